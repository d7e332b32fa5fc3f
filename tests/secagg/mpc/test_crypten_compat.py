"""The CrypTen 0.4.1 compatibility layer: each fix is needed (the unpatched behaviour is shown to fail)
and sufficient (the patched behaviour is right)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import ModuleType
from typing import Any

import pytest
import torch

from fedguard.secagg.mpc import crypten_compat
from fedguard.secagg.mpc.crypten_compat import (
    NEW_REGISTRATION,
    OLD_REGISTRATION,
    CryptenUnavailableError,
    fixed_decode,
    load_crypten,
)

SCALE = 1 << 16


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _crypten_in_fresh_interpreter(body: str) -> dict[str, Any]:
    """Run ``body`` (which sets a JSON-serialisable dict ``result``) with ``crypten = load_crypten()`` in a
    fresh interpreter and return ``result``.

    CrypTen tests run there, not in the test process: :func:`load_crypten` refuses (by design) a process
    that has imported deepspeed, and a pytest worker may have run DeepSpeed tests before these ones.
    """
    code = (
        "import json, torch\n"
        "from fedguard.secagg.mpc.crypten_compat import load_crypten, original_decode\n"
        "crypten = load_crypten()\n"
        f"{textwrap.dedent(body)}\n"
        "print('RESULT ' + json.dumps(result))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.multiprocess
def test_raw_import_fails_without_the_alias_and_succeeds_with_it() -> None:
    # in a fresh interpreter, so this process's alias cannot leak into the check
    out = _python(
        "try:\n    import crypten\nexcept ModuleNotFoundError as err:\n    print('raw failed:', err)\n"
        "from fedguard.secagg.mpc.crypten_compat import load_crypten\n"
        "print('patched:', load_crypten().__version__)\n"
    )
    assert out.returncode == 0, out.stderr
    assert f"raw failed: No module named '{OLD_REGISTRATION}'" in out.stdout
    assert "patched: 0.4.1" in out.stdout


def test_alias_points_at_the_moved_registry() -> None:
    crypten_compat.install_onnx_registration_alias()
    assert sys.modules[OLD_REGISTRATION] is sys.modules[NEW_REGISTRATION]
    assert hasattr(sys.modules[OLD_REGISTRATION], "registry")


@pytest.mark.multiprocess
def test_unpatched_decode_is_exactly_one_too_low_on_a_constructed_value() -> None:
    # t = -(k*S + r) with k + r >= S - 1: 0.4.1 divides by S - 1 and lands one integer too low
    got = _crypten_in_fresh_interpreter(f"""
        enc = crypten.encoder.FixedPointEncoder(precision_bits=16)
        t = torch.tensor([-(1 * {SCALE} + {SCALE - 1})])
        result = {{"wrong": float(original_decode(crypten)(enc, t)), "patched": float(enc.decode(t))}}
    """)
    exact = -131071 / SCALE
    assert got["wrong"] == pytest.approx(exact - 1.0, abs=1e-6)
    assert got["patched"] == pytest.approx(exact, abs=1e-6)  # the installed (patched) decode


@pytest.mark.multiprocess
def test_patched_decode_matches_exact_division_on_many_values() -> None:
    got = _crypten_in_fresh_interpreter(f"""
        enc = crypten.encoder.FixedPointEncoder(precision_bits=16)
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(-(1 << 40), 1 << 40, (200_000,), generator=gen)
        exact = t.double() / {SCALE}
        patched = enc.decode(t).double()
        buggy = original_decode(crypten)(enc, t).double()
        result = {{
            "n": t.numel(),
            # float32 keeps 24 significant bits: exact up to float32 rounding of the result
            "patched_within": int(((patched - exact).abs() <= exact.abs() * 2**-23 + 2**-16).sum()),
            "buggy_off": int(((buggy - exact).abs() > 0.5).sum()),
        }}
    """)
    assert got["patched_within"] == got["n"] == 200_000
    assert got["buggy_off"] > 0  # the bug is real on this sample


def test_fixed_decode_scale_one_returns_integers_unchanged() -> None:
    t = torch.tensor([-(1 << 62), -1, 0, 5, (1 << 62)])
    assert torch.equal(fixed_decode(t, 1), t)


def test_fixed_decode_refuses_float_tensors() -> None:
    with pytest.raises(TypeError, match="integer tensor"):
        fixed_decode(torch.tensor([1.5]), SCALE)


def test_load_crypten_refuses_a_process_with_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", ModuleType("deepspeed"))
    with pytest.raises(CryptenUnavailableError, match="deepspeed"):
        load_crypten()


# -- fix 3: CrypTen's randomness (crypten_rng) ---------------------------------------------------------
def test_stream_generator_is_the_chacha20_keystream_of_its_seed() -> None:
    import numpy as np

    from fedguard.errors import ConfigError
    from fedguard.rng import SecureRNG
    from fedguard.secagg.mpc.crypten_rng import StreamGenerator, seed_to_tensor, tensor_to_seed

    seed = bytes(range(32))
    draws = StreamGenerator(seed, "t").int64((3, 5))
    expected = SecureRNG.from_seed(seed).uint64(15).view(np.int64).reshape(3, 5)
    assert draws.dtype == torch.int64 and np.array_equal(draws.numpy(), expected)
    assert tensor_to_seed(seed_to_tensor(seed)) == seed and seed_to_tensor(seed).shape == (4,)
    with pytest.raises(ConfigError, match="cannot be reseeded"):
        StreamGenerator(seed, "t").manual_seed(0)
    with pytest.raises(ConfigError, match="32-byte seed"):
        StreamGenerator(seed[:8], "t")
    assert "ChaCha20" in repr(StreamGenerator(seed, "t")) and seed.hex()[:8] not in repr(StreamGenerator(seed, "t"))


@pytest.mark.multiprocess
def test_cryptens_sampling_functions_draw_from_stream_generators_everywhere() -> None:
    result = _crypten_in_fresh_interpreter(
        """
        import os
        from scipy import stats
        from fedguard.secagg.mpc.crypten_rng import StreamGenerator
        rng = crypten.common.rng
        names = ("generate_random_ring_element", "generate_kbit_random_tensor")
        modules = ["crypten.mpc.primitives.arithmetic", "crypten.mpc.primitives.binary",
                   "crypten.mpc.provider.ttp_provider", "crypten.mpc.provider.tfp_provider"]
        import importlib
        rebound = all(getattr(importlib.import_module(m), n, getattr(rng, n)) is getattr(rng, n)
                      for m in modules for n in names)
        seed = os.urandom(32)
        a = rng.generate_random_ring_element((1000,), generator=StreamGenerator(seed, "a"))
        b = StreamGenerator(seed, "b").int64((1000,))
        k = rng.generate_kbit_random_tensor((64000,), bitlength=4, generator=StreamGenerator(os.urandom(32), "k"))
        counts = torch.bincount(k, minlength=16).tolist()
        top = rng.generate_random_ring_element((64000,), generator=StreamGenerator(os.urandom(32), "u"))
        top_counts = torch.bincount((top >> 60) & 15, minlength=16).tolist()
        torch_gen = torch.Generator().manual_seed(7)
        falls_through = torch.equal(rng.generate_random_ring_element((8,), generator=torch_gen),
                                    torch.randint(-(2**63), 2**63 - 1, (8,), generator=torch.Generator().manual_seed(7)))
        result = {"rebound": rebound, "patched": rng.generate_random_ring_element.__module__,
                  "same_seed_same_stream": bool(torch.equal(a, b)), "kbit_range": [int(k.min()), int(k.max())],
                  "kbit_p": float(stats.chisquare(counts).pvalue), "top_p": float(stats.chisquare(top_counts).pvalue),
                  "falls_through": bool(falls_through)}
        """
    )
    assert result["rebound"] and result["patched"] == "fedguard.secagg.mpc.crypten_rng"
    assert result["same_seed_same_stream"] and result["falls_through"]
    assert result["kbit_range"] == [0, 15]
    assert result["kbit_p"] > 1e-4 and result["top_p"] > 1e-4  # uniform low 4 bits and top 4 bits

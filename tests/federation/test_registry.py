"""The aggregator registry, the options base class, the round's fixed-point spec and the Aggregator base
lifecycle (close, with, label, check_clients)."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation import (
    AggregatorOptions,
    PlaintextAggregator,
    PlaintextOptions,
    RoundSpec,
    aggregate_updates,
    aggregator_options,
    available_aggregators,
    make_aggregator,
    options_class,
    register_aggregator,
)
from fedguard.federation import registry as registry_module
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate

# one non-default value per option, JSON-plain: what a config file can say
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "plaintext": {"min_clients": 2},
    "masking": {"neighbours": 4, "threshold": 3, "unmask_workers": 2},
    "paillier": {"key_bits": 3072, "key_holder": 1, "max_clients": 40, "min_clients": 4, "workers": 2,
                 "on_bad_input": "exclude", "obfuscator": "djn", "allow_insecure_test_keys": False,
                 "precompute": True, "precompute_background": True},
    "mpc": {"backend": "network", "n_parties": 2, "min_clients": 3, "allow_single_client": False,
            "norm_bound": 2.5, "norm_action": "clip", "clip_halvings": 3, "timeout_s": 12.0,
            "startup_timeout_s": 60.0, "listen": "0.0.0.0:29400", "control_key_file": "control.key",
            "roster_file": None, "identity_files": None, "party_keys_file": None},
}


@pytest.mark.parametrize("module", [
    "fedguard.federation.registry",
    "fedguard.secagg.masking.options",
    "fedguard.secagg.masking.aggregator",
    "fedguard.secagg.paillier.options",
    "fedguard.secagg.mpc.options",
    "fedguard.secagg.mpc.aggregator",
])
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- names ------------------------------------------------------------------------------------------------
def test_the_four_aggregators_are_available_by_name() -> None:
    assert {"plaintext", "masking", "paillier", "mpc"} <= set(available_aggregators())


def test_an_unknown_aggregator_name_names_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown aggregator 'maskng' .*did you mean 'masking'\?"):
        aggregator_options("maskng")
    with pytest.raises(ConfigError, match=r"unknown aggregator 'palier' .*did you mean 'paillier'\?"):
        make_aggregator("palier")


@dataclass(frozen=True, kw_only=True)
class _EchoOptions(AggregatorOptions):
    min_clients: int = 1

    def _problems(self) -> list[str]:
        return [] if self.min_clients >= 1 else [f"min_clients must be >= 1, got {self.min_clients}"]


def _echo_factory(options: _EchoOptions, **runtime: Any) -> PlaintextAggregator:
    return PlaintextAggregator(min_clients=options.min_clients)


def test_a_plug_in_registers_once_and_a_second_registration_is_refused() -> None:
    register_aggregator("echo-test", _EchoOptions, _echo_factory)
    try:
        assert "echo-test" in available_aggregators()
        assert aggregator_options("echo-test", {"min_clients": 2}) == _EchoOptions(min_clients=2)
        assert make_aggregator("echo-test", min_clients=3).min_clients == 3  # type: ignore[attr-defined]
        with pytest.raises(ConfigError, match="an aggregator named 'echo-test' is already registered"):
            register_aggregator("echo-test", _EchoOptions, _echo_factory)
    finally:
        registry_module._REGISTERED.pop("echo-test", None)
    for builtin in ("plaintext", "masking", "paillier", "mpc"):  # built-in names cannot be taken over
        with pytest.raises(ConfigError, match=f"an aggregator named '{builtin}' is already registered"):
            register_aggregator(builtin, _EchoOptions, _echo_factory)


def test_registration_checks_what_it_is_given() -> None:
    with pytest.raises(ConfigError, match="options_class must be an AggregatorOptions subclass"):
        register_aggregator("bad-test", dict, _echo_factory)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="factory must be callable"):
        register_aggregator("bad-test", _EchoOptions, 3)  # type: ignore[arg-type]
    assert "bad-test" not in available_aggregators()


# -- options from a config ----------------------------------------------------------------------------------
def test_a_typo_names_the_nearest_key_and_every_problem_comes_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        aggregator_options("masking", {"neighbors": 4, "threshold": 1, "unmask_workers": True})
    problems = info.value.problems
    assert problems == (
        "unknown key 'aggregator_options.neighbors'; did you mean 'neighbours'?",
        "threshold must be None or an int >= 2, got 1",
        "unmask_workers must be an int >= 1, got True",
    )
    with pytest.raises(ConfigError) as info:
        aggregator_options("paillier", {"key_bit": 3072, "min_client": 2, "obfuscator": "fast"})
    text = str(info.value)
    assert text.startswith("3 problems: ")
    for part in ("unknown key 'aggregator_options.key_bit'; did you mean 'key_bits'?",
                 "unknown key 'aggregator_options.min_client'; did you mean 'min_clients'?",
                 "obfuscator must be one of ('standard', 'djn'), got 'fast'"):
        assert part in text


def test_a_key_with_no_near_match_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'aggregator_options.zzz' \(valid keys: min_clients\)"):
        aggregator_options("plaintext", {"zzz": 1})


def test_options_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="aggregator_options must be a mapping, got list"):
        aggregator_options("masking", [("neighbours", 4)])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_options_round_trip_through_a_json_plain_dict(name: str) -> None:
    default = aggregator_options(name)
    assert isinstance(default, options_class(name))
    assert aggregator_options(name, default.to_dict()) == default
    options = aggregator_options(name, NON_DEFAULT[name])
    plain = options.to_dict()
    assert plain == NON_DEFAULT[name]  # every key, nothing added
    assert aggregator_options(name, json.loads(json.dumps(plain))) == options
    assert aggregator_options(name, options) is options  # already built: passed through


def test_options_are_frozen_and_keyword_only() -> None:
    options = PlaintextOptions(min_clients=2)
    with pytest.raises(AttributeError):
        options.min_clients = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PlaintextOptions(2)  # type: ignore[misc]


def test_checking_options_imports_no_heavy_backend() -> None:
    code = ("import sys\n"
            "from fedguard.federation.registry import aggregator_options\n"
            "for name in ('plaintext', 'masking', 'paillier', 'mpc'):\n"
            "    aggregator_options(name, {})\n"
            "print(sorted(m for m in ('crypten', 'phe', 'gmpy2') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]"


# -- building ---------------------------------------------------------------------------------------------
def test_make_aggregator_takes_options_a_mapping_or_keywords() -> None:
    agg = make_aggregator("masking", neighbours=4)
    assert agg.options == aggregator_options("masking", {"neighbours": 4})
    built = make_aggregator("masking", aggregator_options("masking", {"neighbours": 4}), threshold=4)
    assert (built.options.neighbours, built.options.threshold) == (4, 4)  # type: ignore[union-attr]
    assert make_aggregator("plaintext", {"min_clients": 2}).options == PlaintextOptions(min_clients=2)
    with pytest.raises(ConfigError, match="aggregator 'masking' takes MaskingOptions, got PlaintextOptions"):
        make_aggregator("masking", PlaintextOptions())
    with pytest.raises(ConfigError, match="unknown key 'neighbors'; did you mean 'neighbours'"):
        make_aggregator("masking", neighbors=4)  # not an option, not a runtime argument either


def test_constructors_take_the_options_object_too() -> None:
    from fedguard.secagg.masking import MaskingAggregator, MaskingOptions

    assert MaskingAggregator(MaskingOptions(neighbours=4)).neighbours == 4
    assert MaskingAggregator(neighbours=4).options == MaskingOptions(neighbours=4)
    assert PlaintextAggregator(PlaintextOptions(min_clients=2), min_clients=3).min_clients == 3


# -- the aggregator base: close, with, label, check_clients ---------------------------------------------------
@pytest.mark.parametrize("name", ["plaintext", "masking"])
def test_close_is_idempotent_and_with_closes(name: str) -> None:
    with make_aggregator(name) as agg:
        assert agg.label == name
    agg.close()
    agg.close()


def test_check_clients_turns_a_threshold_refusal_into_a_config_error() -> None:
    make_aggregator("masking").check_clients(3)
    with pytest.raises(ConfigError, match=r"aggregator 'masking' cannot run a round with 3 clients: "
                                          r"neighbours=4 must be in \[1, n-1\] = \[1, 2\] for n=3 clients"):
        make_aggregator("masking", neighbours=4).check_clients(3)
    with pytest.raises(ConfigError, match="neighbours=3 with n=3 clients|neighbours=3 must be in"):
        make_aggregator("masking", neighbours=3).check_clients(3)
    with pytest.raises(ConfigError, match="aggregator_options.neighbours"):
        make_aggregator("masking", neighbours=5).check_clients(5)
    with pytest.raises(ConfigError, match="pairwise masking needs at least 2 clients, got 1"):
        make_aggregator("masking").check_clients(1)
    with pytest.raises(ConfigError, match="n_clients must be an int >= 1, got 0"):
        make_aggregator("masking").check_clients(0)


def test_check_clients_of_plaintext_and_paillier_name_min_clients() -> None:
    make_aggregator("plaintext").check_clients(1)
    with pytest.raises(ConfigError, match="needs at least min_clients=3 clients, got 2"):
        make_aggregator("plaintext", min_clients=3).check_clients(2)
    paillier = make_aggregator("paillier", key_bits=512, allow_insecure_test_keys=True)
    paillier.check_clients(3)
    with pytest.raises(ConfigError, match=r"aggregator 'paillier' needs at least min_clients=3 clients, got 2 "
                                          r"\(a decrypted sum must include the key holder and 2 others"):
        paillier.check_clients(2)
    with pytest.raises(ConfigError, match="sized for max_clients=4, got 5 clients"):
        make_aggregator("paillier", key_bits=512, allow_insecure_test_keys=True, max_clients=4).check_clients(5)
    assert paillier.label == "paillier (insecure 512-bit test keys)"
    assert make_aggregator("paillier").label == "paillier"


# -- the fixed-point spec travels in the round ----------------------------------------------------------------
SPEC = FixedPointSpec(clip=1.0, value_bits=8, ring_bits=32, max_weight=100)


def test_round_spec_carries_a_checked_fixed_point_spec() -> None:
    spec = RoundSpec(1, (0, 1, 2), 5, 32, fixed_point=SPEC)
    assert spec.fixed_point == SPEC and RoundSpec(1, (0, 1), 5).fixed_point is None
    with pytest.raises(ConfigError, match="fixed_point.ring_bits=32 differs from the round's ring_bits=64"):
        RoundSpec(1, (0, 1), 5, 64, fixed_point=SPEC)
    with pytest.raises(ConfigError, match="fixed_point must be a FixedPointSpec or None, got dict"):
        RoundSpec(1, (0, 1), 5, 32, fixed_point={"clip": 1.0})  # type: ignore[arg-type]
    tight = FixedPointSpec(clip=1.0, value_bits=8, ring_bits=16, max_weight=100)
    with pytest.raises(ConfigError, match=r"fixed_point: 3 clients with max_weight=100 .*need ring_bits"):
        RoundSpec(1, (0, 1, 2), 5, 16, fixed_point=tight)
    with pytest.raises(ConfigError) as info:  # collected with the other problems
        RoundSpec(-1, (0, 0), 0, 32, fixed_point=SPEC)
    assert len(info.value.problems) == 3


class _Spy(PlaintextAggregator):
    seen: list[RoundSpec]

    def server(self, spec: RoundSpec, **kw: Any) -> Any:
        self.seen.append(spec)
        return super().server(spec, **kw)


def test_aggregate_updates_puts_its_spec_in_the_round_unless_a_custom_encoder_may_exceed_it() -> None:
    rng = SecureRNG.for_testing("spy")
    updates = [ClientUpdate(c, 0, (rng.normal(6) * 0.3).astype(np.float32), 2) for c in range(3)]
    spy = _Spy()
    spy.seen = []
    aggregate_updates(updates, spy, SPEC, round_id=0, rng=rng)
    assert spy.seen[-1].fixed_point == SPEC

    def noisy(update: ClientUpdate, quantise_rng: SecureRNG) -> np.ndarray:
        return np.zeros(update.vector.size + 1, dtype=np.uint64) + np.uint64(1)

    aggregate_updates(updates, spy, SPEC, round_id=0, rng=rng, encoder=noisy)
    assert spy.seen[-1].fixed_point is None


def test_masking_signed_is_registered_with_checked_options(tmp_path: Any) -> None:
    from fedguard.identity import Identity, Roster
    from fedguard.secagg.masking.options import SignedMaskingOptions

    assert "masking-signed" in available_aggregators()
    with pytest.raises(ConfigError, match="unknown key 'aggregator_options.roster'; did you mean 'roster_file'"):
        aggregator_options("masking-signed", {"roster": "r.json"})
    with pytest.raises(ConfigError, match="max_corrupt must be an int >= 0"):
        aggregator_options("masking-signed", {"max_corrupt": -1})
    with pytest.raises(ConfigError, match="identity_files do not exist: client 1"):
        aggregator_options("masking-signed", {"identity_files": {1: str(tmp_path / "none.key")}})
    identities = {c: Identity.generate(c) for c in range(3)}
    paths = {c: identities[c].save(tmp_path / f"{c}.key") for c in identities}
    roster = Roster.of(identities, "registry-test").save(tmp_path / "r.json")
    options = {"roster_file": str(roster), "identity_files": {str(c): str(p) for c, p in paths.items()}}
    opts = aggregator_options("masking-signed", options)
    assert isinstance(opts, SignedMaskingOptions) and opts.identity_files == {c: str(p) for c, p in paths.items()}
    assert type(opts).from_dict(json.loads(json.dumps(opts.to_dict()))) == opts  # a checkpointed config reads back equal
    with make_aggregator("masking-signed", opts) as agg:
        spec = RoundSpec(1, (0, 1, 2), 4)
        agg.check_round(spec)
        rng = np.random.default_rng(0)
        updates = [ClientUpdate(c, 1, (0.1 * rng.normal(size=3)).astype(np.float32), 1) for c in range(3)]
        out = aggregate_updates(updates, agg, FixedPointSpec(), round_id=1)
        assert out.contributors == (0, 1, 2)
        np.testing.assert_allclose(out.mean, np.mean([u.vector for u in updates], axis=0), atol=1e-5)

"""The release guard of distributed DP: no sum with fewer clients' noise than planned is ever decoded.

The attacker is the server of issue 13: with masking (3 clients, threshold 2, min_survivors 3) it lets one
client drop and decodes a sum carrying 2/3 of the planned noise variance. Here that configuration is
refused at construction, and the round-level guard (``RoundSpec.min_contributors``) aborts such a round
before decoding even when the construction check is bypassed; the write-ahead record of the aborted round
is retracted, so the ledger holds no release that never happened.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedguard.dp import PrivacyAccountant
from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.federation.registry import make_aggregator
from fedguard.federation.round import ClientResult, run_round
from fedguard_train.privacy import ClientDPHook

D = 2000
SECTION = {"placement": "distributed", "clip_norm": 0.05, "noise_multiplier": 0.5, "target_delta": 1e-3,
           "value_bits": 16}


def _hook(n: int, min_survivors: int, ledger: Path | None = None) -> ClientDPHook:
    hook = ClientDPHook({**SECTION, "min_survivors": min_survivors}, n_clients=n, aggregator="masking",
                        ledger_path=ledger)
    hook.on_layout(D)
    return hook


def _zero_step(client: int, start: np.ndarray) -> ClientResult:
    return ClientResult(np.zeros(D, dtype=np.float32), 1, 0.0)


def test_example_setting_is_refused_at_construction_with_the_numbers() -> None:
    # examples/homo_lora_private.yaml before the fix: masking, 3 clients, default threshold 2, min_survivors 3
    hook = _hook(3, 3)
    agg = make_aggregator("masking")
    assert agg.threshold(3) == 2
    with pytest.raises(ConfigError, match=r"min_survivors=3.*as few as 2 of 3 clients.*threshold >= 3"):
        hook.check_aggregator(agg, 3)
    hook.check_aggregator(make_aggregator("masking", {"threshold": 3}), 3)  # the example's setting now
    assert hook.min_contributors == 3


def test_one_dropout_aborts_before_decoding_and_the_ledger_keeps_no_phantom_release(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    hook = _hook(3, 3, ledger)
    agg = make_aggregator("masking", {"threshold": 2})  # the construction check bypassed on purpose
    decoded: list[int] = []
    original = hook.aggregate

    def spy(round_id: int, mean: np.ndarray, contributors: tuple[int, ...]) -> np.ndarray:
        decoded.append(round_id)
        return original(round_id, mean, contributors)

    hook.aggregate = spy  # type: ignore[method-assign]
    with pytest.raises(ProtocolAbort, match="min_contributors=3") as info:
        run_round(1, np.zeros(D, np.float32), range(3), _zero_step, agg, hook.dp.fixed_point_spec(), hooks=hook,
                  drop_at={2: "mask"}, min_contributors=hook.min_contributors)
    assert decoded == [] and info.value.nothing_revealed
    # the write-ahead record was on disk during the round; the trainer retracts it on this abort
    assert len(PrivacyAccountant.load(ledger).ledger) == 1
    hook.on_round_aborted(1, info.value)
    assert PrivacyAccountant.load(ledger).ledger == ()
    assert hook.dp.accountant is not None and hook.dp.accountant.epsilon() == 0.0
    # the same round then runs with every client and is accounted once
    run_round(1, np.zeros(D, np.float32), range(3), _zero_step, agg, hook.dp.fixed_point_spec(), hooks=hook,
              min_contributors=hook.min_contributors)
    assert decoded == [1] and len(PrivacyAccountant.load(ledger).ledger) == 1


def test_an_abort_after_a_party_may_have_decoded_keeps_the_record(tmp_path: Path) -> None:
    # e.g. a Paillier key holder that decrypted the sum, then refused an overfull slot: that party saw a
    # release, so the write-ahead record stays (over-counting is safe, under-counting is not)
    ledger = tmp_path / "ledger.json"
    hook = _hook(3, 3, ledger)
    hook.on_round_start(1, (0, 1, 2))
    assert len(PrivacyAccountant.load(ledger).ledger) == 1
    hook.on_round_aborted(1, ProtocolAbort("key holder decrypted and refused the sum", round_id=1, stage="decrypt"))
    assert len(PrivacyAccountant.load(ledger).ledger) == 1
    hook.on_round_aborted(1, ProtocolAbort("too few", round_id=1, nothing_revealed=True))  # nothing pending now
    assert len(PrivacyAccountant.load(ledger).ledger) == 1


@pytest.mark.parametrize("case", range(10))
def test_random_dropouts_are_refused_or_released_with_at_least_the_planned_noise(case: int) -> None:
    """Property: for random (clients, threshold, min_survivors, dropouts) either the configuration is refused,
    the round aborts before decoding, or the decoded noise has std >= the planned one (statistical test
    over D coordinates of an all-zero update: the decoded sum is the noise alone)."""
    rnd = np.random.default_rng(1300 + case)
    n = int(rnd.integers(3, 7))
    threshold = int(rnd.integers(n // 2 + 1, n + 1))
    min_survivors = int(rnd.integers(2, n + 1))
    dropped = {int(c): "mask" for c in rnd.choice(n, size=int(rnd.integers(0, n - 1)), replace=False)}
    hook = _hook(n, min_survivors)
    agg = make_aggregator("masking", {"threshold": threshold})
    if threshold < min_survivors:
        with pytest.raises(ConfigError, match=f"min_survivors={min_survivors}"):
            hook.check_aggregator(agg, n)
    else:
        hook.check_aggregator(agg, n)
    survivors = n - len(dropped)
    spec = hook.dp.fixed_point_spec()
    try:
        result = run_round(1, np.zeros(D, np.float32), range(n), _zero_step, agg, spec, hooks=hook,
                           drop_at=dropped, min_contributors=hook.min_contributors)
    except ProtocolAbort:
        assert survivors < max(min_survivors, threshold)
        assert hook._last is None  # nothing decoded, nothing finalized
        return
    assert survivors >= min_survivors
    released = hook._last
    total_int = released.update.astype(np.float64) * released.participants * spec.scale
    mechanism = hook.dp.distributed_mechanism(D)
    planned = mechanism.local_stddev * math.sqrt(min_survivors)
    # sample std of D i.i.d. draws: relative standard error ~ 1/sqrt(2D) = 1.6%; allow 5 of them
    assert float(np.std(total_int)) >= planned * (1 - 5 / math.sqrt(2 * D))
    assert result.contributors == tuple(c for c in range(n) if c not in dropped)


@pytest.mark.parametrize(("name", "option", "default"), [("paillier", "min_clients", 3), ("mpc", "min_clients", 2)])
def test_paillier_and_mpc_thresholds_are_checked_too(name: str, option: str, default: int) -> None:
    hook = ClientDPHook({**SECTION, "min_survivors": 4}, n_clients=4, aggregator=name)
    agg = make_aggregator(name)
    try:
        assert agg.threshold(4) == default
        with pytest.raises(ConfigError, match=rf"min_survivors=4.*as few as {default} of 4.*{option} >= 4"):
            hook.check_aggregator(agg, 4)
    finally:
        agg.close()
    agg = make_aggregator(name, {option: 4})
    try:
        hook.check_aggregator(agg, 4)
    finally:
        agg.close()


def test_signed_masking_names_its_threshold_option(tmp_path: Path) -> None:
    from fedguard.identity import Identity, Roster

    identities = {c: Identity.generate(c) for c in range(3)}
    for c, ident in identities.items():
        ident.save(tmp_path / f"client-{c}.identity")
    Roster.of(identities, "guard-test").save(tmp_path / "roster.json")
    options = {"roster_file": str(tmp_path / "roster.json"),
               "identity_files": str(tmp_path / "client-{client}.identity")}
    hook = _hook(3, 3)
    with pytest.raises(ConfigError, match=r"as few as 2 of 3 clients.*aggregator_options\.threshold >= 3"):
        hook.check_aggregator(make_aggregator("masking-signed", options), 3)
    hook.check_aggregator(make_aggregator("masking-signed", {**options, "threshold": 3}), 3)

"""Ownership decisions with a statistical guarantee: :class:`Detection` and the exact binomial test.

The null hypothesis H0 is "this model was not trained with this key". A key's secret (signature bits,
or trigger responses) is drawn uniformly at random *independently of the model* under H0, so:

* sign watermark: each extracted bit agrees with the uniform ±1 key bit with probability exactly 1/2,
  independently across bits, whatever the model's parameters are (a bit extracted as exactly 0 counts as
  a disagreement, which only makes the test conservative): ``matched ~ Binomial(N, 1/2)``;
* backdoor watermark: the model's greedy answer to a trigger equals a uniform random response of
  ``L`` tokens over an alphabet of ``V`` tokens with probability at most ``V^-L``:
  ``matched`` is stochastically dominated by ``Binomial(T, V^-L)``.

The p-value is the exact upper tail ``P[X ≥ matched]`` (``scipy.stats.binom.sf``), and ownership is
claimed when ``p ≤ significance`` (default 1e-6). FedIPR itself reports a bit match rate without a
decision rule; the test here gives a false-claim probability of at most ``significance`` per key tried.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy.stats import binom

from fedguard.checks import check_number
from fedguard.errors import ConfigError

DEFAULT_SIGNIFICANCE = 1e-6


def binomial_p_value(matched: int, n: int, p_null: float = 0.5) -> float:
    """``P[Binomial(n, p_null) ≥ matched]``, exact."""
    if n < 0 or not 0 <= matched <= n:
        raise ConfigError(f"need 0 <= matched <= n, got matched={matched}, n={n}")
    check_number("p_null", p_null, low=0, high=1, low_open=True, high_open=True)
    if matched == 0:
        return 1.0
    return float(binom.sf(matched - 1, n, p_null))


def check_significance(significance: float) -> float:
    """``significance`` as a float in (0, 1), or :class:`ConfigError`."""
    return check_number("significance", significance, low=0, high=1, low_open=True, high_open=True)


@dataclass(frozen=True, slots=True)
class BlockAgreement:
    """Bits matched within one target block (or one trigger for a backdoor key)."""

    label: str
    bits: int
    matched: int

    @property
    def agreement(self) -> float:
        return self.matched / self.bits if self.bits else math.nan


@dataclass(frozen=True, slots=True)
class Detection:
    """The outcome of verifying one key against one model.

    ``verdict`` is True (ownership claimed) iff ``p_value <= significance``.
    """

    key_id: str
    owner: str
    scheme: str
    bits: int
    matched: int
    p_value: float
    significance: float
    p_null: float = 0.5
    blocks: tuple[BlockAgreement, ...] = field(default_factory=tuple)

    @property
    def bit_error_rate(self) -> float:
        return 1.0 - self.matched / self.bits if self.bits else math.nan

    @property
    def verdict(self) -> bool:
        return self.p_value <= self.significance

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["blocks"] = [asdict(b) for b in self.blocks]
        out["bit_error_rate"] = self.bit_error_rate
        out["verdict"] = self.verdict
        return out

    def summary(self) -> str:
        who = self.owner or self.key_id
        claim = "OWNERSHIP CLAIMED" if self.verdict else "no claim"
        return (f"{who}: {self.matched}/{self.bits} {'bits' if self.scheme == 'sign' else 'triggers'} matched, "
                f"p = {self.p_value:.3g} (significance {self.significance:g}) -> {claim}")


def detection(
    *,
    key_id: str,
    owner: str,
    scheme: str,
    bits: int,
    matched: int,
    significance: float = DEFAULT_SIGNIFICANCE,
    p_null: float = 0.5,
    blocks: tuple[BlockAgreement, ...] = (),
) -> Detection:
    """Build a :class:`Detection`, computing the exact binomial p-value."""
    significance = check_significance(significance)
    return Detection(key_id, owner, scheme, bits, matched, binomial_p_value(matched, bits, p_null),
                     significance, p_null, blocks)

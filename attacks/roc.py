"""ROC metrics of a membership-inference score, with bootstrap confidence intervals (pure numpy).

A score ``s(x)`` is larger for examples the attacker believes are members. With members ``M`` and
non-members ``N`` (disjoint, same distribution):

* AUC ``= P(s(m) > s(n)) + ½ P(s(m) = s(n))`` (the Mann-Whitney U statistic over ``|M|·|N|``);
* ``TPR@α``: the largest true-positive rate among thresholds whose false-positive rate is ``<= α``
  (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022, argue for this
  low-FPR reading over AUC). With ``|N|`` non-members the smallest non-zero FPR is ``1/|N|``: below it
  ``TPR@α`` is the TPR at *zero* false positives, which the report states (``fpr_resolution``).
* Confidence intervals: the percentile bootstrap, resampling members and non-members separately
  (``n_boot`` draws, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedguard.errors import ConfigError

FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The Mann-Whitney AUC (ties count ½)."""
    m, n = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    both = np.concatenate([m, n])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.concatenate([members, nonmembers]).astype(np.float64)
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(labels)[distinct]
    fp = np.cumsum(1 - labels)[distinct]
    tpr = np.r_[0.0, tp / max(len(members), 1)]
    fpr = np.r_[0.0, fp / max(len(nonmembers), 1)]
    return fpr, tpr


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, alpha: float) -> float:
    """Largest TPR over thresholds with FPR <= ``alpha``."""
    fpr, tpr = roc_curve(members, nonmembers)
    ok = fpr <= alpha + 1e-12
    return float(tpr[ok].max())


@dataclass(frozen=True, slots=True)
class RocSummary:
    """One attack's ROC with bootstrap intervals (``ci``: (low, high) at ``confidence``)."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at: dict[float, float]
    tpr_ci: dict[float, tuple[float, float]]
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    n_members: int = 0
    n_nonmembers: int = 0
    confidence: float = 0.95

    @property
    def fpr_resolution(self) -> float:
        """The smallest non-zero false-positive rate measurable with these non-members."""
        return 1.0 / max(self.n_nonmembers, 1)

    def to_json(self) -> dict[str, Any]:
        return {"auc": self.auc, "auc_ci": list(self.auc_ci),
                "tpr_at_fpr": {str(a): v for a, v in self.tpr_at.items()},
                "tpr_at_fpr_ci": {str(a): list(v) for a, v in self.tpr_ci.items()},
                "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
                "fpr_resolution": self.fpr_resolution, "confidence": self.confidence}


def summarize(members: Sequence[float] | np.ndarray, nonmembers: Sequence[float] | np.ndarray, *,
              levels: Sequence[float] = FPR_LEVELS, n_boot: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> RocSummary:
    """AUC and TPR at each FPR level, each with a percentile-bootstrap interval."""
    m = np.asarray(members, dtype=np.float64)
    n = np.asarray(nonmembers, dtype=np.float64)
    problems = []
    if m.size < 2 or n.size < 2:
        problems.append(f"need at least 2 members and 2 non-members, got {m.size} and {n.size}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        problems.append("membership scores must be finite")
    if not 0 < confidence < 1:
        problems.append(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        problems.append(f"n_boot must be >= 1, got {n_boot}")
    if problems:
        raise ConfigError.collect(problems)
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    tprs = {a: np.empty(n_boot) for a in levels}
    for b in range(n_boot):
        mb = m[rng.integers(0, m.size, m.size)]
        nb = n[rng.integers(0, n.size, n.size)]
        aucs[b] = auc(mb, nb)
        for a in levels:
            tprs[a][b] = tpr_at_fpr(mb, nb, a)
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    fpr, tpr = roc_curve(m, n)
    return RocSummary(
        auc=auc(m, n), auc_ci=(float(np.percentile(aucs, lo)), float(np.percentile(aucs, hi))),
        tpr_at={a: tpr_at_fpr(m, n, a) for a in levels},
        tpr_ci={a: (float(np.percentile(tprs[a], lo)), float(np.percentile(tprs[a], hi))) for a in levels},
        fpr=fpr, tpr=tpr, n_members=int(m.size), n_nonmembers=int(n.size), confidence=confidence)

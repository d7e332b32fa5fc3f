"""Options of ``aggregator: masking`` (SecAgg / SecAgg+): a light module, checkable without cryptography.

>>> MaskingOptions(neighbours=4).to_dict()
{'neighbours': 4, 'threshold': None, 'unmask_workers': 1}
>>> MaskingOptions(neighbours=4, threshold=2)
Traceback (most recent call last):
...
fedguard.errors.ConfigError: threshold t=2 must exceed half of the k=5 share holders (2t > k, so t >= 3; neighbours=4): otherwise a server could collect t shares of both a client's self-mask seed and its masking key from disjoint holders
"""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.checks import int_problem
from fedguard.federation.protocol import AggregatorOptions

__all__ = ["MaskingOptions", "threshold_problems"]


def threshold_problems(threshold: int, neighbours: int, where: str = "") -> list[str]:
    """Why Shamir threshold ``t`` does not fit ``k = neighbours + 1`` share holders (``k/2 < t <= k``)."""
    k = neighbours + 1
    problems = []
    if threshold > k:
        problems.append(
            f"threshold t={threshold} exceeds the k={k} share holders of each client "
            f"(k = neighbours + 1 with neighbours={neighbours}{where}): shares could never be combined"
        )
    if 2 * threshold <= k:
        problems.append(
            f"threshold t={threshold} must exceed half of the k={k} share holders (2t > k, so t >= {k // 2 + 1}; "
            f"neighbours={neighbours}{where}): otherwise a server could collect t shares of both a client's "
            f"self-mask seed and its masking key from disjoint holders"
        )
    return problems


@dataclass(frozen=True, kw_only=True)
class MaskingOptions(AggregatorOptions):
    """Options of :class:`~fedguard.secagg.masking.aggregator.MaskingAggregator`.

    Attributes:
        neighbours: ``d``, how many other clients each client masks with and shares its secrets to.
            ``None`` (default): all of them, ``d = n - 1`` (classic SecAgg). An int: the Harary graph
            ``H_{d,n}`` on a random permutation (SecAgg+; choose ``d = O(log n)``, e.g. 10 for 100
            clients); a round needs ``2 <= d <= n - 1`` and ``n·d`` even (``d = 1`` only for ``n = 2``:
            otherwise the graph is disjoint pairs and each pair's sum would be revealed).
        threshold: ``t``, the Shamir threshold, with ``k/2 < t <= k`` for ``k = d + 1`` holders.
            ``None`` (default): ``⌊k/2⌋ + 1``, which survives the most dropouts.
        unmask_workers: processes the server uses to regenerate masks in the unmask stage (1: none
            spawned). Worth it when a round has thousands of masks to regenerate (classic SecAgg, large n).
    """

    neighbours: int | None = None
    threshold: int | None = None
    unmask_workers: int = 1

    def _problems(self) -> list[str]:
        problems = [p for p in (
            int_problem("neighbours", self.neighbours, low=1, optional=True),
            int_problem("threshold", self.threshold, low=2, optional=True),
            int_problem("unmask_workers", self.unmask_workers, low=1),
        ) if p]
        if not problems and self.neighbours is not None and self.threshold is not None:
            problems += threshold_problems(self.threshold, self.neighbours)
        return problems

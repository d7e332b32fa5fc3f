"""Options of ``aggregator: masking`` (SecAgg / SecAgg+) and ``aggregator: masking-signed`` (against an active
server): a light module, checkable without cryptography.

>>> MaskingOptions(neighbours=4).to_dict()
{'neighbours': 4, 'threshold': None, 'unmask_workers': 1}
>>> MaskingOptions(neighbours=4, threshold=2)
Traceback (most recent call last):
...
fedguard.errors.ConfigError: threshold t=2 must exceed half of the k=5 share holders (2t > k, so t >= 3; neighbours=4): otherwise a server could collect t shares of both a client's self-mask seed and its masking key from disjoint holders
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedguard.checks import int_problem
from fedguard.federation.protocol import AggregatorOptions
from fedguard.secagg.identity_files import (
    identity_files_problem,
    missing_identity_files,
    normalise_identity_files,
)

__all__ = ["MaskingOptions", "SignedMaskingOptions", "threshold_problems"]


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


@dataclass(frozen=True, kw_only=True)
class SignedMaskingOptions(MaskingOptions):
    """Options of ``aggregator: masking-signed``
    (:class:`~fedguard.secagg.masking.signed.SignedMaskingAggregator`, SecAgg against an active server):
    the masking options plus where the roster and the clients' identities are.

    Attributes:
        roster_file: the roster every client received out of band (``fedguard roster add``): client ids,
            Ed25519 public keys and fingerprints. Required (unless the aggregator is given a ``roster=``
            object at run time); the file must exist.
        identity_files: where the signing identities (``fedguard keygen identity``, mode 0600) of the
            clients this process plays are: a path template with ``{client}``
            (``"keys/client-{client}.identity"``) or a mapping ``{client id: path}``. A simulation plays
            every client and needs every participant's; a missing one is a :class:`ConfigError` naming
            the client. ``None``: a server-only process (it signs nothing).
        max_corrupt: ``c``, how many corrupt clients the consistency round withstands (a client reveals
            only with ``max(t, ⌊(n + c)/2⌋ + 1)`` signatures on its survivor set).
    """

    roster_file: str | None = None
    identity_files: str | Mapping[Any, str] | None = None
    max_corrupt: int = 0

    def __post_init__(self) -> None:
        # one spelling for {0: path} and JSON's {"0": path}: a config read back from a checkpoint is equal
        object.__setattr__(self, "identity_files", normalise_identity_files(self.identity_files))
        super().__post_init__()

    def _problems(self) -> list[str]:
        problems = super()._problems()
        problem = int_problem("max_corrupt", self.max_corrupt, low=0)
        if problem:
            problems.append(problem)
        if self.roster_file is not None:
            if not isinstance(self.roster_file, str) or not self.roster_file:
                problems.append(f"roster_file must be a file path, got {self.roster_file!r}")
            elif not Path(self.roster_file).is_file():
                problems.append(f"roster_file {self.roster_file!r} does not exist (create it with "
                                "`fedguard roster add`)")
        if self.identity_files is not None:
            problem = identity_files_problem(self.identity_files) or missing_identity_files(self.identity_files)
            if problem:
                problems.append(problem)
        return problems

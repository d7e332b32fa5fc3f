"""Canaries for the one-run DP audit: who is in, client canaries (random update directions) and example
canaries (random token sequences).

Membership. Each of the ``m`` canaries is included independently with probability ½ (Steinke, Nasr,
Jagielski 2023, Algorithm 1): :func:`draw_membership`. The draw, the directions and the token sequences
come from a :class:`~fedguard.rng.SecureRNG` (OS entropy by default; a seeded one in tests), never from
the run's seed, which the mechanism sees.

Client canaries (Andrew, Kairouz, Oh, Oprea, McMahan, Xu, "One-shot empirical privacy estimation for
federated learning", ICLR 2024). Canary client ``i`` sends the same update ``c·u_i`` every round it takes
part in, with ``u_i`` a random unit vector of the travelling dimension ``d`` and ``c`` the clip norm (times
``norm_factor``; a factor above 1 also exercises clipping: a correct mechanism clips the canary back to
``C``). The score of canary ``i`` is ``⟨θ_R − θ_0, u_i⟩``: an included canary moves the final model by
``≈ R·C/n`` along ``u_i``, an excluded one only by noise and cross-talk. When ``m·d`` is small enough the
``m`` directions are made orthonormal (QR of a Gaussian matrix, uniform on the Stiefel manifold), which
removes the cross-talk ``⟨u_i, u_j⟩`` between canaries; otherwise they are independent uniform unit
vectors (cross-talk ``≈ √(m/2d)·C`` per round), regenerated from per-canary seeds to keep memory ``O(d)``.

Example canaries (Steinke et al. §6, input-space canaries). Random token sequences drawn uniformly from
the tokenizer's ordinary tokens; a canary that was trained on has a lower loss than under the base model,
an excluded one does not. Score: ``loss_base(x_i) − loss_final(x_i)`` (higher = more likely in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedguard.checks import check_int, check_number
from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG

__all__ = ["MATRIX_LIMIT", "ClientCanaries", "draw_membership", "random_token_sequences"]

MATRIX_LIMIT = 50_000_000
"""Largest ``m·d`` for which the directions are stored (float32, 200 MB) and orthonormalised."""


def draw_membership(m: int, rng: SecureRNG) -> np.ndarray:
    """``m`` independent fair coins: ``True`` = the canary is included."""
    check_int("canaries", m, low=1)
    return rng.uniform01(m) < 0.5


@dataclass(frozen=True, slots=True)
class _Spec:
    m: int
    dimension: int
    norm: float


class ClientCanaries:
    """``m`` canary clients with ids ``first_id .. first_id + m − 1``, their directions and membership.

    Args:
        m: number of canaries.
        dimension: ``d``, the travelling vector's length.
        norm: ``c``, the L2 norm of each canary update (the clip norm times a factor).
        first_id: the first canary's client id (the real clients are ``0 .. first_id − 1``).
        rng: the source of directions and membership (default: OS entropy).
        included: the membership drawn beforehand (:func:`draw_membership`; default: drawn here from ``rng``).
    """

    def __init__(self, m: int, dimension: int, norm: float, *, first_id: int, rng: SecureRNG | None = None,
                 included: np.ndarray | None = None) -> None:
        self.spec = _Spec(check_int("canaries", m, low=2), check_int("dimension", dimension, low=1),
                          check_number("canary norm", norm, low=0.0, low_open=True))
        self.first_id = check_int("first_id", first_id, low=0)
        rng = rng if rng is not None else SecureRNG()
        if included is None:
            included = draw_membership(m, rng.spawn("membership"))
        included = np.asarray(included)
        if included.shape != (m,) or included.dtype != np.bool_:
            raise ConfigError(f"included must be a boolean array of shape ({m},), got {included.dtype} {included.shape}")
        self.included = included.copy()
        self._seeds = rng.spawn("directions")
        self._matrix: np.ndarray | None = None
        self.orthonormal = False
        if m * dimension <= MATRIX_LIMIT:
            g = self._seeds.normal(m * dimension).reshape(dimension, m)
            if m <= dimension:
                q, r = np.linalg.qr(g)  # sign fix: Haar-distributed orthonormal columns
                q = q * np.sign(np.diag(r))
                self.orthonormal = True
                self._matrix = np.ascontiguousarray(q.T, dtype=np.float32)
            else:
                self._matrix = (g / np.linalg.norm(g, axis=0)).T.astype(np.float32)

    @property
    def m(self) -> int:
        return self.spec.m

    @property
    def ids(self) -> range:
        return range(self.first_id, self.first_id + self.spec.m)

    @property
    def included_ids(self) -> list[int]:
        return [self.first_id + i for i in np.flatnonzero(self.included).tolist()]

    def is_canary(self, client_id: int) -> bool:
        return self.first_id <= client_id < self.first_id + self.spec.m

    def direction(self, index: int) -> np.ndarray:
        """Unit vector ``u_index`` (float32)."""
        check_int("canary index", index, low=0, high=self.spec.m - 1)
        if self._matrix is not None:
            return self._matrix[index]
        v = self._seeds.spawn(f"canary/{index}").normal(self.spec.dimension)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def update(self, client_id: int) -> np.ndarray:
        """The update canary client ``client_id`` sends every round: ``c·u_i``."""
        if not self.is_canary(client_id):
            raise ConfigError(f"client {client_id} is not a canary (canaries are {self.ids.start}..{self.ids.stop - 1})")
        return (self.spec.norm * self.direction(client_id - self.first_id)).astype(np.float32)

    def scores(self, model_delta: np.ndarray) -> np.ndarray:
        """``⟨θ_R − θ_0, u_i⟩`` for every canary (float64)."""
        delta = np.asarray(model_delta, dtype=np.float64)
        if delta.shape != (self.spec.dimension,):
            raise ConfigError(f"model delta must have shape ({self.spec.dimension},), got {delta.shape}")
        if self._matrix is not None:
            return self._matrix.astype(np.float64) @ delta
        return np.array([float(self.direction(i).astype(np.float64) @ delta) for i in range(self.spec.m)])


def random_token_sequences(m: int, length: int, vocabulary: Sequence[int], rng: SecureRNG) -> np.ndarray:
    """``m`` sequences of ``length`` tokens drawn uniformly (with replacement) from ``vocabulary`` (int64)."""
    check_int("canaries", m, low=1)
    check_int("canary length", length, low=2)
    vocab = np.asarray(list(vocabulary), dtype=np.int64)
    if vocab.size < 2:
        raise ConfigError(f"the canary vocabulary needs at least 2 tokens, got {vocab.size}")
    idx = rng.integers_below(m * length, int(vocab.size))
    return vocab[np.asarray(idx, dtype=np.int64)].reshape(m, length)

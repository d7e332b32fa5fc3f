"""How many watermark bits K clients can embed into M target parameters (FedIPR's capacity bound).

FedIPR (Li, Fan, Gu, Li, Yang, TPAMI 2022) embeds client k's bits with ``sign(E_kᵀθ) = b_k`` into the
*same* aggregated parameters θ ∈ R^M. Stacking the K projections gives one linear system of
``P = Σ_k N_k`` sign constraints on M unknowns, and FedIPR's capacity analysis states that all K
watermarks can be embedded and detected with 100% accuracy when ``Σ_k N_k ≤ M``; beyond it, watermarks
of different clients conflict and detection degrades.

Why, exactly: the columns of random Gaussian projections are in general position, so for ``P ≤ M`` they
are linearly independent and ``Eᵀθ = target`` is solvable for every target, i.e. every sign pattern is
realisable (with any margin, by scaling). For ``P > M``, Cover's function-counting theorem (Cover 1965)
counts the realisable patterns: ``C(P, M) = 2 Σ_{i<M} binom(P-1, i)`` of the ``2^P``, a fraction
``F(P, M) = BinomCDF(M-1; P-1, 1/2)`` that falls quickly once P exceeds 2M. The planner reports F.

Keys here are block-diagonal (each bit reads one target block), so the bound is checked per block:
``K · N_i ≤ D_i`` for the bits ``N_i`` a client puts into block i of dimension ``D_i``.

The other side of the plan: a verdict at significance α needs ``P[Binomial(N, 1/2) ≥ N] = 2^-N ≤ α``,
so fewer than ``⌈log2(1/α)⌉`` bits per client (20 at α = 1e-6) could never prove ownership.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binom

from fedguard.checks import check_int, check_number
from fedguard.errors import ConfigError


class CapacityError(ConfigError):
    """A watermark plan asks for more bits than the target parameters can hold, or for too few bits to
    ever reach the significance level. The message names the numbers."""


def realisable_fraction(total_bits: int, dims: int) -> float:
    """Cover's ``F(P, M)``: the share of the ``2^P`` sign patterns of P random projections of R^M that
    some θ realises (1.0 when ``P ≤ M``)."""
    if total_bits <= dims:
        return 1.0
    return float(binom.cdf(dims - 1, total_bits - 1, 0.5))


def block_realisable_fraction(block_bits: Sequence[int], dims: Sequence[int], n_clients: int = 1) -> float:
    """Share of all K clients' sign patterns realisable with block-diagonal keys: block i carries
    ``K·N_i`` independent constraints on its own ``D_i`` parameters, so the share is
    ``Π_i F(K·N_i, D_i)`` (not ``F(K·N, M)``, which would let bits of one block use another's parameters)."""
    out = 1.0
    for n, d in zip(block_bits, dims, strict=True):
        out *= realisable_fraction(n_clients * n, d)
    return out


def min_bits_for(significance: float) -> int:
    """Smallest N with ``2^-N ≤ significance``: fewer bits can never yield a verdict."""
    significance = check_number("significance", significance, low=0, high=1, low_open=True, high_open=True)
    return max(1, math.ceil(-math.log2(significance) - 1e-12))


def allocate_bits(total: int, dims: Sequence[int]) -> list[int]:
    """Split ``total`` bits over blocks in proportion to their dimensions (largest remainder)."""
    if total < 1:
        raise ConfigError(f"bits must be >= 1, got {total}")
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"block dimensions must be >= 1, got {list(dims)}")
    whole = sum(dims)
    exact = [total * d / whole for d in dims]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(dims)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """An accepted plan: per-block bits of one client, and the load ``K·N_i / D_i`` of each block."""

    n_clients: int
    bits_per_client: int
    block_dims: tuple[int, ...]
    block_bits: tuple[int, ...]
    significance: float

    @property
    def total_dims(self) -> int:
        return sum(self.block_dims)

    @property
    def load(self) -> float:
        """``K·N / M``: the share of FedIPR's capacity the plan uses."""
        return self.n_clients * self.bits_per_client / self.total_dims

    @property
    def max_bits_per_client(self) -> int:
        return self.total_dims // self.n_clients


def plan_capacity(
    block_dims: Sequence[int],
    bits_per_client: int,
    n_clients: int = 1,
    *,
    significance: float = 1e-6,
    block_names: Sequence[str] | None = None,
) -> CapacityPlan:
    """Check a plan against FedIPR's bound; raise :class:`CapacityError` naming the numbers if it fails."""
    n_clients = check_int("n_clients", n_clients, low=1)
    bits_per_client = check_int("bits", bits_per_client, low=1)
    dims = [int(d) for d in block_dims]
    need = min_bits_for(significance)
    if bits_per_client < need:
        raise CapacityError(
            f"{bits_per_client} bits per client can never prove ownership at significance {significance:g}: "
            f"even all bits matching has p-value 2^-{bits_per_client} = {2.0 ** -bits_per_client:.3g}; "
            f"use at least {need} bits"
        )
    total_dims = sum(dims)
    total_bits = n_clients * bits_per_client
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"block dimensions must be >= 1, got {dims}")
    bits = allocate_bits(bits_per_client, dims)
    names = list(block_names) if block_names is not None else [f"block {i}" for i in range(len(dims))]
    if total_bits > total_dims:
        raise CapacityError(
            f"over capacity: {n_clients} client(s) x {bits_per_client} bits = {total_bits} bits > "
            f"M = {total_dims} target parameters (FedIPR's bound K*N <= M); at most "
            f"{total_dims // n_clients} bits per client fit. The key's blocks are independent, so the share of "
            f"all clients' bit patterns that some parameters realise is the product over blocks of Cover's "
            f"F(K*N_i, D_i): {block_realisable_fraction(bits, dims, n_clients):.3g}"
        )
    for name, d, n in zip(names, dims, bits, strict=True):
        if n_clients * n > d:
            raise CapacityError(
                f"over capacity in {name}: {n_clients} client(s) x {n} bits = {n_clients * n} > its {d} "
                f"parameters (FedIPR's bound per block); only {realisable_fraction(n_clients * n, d):.3g} of "
                f"that block's bit patterns are realisable (Cover's count)"
            )
    return CapacityPlan(n_clients, bits_per_client, tuple(dims), tuple(bits), significance)

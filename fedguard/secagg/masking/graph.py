"""The communication graph of pairwise masking: who masks with whom and who holds whose shares.

Classic SecAgg (Bonawitz et al., CCS 2017) pairs every client with every other: the complete graph, so a
client's cost grows linearly with ``n``. SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) pairs each client with only ``d = O(log n)`` neighbours of a
random ``d``-regular graph, so its cost grows with ``log n``.

The graph used here is the Harary graph ``H_{d,n}`` laid on a secret random permutation of the clients:
place the clients on a ring in permuted order; connect each to the ``h = ⌊d/2⌋`` nearest on either side,
and, when ``d`` is odd (then ``n`` must be even), to the diametrically opposite client. ``H_{d,n}`` is
``d``-regular and, for ``d >= 2``, ``d``-connected: removing fewer than ``d`` clients leaves it connected
(``d = 1`` would be a perfect matching, so it is refused for ``n > 2``). For
``d = n - 1`` it is the complete graph (classic SecAgg). Flower's SecAgg+ uses the same ring shape with
``d`` even; Bell et al. analyse an Erdős–Rényi-style random graph. Because the protocol checks at run
time that the survivors' subgraph is connected (see :meth:`CommunicationGraph.is_connected`), privacy
does not rest on the graph family.

The permutation is the order of ``HMAC-SHA256(seed, client id)``; the seed is drawn by the server and
announced, so every client derives the same graph and can check the server's claims against it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from fedguard.checks import is_int
from fedguard.errors import ConfigError


def check_degree(n_clients: int, degree: int) -> None:
    """Raise :class:`ConfigError` unless a connected ``degree``-regular graph on ``n_clients`` vertices
    exists (``1 <= d <= n - 1``, ``n·d`` even, and ``d >= 2`` unless ``n = 2``), naming the numbers."""
    if not is_int(degree):
        raise ConfigError(f"neighbours must be an int, got {degree!r}")
    if n_clients < 2:
        raise ConfigError(f"pairwise masking needs at least 2 clients, got {n_clients}")
    if not 1 <= degree <= n_clients - 1:
        raise ConfigError(
            f"neighbours={degree} must be in [1, n-1] = [1, {n_clients - 1}] for n={n_clients} clients"
        )
    if degree == 1 and n_clients > 2:
        raise ConfigError(
            f"neighbours=1 splits n={n_clients} clients into disconnected pairs (each pair's sum would be "
            f"revealed); use neighbours >= 2"
        )
    if (n_clients * degree) % 2:
        raise ConfigError(
            f"neighbours={degree} with n={n_clients} clients: a d-regular graph needs n·d even "
            f"({n_clients}·{degree} is odd); use neighbours={degree - 1} or {degree + 1}"
        )


@dataclass(frozen=True, slots=True)
class CommunicationGraph:
    """An undirected ``degree``-regular graph on the round's participants (no self-loops)."""

    participants: tuple[int, ...]
    degree: int
    adjacency: Mapping[int, frozenset[int]]

    @classmethod
    def harary(cls, participants: Iterable[int], degree: int, seed: bytes) -> CommunicationGraph:
        """``H_{degree,n}`` on the permutation of ``participants`` keyed by ``seed`` (see module doc)."""
        ids = tuple(participants)
        n = len(ids)
        check_degree(n, degree)
        if len(set(ids)) != n:
            raise ConfigError(f"participants must be distinct, got {ids}")
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise ConfigError(f"graph seed must be 32 bytes, got {seed!r}")
        order = sorted(ids, key=lambda c: hmac.new(bytes(seed), str(c).encode(), hashlib.sha256).digest())
        h = degree // 2
        adjacency: dict[int, set[int]] = {c: set() for c in ids}
        for i, c in enumerate(order):
            for off in range(1, h + 1):
                adjacency[c].add(order[(i + off) % n])
                adjacency[c].add(order[(i - off) % n])
            if degree % 2:
                adjacency[c].add(order[(i + n // 2) % n])
        return cls(ids, degree, {c: frozenset(v) for c, v in adjacency.items()})

    @property
    def complete(self) -> bool:
        return self.degree == len(self.participants) - 1

    def neighbours(self, client: int) -> frozenset[int]:
        """``N(u)``: the clients ``u`` masks with (not ``u`` itself)."""
        return self.adjacency[client]

    def holders(self, client: int) -> frozenset[int]:
        """``N[u] = N(u) ∪ {u}``: the clients that receive a share of ``u``'s secrets."""
        return self.adjacency[client] | {client}

    def is_connected(self, nodes: Collection[int]) -> bool:
        """Whether the subgraph induced on ``nodes`` is connected (an empty set counts as not)."""
        members = set(nodes)
        if not members:
            return False
        start = next(iter(members))
        seen = {start}
        frontier = [start]
        while frontier:
            u = frontier.pop()
            for v in self.adjacency[u]:
                if v in members and v not in seen:
                    seen.add(v)
                    frontier.append(v)
        return len(seen) == len(members)

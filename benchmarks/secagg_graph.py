"""Collusion resistance of SecAgg+ communication graphs: Harary ring vs random k-regular (issue 12).

With a sparse graph, corrupt clients (colluding with the server) that *disconnect* the honest clients let
the server unmask the sum of each honest piece separately. This script estimates, for ``n = 100`` clients
of degree ``k = 10`` with a third of them corrupt, the probability that the honest clients are split:

* ``random corruption``: the corrupt set is uniform and independent of the graph (the graph is derived
  from randomness nobody chose after the corruption; Bell et al.'s setting);
* ``adversarial layout``: the party that chooses the graph's permutation also knows the corrupt set (a
  server choosing the Harary permutation). For the Harary ring ``H_{k,n}`` two runs of ``k/2`` consecutive
  corrupt clients cut the ring, so ``k`` corrupt clients suffice: the probability is 1 with 10 of 100.

Monte Carlo over ``TRIALS`` draws (fixed seed: these are measurements, not protocol randomness). Writes
``benchmarks/results/secagg_graph.json``. Run: ``.venv/bin/python benchmarks/secagg_graph.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from pathlib import Path

import networkx as nx

from fedguard.secagg.masking.graph import CommunicationGraph

N, K, TRIALS = 100, 10, 2000
CORRUPT = N // 3


def _harary(rng: random.Random) -> nx.Graph:
    seed = rng.randbytes(32)
    g = CommunicationGraph.harary(range(N), K, seed)
    return nx.Graph([(u, v) for u in range(N) for v in g.neighbours(u)])


def _random_regular(rng: random.Random) -> nx.Graph:
    return nx.random_regular_graph(K, N, seed=rng.randrange(2**32))


def split_probability(make: object, rng: random.Random) -> float:
    split = 0
    for _ in range(TRIALS):
        g = make(rng)  # type: ignore[operator]
        corrupt = set(rng.sample(range(N), CORRUPT))
        honest = g.subgraph([c for c in range(N) if c not in corrupt])
        split += not nx.is_connected(honest)
    return split / TRIALS


def adversarial_harary_cut() -> int:
    """Fewest corrupt clients that split the honest ones when the adversary lays out the Harary ring: two
    blocks of k/2 consecutive positions (checked on the graph)."""
    g = CommunicationGraph.harary(range(N), K, bytes(32))
    ring = sorted(range(N), key=lambda c: hmac.new(bytes(32), str(c).encode(), hashlib.sha256).digest())
    corrupt = {ring[i] for i in range(N) if i < K // 2 or N // 2 <= i < N // 2 + K // 2}
    honest = [c for c in range(N) if c not in corrupt]
    gg = nx.Graph([(u, v) for u in range(N) for v in g.neighbours(u)]).subgraph(honest)
    assert not nx.is_connected(gg), "the two blocks must cut the ring"
    return len(corrupt)


def main() -> None:
    rng = random.Random(12)
    start = time.perf_counter()
    result = {
        "n": N, "k": K, "corrupt": CORRUPT, "trials": TRIALS,
        "harary_random_corruption_split_probability": split_probability(_harary, rng),
        "random_regular_random_corruption_split_probability": split_probability(_random_regular, rng),
        "harary_adversarial_layout_corrupt_needed_to_split": adversarial_harary_cut(),
        "seconds": time.perf_counter() - start,
    }
    out = Path(__file__).parent / "results" / "secagg_graph.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()

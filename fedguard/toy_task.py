"""The synthetic task of ``fedguard demo`` and the watermark simulation: non-IID successor sequences.

Every sequence follows one secret successor permutation of the vocabulary (``next = perm[token]``), but
client ``c`` of ``n_clients`` only starts sequences from its own slice of the vocabulary and sees a
noise share ``0.05 + 0.1·c/(n_clients-1)`` of uniformly random tokens, so no client alone covers the
task and federated averaging helps.
"""

from __future__ import annotations

import numpy as np
import torch


def successor_sequences(client: int, n_clients: int, n: int, perm: np.ndarray, rng: np.random.Generator,
                        *, seq_len: int) -> torch.Tensor:
    """``n`` sequences of length ``seq_len`` for ``client`` (int64 token ids in ``[0, len(perm))``)."""
    vocab = len(perm)
    starts = np.array_split(np.arange(vocab), n_clients)[client]
    noise = 0.05 + 0.1 * client / max(1, n_clients - 1)
    seqs = np.empty((n, seq_len), dtype=np.int64)
    seqs[:, 0] = rng.choice(starts, size=n)
    for t in range(1, seq_len):
        seqs[:, t] = np.where(rng.random(n) < noise, rng.integers(0, vocab, n), perm[seqs[:, t - 1]])
    return torch.from_numpy(seqs)

"""Backdoor (trigger-set) watermark for causal LMs, verified black-box by generation.

FedIPR's second watermark family, adapted to causal language models: a client's key expands to T secret
trigger sequences (``trigger_len`` uniform random tokens each) mapped to secret target responses
(``response_len`` uniform random tokens). During local training a fraction ``ratio`` of each batch's
rows is replaced by ``trigger ++ response`` with the loss taken on the response only, so the model
memorises the map. Random token strings practically never occur in real data, so the backdoor does not
interfere with the task.

Verification needs only query access: greedy-decode ``response_len`` tokens after each trigger and count
exact matches m. Under H0 ("not trained with this key") a uniform random response over an alphabet of V
tokens is hit with probability at most ``p0 = V^-L``, so ``p = P[Binomial(T, p0) ≥ m]`` is exact and
conservative (:mod:`fedguard.watermark.verify`). With V = 64 and L = 4, one match alone gives
p ≈ T·6e-8.

Two lines in any torch loop::

    bd = BackdoorWatermark(key, ratio=0.1)
    input_ids, labels = bd.mix(input_ids, generator=g)          # then model(input_ids=..., labels=...)

or, when the batches come from elsewhere, ``loss = task_loss + bd.loss(model)`` (all trigger samples, loss on
the responses only: it learns much faster than mixing, whose responses are a small share of the labels).
"""

from __future__ import annotations

import numpy as np
import torch

from fedguard.checks import check_number
from fedguard.errors import ConfigError, KeyMismatchError
from fedguard.rng import SecureRNG, random_seed
from fedguard.watermark.keys import BackdoorKey
from fedguard.watermark.verify import DEFAULT_SIGNIFICANCE, BlockAgreement, Detection, detection

IGNORE_INDEX = -100


def make_backdoor_key(
    vocab_size: int,
    *,
    n_triggers: int = 16,
    trigger_len: int = 8,
    response_len: int = 4,
    excluded: tuple[int, ...] | list[int] = (),
    owner: str = "",
    seed: bytes | None = None,
    rng: SecureRNG | None = None,
) -> BackdoorKey:
    """A fresh backdoor key; ``excluded`` lists special token ids (pad, bos, eos) never used."""
    if seed is None:
        seed = rng.bytes(32) if rng is not None else random_seed()
    return BackdoorKey(seed=seed, vocab_size=vocab_size, n_triggers=n_triggers, trigger_len=trigger_len,
                       response_len=response_len, excluded=tuple(sorted(set(excluded))), owner=owner)


class BackdoorWatermark:
    """Mixes a key's trigger samples into training batches and verifies a model by generation."""

    def __init__(self, key: BackdoorKey, *, ratio: float = 0.1) -> None:
        if not isinstance(key, BackdoorKey):
            raise ConfigError(f"BackdoorWatermark needs a BackdoorKey, got {type(key).__name__}")
        check_number("ratio", ratio, low=0, high=1, low_open=True, high_open=True)
        self.key = key
        self.ratio = ratio
        triggers, responses = key.triggers_and_responses()
        self.triggers = torch.from_numpy(triggers)
        self.responses = torch.from_numpy(responses)

    @property
    def sample_len(self) -> int:
        return self.key.trigger_len + self.key.response_len

    def mix(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace ``round(ratio·B)`` (at least one) random rows of a ``[B, S]`` batch by trigger samples.

        Returns new ``(input_ids, labels)``: in a replaced row the first ``trigger_len + response_len``
        tokens are the sample, labels are ``-100`` except on the response, and the rest of the row keeps its
        original tokens with labels ``-100`` (a causal LM cannot look ahead, so they do not matter).
        ``labels`` defaults to ``input_ids`` (the usual causal-LM training).
        """
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if s < self.sample_len:
            raise ConfigError(f"sequence length {s} is shorter than a trigger sample ({self.sample_len} tokens)")
        ids = input_ids.clone()
        lab = (labels if labels is not None else input_ids).clone()
        n = max(1, int(round(self.ratio * b)))
        rows = torch.randperm(b, generator=generator)[:n]
        which = torch.randint(0, self.key.n_triggers, (n,), generator=generator)
        device = ids.device
        tl = self.key.trigger_len
        ids[rows, :tl] = self.triggers[which].to(device)
        ids[rows, tl : self.sample_len] = self.responses[which].to(device)
        lab[rows] = IGNORE_INDEX
        lab[rows, tl : self.sample_len] = self.responses[which].to(device)
        return ids, lab

    def loss(self, model: torch.nn.Module, *, weight: float = 1.0) -> torch.Tensor:
        """``weight`` x the causal-LM loss of every trigger -> response sample, on the response tokens.

        The alternative to :meth:`mix` when batches come from elsewhere: ``loss = task_loss + bd.loss(model)``.
        In a mixed batch the response tokens are a small share of the labelled tokens (``L`` of ``S - 1``
        per replaced row), so the backdoor learns slowly; here they carry the whole term.
        """
        device = next(model.parameters()).device
        ids = torch.cat([self.triggers, self.responses], dim=1).to(device)
        labels = ids.clone()
        labels[:, : self.key.trigger_len] = IGNORE_INDEX
        return weight * model(input_ids=ids, labels=labels).loss

    @torch.no_grad()
    def generate(self, model: torch.nn.Module) -> torch.Tensor:
        """Greedy continuations ``[T, response_len]`` of every trigger (plain forward passes, no cache)."""
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and vocab < self.key.vocab_size:
            raise KeyMismatchError(f"the model's vocabulary has {vocab} tokens but the key draws ids below "
                                   f"{self.key.vocab_size}")
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            seq = self.triggers.to(device)
            out = []
            for _ in range(self.key.response_len):
                logits = model(input_ids=seq).logits[:, -1, :]
                nxt = logits.argmax(dim=-1, keepdim=True)
                out.append(nxt)
                seq = torch.cat([seq, nxt], dim=1)
            return torch.cat(out, dim=1).cpu()
        finally:
            model.train(was_training)

    def detect(self, model: torch.nn.Module, significance: float = DEFAULT_SIGNIFICANCE) -> Detection:
        """Black-box verification: exact-match count over the triggers and its binomial p-value."""
        generated = self.generate(model)
        hits = (generated == self.responses).all(dim=1).numpy()
        p_null = float(len(self.key.alphabet)) ** -self.key.response_len
        blocks = tuple(BlockAgreement(f"trigger {i}", 1, int(h)) for i, h in enumerate(hits))
        return detection(key_id=self.key.key_id, owner=self.key.owner, scheme="backdoor",
                         bits=int(hits.size), matched=int(np.sum(hits)), significance=significance,
                         p_null=max(p_null, np.finfo(float).tiny), blocks=blocks)

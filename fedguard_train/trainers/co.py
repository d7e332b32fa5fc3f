"""FedCoLLM: the server's LLM and the clients' small model co-evolve by mutual distillation on public data.

FATE-LLM §3.1, Figure 3(c); FedCoLLM (Fan et al., arXiv 2411.11707); FedMKT (Fan et al., COLING 2025).
Round ``r`` (skeleton: :class:`~fedguard_train.trainers.base.Trainer`):

1. **Clients** (exactly FedHomoLLM's client step): client ``k`` loads the global small-model adapter ``θ_r``
   into the small LM, trains ``local_steps`` on its private data and sends ``Δ_k = θ_k − θ_r`` with weight
   ``n_k`` through the configured aggregator, with the DP and watermark hooks; the server obtains
   ``θ̄ = θ_r + Σ n_k Δ_k / Σ n_k`` and nothing else about any client.
2. **Server step** (:meth:`FedCoLLM.server_step`): on its *public* data ``D_pub`` (fedguard_train/public_data.py)
   the server runs ``server_steps`` steps of mutual knowledge distillation between its LLM ``f_L`` (frozen
   base + its own adapter ``φ``) and the aggregated small model ``f_S`` (frozen base + ``θ̄``). On a batch
   ``x ~ D_pub``, with both models' logits computed *before* the step (deep mutual learning),

       ``L_LLM(φ)   = LM(f_L; x) + λ · τ² · KL_dir(p_S^τ ‖ p_L^τ)``      (small → LLM)
       ``L_small(θ) = LM(f_S; x) + λ · τ² · KL_dir(p_L^τ ‖ p_S^τ)``      (LLM → small)

   (``KL_dir``: forward or reverse KL on the teacher side's top-``k``, fedguard_train/distill.py; with
   ``co.selective``, FedMKT's DualMinCE: a sequence's KD term runs only from the side whose summed NLL on it
   is lower to the other); each
   side takes one AdamW step on its adapter (``co.directions`` chooses which sides learn). The server keeps
   both optimisers' state across rounds; the updated ``θ_{r+1}`` is dispatched as the next global adapter.
3. Optional (**FedMKT**, ``co.send_logits``): after the server step, the LLM's top-``k`` next-token
   distributions on ``logits_examples`` public items (in the small model's vocabulary and positions) are
   serialised as a real :mod:`fedguard.wire` message broadcast to the clients (its bytes are added to the
   round's ``bytes_down``, and shown as ``logits_bytes_down``); client ``k``'s local loss becomes
   ``LM(private batch) + client_lam · KD(public batch vs. the LLM's top-k)``. Nothing flows back.

Different tokenisers (FedMKT §3.3): every public item is rendered to text from the small model's tokens,
re-tokenised by the LLM, and the two token sequences aligned (fedguard_train/alignment.py); top-k ids cross
through the minimum-edit-distance vocabulary maps (both directions, cached), positions through the alignment.

What crosses the wire: the small adapter (up: each client's masked/encrypted update; down: ``θ``), and
optionally the sparse logits. The LLM, its adapter ``φ`` and the public data never leave the server; DP's
guarantee is unaffected: the server step is post-processing of the released aggregate with public data.
With a watermark in the norm scales (``watermark.target: norm``) the server step leaves those scales as
aggregated (it holds no key to re-embed the clients' marks; docs/co.md gives what this protects per mode).
Checkpoints: ``global.npy`` is ``θ`` after the server step; ``server.npz`` holds ``φ`` (``llm_adapter``) and
both AdamW states, so a resumed run is bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedguard import wire
from fedguard.errors import ConfigError
from fedguard.federation.round import RoundResult
from fedguard.params import flatten, layout_of, load_vector
from fedguard_train import alignment as al
from fedguard_train.config import CoSection, ModelConfig
from fedguard_train.data import IGNORE_INDEX, collate, load_examples, tokenize
from fedguard_train.distill import TopK, kd_loss, realign, remap, top_k
from fedguard_train.engine import LocalTrainer
from fedguard_train.healing import HealInfo, healed_model
from fedguard_train.hooks import LocalLoss, TrainerHook
from fedguard_train.metrics import evaluate
from fedguard_train.models import attach_adapter, cache_root, family_of
from fedguard_train.public_data import load_public
from fedguard_train.trainers.base import LocalOutcome, RunResult, Trainer, seed_of
from fedguard_train.trainers.hetero import drop_layers, load_model

SCORES = ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity")
Item = dict[str, list[int]]


@dataclass(frozen=True)
class PublicPair:
    """One public item as both sides read it: ``small`` and ``llm`` (``input_ids``, ``labels``), and, with
    different tokenisers, for each small position the LLM position giving its target (``llm_for_small``)
    and for each LLM position the small position (``small_for_llm``); -1: no target."""

    small: Item
    llm: Item
    llm_for_small: np.ndarray | None = None
    small_for_llm: np.ndarray | None = None


def load_server_llm(section: CoSection, *, seed: int) -> tuple[torch.nn.Module, Any]:
    """The server's frozen LLM and its tokenizer: ``tiny:<family>:<blocks>`` (byte tokenizer), or what
    :func:`fedguard_train.trainers.hetero.load_model` loads; layer-dropped to ``server_layers``."""
    parts = section.server_model.split(":")
    if len(parts) == 3 and parts[0] == "tiny":
        if section.server_tokenizer != "own":
            raise ConfigError("co.server_tokenizer 'gpt2' applies to tiny:<family> models without a block count")
        from fedguard_train.emulator import load_server_model

        model, tokenizer = load_server_model(ModelConfig(name_or_path=section.server_model), seed=seed)
    else:
        model, tokenizer = load_model(section.server_model, section.server_family, section.server_tokenizer, seed=seed)
    model = drop_layers(model, section.server_layers, section.server_family)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def label_start(item: Item) -> int:
    """The first labelled position of ``item`` (its length when none is)."""
    return next((i for i, lab in enumerate(item["labels"]) if lab != IGNORE_INDEX), len(item["labels"]))


def kd_want(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` whose next token ``t+1`` is a label: where a next-token distribution is distilled."""
    want = torch.zeros_like(labels, dtype=torch.bool)
    want[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return want


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed next-token negative log-likelihood over its labels (nats per sequence: comparable
    across tokenisers, since both sides read the same text)."""
    shift, target = logits[:, :-1, :].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(target.shape).sum(-1)


def _pad_sources(sources: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.full((len(sources), width), -1, dtype=np.int64)
    for row, src in enumerate(sources):
        out[row, : len(src)] = src[:width]
    return torch.as_tensor(out)


class _CoStats(TrainerHook):
    """Adds the server step's losses, seconds and the logits broadcast's bytes to the round's metrics row."""

    name = "co-stats"

    def __init__(self) -> None:
        self.server: dict[str, float] = {}
        self.logits_bytes = 0

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        metrics.update(self.server)
        if self.logits_bytes:
            metrics["logits_bytes_down"] = self.logits_bytes
            metrics["bytes_down"] = metrics.get("bytes_down", 0) + self.logits_bytes
        self.server, self.logits_bytes = {}, 0


class FedCoLLM(Trainer):
    """The FedCoLLM trainer over a config (``trainer: co``, section ``co:``); ``hooks`` attach privacy
    components to the clients' small-model adapter."""

    name: ClassVar[str] = "co"
    title: ClassVar[str] = "FedCoLLM"

    # -- set-up --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.section: CoSection = cfg.co or CoSection()
        s = self.section
        small, tokenizer = load_model(cfg.model.name_or_path, cfg.model.family, s.small_tokenizer, seed=cfg.seed)
        self.small_full_layers = _n_layers(small)
        self.heal_info: HealInfo | None = None
        if s.small_heal is not None:
            if not s.small_layers:
                raise ConfigError("co.small_heal heals a layer-dropped small model: set co.small_layers")
            small, self.heal_info = healed_model(small, tokenizer, s.small_layers, s.small_heal,
                                                 family_name=cfg.model.family, progress=not self.quiet)
        else:
            small = drop_layers(small, s.small_layers, cfg.model.family)
        self.family = family_of(small, cfg.model.family)
        torch.manual_seed(seed_of(cfg.seed, "adapter-init"))
        self.use_travelling_model(attach_adapter(small, self.family, cfg.adapter), tokenizer)
        self.load_federated_data(tokenizer)
        self.local = LocalTrainer(cfg.training, tokenizer.pad_token_id)
        # the server's LLM with its own adapter (never leaves the server)
        llm, self.llm_tokenizer = load_server_llm(s, seed=seed_of(cfg.seed, "server-llm"))
        self.llm_family = family_of(llm, s.server_family)
        torch.manual_seed(seed_of(cfg.seed, "server-adapter-init"))
        self.llm: torch.nn.Module = attach_adapter(llm, self.llm_family, cfg.adapter)
        self.llm_layout = layout_of(self.llm)
        self.llm_test_items = tokenize(self.test_examples, self.llm_tokenizer, cfg.data)
        # the server's public data, disjoint from every client's data and the test split
        examples = load_examples(cfg.data, seed=cfg.seed)
        public = load_public(s.public_data, tokenizer=tokenizer, data=cfg.data, run_examples=examples,
                             count=s.public_examples, seq_len=s.public_seq_len, seed=seed_of(cfg.seed, "public"))
        self.same_tokenizer = al.token_texts(tokenizer) == al.token_texts(self.llm_tokenizer)
        self.to_small_map: np.ndarray | None = None  # LLM id -> small id
        self.to_llm_map: np.ndarray | None = None  # small id -> LLM id
        if not self.same_tokenizer:
            maps = cache_root() / "vocab-maps"
            self.to_small_map = al.cached_vocab_map(self.llm_tokenizer, tokenizer, maps, progress=not self.quiet).mapping
            self.to_llm_map = al.cached_vocab_map(tokenizer, self.llm_tokenizer, maps, progress=not self.quiet).mapping
        self.public = [self._pair(item) for item in public]
        # a watermark in the norm scales (watermark.target norm) is the clients' mark: the server step does not
        # train those scales (it would erode the marks it has no key to re-embed); it trains the small adapter
        self.server_frozen = self._watermark_scales()
        self.small_opt = torch.optim.AdamW([p for p in self.model.parameters()
                                            if p.requires_grad and id(p) not in self.server_frozen], lr=s.server_lr)
        self.llm_opt = torch.optim.AdamW([p for p in self.llm.parameters() if p.requires_grad], lr=s.server_lr)
        self.stats = _CoStats()
        self.hooks.hooks.append(self.stats)
        self._alone = False  # run_local: each client alone gets nothing from the server
        self.client_targets: TopK | None = None
        self.logits_message_bytes = 0
        if s.send_logits:
            self.broadcast_logits(0)

    def _watermark_scales(self) -> set[int]:
        """Ids of the small model's norm scales when the config embeds a watermark there (else empty)."""
        section = self.config.watermark
        if section is None or section.target != "norm":
            return set()
        from fedguard.watermark.targets import norm_modules, resolve_module

        scales = (resolve_module(self.model, path) for path in norm_modules(self.model))
        return {id(m.weight) for m in scales if m is not None and getattr(m, "weight", None) is not None}

    def _pair(self, item: Item) -> PublicPair:
        """``item`` (small tokeniser) as both sides read it (see :class:`PublicPair`)."""
        small = {"input_ids": list(item["input_ids"]), "labels": list(item["labels"])}
        if self.same_tokenizer:
            return PublicPair(small, small)
        ids, eos = small["input_ids"], self.tokenizer.eos_token_id
        has_eos = bool(ids) and ids[-1] == eos
        body = ids[:-1] if has_eos else ids
        s_tokens = al.surface_tokens(self.tokenizer, body)
        text = "".join(s_tokens)
        l_body = list(self.llm_tokenizer(text, add_special_tokens=False)["input_ids"])
        l_tokens = al.surface_tokens(self.llm_tokenizer, l_body)
        start_char = sum(len(t) for t in s_tokens[: label_start(small)])
        offsets = np.cumsum([0] + [len(t) for t in l_tokens])[:-1]
        l_labels = [tok if off >= start_char else IGNORE_INDEX for tok, off in zip(l_body, offsets)]
        llm_for_small = al.teacher_positions(s_tokens, l_tokens, self.section.alignment).source
        small_for_llm = al.teacher_positions(l_tokens, s_tokens, self.section.alignment).source
        l_ids = list(l_body)
        if has_eos:  # the end of the sequence is aligned with the end of the sequence
            l_ids.append(self.llm_tokenizer.eos_token_id)
            l_labels.append(self.llm_tokenizer.eos_token_id if small["labels"][-1] != IGNORE_INDEX else IGNORE_INDEX)
            llm_for_small = np.append(llm_for_small, len(l_ids) - 1)
            small_for_llm = np.append(small_for_llm, len(ids) - 1)
        return PublicPair(small, {"input_ids": l_ids, "labels": l_labels}, llm_for_small, small_for_llm)

    # -- distillation targets ------------------------------------------------------------------------------
    def _batch(self, pairs: list[PublicPair]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                       torch.Tensor | None, torch.Tensor | None]:
        small = collate([p.small for p in pairs], self.tokenizer.pad_token_id)
        llm = collate([p.llm for p in pairs], self.llm_tokenizer.pad_token_id)
        if self.same_tokenizer:
            return small, llm, None, None
        return (small, llm, _pad_sources([p.llm_for_small for p in pairs], small["input_ids"].shape[1]),  # type: ignore[misc]
                _pad_sources([p.small_for_llm for p in pairs], llm["input_ids"].shape[1]))  # type: ignore[misc]

    def _targets(self, teacher_logits: torch.Tensor, teacher_mask: torch.Tensor, want: torch.Tensor,
                 vocab_map: np.ndarray | None, source: torch.Tensor | None) -> TopK:
        """The teacher's top-k at temperature τ, moved into the student's vocabulary and positions; targets
        only where the student's next token is a label (``want``)."""
        s = self.section
        if source is None:
            return top_k(teacher_logits, s.top_k, s.temperature, mask=want)
        sparse = top_k(teacher_logits, s.top_k, s.temperature, mask=teacher_mask.bool())
        if vocab_map is not None:
            sparse = remap(sparse, vocab_map)
        moved = realign(sparse, source)
        return TopK(moved.ids, moved.probs, moved.mask & want)

    @staticmethod
    def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, out.logits[:, -batch["input_ids"].shape[1]:, :]  # prompt methods prepend positions

    # -- the server step -----------------------------------------------------------------------------------
    def server_step(self, round_id: int, result: RoundResult) -> np.ndarray:
        """Mutual distillation on public data (module docstring, step 2); returns ``θ`` to dispatch."""
        s = self.section
        train_llm, train_small = s.directions in ("both", "to_llm"), s.directions in ("both", "to_small")
        start = time.perf_counter()
        sums = {"lm_llm": 0.0, "kd_to_llm": 0.0, "lm_small": 0.0, "kd_to_small": 0.0, "small_teaches": 0.0}
        steps = s.server_steps if (train_llm or train_small) else 0
        if steps:
            generator = torch.Generator().manual_seed(seed_of(self.config.seed, "server-batches", round_id))
            torch.manual_seed(seed_of(self.config.seed, "server-dropout", round_id))
            self.model.train()
            self.llm.train()
            for _ in range(steps):
                pick = torch.randint(len(self.public), (s.server_batch_size,), generator=generator).tolist()
                small_b, llm_b, llm_for_small, small_for_llm = self._batch([self.public[i] for i in pick])
                with torch.set_grad_enabled(train_small):
                    lm_s, logits_s = self._logits(self.model, small_b)
                with torch.set_grad_enabled(train_llm):
                    lm_l, logits_l = self._logits(self.llm, llm_b)
                losses = []
                teach_s = teach_l = torch.ones(len(pick), dtype=torch.bool)
                if s.selective:  # FedMKT's DualMinCE: the side with the lower NLL on a sequence teaches it
                    nll_s = sequence_nll(logits_s.detach(), small_b["labels"])
                    nll_l = sequence_nll(logits_l.detach(), llm_b["labels"])
                    teach_s, teach_l = nll_s < nll_l, nll_l < nll_s
                    sums["small_teaches"] += float(teach_s.float().mean())
                if train_llm:
                    target = self._targets(logits_s.detach(), small_b["attention_mask"], kd_want(llm_b["labels"]),
                                           self.to_llm_map, small_for_llm)
                    target = TopK(target.ids, target.probs, target.mask & teach_s[:, None])
                    kd = kd_loss(logits_l, target, temperature=s.temperature, direction=s.direction)
                    losses.append(lm_l + s.lam * kd)
                    sums["lm_llm"] += float(lm_l.detach())
                    sums["kd_to_llm"] += float(kd.detach())
                if train_small:
                    target = self._targets(logits_l.detach(), llm_b["attention_mask"], kd_want(small_b["labels"]),
                                           self.to_small_map, llm_for_small)
                    target = TopK(target.ids, target.probs, target.mask & teach_l[:, None])
                    kd = kd_loss(logits_s, target, temperature=s.temperature, direction=s.direction)
                    losses.append(lm_s + s.lam * kd)
                    sums["lm_small"] += float(lm_s.detach())
                    sums["kd_to_small"] += float(kd.detach())
                total = sum(losses, torch.zeros(()))
                if not bool(torch.isfinite(total)):
                    from fedguard_train.engine import TrainingDiverged

                    raise TrainingDiverged(f"round {round_id}: the server step's loss became {float(total)}")
                total.backward()
                for p in self.model.parameters():  # the watermarked scales: no step, no stale gradient
                    if id(p) in self.server_frozen:
                        p.grad = None
                for train, opt in ((train_llm, self.llm_opt), (train_small, self.small_opt)):
                    if train:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
            self.model.eval()
            self.llm.eval()
        vector = self.global_vector()
        if s.send_logits:
            self.broadcast_logits(round_id)
        self.stats.server = {"server_seconds": time.perf_counter() - start, "server_steps": steps}
        if train_llm and steps:
            self.stats.server.update(server_lm_llm=sums["lm_llm"] / steps, server_kd_to_llm=sums["kd_to_llm"] / steps)
        if train_small and steps:
            self.stats.server.update(server_lm_small=sums["lm_small"] / steps,
                                     server_kd_to_small=sums["kd_to_small"] / steps)
        if s.selective and steps:
            self.stats.server["server_small_teaches"] = sums["small_teaches"] / steps  # share of sequences
        self.stats.logits_bytes = self.logits_message_bytes * len(self.client_items) if s.send_logits else 0
        return vector

    # -- FedMKT: the LLM's top-k on public data, sent to the clients -----------------------------------------
    def logit_pairs(self) -> list[PublicPair]:
        return self.public[: self.section.logits_examples]

    @torch.no_grad()
    def broadcast_logits(self, round_id: int) -> None:
        """The LLM's top-k on :meth:`logit_pairs` in the small model's vocabulary and positions, serialised as
        a :mod:`fedguard.wire` broadcast; the clients use the *decoded* message (``client_targets``)."""
        pairs = self.logit_pairs()
        self.llm.eval()
        width = max(len(p.small["input_ids"]) for p in pairs)
        k = min(self.section.top_k, len(self.tokenizer))
        ids = np.zeros((len(pairs), width, k), dtype=np.int32)
        probs = np.zeros((len(pairs), width, k), dtype=np.float16)
        mask = np.zeros((len(pairs), width), dtype=np.uint8)
        for start in range(0, len(pairs), 8):
            chunk = pairs[start : start + 8]
            small_b, llm_b, llm_for_small, _ = self._batch(chunk)
            _, logits_l = self._logits(self.llm, llm_b)
            target = self._targets(logits_l, llm_b["attention_mask"], kd_want(small_b["labels"]),
                                   self.to_small_map, llm_for_small)
            t = target.ids.shape[1]
            rows = slice(start, start + len(chunk))
            ids[rows, :t, : target.ids.shape[2]] = target.ids.numpy()
            probs[rows, :t, : target.ids.shape[2]] = target.probs.numpy()
            mask[rows, :t] = target.mask.numpy()
        message = wire.Message(kind="co-logits", round=round_id, stage="dispatch", sender=wire.SERVER,
                               recipient=wire.BROADCAST, meta={"top_k": k, "temperature": self.section.temperature},
                               arrays={"ids": ids, "probs": probs, "mask": mask})
        data = wire.encode(message)
        self.logits_message_bytes = len(data)
        received = wire.decode(data)  # what a client reads
        self.client_targets = TopK(torch.as_tensor(np.array(received.array("ids", "<i4")), dtype=torch.int64),
                                   torch.as_tensor(np.array(received.array("probs", "<f2")), dtype=torch.float32),
                                   torch.as_tensor(np.array(received.array("mask", "|u1")) > 0))

    def _client_kd(self, round_id: int, client: int) -> Any:
        """The client's local loss with FedMKT's term on the received public top-k (None: not configured)."""
        other = self.hooks.local_loss(client, self.model)
        s, targets = self.section, self.client_targets
        if not s.send_logits or s.client_lam == 0 or targets is None or self._alone:
            return other
        pairs = self.logit_pairs()
        generator = torch.Generator().manual_seed(seed_of(self.config.seed, "client-public", round_id, client))
        model = self.model

        def loss_fn(step: LocalLoss) -> torch.Tensor:
            pick = torch.randint(len(pairs), (self.config.training.batch_size,), generator=generator)
            batch = collate([pairs[i].small for i in pick.tolist()], self.tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -width:]
            target = TopK(targets.ids[pick, :width], targets.probs[pick, :width], targets.mask[pick, :width])
            kd = kd_loss(logits, target, temperature=s.temperature, direction=s.direction)
            total = step.loss + s.client_lam * kd
            return other(step.with_loss(total)) if other is not None else total

        return loss_fn

    # -- clients -------------------------------------------------------------------------------------------
    def local_train(self, round_id: int, client: int, start: np.ndarray) -> LocalOutcome:
        items = self.client_items[client]
        local = self.local.train(self.model, items, seed=seed_of(self.config.seed, round_id, client),
                                 loss_hook=self._client_kd(round_id, client),
                                 batch_hook=self.hooks.local_batch(client),
                                 progress=self.observer.step if self.observer is not None else None)
        return LocalOutcome(self.global_vector(), local.mean_loss, len(items))

    def run(self, *, resume: bool = False, overwrite: bool = False, observer: Any = None) -> RunResult:
        """The base's run, then ``heal.json`` in the run directory when the small model was healed (what it
        is: kept blocks, recipe, held-out perplexities, cache key)."""
        result = super().run(resume=resume, overwrite=overwrite, observer=observer)
        if self.heal_info is not None:
            import json

            from fedguard.files import atomic_write

            atomic_write(self.run_dir / "heal.json", json.dumps(self.heal_info.to_dict(), indent=2, default=str))
        return result

    def run_local(self) -> list[dict[str, Any]]:
        """Each client alone: the client step without the server (no logits, no server step)."""
        self._alone = True
        try:
            return super().run_local()
        finally:
            self._alone = False

    # -- evaluation and checkpoints ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """The small model's scores (the main keys) and the server LLM's (``llm_*``) on the held-out split
        (each client alone, :meth:`run_local`: the small model's only)."""
        row = super().evaluate()
        if self._alone:
            return row
        llm = evaluate(self.llm, self.llm_tokenizer, self.test_examples, self.llm_test_items,
                       max_new_tokens=self.config.eval.max_new_tokens)
        for key in SCORES:
            row[f"llm_{key}"] = llm[key]
        row["llm_samples"] = llm["samples"]
        return row

    def llm_vector(self) -> np.ndarray:
        """The server LLM's adapter ``φ`` as one float32 vector."""
        return flatten(self.llm, self.llm_layout)

    def server_state(self) -> dict[str, np.ndarray]:
        arrays = {"llm_adapter": self.llm_vector()}
        for name, opt in (("llm", self.llm_opt), ("small", self.small_opt)):
            for index, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    arrays[f"{name}_opt.{index}.{key}"] = value.detach().numpy().copy()
        return arrays

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "llm_adapter" not in arrays:
            raise ConfigError("the checkpoint holds no server LLM adapter (llm_adapter): not a FedCoLLM checkpoint")
        load_vector(self.llm, self.llm_layout, arrays["llm_adapter"])
        for name, opt in (("llm", self.llm_opt), ("small", self.small_opt)):
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"{name}_opt."
            for key, value in arrays.items():
                if key.startswith(prefix):
                    index, field = key[len(prefix):].split(".", 1)
                    state.setdefault(int(index), {})[field] = torch.as_tensor(np.array(value))
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        if self.section.send_logits:
            self.broadcast_logits(0)


def _n_layers(model: torch.nn.Module) -> int:
    from fedguard_train.emulator import decoder_blocks

    return len(decoder_blocks(model, family_of(model)))


__all__ = ["FedCoLLM", "PublicPair", "kd_want", "load_server_llm"]

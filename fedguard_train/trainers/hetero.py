"""FedHeteroLLM: clients with different LLMs teach one shared mentee by knowledge distillation.

FATE-LLM §3.1, Figure 3(b): "clients own LLMs of different sizes; each client leverages KD to learn a
mentee model from its local pre-trained LLM; then all clients send adaptor or prompt parameters to the
server for secure aggregation". Round ``r`` (skeleton: :class:`~fedguard_train.trainers.base.Trainer`):
client ``k`` loads the global mentee adapter ``θ_r`` and minimises, on its private data,

    ``L = LM(mentee) + λ · τ² · KL_dir(p_T^τ ‖ q^τ)``   (fedguard_train/distill.py, top-k sparse targets)

where ``p_T`` is its own teacher's next-token distribution; the adapter update ``Δ_k`` goes through the
configured aggregator with the DP and watermark hooks exactly as in FedHomoLLM. A teacher never leaves its
client: it lives in this process's per-client table, is not part of the travelling vector, the messages
or the checkpoints.

Teachers with another tokeniser than the mentee (FedMKT, Fan et al., COLING 2025): the mentee's sequence is
rendered to text, tokenised by the teacher, the teacher's top-k ids are mapped into the mentee's vocabulary
(min-edit-distance map, cached under the run's cache directory) and its positions aligned onto the mentee's
(fedguard_train/alignment.py; one-to-one / one-to-many / many-to-one counted per round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard.files import atomic_write
from fedguard_train import alignment as al
from fedguard_train.config import HealSection, HeteroSection, ModelConfig
from fedguard_train.data import IGNORE_INDEX
from fedguard_train.distill import TopK, kd_loss, realign, remap, top_k
from fedguard_train.engine import LocalTrainer
from fedguard_train.healing import HealInfo, healed_model
from fedguard_train.hooks import LocalLoss, TrainerHook
from fedguard_train.models import attach_adapter, cache_root, family_of, load_base_model
from fedguard_train.trainers.base import LocalOutcome, RunResult, Trainer, seed_of


def load_model(source: str, family: str, tokenizer: str, *, seed: int) -> tuple[torch.nn.Module, Any]:
    """A frozen causal LM and its tokenizer: ``tiny:<family>`` (random, with the byte tokenizer or GPT-2's
    BPE), ``smollm2`` or a local model directory (own tokenizer only)."""
    if source.startswith("tiny:") and tokenizer == "gpt2":
        from transformers import AutoModelForCausalLM

        tok = al.gpt2_tokenizer()
        fam = family_of(None, source.split(":", 1)[1])
        torch.manual_seed(seed)
        cfg = fam.tiny_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
        model = AutoModelForCausalLM.from_config(cfg)
        model.requires_grad_(False)
        return model, tok
    if tokenizer == "gpt2":
        raise ConfigError(f"tokenizer 'gpt2' applies to tiny: models only; {source!r} has its own tokenizer")
    return load_base_model(ModelConfig(name_or_path=source, family=family), seed=seed)


def drop_layers(model: torch.nn.Module, keep: int | None, family_name: str = "auto") -> torch.nn.Module:
    """``model`` with ``keep`` of its ``M`` decoder blocks, evenly spaced (first and last kept), built by
    FedOST's family-agnostic :func:`fedguard_train.emulator.build_emulator` (no dropped block's tensor is
    copied). ``keep`` None or ``>= M``: the model itself."""
    from fedguard_train.emulator import EmulatorRecipe, build_emulator, decoder_blocks, fingerprint

    family = family_of(model, family_name)
    n = len(decoder_blocks(model, family))
    if keep is None or keep >= n:
        return model
    kept = tuple(int(i) for i in np.unique(np.linspace(0, n - 1, keep).round().astype(int)))
    recipe = EmulatorRecipe(family.name, n, 0, 0, 1 - len(kept) / n, kept, fingerprint(model))
    return build_emulator(model, recipe)


@dataclass
class Teacher:
    """One client's teacher (stays with that client) and how its outputs reach the mentee."""

    model: torch.nn.Module
    tokenizer: Any
    description: str
    vocab_map: np.ndarray | None  # None: same tokeniser as the mentee
    cache: dict[tuple[int, ...], tuple[list[int], np.ndarray]] = field(default_factory=dict)


class _Stats(TrainerHook):
    """Adds the round's mean LM and KD losses and alignment counts to the round's metrics row."""

    name = "hetero-stats"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lm: list[float] = []
        self.kd: list[float] = []
        self.counts = {"one_to_one": 0, "one_to_many": 0, "many_to_one": 0, "mentee_tokens": 0}

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        if self.lm:
            metrics["lm_loss"] = float(np.mean(self.lm))
            metrics["kd_loss"] = float(np.mean(self.kd))
        if self.counts["mentee_tokens"]:
            metrics["alignment"] = dict(self.counts)
        self.reset()


class FedHeteroLLM(Trainer):
    """The FedHeteroLLM trainer over a config (``hetero:`` section); ``hooks`` attach privacy components."""

    name: ClassVar[str] = "hetero"
    title: ClassVar[str] = "FedHeteroLLM"

    def setup(self) -> None:
        cfg = self.config
        if cfg.hetero is None:
            raise ConfigError("trainer 'hetero' needs a hetero: section")
        self.section: HeteroSection = cfg.hetero
        base, tokenizer = load_model(cfg.model.name_or_path, cfg.model.family, self.section.mentee_tokenizer,
                                     seed=cfg.seed)
        self.heal_info: HealInfo | None = None
        if self.section.mentee_heal is not None:
            if not self.section.mentee_layers:
                raise ConfigError("hetero.mentee_heal heals a layer-dropped mentee: set hetero.mentee_layers")
            base, self.heal_info = healed_model(base, tokenizer, self.section.mentee_layers, self.section.mentee_heal,
                                                family_name=cfg.model.family, progress=not self.quiet)
        else:
            base = drop_layers(base, self.section.mentee_layers, cfg.model.family)
        self.family = family_of(base, cfg.model.family)
        torch.manual_seed(seed_of(cfg.seed, "adapter-init"))
        self.use_travelling_model(attach_adapter(base, self.family, cfg.adapter), tokenizer)
        self.load_federated_data(tokenizer)
        self.local = LocalTrainer(cfg.training, tokenizer.pad_token_id)
        self.stats = _Stats()
        self.hooks.hooks.append(self.stats)
        self._mentee_texts: list[str] | None = None
        self._teachers: list[Teacher] | None = None  # built on first use: a run with lam 0 never needs them

    @property
    def teachers(self) -> list[Teacher]:
        """Each client's teacher (built, or loaded from the teacher cache, on first use)."""
        if self._teachers is None:
            self._teachers = [self._build_teacher(k) for k in range(self.config.federation.clients)]
        return self._teachers

    # -- teachers ------------------------------------------------------------------------------------
    def _build_teacher(self, client: int) -> Teacher:
        spec = dict(self.section.teachers[f"client{client}"])
        source, tok_choice = str(spec["source"]), str(spec.get("tokenizer", "own"))
        model, tokenizer = load_model(source, str(spec.get("family", "auto")), tok_choice,
                                      seed=seed_of(self.config.seed, "teacher", client))
        full_layers = _n_layers(model)
        heal_line = ""
        if spec.get("heal") is not None and spec.get("layers") is not None and int(spec["layers"]) < full_layers:
            model, info = healed_model(model, tokenizer, int(spec["layers"]), HealSection(**spec["heal"]),
                                       family_name=str(spec.get("family", "auto")), progress=not self.quiet)
            heal_line = f"; healed: held-out perplexity {info.ppl_before:,.1f} -> {info.ppl_after:,.1f}"
        else:
            model = drop_layers(model, spec.get("layers"), str(spec.get("family", "auto")))
        layers = _n_layers(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        vocab_map = None
        if al.token_texts(tokenizer) != al.token_texts(self.tokenizer):
            vocab_map = al.cached_vocab_map(tokenizer, self.tokenizer, cache_root() / "vocab-maps",
                                            progress=not self.quiet).mapping
        steps = int(spec.get("finetune_steps", 0))
        loss = (self._cached_finetune(Teacher(model, tokenizer, "", vocab_map), client, spec, steps)
                if steps else None)
        params = sum(p.numel() for p in model.parameters())
        description = (f"{source} ({family_of(model).name}, {layers} of {full_layers} blocks"
                       f"{', layer-dropped' if layers < full_layers else ''}{heal_line}, {params / 1e6:.2f}M "
                       f"parameters, "
                       f"{'GPT-2 BPE' if tok_choice == 'gpt2' else 'own'} tokenizer"
                       f"{', different from the mentee' if vocab_map is not None else ', same as the mentee'}; "
                       + (f"fine-tuned on client {client}'s data for {steps} steps, final loss {loss:.3f})"
                          if loss is not None else "not fine-tuned)"))
        model.requires_grad_(False)
        model.eval()
        return Teacher(model, tokenizer, description, vocab_map)

    def _teacher_ids(self, teacher: Teacher, ids: list[int]) -> list[int]:
        if teacher.vocab_map is None:
            return ids
        text = "".join(al.surface_tokens(self.tokenizer, ids))
        return list(teacher.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cached_finetune(self, teacher: Teacher, client: int, spec: dict[str, Any], steps: int) -> float:
        """:meth:`_finetune`, or its result loaded from ``$FEDGUARD_CACHE/teachers/<key>/`` when this exact
        teacher was fine-tuned before: the key hashes the teacher's source weights (fingerprint), its spec,
        the client's tokenised examples, the batch size and the seed, so a teacher is trained once per
        (teacher, client data) and a changed dataset, seed or recipe trains a new one. The cache holds the
        client's fine-tuned teacher: it stays on the client's machine like the teacher itself."""
        import hashlib
        import json
        import os
        import shutil

        from safetensors.torch import load_file, save_file

        from fedguard_train.emulator import fingerprint

        model = teacher.model
        items = [it["input_ids"] for it in self.client_items[client]]
        raw = {"weights": fingerprint(model), "spec": {k: spec[k] for k in sorted(spec)}, "client": client,
               "data": hashlib.sha256(json.dumps(items).encode()).hexdigest(), "seed": self.config.seed,
               "batch_size": self.config.training.batch_size, "version": 1}
        key = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:32]
        directory = cache_root() / "teachers" / key
        if (directory / "model.safetensors").is_file() and (directory / "meta.json").is_file():
            missing, unexpected = model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
            if unexpected or any(not n.endswith("lm_head.weight") for n in missing):
                raise ConfigError(f"the teacher cache {directory} does not fit client {client}'s teacher; delete it")
            return float(json.loads((directory / "meta.json").read_text())["loss"])
        loss = self._finetune(teacher, client, steps, float(spec.get("finetune_lr", 1e-4)))
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in model.state_dict().items():  # tied weights once
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensors[name] = tensor.detach().contiguous().clone()
        tmp = directory.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"key": raw, "loss": loss}, indent=2, default=str))
        if directory.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        return loss

    def _finetune(self, teacher: Teacher, client: int, steps: int, lr: float) -> float:
        """Full fine-tuning of a teacher on its own client's examples (prompt + response as plain LM, Adam),
        seeded per client; returns the last loss."""
        from fedguard_train.data import collate

        model, tokenizer = teacher.model, teacher.tokenizer
        items = [self._teacher_ids(teacher, it["input_ids"]) for it in self.client_items[client]]
        items = [ids[-256:] for ids in items if len(ids) >= 2]
        model.requires_grad_(True)
        model.train()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed_of(self.config.seed, "teacher-finetune", client))
        batch_size = self.config.training.batch_size
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            pick = torch.randint(len(items), (batch_size,), generator=generator).tolist()
            batch = collate([{"input_ids": items[i], "labels": items[i]} for i in pick], tokenizer.pad_token_id)
            loss = model(**batch).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return float(loss.detach())

    def _targets(self, teacher: Teacher, batch: dict[str, torch.Tensor]) -> TopK:
        """The teacher's top-k targets on the mentee's positions for one batch (sparse, mentee ids)."""
        s = self.section
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        # position t predicts token t+1: KD only where t+1 is a response (label) token
        want = torch.zeros_like(mask)
        want[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        vocab_map = teacher.vocab_map
        if vocab_map is None:
            with torch.no_grad():
                logits = teacher.model(input_ids=ids, attention_mask=mask.long()).logits
            self.stats.counts["one_to_one"] += int(want.sum())
            self.stats.counts["mentee_tokens"] += int(want.sum())
            return top_k(logits, s.top_k, s.temperature, mask=want)
        rows, sources = [], []
        for row in range(ids.shape[0]):
            seq = ids[row][mask[row]].tolist()
            key = tuple(seq)
            if key not in teacher.cache:
                t_ids = self._teacher_ids(teacher, seq)
                aligned = al.teacher_positions(al.surface_tokens(self.tokenizer, seq),
                                               al.surface_tokens(teacher.tokenizer, t_ids), s.alignment)
                teacher.cache[key] = (t_ids, aligned.source)
                for name, value in aligned.counts.items():
                    self.stats.counts[name] += value
                self.stats.counts["mentee_tokens"] += len(seq)
            t_ids, source = teacher.cache[key]
            rows.append(t_ids)
            src = np.full(ids.shape[1], -1, dtype=np.int64)
            src[: len(source)] = source
            sources.append(src)
        width = max(1, max(len(r) for r in rows))
        pad = teacher.tokenizer.pad_token_id
        t_batch = torch.full((len(rows), width), pad, dtype=torch.long)
        t_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, r in enumerate(rows):
            t_batch[row, : len(r)] = torch.tensor(r, dtype=torch.long)
            t_mask[row, : len(r)] = 1
        with torch.no_grad():
            logits = teacher.model(input_ids=t_batch, attention_mask=t_mask).logits
        sparse = remap(top_k(logits, s.top_k, s.temperature, mask=t_mask.bool()), vocab_map)
        moved = realign(sparse, torch.as_tensor(np.stack(sources)))
        return TopK(moved.ids, moved.probs, moved.mask & want)

    # -- the client step -----------------------------------------------------------------------------
    def kd_hook(self, client: int) -> Any:
        teacher, s = self.teachers[client], self.section
        other = self.hooks.local_loss(client, self.model)

        def loss_fn(step: LocalLoss) -> torch.Tensor:
            target = self._targets(teacher, dict(step.batch))
            # prompt tuning prepends its virtual tokens: the mentee's own positions are the last T
            logits = step.outputs.logits[:, -step.batch["input_ids"].shape[1]:]
            kd = kd_loss(logits, target, temperature=s.temperature, direction=s.direction)
            self.stats.lm.append(float(step.loss.detach()))
            self.stats.kd.append(float(kd.detach()))
            total = step.loss + s.lam * kd
            return other(step.with_loss(total)) if other is not None else total

        return loss_fn

    def local_train(self, round_id: int, client: int, start: np.ndarray) -> LocalOutcome:
        items = self.client_items[client]
        loss_hook = self.kd_hook(client) if self.section.lam > 0 else self.hooks.local_loss(client, self.model)
        local = self.local.train(self.model, items, seed=seed_of(self.config.seed, round_id, client),
                                 loss_hook=loss_hook, batch_hook=self.hooks.local_batch(client),
                                 progress=self.observer.step if self.observer is not None else None)
        return LocalOutcome(self.global_vector(), local.mean_loss, len(items))

    def teacher_descriptions(self) -> list[str]:
        return [f"client {k}: {t.description}" for k, t in enumerate(self.teachers)]

    def run(self, *, resume: bool = False, overwrite: bool = False, observer: Any = None) -> RunResult:
        """The base's run, then ``hetero.md`` in the run directory: each client's teacher and the LM loss, KD
        loss and alignment counts per round (the runner's report.md holds the usual tables)."""
        result = super().run(resume=resume, overwrite=overwrite, observer=observer)
        s = self.section
        scores = self.teacher_scores() if s.lam > 0 else []
        heal = f"- mentee healing: {self.heal_info.describe()}" if self.heal_info else "- mentee not healed"
        lines = [f"# FedHeteroLLM: teachers and distillation ({self.run_dir.name})", "",
                 f"- mentee: `{self.config.model.name_or_path}`"
                 f"{f' layer-dropped to {s.mentee_layers} blocks' if s.mentee_layers else ''}, adapter "
                 f"{self.config.adapter.method}; loss = LM + {s.lam} x KD ({s.direction} KL, temperature "
                 f"{s.temperature}, teacher top-{s.top_k}, alignment {s.alignment})", "", "## Teachers (never leave "
                 "their client)", "", *[f"- {d}" for d in self.teacher_descriptions()], "", heal, "",
                 *(["## Teachers on the held-out split", "", "| client | ROUGE-L | BLEU-4 | perplexity |",
                    "|---:|---:|---:|---:|"] + [f"| {k} | {r['rougeL']:.2f} | {r['bleu4']:.2f} | {r['perplexity']:,.2f} |"
                                               for k, r in enumerate(scores)] + [""] if scores else []),
                 "## Rounds", "",
                 "| round | LM loss | KD loss | one-to-one | one-to-many | many-to-one | mentee tokens |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result.history:
            c = row.get("alignment", {})
            lines.append(f"| {row['round']} | {row.get('lm_loss', float('nan')):.4f} | "
                         f"{row.get('kd_loss', float('nan')):.4f} | {c.get('one_to_one', '-')} | "
                         f"{c.get('one_to_many', '-')} | {c.get('many_to_one', '-')} | {c.get('mentee_tokens', '-')} |")
        (self.run_dir / "hetero.md").write_text("\n".join(lines) + "\n")
        extra = {"teachers": [{"description": d, **r} for d, r in zip(self.teacher_descriptions(), scores)],
                 "heal": self.heal_info.to_dict() if self.heal_info else None}
        atomic_write(self.run_dir / "hetero.json", json.dumps(extra, indent=2, default=str))
        return result

    def teacher_scores(self) -> list[dict[str, Any]]:
        """Each client's teacher scored on the run's held-out split (ROUGE/BLEU-4 of greedy answers,
        perplexity of the references), in its own tokeniser; the scores stay with the run's report."""
        from fedguard_train.data import tokenize
        from fedguard_train.metrics import evaluate

        out = []
        for teacher in self.teachers:
            items = tokenize(self.test_examples, teacher.tokenizer, self.config.data)
            row = evaluate(teacher.model, teacher.tokenizer, self.test_examples, items,
                           max_new_tokens=self.config.eval.max_new_tokens)
            out.append({k: row[k] for k in ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity")})
        return out


def _n_layers(model: torch.nn.Module) -> int:
    from fedguard_train.emulator import decoder_blocks

    return len(decoder_blocks(model, family_of(model)))


__all__ = ["FedHeteroLLM", "Teacher", "drop_layers", "load_model"]

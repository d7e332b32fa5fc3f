"""FedOST: federated offsite-tuning — clients adapt the server's LLM without ever holding it.

FATE-LLM §3.1, Figure 3(d); Offsite-Tuning (Xiao, Lin, Han 2023, arXiv 2302.04870). The server owns a
full model ``f`` of ``L`` blocks and will not release it. Once, it sends every client the *emulator*
(:mod:`fedguard_train.emulator`: adapter blocks ``0..a-1`` and ``L-b..L-1`` intact, the middle layer-dropped
and optionally distilled) — ``setup_bytes_down`` in every metrics row counts those bytes. Round ``r``: each
client loads the global adapter ``θ_r`` (the adapter blocks' weights) into its emulator, trains the adapter
for ``local_steps`` with the emulator frozen, and sends ``Δ_k = θ_k − θ_r`` with weight ``n_k``; the
configured fedguard aggregator computes ``Σ n_k Δ_k / Σ n_k`` (masking, Paillier, MPC; DP and watermark
hooks act on this adapter vector like on any other). The server then **plugs** ``θ_{r+1}`` into its full
model and evaluates it (ROUGE-L, BLEU-4, perplexity) beside the emulator with the same adapter
(``emulator_*`` keys: the gap is what keeps the full model valuable) and the zero-shot full model
(``zeroshot_*``).

In simulation, ``self.model`` (what the base trainer trains, serialises and checkpoints) is the
client-side :class:`~fedguard_train.emulator.EmulatorModel`, built from the payload bytes the server sends;
the full model lives in ``self.server_model`` and is touched only by server-side code (plug-in,
evaluation). Checkpoints hold the adapter blocks and the recipe (:func:`emulator.load_plugged_model`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard_train.config import OSTSection
from fedguard_train.emulator import (
    EmulatorModel,
    EmulatorRecipe,
    build_emulator,
    distilled_emulator,
    emulator_from_payload,
    load_adapter_state,
    make_recipe,
    payload,
)
from fedguard_train.engine import LocalTrainer, gathered
from fedguard_train.metrics import evaluate
from fedguard_train.models import family_of
from fedguard_train.trainers.base import LocalOutcome, Trainer, seed_of

SCORES = ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity")


class FedOST(Trainer):
    """The FedOST trainer over a config (``trainer: ost``, section ``ost:``)."""

    name: ClassVar[str] = "ost"
    title: ClassVar[str] = "FedOST"

    @property
    def adapter_label(self) -> str:
        ost = self.config.ost or OSTSection()
        middle = "distilled" if ost.distill else "layer-dropped"
        return f"offsite blocks (bottom {ost.bottom}, top {ost.top}, {middle} middle at drop {ost.drop:g})"

    def setup(self) -> None:
        from fedguard_train.emulator import load_server_model

        cfg = self.config
        if cfg.training.nproc_per_node > 1:
            raise ConfigError("trainer 'ost' trains clients in-process (training.nproc_per_node = 1)")
        ost = cfg.ost or OSTSection()
        full, tokenizer = load_server_model(cfg.model, seed=cfg.seed)
        self.family = family_of(full, cfg.model.family)
        self.server_model: torch.nn.Module = full
        recipe = make_recipe(full, self.family, bottom=ost.bottom, top=ost.top, drop=ost.drop)
        if ost.distill:
            server_emulator, recipe = distilled_emulator(
                full, recipe, tokenizer, source=ost.public_corpus, seq_len=ost.distill_seq_len,
                max_tokens=ost.distill_max_tokens, batch_size=ost.distill_batch_size, lr=ost.distill_lr,
                seed=seed_of(cfg.seed, "distill") % 2**31, progress=not self.quiet)
        else:
            server_emulator = build_emulator(full, recipe)
        self.recipe: EmulatorRecipe = recipe
        # what travels once: the emulator (adapter blocks included) as bytes; the client rebuilds it from them
        sent = payload(server_emulator)
        del server_emulator
        self.setup_bytes_per_client = len(sent)
        client_emulator = emulator_from_payload(sent)
        self.use_travelling_model(EmulatorModel(client_emulator, recipe), tokenizer)
        self.load_federated_data(tokenizer)
        self.local = LocalTrainer(cfg.training, tokenizer.pad_token_id)
        # the server keeps its original adapter blocks for the zero-shot reference
        self._original = {k: v.detach().clone() for k, v in self._plugged_state().items()}
        self._zeroshot: dict[str, Any] | None = None

    def local_train(self, round_id: int, client: int, start: np.ndarray) -> LocalOutcome:
        items = self.client_items[client]
        local = self.local.train(self.model, items, seed=seed_of(self.config.seed, round_id, client),
                                 loss_hook=self.hooks.local_loss(client, self.model),
                                 batch_hook=self.hooks.local_batch(client),
                                 progress=self.observer.step if self.observer is not None else None)
        return LocalOutcome(self.global_vector(), local.mean_loss, len(items))

    # -- server side ---------------------------------------------------------------------------------------
    def _plugged_state(self) -> dict[str, torch.Tensor]:
        """The server model's current adapter-block tensors (full-model names)."""
        wanted = set(self.model.adapter_names().values())  # type: ignore[operator]
        return {k: v for k, v in self.server_model.state_dict().items() if k in wanted}

    def plug_global(self) -> None:
        """Copy the current global adapter (held by the client-side model) into the server's full model."""
        params = dict(self.model.named_parameters())
        names: dict[str, str] = self.model.adapter_names()  # type: ignore[operator]
        load_adapter_state(self.server_model, self.recipe, {full: params[mine].detach() for mine, full in names.items()})

    def _score(self, model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, self.tokenizer, self.test_examples, self.test_items,
                        max_new_tokens=self.config.eval.max_new_tokens)

    def zeroshot(self) -> dict[str, Any]:
        """The full model with its own (original) adapter blocks: no federated tuning."""
        if self._zeroshot is None:
            current = {k: v.detach().clone() for k, v in self._plugged_state().items()}
            load_adapter_state(self.server_model, self.recipe, self._original)
            self._zeroshot = self._score(self.server_model)
            load_adapter_state(self.server_model, self.recipe, current)
        return self._zeroshot

    def evaluate(self) -> dict[str, Any]:
        """Plugged full model (the main scores), emulator + adapter (``emulator_*``), zero-shot full model
        (``zeroshot_*``), and the one-time emulator download (``setup_bytes_down``, all clients)."""
        with gathered(self._params()):
            self.plug_global()
            row = self._score(self.server_model)
            emulator = self._score(self.model)
        zeroshot = self.zeroshot()
        for key in SCORES:
            row[f"emulator_{key}"] = emulator[key]
            row[f"zeroshot_{key}"] = zeroshot[key]
        row["emulator_samples"] = emulator["samples"]
        row["setup_bytes_down"] = self.setup_bytes_per_client * len(self.client_items)
        row["emulator_blocks"] = len(self.recipe.kept)
        row["full_blocks"] = self.recipe.n_layers
        if self.recipe.distill is not None:
            row["distill_nmse"] = self.recipe.distill["nmse"]
            row["distill_nmse_before"] = self.recipe.distill["nmse_before"]
        return row

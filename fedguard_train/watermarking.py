"""The ``watermark:`` section of a run config: each client embeds its own FedIPR sign watermark.

::

    watermark:
      bits: 64           # signature bits per client (the capacity planner refuses too many)
      target: norm       # norm (norm scales, made trainable beside the adapter) | lora | prompt
      alpha: 0.03        # regulariser weight
      gamma0: 1.0        # margin of the hinge relu(gamma0 - b_j (E^T theta)_j)
      mode: gram         # norm targets: gram (survives norm folding and output-side permutations /
                         # rotations) | invariant (norm folding only); lora/prompt targets are plain
      key_dir: null      # where the secret keys go (default <run_dir>/keys; files of mode 0600)
      directions: 1      # gram: secret directions per norm block (more feature values than bits)
      server_embed_steps: 0   # > 0: the server re-embeds every client's mark after aggregation (and DP
      server_embed_lr: 1.0e-2 # noise): post-processing, no privacy cost, but the server holds the keys

Before the travelling layout is fixed, the hook marks the norm scales trainable (target ``norm``) and
generates one key per client against the starting model (or reloads them from ``key_dir`` on resume,
refusing, without touching any key, a missing key file or keys of another configuration), writes each
key's commitment (``client-<k>.commitment.json``, :mod:`fedguard.watermark.commitment`) at round 0 and
records the commitments in the run state;
each client's local loss gets its own regulariser; after every round the global model is verified
against every key and the round's row reports the matched bits per client and how many clients'
ownership claims hold at p <= 1e-6 (FedIPR, Li et al. TPAMI 2022; FATE-LLM §3.1).

With ``server_embed_steps > 0`` the hook's ``aggregate`` seam (after the DP hook's noise) loads the released
``θ_r + mean``, takes up to that many Adam steps on the sum of every client's regulariser
(:func:`fedguard.watermark.server.server_embed`) and returns the new mean, so the checkpointed vector and
the next round start from the re-embedded model. Clients thereby trust the server with their keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard_train.config import TrainConfig, WatermarkSection, section_from_mapping
from fedguard_train.hooks import LossFn, TrainerHook


class WatermarkHook(TrainerHook):
    """Per-client FedIPR sign watermarks embedded during federated training."""

    name = "watermark"

    def __init__(self, section: WatermarkSection | Mapping[str, Any], *, config: TrainConfig,
                 rng: SecureRNG | None = None) -> None:
        """``section``: the typed ``watermark:`` section (a plain mapping is checked into one). ``rng``
        defaults to a fresh OS-seeded stream (keys are secrets); tests pass a seeded one."""
        if not isinstance(section, WatermarkSection):
            section = section_from_mapping(WatermarkSection, section, "watermark")
        if config.training.nproc_per_node > 1:
            raise ConfigError("watermark needs in-process clients (training.nproc_per_node = 1)")
        self.bits, self.target, self.alpha, self.gamma0 = section.bits, section.target, section.alpha, section.gamma0
        self.mode = section.mode if section.target == "norm" else "plain"
        self.directions = section.directions
        self.key_dir = Path(section.key_dir or Path(config.run_dir) / "keys")
        self.n_clients = config.n_parties
        self.run_dir = config.run_dir
        self.marks: list[Any] = []
        self.commitments: list[str] = []
        self._rng = rng
        self.server_embed_steps, self.server_embed_lr = section.server_embed_steps, section.server_embed_lr
        if self.server_embed_steps and config.training.zero_stage == 3:
            raise ConfigError("watermark.server_embed_steps needs unpartitioned parameters (training.zero_stage < 3)")
        self._model: torch.nn.Module | None = None
        self._layout: Any = None
        self._global: np.ndarray | None = None
        self.server_steps_taken: list[int] = []

    def _path(self, client: int) -> Path:
        return self.key_dir / f"client-{client}.key"

    def _commitment_path(self, client: int) -> Path:
        return self.key_dir / f"client-{client}.commitment.json"

    def prepare_model(self, model: torch.nn.Module) -> None:
        from fedguard.watermark import SignWatermark, load_key, make_sign_key, prepare_norm_targets, save_key
        from fedguard.watermark.commitment import commit, make_commitment, save_commitment

        if self.target == "norm":
            prepare_norm_targets(model)
        paths = [self._path(c) for c in range(self.n_clients)]
        present = [c for c, path in enumerate(paths) if path.exists() or path.is_symlink()]
        if present and len(present) < self.n_clients:
            missing = [str(paths[c]) for c in range(self.n_clients) if c not in present]
            raise ConfigError(f"watermark key file(s) missing: {', '.join(missing)} ({self.key_dir} holds the keys "
                              f"of clients {present}); keys are never regenerated or replaced, so no key was "
                              f"touched: restore the missing file(s), or move all keys away / set "
                              f"watermark.key_dir for new ones")
        if present:
            keys = [load_key(path) for path in paths]  # resume: the same secrets
            problems = [f"{paths[c]}: {what}" for c, key in enumerate(keys) for what in self._mismatch(key, c)]
            if problems:
                raise ConfigError.collect([*problems, f"the keys in {self.key_dir} belong to another watermark "
                                           f"configuration and are never replaced: move them away or set "
                                           f"watermark.key_dir"])
            self.commitments = [commit(key) for key in keys]
        else:
            self.key_dir.mkdir(parents=True, exist_ok=True)
            rng = self._rng if self._rng is not None else SecureRNG()
            keys = [make_sign_key(model, bits=self.bits, target=self.target, n_clients=self.n_clients,
                                  alpha=self.alpha, gamma0=self.gamma0, owner=f"client-{c}", rng=rng,
                                  mode=self.mode, directions=self.directions)
                    for c in range(self.n_clients)]
            # round 0: each key is committed to (public hash, see fedguard.watermark.commitment) before
            # any training, beside the key and in every checkpoint's state
            for c, key in enumerate(keys):
                save_key(key, paths[c])
                save_commitment(make_commitment(key, context=f"run {self.run_dir}, client {c}, round 0"),
                                self._commitment_path(c))
            self.commitments = [commit(key) for key in keys]
        self.marks = [SignWatermark(key, model) for key in keys]  # type: ignore[arg-type]
        self._model = model

    def _mismatch(self, key: Any, client: int) -> list[str]:
        """How a stored key differs from what this section would generate for ``client``."""
        wanted = {"scheme": "sign", "n_bits": self.bits, "alpha": self.alpha, "gamma0": self.gamma0,
                  "owner": f"client-{client}", "mode": self.mode}
        out = [f"{name} is {getattr(key, name, None)!r}, the config says {value!r}"
               for name, value in wanted.items() if getattr(key, name, None) != value]
        found = sorted({b.directions for b in getattr(key, "blocks", ())})
        if found and found != [self.directions]:
            out.append(f"directions is {found[0] if len(found) == 1 else found}, the config says {self.directions}")
        kinds = sorted({b.kind for b in getattr(key, "blocks", ())})
        if kinds != [self.target]:
            out.append(f"target is {', '.join(kinds) or None!r}, the config says {self.target!r}")
        return out

    def local_loss(self, client_id: int, model: torch.nn.Module) -> LossFn | None:
        mark = self.marks[client_id]
        return lambda step: step.loss + mark.loss()

    def on_round_start(self, round_id: int, participants: Any) -> None:
        if self.server_embed_steps and self._model is not None:
            from fedguard.params import flatten, layout_of

            if self._layout is None:
                self._layout = layout_of(self._model)  # the trainer's travelling layout (same function)
            self._global = flatten(self._model, self._layout)  # θ_r: the model holds it before clients train

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Any) -> np.ndarray:
        """Server-side embedding on the released ``θ_r + mean`` (see the module docstring)."""
        if not self.server_embed_steps or self._model is None or self._global is None:
            return mean
        from fedguard.params import flatten, load_vector
        from fedguard.watermark.server import server_embed

        start = self._global
        load_vector(self._model, self._layout, start + mean)
        self.server_steps_taken.append(server_embed(self._model, self.marks, self.server_embed_steps,
                                                    self.server_embed_lr))
        return (flatten(self._model, self._layout) - start).astype(mean.dtype)

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        detections = [m.detect() for m in self.marks]
        metrics["watermark_matched"] = [d.matched for d in detections]
        metrics["watermark_bits"] = detections[0].bits if detections else 0
        metrics["watermark_verified"] = sum(d.verdict for d in detections)
        metrics["watermark_max_p"] = max(d.p_value for d in detections) if detections else 1.0
        if self.server_embed_steps:
            metrics["watermark_server_steps"] = self.server_steps_taken[-1] if self.server_steps_taken else 0

    def state_dict(self) -> dict[str, Any]:
        return {"key_dir": str(self.key_dir), "key_commitments": list(self.commitments)}

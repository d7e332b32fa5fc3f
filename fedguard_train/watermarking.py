"""The ``watermark:`` section of a run config: each client embeds its own FedIPR sign watermark.

::

    watermark:
      bits: 32           # signature bits per client (the capacity planner refuses too many)
      target: norm       # norm (norm scales, made trainable beside the adapter) | lora | prompt
      alpha: 3.0e-3      # regulariser weight
      gamma0: 1.0        # margin of the hinge relu(gamma0 - b_j (E^T theta)_j)
      key_dir: null      # where the secret keys go (default <run_dir>/keys; files of mode 0600)

Before the travelling layout is fixed, the hook marks the norm scales trainable (target ``norm``) and
generates one key per client against the starting model (or reloads them from ``key_dir`` on resume);
each client's local loss gets its own regulariser; after every round the global model is verified
against every key and the round's row reports the matched bits per client and how many clients'
ownership claims hold at p <= 1e-6 (FedIPR, Li et al. TPAMI 2022; FATE-LLM §3.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedguard.errors import ConfigError
from fedguard.rng import SecureRNG
from fedguard_train.config import TrainConfig
from fedguard_train.hooks import TrainerHook

_KEYS = {"bits", "target", "alpha", "gamma0", "key_dir"}


class WatermarkHook(TrainerHook):
    """Per-client FedIPR sign watermarks embedded during federated training."""

    name = "watermark"

    def __init__(self, section: Mapping[str, Any], *, config: TrainConfig, rng: SecureRNG | None = None) -> None:
        """``rng`` defaults to a fresh OS-seeded stream (keys are secrets); tests pass a seeded one."""
        unknown = sorted(set(section) - _KEYS)
        if unknown:
            raise ConfigError(f"unknown watermark key(s) {unknown}; known: {sorted(_KEYS)}")
        self.bits = int(section.get("bits", 32))
        self.target = str(section.get("target", "norm"))
        self.alpha = float(section.get("alpha", 3e-3))
        self.gamma0 = float(section.get("gamma0", 1.0))
        problems = []
        if self.target not in ("norm", "lora", "prompt"):
            problems.append(f"watermark.target must be 'norm', 'lora' or 'prompt', got {self.target!r}")
        if self.bits < 1:
            problems.append(f"watermark.bits must be >= 1, got {self.bits}")
        if not self.alpha > 0:
            problems.append(f"watermark.alpha must be > 0, got {self.alpha}")
        if config.training.nproc_per_node > 1:
            problems.append("watermark needs in-process clients (training.nproc_per_node = 1)")
        if problems:
            raise ConfigError.collect(problems)
        self.key_dir = Path(section.get("key_dir") or Path(config.run_dir) / "keys")
        self.n_clients = config.federation.clients
        self.marks: list[Any] = []
        self._rng = rng

    def _path(self, client: int) -> Path:
        return self.key_dir / f"client-{client}.key"

    def prepare_model(self, model: torch.nn.Module) -> None:
        from fedguard.watermark import SignWatermark, load_key, make_sign_key, prepare_norm_targets, save_key

        if self.target == "norm":
            prepare_norm_targets(model)
        if all(self._path(c).is_file() for c in range(self.n_clients)):
            keys = [load_key(self._path(c)) for c in range(self.n_clients)]  # resume: the same secrets
        else:
            self.key_dir.mkdir(parents=True, exist_ok=True)
            rng = self._rng if self._rng is not None else SecureRNG()
            keys = [make_sign_key(model, bits=self.bits, target=self.target, n_clients=self.n_clients,  # type: ignore[arg-type]
                                  alpha=self.alpha, gamma0=self.gamma0, owner=f"client-{c}", rng=rng)
                    for c in range(self.n_clients)]
            for c, key in enumerate(keys):
                save_key(key, self._path(c))
        self.marks = [SignWatermark(key, model) for key in keys]  # type: ignore[arg-type]

    def local_loss(self, client_id: int, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        mark = self.marks[client_id]
        return lambda loss: loss + mark.loss()

    def on_round_end(self, round_id: int, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        detections = [m.detect() for m in self.marks]
        metrics["watermark_matched"] = [d.matched for d in detections]
        metrics["watermark_bits"] = detections[0].bits if detections else 0
        metrics["watermark_verified"] = sum(d.verdict for d in detections)
        metrics["watermark_max_p"] = max(d.p_value for d in detections) if detections else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"key_dir": str(self.key_dir)}

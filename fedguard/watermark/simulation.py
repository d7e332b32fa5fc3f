"""A small in-process federated run with per-client watermarks, seconds long (the trainer's ``watermark:``
section does the same on DeepSpeed and real models).

K clients share a tiny randomly initialised GPT-2 with a LoRA adapter and trainable norm scales. Each
round every client loads the global adapter, trains locally on its own slice of a synthetic
next-token task with its own :class:`~fedguard.watermark.sign.SignWatermark` regulariser (two lines in the
loop), and sends ``local − global``; the server runs weighted FedAvg through
:func:`fedguard.federation.round.run_round` (the round every trainer runs) with the plaintext aggregator. The same function with
``watermark=False`` is the fidelity baseline: identical seeds, data and batches.

Under client-level DP (``dp_clip``, ``dp_noise``) each client's update is clipped to L2 norm C and the
released mean gets ``N(0, (zC/K)²)`` per coordinate (the Gaussian mechanism, central placement);
``server_embed_steps`` adds the server-side component (:func:`fedguard.watermark.server.server_embed`).

The task (as in ``fedguard demo``): sequences follow a secret successor permutation of the vocabulary
with client-specific start tokens and noise, so eval loss measures how well the federation learnt it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedguard.dp.client_level import clip_to_norm
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation.plaintext import PlaintextAggregator
from fedguard.federation.round import ClientResult, RoundHooks, run_round
from fedguard.params import flatten, layout_of, load_vector
from fedguard.rng import SecureRNG
from fedguard.toy_task import successor_sequences
from fedguard.watermark.keys import Mode, SignKey
from fedguard.watermark.server import server_embed
from fedguard.watermark.sign import SignWatermark, make_sign_key
from fedguard.watermark.targets import prepare_norm_targets
from fedguard.watermark.verify import Detection


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    clients: int = 4
    rounds: int = 4
    local_steps: int = 15
    batch_size: int = 16
    lr: float = 5e-3
    bits: int = 32
    vocab: int = 48
    seq_len: int = 16
    n_embd: int = 64
    n_layer: int = 4
    gamma0: float = 1.0
    alpha: float = 3e-3
    mode: Mode = "invariant"
    directions: int = 1  # gram mode: secret directions per norm block
    dp_clip: float | None = None
    dp_noise: float = 0.0
    server_embed_steps: int = 0
    server_embed_lr: float = 1e-2
    seed: str = "watermark-simulation"

    def __post_init__(self) -> None:
        problems = [f"{n} must be >= 1, got {getattr(self, n)}"
                    for n in ("clients", "rounds", "local_steps", "batch_size", "bits", "n_layer")
                    if getattr(self, n) < 1]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.dp_clip is not None and not self.dp_clip > 0:
            problems.append(f"dp_clip must be > 0, got {self.dp_clip}")
        if self.dp_noise < 0 or (self.dp_noise > 0 and self.dp_clip is None):
            problems.append(f"dp_noise must be >= 0 and needs dp_clip, got {self.dp_noise}")
        if self.server_embed_steps < 0 or not self.server_embed_lr > 0:
            problems.append("server_embed_steps must be >= 0 and server_embed_lr > 0")
        if problems:
            raise ConfigError.collect(problems)


@dataclass
class SimulationResult:
    eval_loss: float
    eval_history: list[float]
    keys: list[SignKey] = field(default_factory=list)
    detections: list[list[Detection]] = field(default_factory=list)  # [round][client]
    model: torch.nn.Module | None = None
    initial_model_state: dict[str, torch.Tensor] = field(default_factory=dict)


def tiny_gpt2_lora(config: SimulationConfig, torch_seed: int) -> torch.nn.Module:
    """Tiny random GPT-2 + LoRA (r=8, alpha=32 on c_attn/c_proj/c_fc) with trainable norm scales."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(torch_seed)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab, n_positions=config.seq_len, n_embd=config.n_embd,
                                      n_layer=config.n_layer, n_head=4, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0))
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    prepare_norm_targets(model)
    return model


class CentralGaussianNoise(RoundHooks):
    """Central client-level DP on the released mean of K clipped updates (equal weights): the Gaussian
    mechanism adds N(0, std²) per coordinate with std = z·C/K, drawn from OS entropy (a seeded noise
    stream would let anyone who knows the seed subtract it). ``std = 0``: no noise."""

    name = "central-noise"

    def __init__(self, std: float, rng: SecureRNG | None = None) -> None:
        self.std = std
        self._rng = rng if rng is not None else SecureRNG()

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        if not self.std:
            return mean
        return mean + self._rng.normal(mean.size, std=self.std).reshape(mean.shape).astype(mean.dtype)


def task_data(config: SimulationConfig, rng: SecureRNG) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-client training sequences and a pooled test set of the successor-permutation task."""
    gen = rng.spawn("data").numpy_generator()
    perm = gen.permutation(config.vocab)

    def sample(client: int, n: int) -> torch.Tensor:
        return successor_sequences(client, config.clients, n, perm, gen, seq_len=config.seq_len)

    train = [sample(c, 256) for c in range(config.clients)]
    test = torch.cat([sample(c, 64) for c in range(config.clients)])
    return train, test


def run_federated(config: SimulationConfig, *, watermark: bool = True) -> SimulationResult:
    """Run the simulation; with ``watermark`` each client embeds its own key (K independent keys)."""
    rng = SecureRNG.for_testing(config.seed)
    model = tiny_gpt2_lora(config, rng.spawn("init").torch_seed())
    train, test = task_data(config, rng)
    layout = layout_of(model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys: list[SignKey] = []
    marks: list[SignWatermark] = []
    if watermark:
        for c in range(config.clients):
            key = make_sign_key(model, bits=config.bits, n_clients=config.clients, gamma0=config.gamma0,
                                alpha=config.alpha, owner=f"client-{c}", rng=rng.spawn(f"key/{c}"),
                                mode=config.mode, directions=config.directions)
            keys.append(key)
            marks.append(SignWatermark(key, model))
    spec = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1 << 16)
    aggregator = PlaintextAggregator()
    batch_gen = torch.Generator().manual_seed(rng.spawn("batches").torch_seed())

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=test, labels=test).loss)

    noise = CentralGaussianNoise(config.dp_noise * float(config.dp_clip or 0.0) / config.clients)
    history, detections = [], []
    for r in range(1, config.rounds + 1):

        def client_step(c: int, global_vec: np.ndarray) -> ClientResult:
            load_vector(model, layout, global_vec)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
            losses = []
            for _ in range(config.local_steps):
                idx = torch.randint(0, train[c].shape[0], (config.batch_size,), generator=batch_gen)
                loss = model(input_ids=train[c][idx], labels=train[c][idx]).loss
                if watermark:
                    loss = loss + marks[c].loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            update = flatten(model, layout) - global_vec
            if config.dp_clip is not None:
                update, _ = clip_to_norm(update, config.dp_clip)
            return ClientResult(update, int(train[c].shape[0]), float(np.mean(losses)))

        run_round(r, flatten(model, layout), range(config.clients), client_step, aggregator, spec,
                  hooks=noise, load=lambda v: load_vector(model, layout, v), rng=rng.spawn(f"round/{r}"))
        if watermark and config.server_embed_steps:
            server_embed(model, marks, config.server_embed_steps, config.server_embed_lr)
        history.append(evaluate())
        if watermark:
            detections.append([m.detect() for m in marks])
    return SimulationResult(history[-1], history, keys, detections, model, initial)

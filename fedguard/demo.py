"""``fedguard demo``: an in-process federated simulation that shows the runtime at work.

The seconds-long companion of ``make demo`` (FedHomoLLM on SmolLM2, ``fedguard_train``): N clients share
one tiny, randomly initialised GPT-2 (one copy of the frozen base weights in memory) with a LoRA adapter, train
locally on non-IID synthetic sequences, and send their adapter updates through an aggregator
(``plaintext`` by default) as serialised messages; the server applies weighted FedAvg. Each round is
:func:`fedguard.federation.round.run_round`, the same round every trainer runs. Each round prints
one table row: losses, who dropped, bytes up/down from the real messages, and seconds.

The task is :mod:`fedguard.toy_task`: non-IID sequences that follow one secret successor permutation.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedguard.console import Column, RoundTable
from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError, ProtocolAbort
from fedguard.federation.protocol import Aggregator
from fedguard.federation.registry import make_aggregator
from fedguard.federation.round import ClientResult, run_round
from fedguard.params import flatten, layout_of, load_vector
from fedguard.rng import SecureRNG
from fedguard.toy_task import successor_sequences

if TYPE_CHECKING:
    from fedguard.cli import Commands

VOCAB = 48
SEQ_LEN = 16


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    clients: int = 3
    rounds: int = 5
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    drop_rate: float = 0.0
    aggregator: str = "plaintext"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("clients", "rounds", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.drop_rate < 1:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if problems:
            raise ConfigError.collect(problems)


def build_model(seed: int) -> torch.nn.Module:
    """A tiny random GPT-2 with a LoRA adapter (r=8, alpha=32, dropout 0.1: FATE-LLM's defaults)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0))
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def run_demo(config: DemoConfig, *, table: RoundTable | None = None) -> list[dict[str, Any]]:
    """Run the simulation; returns one metrics dict per round."""
    with make_aggregator(config.aggregator) as aggregator:  # closed at the end (MPC's party processes)
        return _simulate(config, aggregator, table)


def _simulate(config: DemoConfig, aggregator: Aggregator, table: RoundTable | None) -> list[dict[str, Any]]:
    rng = SecureRNG.for_testing(f"demo/{config.seed}")
    data_rng = rng.spawn("data").numpy_generator()
    perm = data_rng.permutation(VOCAB)
    train = [successor_sequences(c, config.clients, 256 * (c + 1), perm, data_rng, seq_len=SEQ_LEN) for c in range(config.clients)]
    test = torch.cat([successor_sequences(c, config.clients, 64, perm, data_rng, seq_len=SEQ_LEN) for c in range(config.clients)])
    model = build_model(config.seed)
    layout = layout_of(model)
    spec = FixedPointSpec(clip=1.0, value_bits=24, ring_bits=64, max_weight=1 << 16)
    table = table or RoundTable([
        Column("round", "round", "{:d}", 5), Column("clients", "clients", "{:d}", 7),
        Column("dropped", "dropped", "{}", 8), Column("train_loss", "train loss", "{:.4f}", 10),
        Column("eval_loss", "eval loss", "{:.4f}", 10), Column("kib_up", "KiB up", "{:.1f}", 9),
        Column("kib_down", "KiB down", "{:.1f}", 9), Column("seconds", "seconds", "{:.2f}", 8),
    ])
    torch_gen = torch.Generator().manual_seed(rng.spawn("batches").torch_seed())

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return float(_loss(model, test))

    print(f"fedguard demo: {config.clients} clients, tiny GPT-2 + LoRA ({layout.size} trainable values "
          f"of {sum(p.numel() for p in model.parameters())}), aggregator={config.aggregator}")
    table.row({"round": 0, "eval_loss": evaluate()})
    history = []
    for r in range(1, config.rounds + 1):
        start = time.perf_counter()
        losses: list[float] = []

        def client_step(c: int, global_vec: np.ndarray, losses: list[float] = losses) -> ClientResult:
            load_vector(model, layout, global_vec)  # the shared base weights stay; only adapters swap
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
            mine = []
            for _ in range(config.local_steps):
                idx = torch.randint(0, train[c].shape[0], (config.batch_size,), generator=torch_gen)
                loss = _loss(model, train[c][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                mine.append(float(loss.detach()))
            losses.extend(mine)
            return ClientResult(flatten(model, layout) - global_vec, int(train[c].shape[0]), float(np.mean(mine)))

        drop_rng = rng.spawn(f"drops/{r}")
        drop_at = {c: aggregator.input_stage for c in range(config.clients)
                   if drop_rng.uniform01(1)[0] < config.drop_rate}
        try:
            result = run_round(r, flatten(model, layout), range(config.clients), client_step, aggregator, spec,
                               load=lambda v: load_vector(model, layout, v), rng=rng.spawn(f"round/{r}"),
                               drop_at=drop_at)
        except ProtocolAbort as err:  # run_round has put the global adapter back
            print(f"round {r} aborted: {err}")
            continue
        row = {
            "round": r,
            "clients": len(result.contributors),
            "dropped": ",".join(str(c) for c in sorted(drop_at)) or "-",
            "train_loss": float(np.mean(losses)),
            "eval_loss": evaluate(),
            "kib_up": result.bytes_up / 1024,
            "kib_down": result.aggregation.traffic.bytes_down() / 1024,
            "seconds": time.perf_counter() - start,
        }
        table.row(row)
        history.append(row)
    return history


def register_cli(commands: Commands) -> None:
    p = commands.command("demo", help="run an in-process federated simulation on a tiny model")
    defaults = DemoConfig()
    p.add_argument("--clients", type=int, default=defaults.clients)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--local-steps", type=int, default=defaults.local_steps)
    p.add_argument("--drop-rate", type=float, default=defaults.drop_rate,
                   help="probability that a client drops before sending its input, each round")
    p.add_argument("--aggregator", default=defaults.aggregator)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(handler=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    config = DemoConfig(clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                        drop_rate=args.drop_rate, aggregator=args.aggregator, seed=args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_demo(config)
    return 0

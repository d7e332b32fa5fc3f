"""Communication cost of FedLLM at full scale (FATE-LLM §4, Table 3), measured without weights.

A 6B-7B-class model is instantiated on PyTorch's ``meta`` device (shapes only, no memory), the peft method
is attached exactly as in training, and the travelling parameters are counted with the same
:func:`fedguard.params.layout_of` the runtime uses. Message sizes come from :func:`fedguard.wire.encoded_size`
of the very messages the runtime sends: the float32 global-adapter broadcast, and the uint64 ring vector a
client uploads through an aggregator (``d`` values + 1 weight slot, in the ring's width: 8 bytes for the 64-bit
ring, 4 for a 32-bit one, 2 and 1 for 16- and 8-bit quantised uploads; :mod:`fedguard.quantise`).

Two shapes: ChatGLM-6B's (the paper's model: hidden 4096, 28 layers, vocabulary 130,528, one tied
embedding, 6.17B parameters; built as a transformers ``glm`` config whose gated MLP width 10,923 matches
ChatGLM's 4096 -> 16384 -> 4096 MLP in size, and whose separate q/k/v projections make LoRA on
``q_proj`` + ``v_proj`` add exactly the parameters of ChatGLM's fused ``query_key_value`` LoRA:
r·(4096 + 3·4096) per layer) and LLaMA-7B's. Methods: LoRA, P-Tuning-v2, Houlsby bottleneck adapters
(``bottleneck_size`` 16; the paper gives no figure for them) and full fine-tuning.

Bytes per round by aggregator and encoding (:func:`round_bytes_table`) are measured from real rounds: every
available aggregator (plaintext, masking, paillier, mpc) runs :func:`fedguard.federation.aggregate_updates`
over serialised messages at two update lengths, the traffic log gives each client's bytes up and down,
and, as every protocol's messages are affine in the update length (Paillier: up to one ciphertext of
rounding), the two rounds give bytes per value and a fixed part, from which the rows project one round of
the 6B-7B LoRA update. Each row is compared with a float32 upload of the same values.

    python -m fedguard_train.comm_cost                  # Table 3, then bytes per round per aggregator
    python -m fedguard_train.comm_cost --no-rounds      # Table 3 only
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from fedguard import wire
from fedguard.errors import ConfigError
from fedguard.params import layout_of
from fedguard.quantise import UploadPlan, plan_upload
from fedguard.rng import SecureRNG
from fedguard_train.config import AdapterConfig
from fedguard_train.models import FAMILIES, attach_adapter

PAPER_TABLE3: dict[str, tuple[float | None, float]] = {"lora": (3.6e6, 0.058), "p-tuning-v2": (29.3e6, 0.475),
                                                      "full": (None, 100.0)}
Method = Literal["lora", "p-tuning-v2", "bottleneck", "full"]
METHODS: tuple[Method, ...] = ("lora", "p-tuning-v2", "bottleneck", "full")


def _configs() -> dict[str, tuple[str, Any]]:
    from transformers import GlmConfig, LlamaConfig

    return {
        "ChatGLM-6B shapes": ("glm", GlmConfig(vocab_size=130528, hidden_size=4096, intermediate_size=10923,
                                               num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=32,
                                               head_dim=128, max_position_embeddings=2048,
                                               pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                               tie_word_embeddings=True)),
        "LLaMA-7B": ("llama", LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
    }


def _message_bytes(n: int, dtype: type, kind: str) -> int:
    msg = wire.Message(kind=kind, round=1, stage="input", sender=0, recipient=wire.SERVER,
                       arrays={"x": np.broadcast_to(dtype(0), (n,))})
    return wire.encoded_size(msg)


def communication_table() -> list[dict[str, Any]]:
    """Rows of (model, method, trainable parameters, share %, broadcast bytes, upload bytes)."""
    from transformers import AutoModelForCausalLM

    rows = []
    for model_name, (family_name, config) in _configs().items():
        family = FAMILIES[family_name]
        for method in METHODS:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            total = sum(p.numel() for p in model.parameters())
            if method == "full":
                trainable = total
            else:
                model.requires_grad_(False)
                adapter = AdapterConfig(method=method, r=8, alpha=32, dropout=0.1, pre_seq_len=128,
                                        bottleneck_size=16)
                model = attach_adapter(model, family, adapter)
                trainable = layout_of(model).size
            rows.append({
                "model": model_name,
                "method": method,
                "trainable": trainable,
                "total": total,
                "share_percent": 100.0 * trainable / total,
                "broadcast_bytes": _message_bytes(trainable, np.float32, "global-adapter"),
                "upload_bytes": _message_bytes(trainable + 1, np.uint64, "plaintext/input"),
                # the paper's Table 3 is ChatGLM-6B's: no paper figure for the other shapes
                "paper_share_percent": PAPER_TABLE3[method][1] if family_name == "glm" and method in PAPER_TABLE3
                else None,
            })
            del model
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | trainable params | share (%) | paper (%) | broadcast (MiB) | upload (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['trainable'] / 1e6:,.2f}M | {r['share_percent']:.3f} | "
                     f"{'—' if r['paper_share_percent'] is None else r['paper_share_percent']} | "
                     f"{r['broadcast_bytes'] / 2**20:,.1f} | {r['upload_bytes'] / 2**20:,.1f} |")
    return "\n".join(lines)


# -- bytes per round from real messages ------------------------------------------------------------------
ENCODINGS: dict[str, dict[str, Any]] = {
    "24-bit values (trainer default)": {"value_bits": 24},
    "16-bit values, ring auto": {"value_bits": 16},
    "8-bit values": {"value_bits": 8},
    "16-bit upload": {"upload_bits": 16},
    "8-bit upload": {"upload_bits": 8},
}
"""Encodings measured, as :func:`fedguard.quantise.plan_upload` arguments (the trainer's ``federation`` keys) with
``ring_bits: auto`` and at most :data:`MAX_WEIGHT` examples per client: 24-bit values need the 64-bit ring (8 B
per value for masking, MPC, plaintext); 16-bit values fit the 32-bit ring (4 B, as fp32); quantised uploads of
16 and 8 bits (equal client weights) travel in 2 and 1 B. Paillier packs more values per ciphertext at fewer
bits."""

MAX_WEIGHT = 300
"""Examples per client assumed by the rows (the demo's WordNet task gives each of 3 clients ~290)."""

DEFAULT_AGGREGATORS: tuple[str, ...] = ("plaintext", "masking", "paillier", "mpc")
"""Aggregators measured by default (variants that need runtime material, e.g. a roster, are left out)."""


def _measure_round(name: str, options: Mapping[str, Any], plan: UploadPlan, length: int, clients: int,
                   seed: str) -> dict[str, float]:
    """One real round of ``length`` values over aggregator ``name``: mean bytes up and down per client
    (all stages) and the broadcast of the global vector to one client."""
    from fedguard.federation import aggregate_updates, make_aggregator
    from fedguard.federation.round import broadcast_size
    from fedguard.updates import ClientUpdate

    rng = SecureRNG.for_testing(f"comm-cost/{seed}")
    updates = [plan.forward(ClientUpdate(c, 1, (rng.normal(length) * 0.1).astype(np.float32), 1 + c))
               for c in range(clients)]
    with make_aggregator(name, dict(options)) as aggregator:
        outcome = aggregate_updates(updates, aggregator, plan.spec, round_id=1, rng=rng.spawn("q"))
    if len(outcome.contributors) != clients:
        raise ConfigError(f"{name}: only {len(outcome.contributors)} of {clients} clients contributed")
    traffic = outcome.traffic
    return {"up": traffic.bytes_up() / clients, "down": traffic.bytes_down() / clients,
            "broadcast": float(broadcast_size(1, np.zeros(length, np.float32)))}


def round_bytes_table(
    *,
    lengths: tuple[int, int] = (20_000, 40_000),
    clients: int = 3,
    project_to: int = 3_670_016,
    aggregators: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    encodings: Mapping[str, Mapping[str, Any]] = ENCODINGS,
) -> list[dict[str, Any]]:
    """Bytes per client and round for each aggregator and encoding, measured from real rounds.

    Two rounds of ``lengths[0]`` and ``lengths[1]`` values give, per client, ``bytes_up = fixed + per_value·L``
    (likewise down, without the broadcast); rows report both parts, the ratio of the upload to float32
    (4 bytes per value: the plaintext upload of an unprotected fp32 LoRA), and the projection to
    ``project_to`` values (default: ChatGLM-6B LoRA r=8, 3,670,016). ``options`` per aggregator name
    (e.g. ``{"paillier": {"key_bits": 2048}}``, ``{"mpc": {"backend": "simulated"}}``)."""
    from fedguard.federation.registry import available_aggregators

    short, long = lengths
    if not 0 < short < long:
        raise ConfigError(f"lengths must be two increasing positive sizes, got {lengths}")
    names = list(aggregators) if aggregators is not None else [
        a for a in DEFAULT_AGGREGATORS if a in available_aggregators()]
    rows = []
    for name in names:
        opts = dict((options or {}).get(name, {}))
        for label, fields in encodings.items():
            plans = [plan_upload(**{"clip": 1.0, "value_bits": 24, "max_weight": MAX_WEIGHT, **fields},
                                 n_clients=clients, dimension=n) for n in (short, long)]
            a = _measure_round(name, opts, plans[0], short, clients, f"{name}/{label}/a")
            b = _measure_round(name, opts, plans[1], long, clients, f"{name}/{label}/b")
            per_up = (b["up"] - a["up"]) / (long - short)
            per_down = (b["down"] - a["down"]) / (long - short)
            fixed_up, fixed_down = a["up"] - per_up * short, a["down"] - per_down * short
            per_bc = (b["broadcast"] - a["broadcast"]) / (long - short)
            fixed_bc = a["broadcast"] - per_bc * short
            rows.append({
                "aggregator": name, "encoding": label, "clients": clients, "ring_bits": plans[0].spec.ring_bits,
                "value_bits": plans[0].spec.value_bits,
                "measured_lengths": list(lengths), "measured_up": [a["up"], b["up"]],
                "up_bytes_per_value": per_up, "up_fixed_bytes": fixed_up,
                "down_bytes_per_value": per_down, "down_fixed_bytes": fixed_down,
                "up_vs_fp32": per_up / 4.0,
                "projected_values": project_to,
                "projected_up_bytes": fixed_up + per_up * project_to,
                "projected_down_bytes": fixed_down + per_down * project_to + fixed_bc + per_bc * project_to,
            })
    return rows


def format_round_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    n = rows[0]["projected_values"]
    lines = [f"Bytes per client and round, measured from real rounds of {rows[0]['clients']} clients at "
             f"{rows[0]['measured_lengths'][0]:,} and {rows[0]['measured_lengths'][1]:,} values; projected to "
             f"{n:,} values (down includes the fp32 broadcast of the global vector)",
             "",
             "| aggregator | encoding | ring bits | up B/value | up vs fp32 | up fixed (B) | down B/value | "
             "up per round (MiB) | down per round (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['aggregator']} | {r['encoding']} | {r['ring_bits']} | {r['up_bytes_per_value']:.2f} | "
                     f"{r['up_vs_fp32']:.2f}x | "
                     f"{r['up_fixed_bytes']:,.0f} | {r['down_bytes_per_value']:.2f} | "
                     f"{r['projected_up_bytes'] / 2**20:,.1f} | {r['projected_down_bytes'] / 2**20:,.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FATE-LLM Table 3 at 6B-7B shapes, and bytes per round per "
                                                 "aggregator and encoding from real messages")
    parser.add_argument("--no-rounds", action="store_true", help="Table 3 only")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs=2, default=(20_000, 40_000))
    parser.add_argument("--mpc-backend", default="simulated", choices=("simulated", "crypten"),
                        help="MPC parties: in this process (same messages, default) or CrypTen processes")
    args = parser.parse_args(argv)
    print(format_table(communication_table()))
    if not args.no_rounds:
        print()
        rows = round_bytes_table(lengths=tuple(args.lengths), clients=args.clients,
                                 options={"mpc": {"backend": args.mpc_backend}})
        print(format_round_table(rows))


if __name__ == "__main__":
    main()

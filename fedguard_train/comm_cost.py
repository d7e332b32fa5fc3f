"""Communication cost of FedLLM at full scale (FATE-LLM §4, Table 3), measured without weights.

A 6B-7B-class model is instantiated on PyTorch's ``meta`` device (shapes only, no memory), the peft method
is attached exactly as in training, and the travelling parameters are counted with the same
:func:`fedguard.params.layout_of` the runtime uses. Message sizes come from :func:`fedguard.wire.encoded_size`
of the very messages the runtime sends: the float32 global-adapter broadcast, and the uint64 ring vector a
client uploads through an aggregator (``d`` values + 1 weight slot).

Two shapes: ChatGLM-6B's (the paper's model: hidden 4096, 28 layers, vocabulary 130,528, one tied
embedding, 6.17B parameters; built as a transformers ``glm`` config whose gated MLP width 10,923 matches
ChatGLM's 4096 -> 16384 -> 4096 MLP in size, and whose separate q/k/v projections make LoRA on
``q_proj`` + ``v_proj`` add exactly the parameters of ChatGLM's fused ``query_key_value`` LoRA:
r·(4096 + 3·4096) per layer) and LLaMA-7B's.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from fedguard import wire
from fedguard.params import layout_of
from fedguard_train.config import AdapterConfig
from fedguard_train.models import FAMILIES, attach_adapter

PAPER_TABLE3 = {"lora": (3.6e6, 0.058), "p-tuning-v2": (29.3e6, 0.475), "full": (None, 100.0)}


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
        methods: tuple[Literal["lora", "p-tuning-v2"] | Literal["full"], ...] = ("lora", "p-tuning-v2", "full")
        for method in methods:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            total = sum(p.numel() for p in model.parameters())
            if method == "full":
                trainable = total
            else:
                model.requires_grad_(False)
                adapter = AdapterConfig(method=method, r=8, alpha=32, dropout=0.1, pre_seq_len=128)
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
                "paper_share_percent": PAPER_TABLE3[method][1] if family_name == "glm" else None,
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


if __name__ == "__main__":
    print(format_table(communication_table()))

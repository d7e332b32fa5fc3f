"""What an attacker (or an auditor playing one) reads from a fedguard run directory.

* :func:`load_run` rebuilds the run's model exactly as the trainer built it (base model, the adapter's
  seeded initialisation, the travelling layout), its tokenised data (each client's partition, the
  held-out split) and its checkpoints; the base model with the initial adapter is the reference model
  of the membership attacks (LoRA starts as the identity: ``B = 0``).
* :func:`captured_rounds` / :func:`client_update` read the server view (:mod:`fedguard_train.capture`):
  a client's input-stage message decoded *as the server would decode a plaintext update* — for a masked
  or encrypted aggregator the result is what the server actually holds of that client, i.e. noise.
* :func:`examples_seen` names the examples a client trained on in a round, by replaying the trainer's
  seeded batch order (the audit's ground truth; an attacker does not have it).

Only FedHomoLLM-style runs (``trainer: homo``, one model whose trainable parameters travel) are loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.encoding import FixedPointSpec, dequantize, from_ring
from fedguard.errors import ConfigError, MessageError
from fedguard.params import AdapterLayout, load_vector, named_vector
from fedguard.wire import decode


@dataclass
class LoadedRun:
    """A run as the attacker sees it (``model``: the travelling model, holding whatever was loaded last)."""

    path: Path
    config: Any
    model: torch.nn.Module
    tokenizer: Any
    layout: AdapterLayout
    initial: np.ndarray
    final: np.ndarray
    final_round: int
    client_items: list[list[dict[str, list[int]]]]
    test_items: list[dict[str, list[int]]]
    texts: dict[str, list[bytes]] = field(default_factory=dict)

    def load(self, vector: np.ndarray) -> None:
        load_vector(self.model, self.layout, vector)

    @property
    def view(self) -> Path:
        return self.path / "server_view"


def load_run(path: str | Path, *, extra_heldout: int = 0) -> LoadedRun:
    """Rebuild a run's model, data and final global vector (see the module docstring).

    ``extra_heldout``: WordNet runs only — that many more examples the run never loaded, drawn by the same
    seeded permutation that chose the run's examples (so from the same distribution), appended to the
    held-out split (more non-members for the membership attacks than ``data.test_size``)."""
    from fedguard_train.checkpoint import load_latest
    from fedguard_train.config import TrainConfig
    from fedguard_train.data import load_examples, partition, tokenize, train_test_split
    from fedguard_train.models import attach_adapter, family_of, load_base_model
    from fedguard_train.trainers.base import seed_of

    run = Path(path)
    try:
        raw = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run} holds no readable run config.json: {err}") from err
    cfg = TrainConfig.from_dict(raw)
    if cfg.trainer != "homo":
        raise ConfigError(f"leakage attacks load FedHomoLLM runs (trainer: homo), got trainer {cfg.trainer!r}")
    checkpoint = load_latest(run)
    if checkpoint is None:
        raise ConfigError(f"{run} has no checkpoint: train at least one round first")
    base, tokenizer = load_base_model(cfg.model, seed=cfg.seed)
    family = family_of(base, cfg.model.family)
    torch.manual_seed(seed_of(cfg.seed, "adapter-init"))  # the trainer's seeded adapter initialisation
    model = attach_adapter(base, family, cfg.adapter)
    layout = AdapterLayout.from_json(json.dumps(checkpoint.state["layout"]))
    from fedguard.params import flatten

    initial = flatten(model, layout)
    examples = load_examples(cfg.data, seed=cfg.seed)
    train, test = train_test_split(examples, cfg.data.test_size, seed=cfg.seed)
    parts = partition(train, cfg.federation.clients, cfg.data.partition, alpha=cfg.data.dirichlet_alpha,
                      seed=cfg.seed)
    if extra_heldout > 0:
        if cfg.data.source != "wordnet":
            raise ConfigError("extra held-out examples are drawn for WordNet runs only (data.source: wordnet)")
        import dataclasses

        seen = {(e.prompt, e.response) for e in examples}
        more = load_examples(dataclasses.replace(cfg.data, max_examples=cfg.data.max_examples + extra_heldout),
                             seed=cfg.seed)
        test = test + [e for e in more if (e.prompt, e.response) not in seen][:extra_heldout]
    client_items = [tokenize(p, tokenizer, cfg.data) for p in parts]
    test_items = tokenize(test, tokenizer, cfg.data)
    texts = {"members": [(e.prompt + "\n" + e.response).encode() for p in parts for e in p],
             "nonmembers": [(e.prompt + "\n" + e.response).encode() for e in test]}
    model.eval()
    return LoadedRun(run, cfg, model, tokenizer, layout, initial, checkpoint.vector, checkpoint.round,
                     client_items, test_items, texts)


def captured_rounds(run: LoadedRun) -> list[int]:
    """Rounds whose server view was captured completely (``view.json`` status ``complete``)."""
    out = []
    for d in sorted(run.view.glob("round_[0-9][0-9][0-9][0-9]")):
        try:
            manifest = json.loads((d / "view.json").read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("status") == "complete":
            out.append(int(manifest["round"]))
    return out


def manifest(run: LoadedRun, round_id: int) -> dict[str, Any]:
    path = run.view / f"round_{round_id:04d}" / "view.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"no server view for round {round_id} in {run.view} (run with capture: true): {err}") from err
    return doc


def view_spec(doc: dict[str, Any]) -> FixedPointSpec:
    # a custom encoding (distributed DP's own spec) is not the trainer's fixed point the manifest may also name
    if doc.get("fixed_point") is None or doc.get("custom_encoding"):
        raise ConfigError(f"round {doc.get('round')}: the updates used a custom ring encoding (e.g. distributed DP "
                          f"noise); the fixed-point spec to decode them is not public")
    return FixedPointSpec(**doc["fixed_point"])


def client_update(run: LoadedRun, round_id: int, client: int) -> tuple[np.ndarray, float]:
    """Client ``client``'s input-stage message of ``round_id`` decoded as a plaintext weighted update
    ``[w·q, w]`` → ``q/s``, and the per-entry quantisation noise bound ``1/s``."""
    doc = manifest(run, round_id)
    spec = view_spec(doc)
    stage = doc["input_stage"]
    entry = next((p for p in doc["payloads"] if p["stage"] == stage and p["client"] == client), None)
    if entry is None:
        raise ConfigError(f"round {round_id}: no input-stage message of client {client} in the server view")
    msg = decode((run.view / f"round_{round_id:04d}" / entry["file"]).read_bytes())
    if "x" not in msg.arrays:
        raise MessageError(f"round {round_id}, client {client}: the server holds {msg.kind!r} "
                           f"({', '.join(msg.arrays)}), not a ring vector: nothing to decode without the key")
    signed = from_ring(np.asarray(msg.arrays["x"], dtype=np.uint64), spec.ring_bits)
    weight = int(signed[-1])
    divisor = weight if 1 <= weight <= spec.max_weight else 1  # a masked weight slot is noise too
    return dequantize(signed[:-1], spec, divisor=divisor), 1.0 / spec.scale


def aggregate_mean(run: LoadedRun, round_id: int) -> tuple[np.ndarray, list[int]]:
    """The decoded mean update of ``round_id`` and its contributors, as captured."""
    with np.load(run.view / f"round_{round_id:04d}" / "aggregate.npz") as data:
        return np.asarray(data["mean"]), [int(c) for c in data["contributors"]]


def round_start(run: LoadedRun, round_id: int) -> np.ndarray:
    path = run.view / f"round_{round_id:04d}" / "global.npy"
    if path.is_file():
        return np.asarray(np.load(path))
    if round_id == 1:
        return run.initial
    raise ConfigError(f"round {round_id}: θ_r was not captured")


def examples_seen(run: LoadedRun, round_id: int, client: int) -> list[int]:
    """Indices into ``client_items[client]`` of the examples the client trained on in ``round_id``
    (replays the trainer's seeded batch order: :mod:`fedguard_train.engine`)."""
    from fedguard_train.engine import _batches
    from fedguard_train.trainers.base import seed_of

    cfg = run.config
    items = run.client_items[client]
    index = [{"i": [i]} for i in range(len(items))]
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, round_id, client))
    batches = _batches(index, cfg.training.batch_size, gen, 0, 1)
    seen: list[int] = []
    for _ in range(cfg.training.local_steps * cfg.training.grad_accum):
        seen.extend(b["i"][0] for b in next(batches))
    return list(dict.fromkeys(seen))


def round_participants(run: LoadedRun, round_id: int) -> list[int]:
    """The clients that trained in ``round_id``: the captured manifest's participants when the view was
    captured, else the trainer's own draw replayed (every client; or the seeded sample of
    ``federation.sample_rate`` / ``clients_per_round``: ``Trainer.participants``)."""
    view = run.view / f"round_{round_id:04d}" / "view.json"
    if view.is_file():
        return [int(c) for c in manifest(run, round_id)["participants"]]
    from fedguard_train.trainers.base import sampled_participants

    return sampled_participants(run.config, len(run.client_items), round_id)


def trained_on(run: LoadedRun, *, client: int | None = None, rounds: int | None = None) -> list[tuple[int, int]]:
    """``(client, index)`` of every example some client trained on in rounds ``1..rounds`` (default: the final
    round), each once, in a fixed order — the members in the strict sense (a client's examples that no round
    drew were never in any update). ``client``: that client's only."""
    last = run.final_round if rounds is None else rounds
    seen: dict[tuple[int, int], None] = {}
    for round_id in range(1, last + 1):
        for c in round_participants(run, round_id):
            if client is None or c == client:
                seen.update(((c, i), None) for i in examples_seen(run, round_id, c))
    return sorted(seen)


def named_update(run: LoadedRun, vector: np.ndarray) -> dict[str, np.ndarray]:
    return named_vector(run.layout, vector)

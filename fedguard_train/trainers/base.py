"""What every trainer shares: set-up, the round loop, resume, checkpoints, evaluation and baselines.

A trainer (FedHomoLLM, FedOST, FedHeteroLLM, FedCoLLM) subclasses :class:`Trainer` and supplies three
things (FATE-LLM §3, Figure 3):

* :meth:`Trainer.setup` — its models and data: it calls :meth:`Trainer.use_travelling_model` with the
  model whose trainable parameters travel (the adapter; whatever ``requires_grad``);
* :meth:`Trainer.local_train` — what one client trains locally, from the global travelling vector, to
  its local vector (the base turns that into ``Δ_k = θ_k − θ_r``);
* :meth:`Trainer.server_step` — what the server does after aggregation (default: nothing); a server-side
  model it trains is saved with :meth:`Trainer.server_state` and restored by
  :meth:`Trainer.load_server_state`, so a checkpoint holds the state *after* the server step.

The base runs each round through the core's :func:`fedguard.federation.round.run_round` (hooks,
aggregator over real serialised messages, weighted mean; on any failure the model holds the global
vector again), then the server step, evaluation (ROUGE-1/2/L, BLEU-4, perplexity), the hooks' round-end
metrics and an atomic checkpoint. Randomness is derived from ``seed`` per (round, client), so a resumed
run is bit-identical to an uninterrupted one — except for what is drawn from OS entropy on purpose
(DP noise, central or distributed; protocol keys and masks, which do not change an exact aggregate).

Baselines use the same client step and hooks: ``mode: centralized`` is one party holding the union of
the clients' data, and :meth:`Trainer.run_local` trains each client alone ("Client-k" in Tables 1-2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from fedguard.errors import BudgetExceededError, ConfigError, InvalidUpdateError, ProtocolAbort
from fedguard.federation.fedavg import FedAvgOutcome
from fedguard.federation.protocol import Aggregator, RoundSpec
from fedguard.federation.registry import make_aggregator
from fedguard.federation.round import ClientResult, RoundResult, run_round
from fedguard.federation.transport import InProcessTransport, TrafficLog
from fedguard.params import AdapterLayout, flatten, layout_of, load_vector, parameter_counts
from fedguard.quantise import plan_upload
from fedguard.rng import SecureRNG
from fedguard_train.checkpoint import load_latest, load_round_metrics, save_checkpoint
from fedguard_train.config import TrainConfig
from fedguard_train.data import load_examples, partition, partition_report, tokenize, train_test_split
from fedguard_train.engine import TrainingDiverged, gathered
from fedguard_train.hooks import HookList, TrainerHook
from fedguard_train.metrics import evaluate

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "report.md", "curves.png")
"""What a run writes into its run directory (``keys/`` of a watermark run is never removed)."""


class RunExistsError(ConfigError):
    """The run directory already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


class Observer(Protocol):
    """What a trainer tells the person watching: the number of local steps to come, each step, each row."""

    def start(self, total_steps: int) -> None: ...

    def step(self, loss: float) -> None: ...

    def row(self, values: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    run_dir: Path = Path(".")
    trainable_share: float = 0.0
    stopped: str | None = None


@dataclass(frozen=True, slots=True)
class LocalOutcome:
    """One client's local training: its local travelling vector ``θ_k``, mean loss and FedAvg weight;
    ``delta``: ``θ_k − θ_r`` when the client computed it itself (e.g. in another process)."""

    vector: np.ndarray
    loss: float
    weight: int
    delta: np.ndarray | None = None


def seed_of(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. run seed, round, client): reproducible, independent."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampled_participants(config: TrainConfig, n_clients: int, round_id: int) -> list[int]:
    """The clients of round ``round_id`` among ``n_clients``, in increasing order: every client by default;
    with ``federation.sample_rate`` a Poisson sample (each client independently with probability ``q``; may
    be empty), with ``federation.clients_per_round`` ``k`` clients uniformly without replacement.

    Drawn from ``SecureRNG.for_testing(f"{seed}/sample/{round_id}")``: a resumed run samples exactly as an
    uninterrupted one, and an audit holding the run's config replays the draw (:mod:`attacks.run_view`)."""
    from fedguard.dp.client_level import sample_clients, sample_fixed_size

    everyone = list(range(n_clients))
    options = config.sampling_options
    rng = SecureRNG.for_testing(f"{config.seed}/sample/{round_id}")
    if options["sample_rate"] is not None:
        return sample_clients(everyone, float(options["sample_rate"]), rng)
    if options["clients_per_round"] is not None:
        return sample_fixed_size(everyone, int(options["clients_per_round"]), rng)
    return everyone


def check_run_dir(path: Path) -> None:
    """Make sure ``path`` is (or can become) a writable directory; :class:`ConfigError` naming the
    problem otherwise (a regular file on the way, no permission). Runs before any model loads."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"run_dir {str(path)!r} cannot be created: {str(parent)!r} is a regular file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"run_dir {str(path)!r} is not writable: {err.strerror or err}") from err


def existing_run(path: Path) -> list[str]:
    """The run files already in ``path`` (empty: no run there)."""
    return [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()]


def is_fedguard_run(path: Path) -> bool:
    """Whether ``path`` holds a run this package wrote: its ``config.json`` is a run config (a directory
    that merely has files of the same names — a project root, a home directory — is not)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"run_dir", "model", "federation", "training"} <= set(saved)


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse to start a new run over an existing one unless told: ``resume`` continues it, ``overwrite``
    removes the old run's files (:data:`RUN_FILES`, never its watermark keys). Files of those names that
    are not a fedguard run are never removed, and neither is anything behind a symbolic link.
    ``remove=False`` only checks (e.g. before a model loads; the files go when the run starts)."""
    check_run_dir(path)
    if resume:
        return
    found = existing_run(path)
    if not found:
        return
    if not overwrite:
        raise RunExistsError(f"{str(path)!r} already holds a run ({', '.join(found)}): pass --resume to continue it "
                             f"or --overwrite to replace it (or choose another --run-dir)")
    if not is_fedguard_run(path):
        raise RunExistsError(f"{str(path)!r} holds {', '.join(found)} but no fedguard run config.json: these are not "
                             f"a run's files and are not removed; choose another run_dir")
    links = [name for name in found if (path / name).is_symlink()]
    if links:
        raise RunExistsError(f"{str(path)!r}: {', '.join(links)} {'is a' if len(links) == 1 else 'are'} symbolic "
                             f"link(s); --overwrite removes only plain files and directories: remove them yourself")
    if not remove:
        return
    for name in found:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


class Trainer(ABC):
    """The round skeleton of every trainer (see the module docstring); ``hooks`` attach privacy components.

    ``coordinator=False`` builds a trainer that only trains clients (a ``torchrun`` rank): it builds no
    aggregator (no MPC parties, no keys).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # e.g. "FedHomoLLM", used in tables and reports
    transport: InProcessTransport | None = None
    """What each round's protocol messages travel over (``None``: a fresh in-process transport). A
    deployment or a test may set one, e.g. a transport that drops a client at some protocol stage."""

    def __init__(self, config: TrainConfig, *, hooks: Sequence[TrainerHook] = (), quiet: bool = False,
                 coordinator: bool = True) -> None:
        self.config = config
        self.hooks = HookList(hooks)
        self.quiet = quiet
        self.coordinator = coordinator
        self.run_dir = Path(config.run_dir)
        self.observer: Observer | None = None
        self.aggregator: Aggregator | None = None
        if coordinator:
            check_run_dir(self.run_dir)  # before any model loads
            self.aggregator = self._make_aggregator()  # a bad aggregator config fails before any model loads
        try:
            if self.aggregator is not None:  # e.g. DP's release guard: before any model loads
                self.hooks.check_aggregator(self.aggregator, self.round_size)
                self._check_sampling(self.aggregator)
            self.setup()
            fed = config.federation  # what travels: ring sized to need, quantised uploads, rotation (fedguard/quantise.py)
            self.upload = plan_upload(clip=fed.clip, value_bits=fed.value_bits, ring_bits=fed.ring_bits,
                                      upload_bits=fed.upload_bits, rotation=fed.rotation,
                                      n_clients=len(self.client_items), dimension=self.layout.size,
                                      max_weight=max(1, max(len(i) for i in self.client_items)),
                                      seed=f"{config.seed}/upload")
            self.spec = self.upload.spec
            # e.g. central DP calibrates its noise to what is actually summed
            self.hooks.on_encoding(self.spec, self.upload.dp_dimension)
            if self.aggregator is not None:  # e.g. a packing or norm bound that cannot hold: before any training
                encoding = self.hooks.ring_encoding()
                if encoding is not None and (fed.upload_bits is not None or fed.rotation) and (
                        encoding.spec.ring_bits != self.spec.ring_bits or encoding.spec.clip != self.spec.clip):
                    # a hook's encoding (distributed DP's noise) must live in the upload's ring at its public scale
                    raise ConfigError(f"federation.upload_bits/rotation: the hook's ring encoding "
                                      f"({encoding.spec.ring_bits}-bit ring, clip {encoding.spec.clip:g}) is not the "
                                      f"upload's ({self.spec.ring_bits}-bit ring, clip {self.spec.clip:g})")
                self.aggregator.check_round(RoundSpec(
                    1, tuple(range(self.round_size)), self.upload.travelling_length + 1,
                    self.spec.ring_bits if encoding is None else encoding.spec.ring_bits,
                    fixed_point=self.spec if encoding is None else None))
        except BaseException:
            self.close()
            raise

    # -- what a trainer supplies -------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Load models and data. Must set ``client_items`` (tokenised examples per party) and call
        :meth:`use_travelling_model`; :meth:`load_federated_data` does the usual data part."""

    @abstractmethod
    def local_train(self, round_id: int, client: int, start: np.ndarray) -> LocalOutcome:
        """Train ``client`` from the travelling vector ``start`` (already loaded into the model)."""

    def server_step(self, round_id: int, result: RoundResult) -> np.ndarray:
        """After aggregation (the model holds ``result.global_vector``): returns the global travelling vector
        to keep (default: the aggregate). The base loads a different vector into the model, evaluates it
        and checkpoints it."""
        return result.global_vector

    def server_state(self) -> dict[str, np.ndarray]:
        """Arrays of server-side models to checkpoint each round (default: none)."""
        return {}

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`server_state` returned (on resume)."""

    def evaluate(self) -> dict[str, Any]:
        """Scores of the current global model on the held-out split."""
        with gathered(self._params()):
            return evaluate(self.model, self.tokenizer, self.test_examples, self.test_items,
                            max_new_tokens=self.config.eval.max_new_tokens)

    @property
    def steps_per_round(self) -> int:
        """Local optimiser steps in one round (for the progress bar)."""
        return len(self.client_items) * self.config.training.local_steps

    # -- helpers for setup -------------------------------------------------------------------------------
    def use_travelling_model(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """``model``'s trainable parameters travel; hooks prepare it first (e.g. mark norm scales)."""
        self.model, self.tokenizer = model, tokenizer
        self.hooks.prepare_model(model)
        self.layout: AdapterLayout = layout_of(model)
        self.counts = parameter_counts(model, self.layout)
        self.hooks.on_layout(self.layout.size)

    def load_federated_data(self, tokenizer: Any) -> None:
        """The run's examples, test split and non-IID partition, tokenised (one party in centralized mode)."""
        cfg = self.config
        examples = load_examples(cfg.data, seed=cfg.seed)
        train, test = train_test_split(examples, cfg.data.test_size, seed=cfg.seed)
        self.test_examples = test[: cfg.eval.examples]
        parts = partition(train, cfg.federation.clients, cfg.data.partition, alpha=cfg.data.dirichlet_alpha,
                          seed=cfg.seed)
        self.partition = partition_report(parts)
        if cfg.mode == "centralized":
            parts = [[ex for part in parts for ex in part]]
        self.client_items = [tokenize(p, tokenizer, cfg.data) for p in parts]
        self.test_items = tokenize(self.test_examples, tokenizer, cfg.data)

    # -- the travelling vector ---------------------------------------------------------------------------
    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def global_vector(self) -> np.ndarray:
        """The model's travelling parameters as one float32 vector."""
        with gathered(self._params()):
            return flatten(self.model, self.layout)

    def load(self, vector: np.ndarray) -> None:
        with gathered(self._params(), modify=True):
            load_vector(self.model, self.layout, vector)

    # -- aggregator ----------------------------------------------------------------------------------------
    def _make_aggregator(self) -> Aggregator:
        fed = self.config.federation
        aggregator = make_aggregator(fed.aggregator, fed.aggregator_options)
        try:
            aggregator.check_clients(self.round_size)  # a fixed-size sample: rounds of clients_per_round
        except BaseException:
            aggregator.close()
            raise
        if self.config.capture:  # leakage audits: record what the server receives (loud; off by default)
            from fedguard_train.capture import capture_server_view

            aggregator = capture_server_view(self, aggregator)
        return aggregator

    @property
    def adapter_label(self) -> str:
        """What travels, in words, for the run's header line (the PEFT method by default)."""
        return self.config.adapter.method

    @property
    def aggregator_label(self) -> str:
        if self.aggregator is not None:
            return self.aggregator.label
        return self.config.federation.aggregator

    def close(self) -> None:
        """Release what the aggregator holds (e.g. MPC compute-party processes); :meth:`run` calls it."""
        if self.aggregator is not None:
            self.aggregator.close()
        self.aggregator = None

    # -- the run ---------------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self, *, resume: bool = False, overwrite: bool = False, observer: Observer | None = None) -> RunResult:
        """Train all rounds (continuing from the last checkpoint with ``resume``; replacing an existing
        run in ``run_dir`` only with ``overwrite``)."""
        if not self.coordinator:
            raise ConfigError("a trainer built with coordinator=False only trains clients; it cannot run rounds")
        if self.aggregator is None:  # a second run on the same trainer
            self.aggregator = self._make_aggregator()
        self.observer = observer
        try:
            prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            return self._run(resume=resume)
        finally:
            self.close()

    def _run(self, *, resume: bool) -> RunResult:
        cfg = self.config
        result = RunResult(run_dir=self.run_dir, trainable_share=float(self.counts["share"]))
        start_round = 1
        metrics_path = self.run_dir / "metrics.jsonl"
        checkpoint = load_latest(self.run_dir) if resume else None
        if resume and checkpoint is None:
            # a run killed before round 1 is cleaned; files that are not a fedguard run are refused, not removed
            prepare_run_dir(self.run_dir, resume=False, overwrite=True)
            self._log(f"no checkpoint in {self.run_dir} yet: starting from round 1")
        if checkpoint is not None:
            saved = TrainConfig.from_dict(checkpoint.state["config"])
            diff = saved.differences(cfg)
            if diff:
                raise ConfigError(f"cannot resume {self.run_dir}: the config differs from the checkpoint's in {diff}")
            self.load(checkpoint.vector)
            self.load_server_state(checkpoint.arrays)
            self.hooks.load_state_dict(checkpoint.state.get("hooks", {}))
            result.baseline = checkpoint.state.get("baseline", {})
            # rebuild the history from the checkpoints themselves (metrics.jsonl may lag a killed run)
            result.history = [load_round_metrics(self.run_dir, r) for r in range(1, checkpoint.round + 1)]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in [result.baseline, *result.history]))
            (self.run_dir / "config.json").write_text(cfg.to_json())  # e.g. more rounds, another run_dir
            start_round = checkpoint.round + 1
            self._log(f"resuming {self.run_dir} after round {checkpoint.round}")
        else:
            (self.run_dir / "config.json").write_text(cfg.to_json())
            metrics_path.write_text("")
            result.baseline = self.evaluate()
            result.baseline["round"] = 0
            with metrics_path.open("a") as out:
                out.write(json.dumps(result.baseline) + "\n")
        self._baseline = result.baseline
        if self.observer is not None:
            for done in [result.baseline, *result.history]:  # on resume, the rounds so far first
                self.observer.row(done)
            self.observer.start(max(0, cfg.federation.rounds - start_round + 1) * self.steps_per_round)
        for round_id in range(start_round, cfg.federation.rounds + 1):
            try:
                row = self._round(round_id)
            except BudgetExceededError as err:
                result.stopped = f"stopped before round {round_id}: {err}"
                self._log(result.stopped + f" (last checkpoint kept in {self.run_dir / 'checkpoints'})")
                break
            result.history.append(row)
            with metrics_path.open("a") as out:
                out.write(json.dumps(row) + "\n")
            if self.observer is not None:
                self.observer.row(row)
        return result

    # -- participant selection (client sampling) --------------------------------------------------------
    @property
    def round_size(self) -> int:
        """The most clients a round can have: ``federation.clients_per_round`` or every party."""
        k = self.config.sampling_options["clients_per_round"]
        return int(k) if k is not None else self.config.n_parties

    def _check_sampling(self, aggregator: Aggregator) -> None:
        """A Poisson sample may hold any number of clients from 1 to all: refuse, before any model loads, an
        aggregator that cannot run a round with one of those sizes (e.g. masking with threshold 2)."""
        if self.config.sampling_options["sample_rate"] is None:
            return
        for size in range(1, self.config.n_parties + 1):
            try:
                aggregator.check_clients(size)
            except ConfigError as err:
                raise ConfigError(f"federation.sample_rate: a Poisson sample may hold {size} client(s), but {err}; "
                                  "use federation.clients_per_round (a fixed-size sample) instead") from err

    def participants(self, round_id: int) -> list[int]:
        """The clients of round ``round_id``, in increasing order: every party by default; with
        ``federation.sample_rate`` a Poisson sample (each client independently with probability ``q``; may be
        empty), with ``federation.clients_per_round`` ``k`` clients uniformly without replacement.

        Drawn from ``SecureRNG.for_testing(f"{seed}/sample/{round_id}")``, so a resumed run samples exactly
        as an uninterrupted one. Amplification by sampling (central DP) assumes whoever sees the released
        models cannot recompute the sample: the run's ``seed`` is the server's secret (docs/dp.md).
        Subclasses may override (e.g. canary clients); the base calls it once per round
        (:func:`sampled_participants`)."""
        return sampled_participants(self.config, len(self.client_items), round_id)

    def _empty_round(self, round_id: int) -> RoundResult:
        """A round whose sample is empty: no client trains and nothing is aggregated, but the hooks still
        run (``on_round_start``, then ``aggregate`` on a zero mean with no contributors), so central DP
        releases its noise-only update and accounts it, as the mechanism must every round."""
        start = self.global_vector()
        self.hooks.on_round_start(round_id, ())
        try:
            mean = np.asarray(self.hooks.aggregate(round_id, np.zeros(start.size, dtype=np.float32), ()),
                              dtype=np.float32)
            new_global = start + mean
            if not np.all(np.isfinite(new_global)):
                raise InvalidUpdateError(f"round {round_id}: the released update of an empty sample is not finite")
        except BaseException:
            self.load(start)
            raise
        self.load(new_global)
        outcome = FedAvgOutcome(round_id, mean, 0, (), {}, TrafficLog(), 0.0)
        return RoundResult(round_id, new_global, mean, {}, outcome, 0, ())

    def _precompute(self, round_id: int) -> float | None:
        """The aggregator's offline work for round ``round_id`` (:meth:`Aggregator.precompute`, e.g. Paillier's
        obfuscator pools), for every client, before local training; its seconds, or None when nothing was made."""
        if self.aggregator is None:
            return None
        encoding = self.hooks.ring_encoding()
        spec = RoundSpec(round_id, tuple(range(len(self.client_items))), self.upload.travelling_length + 1,
                         self.spec.ring_bits if encoding is None else encoding.spec.ring_bits,
                         fixed_point=self.spec if encoding is None else None)
        start = time.perf_counter()
        made = self.aggregator.precompute(spec)
        return time.perf_counter() - start if made else None

    def client_step(self, round_id: int, client: int, start: np.ndarray) -> ClientResult:
        """Load ``start``, train ``client`` locally, return its update ``θ_k − start`` (a non-finite one aborts
        the round, naming the client)."""
        self.load(start)
        try:
            local = self.local_train(round_id, client, start)
            delta = local.delta if local.delta is not None else local.vector - start
            if not np.all(np.isfinite(delta)):
                raise TrainingDiverged(f"client {client}'s update has non-finite values")
        except TrainingDiverged as err:
            raise TrainingDiverged(f"round {round_id} aborted: client {client}: {err}; the last good "
                                   f"checkpoint in {self.run_dir / 'checkpoints'} is kept") from err
        return ClientResult(delta, local.weight, local.loss)

    def _round_result(self, round_id: int) -> tuple[RoundResult, float | None]:
        """The round's sample, local training and aggregation (the model then holds the new global vector),
        and the seconds of offline precomputation before it (None: none). A deployment that carries the
        protocol's stages over a network (fedguard_train.flower) overrides only this."""
        if self.aggregator is None:
            raise ConfigError("the trainer's aggregator is closed")
        chosen = self.participants(round_id)
        offline = self._precompute(round_id)
        if not chosen:
            return self._empty_round(round_id), offline
        # Quantisation is seeded (the run is reproducible); the protocol's keys and masks come from OS entropy.
        return run_round(round_id, self.global_vector(), chosen,
                         lambda client, start_vec: self.client_step(round_id, client, start_vec),
                         self.aggregator, self.spec, hooks=self.hooks, load=self.load,
                         rng=SecureRNG.for_testing(f"{self.config.seed}/aggregate/{round_id}"),
                         protocol_rng=SecureRNG(), transport=self.transport,
                         # DP: the survivors its noise is planned for
                         min_contributors=self.hooks.min_contributors, upload=self.upload), offline

    def _clipped_share(self, round_id: int, result: RoundResult) -> float:
        """The share of the round's uploaded values outside ``[-clip, clip]`` of the encoding; a warning
        naming the fix when any were clipped (the public clip is a config value: ``federation.clip``)."""
        values = sum(result.clipped.values())
        share = values / max(1, len(result.clipped) * self.upload.travelling_length)
        if values:
            encoding = self.hooks.ring_encoding()  # e.g. distributed DP's, in place of the upload's own
            clip = (encoding.spec if encoding is not None else self.spec).clip
            self._log(f"round {round_id}: {values} uploaded values ({share:.2%}) lay outside the encoding's "
                      f"clip ±{clip:g} and were clipped (per client: {dict(result.clipped)}); raise "
                      f"federation.clip if that is not intended (AdamW moves a value by about lr per local step)")
        return share

    def _round(self, round_id: int) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        if self.aggregator is None:
            raise ConfigError("the trainer's aggregator is closed")
        try:
            result, offline = self._round_result(round_id)
        except (ProtocolAbort, TrainingDiverged) as err:
            # nothing was decoded (ProtocolAbort's contract) or nothing reached the aggregator: hooks may
            # take back what they prepared for the release (DP's write-ahead record)
            self.hooks.on_round_aborted(round_id, err)
            raise
        final = self.server_step(round_id, result)
        if final is not result.global_vector:
            self.load(final)
        row: dict[str, Any] = {"round": round_id,
                               "train_loss": result.mean_loss if result.losses else float("nan"),
                               "clients": len(result.contributors),
                               "bytes_up": result.bytes_up, "bytes_down": result.bytes_down}
        if any(v is not None for v in cfg.sampling_options.values()):
            row["sampled"] = len(result.participants)
        if offline is not None:  # e.g. Paillier obfuscators made before local training (not in the protocol's time)
            row["offline_seconds"] = offline
        if result.clipped:  # in-process clients: the share of uploaded values the public clip flattened
            row["clipped"] = self._clipped_share(round_id, result)
        if round_id % cfg.eval.every == 0 or round_id == cfg.federation.rounds:
            row.update(self.evaluate())
        self.hooks.on_round_end(round_id, self.model, row)
        row["seconds"] = time.perf_counter() - start
        with gathered(self._params()):
            save_checkpoint(self.run_dir, round_id, self.model, final,
                            {"config": cfg.to_dict(), "hooks": self.hooks.state_dict(), "baseline": self._baseline,
                             "layout": json.loads(self.layout.to_json()), "metrics": row, "trainer": self.name},
                            arrays=self.server_state())
        return row

    # -- baselines -----------------------------------------------------------------------------------------
    def run_local(self) -> list[dict[str, Any]]:
        """Each client alone ("Client-k" in the paper's Tables 1-2): the client step (with the hooks) for as
        many rounds as the federated run, no aggregation, scored on the same test split."""
        start = self.global_vector()
        rows = []
        if self.observer is not None:
            self.observer.start(self.config.federation.rounds * self.steps_per_round)
        for client in range(len(self.client_items)):
            vector, losses = start, []
            for round_id in range(1, self.config.federation.rounds + 1):
                self.load(vector)
                local = self.local_train(round_id, client, vector)
                vector = local.vector
                losses.append(local.loss)
            self.load(vector)
            row: dict[str, Any] = {"client": client, "train_loss": float(np.mean(losses))}
            row.update(self.evaluate())
            rows.append(row)
        self.load(start)
        return rows


def env_without_launcher() -> dict[str, str]:
    """This process's environment without a launcher's rank variables (for starting a new job)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}

"""The server-view capture: store exactly what the server of a run receives, for leakage attacks.

**Off by default, and loud when on.** An honest-but-curious server (docs/threat-model.md) keeps every
byte it is sent; this module makes a run do the same on disk so that the attacks of :mod:`attacks`
(update inversion, membership inference) run on the *real* view of the server, not on something the
server never sees. With ``capture: true`` in a run config, the trainer wraps its aggregator
(:meth:`fedguard_train.trainers.base.Trainer._make_aggregator`) and writes, per round ``r``::

    <run>/server_view/README.txt                what this directory is (a warning)
    <run>/server_view/round_0001/global.npy     θ_r, the global travelling vector the server broadcast
    <run>/server_view/round_0001/<stage>/client_<k>.msg
                                                each reply the server *accepted*, byte for byte
                                                (fedguard.wire messages: plaintext ring vectors,
                                                masked vectors, Paillier ciphertexts, shares, keys ...)
    <run>/server_view/round_0001/aggregate.npz  the revealed ring sum, its contributors and the decoded
                                                mean update (before any central DP noise the server adds)
    <run>/server_view/round_0001/view.json      manifest: aggregator, stages, input stage, fixed-point
                                                encoding, each payload's size and SHA-256, status

What each aggregator shows the server (and therefore what the capture holds): ``plaintext`` — each
client's weighted, quantised update ``[w·q, w]`` (individual updates); ``masking`` — masked vectors,
uniformly distributed in the ring on their own, plus key and share messages; ``paillier`` — ciphertexts;
``mpc`` — what the coordinating server relays. The decoded aggregate is what every aggregator reveals.

Nothing is ever deleted: a round directory left by an earlier (killed or overwritten) run is renamed
``round_XXXX.stale-N`` before the round is captured again. Refused replies (a malformed or replayed
message) are not part of the server's state and are not stored; the transport's log names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedguard.encoding import FixedPointSpec
from fedguard.errors import ConfigError
from fedguard.federation.protocol import (
    AggregateResult,
    Aggregator,
    ClientSide,
    Outbox,
    RoundSpec,
    ServerSide,
)
from fedguard.files import atomic_write
from fedguard.rng import SecureRNG
from fedguard.wire import Message, MessageSchema
from fedguard_train.hooks import TrainerHook

if TYPE_CHECKING:
    from fedguard_train.trainers.base import Trainer

_LOG = logging.getLogger(__name__)

VIEW_DIR = "server_view"
WARNING = ("SERVER VIEW CAPTURED: every message the server received (individual plaintext updates, masked "
           "vectors, ciphertexts) and every decoded aggregate is stored under {path}. This is for leakage "
           "audits only: these files are as sensitive as the clients' training data.")


def round_dir(root: Path, round_id: int) -> Path:
    return root / f"round_{round_id:04d}"


class ServerView:
    """Writes one run's server view under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, aggregator: Aggregator) -> None:
        self.root = Path(root)
        self.aggregator_name = aggregator.name
        self.stages = tuple(aggregator.stages)
        self.input_stage = aggregator.input_stage
        self._round: int | None = None
        self._global: np.ndarray | None = None
        self._payloads: list[dict[str, Any]] = []
        self._spec: RoundSpec | None = None
        self._result: AggregateResult | None = None
        self._fixed_point: FixedPointSpec | None = None
        self._started = False

    # -- what the trainer and the wrapped server call -----------------------------------------------------
    def begin(self, round_id: int, global_vector: np.ndarray) -> None:
        """Round ``round_id`` starts from ``θ_r = global_vector`` (kept in memory until something arrives)."""
        self._round, self._global = round_id, np.asarray(global_vector, dtype=np.float32).copy()
        self._payloads, self._spec, self._result, self._started = [], None, None, False

    def set_encoding(self, spec: FixedPointSpec) -> None:
        self._fixed_point = spec

    def on_server(self, spec: RoundSpec) -> None:
        if self._round is None or spec.round_id != self._round:  # a round driven without the trainer's hook
            self._round, self._global, self._payloads, self._started = spec.round_id, None, [], False
        self._spec = spec

    def record(self, stage: str, client: int, payload: bytes) -> None:
        """One accepted reply, stored byte for byte."""
        directory = self._open_round() / stage
        directory.mkdir(exist_ok=True)
        name = f"client_{client}.msg"
        atomic_write(directory / name, payload, mode=0o600, overwrite=False)
        self._payloads.append({"stage": stage, "client": int(client), "file": f"{stage}/{name}",
                               "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})

    def record_result(self, result: AggregateResult) -> None:
        self._result = result

    def record_mean(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> None:
        """The decoded aggregate (the weighted mean update) as the server holds it, then the manifest."""
        directory = self._open_round()
        arrays: dict[str, np.ndarray] = {"mean": np.asarray(mean, dtype=np.float32),
                                         "contributors": np.asarray(list(contributors), dtype=np.int64)}
        if self._result is not None:
            arrays["ring_sum"] = self._result.ring_sum
        with (directory / ".aggregate.npz.tmp").open("wb") as out:
            np.savez(out, **arrays)  # type: ignore[arg-type]
        (directory / ".aggregate.npz.tmp").replace(directory / "aggregate.npz")
        self._manifest("complete", contributors)

    def aborted(self, round_id: int, error: BaseException) -> None:
        if self._started and self._round == round_id:
            self._manifest(f"aborted: {type(error).__name__}: {error}", ())

    # -- files ----------------------------------------------------------------------------------------------
    def _open_round(self) -> Path:
        if self._round is None:
            raise ConfigError("the server view received a message outside a round")
        directory = round_dir(self.root, self._round)
        if not self._started:
            self.root.mkdir(parents=True, exist_ok=True)
            readme = self.root / "README.txt"
            if not readme.exists():
                atomic_write(readme, WARNING.format(path=self.root) + "\n")
            if directory.exists():  # an earlier run's round: keep it, out of the way
                n = 1
                while directory.with_name(f"{directory.name}.stale-{n}").exists():
                    n += 1
                directory.rename(directory.with_name(f"{directory.name}.stale-{n}"))
            directory.mkdir()
            if self._global is not None:
                with (directory / ".global.npy.tmp").open("wb") as out:
                    np.save(out, self._global)
                (directory / ".global.npy.tmp").replace(directory / "global.npy")
            self._started = True
        return directory

    def _manifest(self, status: str, contributors: Sequence[int]) -> None:
        spec = self._spec
        fixed_point = spec.fixed_point if spec is not None and spec.fixed_point is not None else self._fixed_point
        doc = {"round": self._round, "aggregator": self.aggregator_name, "stages": list(self.stages),
               "input_stage": self.input_stage, "status": status,
               "participants": list(spec.participants) if spec is not None else [],
               "contributors": [int(c) for c in contributors],
               "ring_bits": spec.ring_bits if spec is not None else None,
               "fixed_point": asdict(fixed_point) if fixed_point is not None else None,
               "custom_encoding": spec is not None and spec.fixed_point is None,
               "global_vector": self._global is not None, "payloads": self._payloads,
               "warning": WARNING.format(path=self.root)}
        atomic_write(self._open_round() / "view.json", json.dumps(doc, indent=2) + "\n")


class _CapturingServer(ServerSide):
    """A :class:`ServerSide` that forwards everything to ``inner`` and records each accepted reply."""

    def __init__(self, inner: ServerSide, view: ServerView) -> None:  # no super().__init__: state is inner's
        self.inner = inner
        self.view = view
        self.spec = inner.spec
        self.threshold = inner.threshold
        self.stages = inner.stages  # type: ignore[misc]
        view.on_server(inner.spec)

    @property
    def stage(self) -> str:
        return self.inner.stage

    @property
    def expected(self) -> frozenset[int]:
        return self.inner.expected

    @property
    def received(self) -> frozenset[int]:
        return self.inner.received

    def open(self) -> Outbox:
        return self.inner.open()

    def accept(self, sender: int, payload: bytes) -> None:
        stage = self.inner.stage
        self.inner.accept(sender, payload)  # raises (and records nothing) when refused
        self.view.record(stage, sender, payload)

    def close_stage(self) -> Outbox | AggregateResult:
        out = self.inner.close_stage()
        if isinstance(out, AggregateResult):
            self.view.record_result(out)
        return out

    def min_replies(self, stage: str) -> int:
        return self.inner.min_replies(stage)

    def _open(self) -> Outbox:  # pragma: no cover - open() is forwarded
        raise NotImplementedError

    def _schema(self, stage: str) -> MessageSchema:  # pragma: no cover - accept() is forwarded
        raise NotImplementedError

    def _close(self, stage: str, replies: dict[int, Message]) -> Outbox | AggregateResult:  # pragma: no cover
        raise NotImplementedError


class CapturingAggregator(Aggregator):
    """Wraps an aggregator: the same protocol, but every reply its server accepts goes to a :class:`ServerView`.

    Client sides are the inner aggregator's, unchanged; ``label`` says the view is captured, so the run's
    header and report carry the warning."""

    name: ClassVar[str] = "captured"

    def __init__(self, inner: Aggregator, view: ServerView) -> None:
        self.inner = inner
        self.view = view
        self.name = inner.name  # type: ignore[misc]
        self.stages = inner.stages  # type: ignore[misc]
        self.input_stage = inner.input_stage  # type: ignore[misc]
        self.options = inner.options

    def threshold(self, n_clients: int) -> int:
        return self.inner.threshold(n_clients)

    def server(self, spec: RoundSpec, *, rng: SecureRNG | None = None) -> ServerSide:
        return _CapturingServer(self.inner.server(spec, rng=rng), self.view)

    def client(self, spec: RoundSpec, client_id: int, ring_input: np.ndarray, *,
               rng: SecureRNG | None = None) -> ClientSide:
        return self.inner.client(spec, client_id, ring_input, rng=rng)

    @property
    def label(self) -> str:
        return f"{self.inner.label} [SERVER VIEW CAPTURED]"

    def check_clients(self, n_clients: int) -> None:
        self.inner.check_clients(n_clients)

    def check_round(self, spec: RoundSpec) -> None:
        self.inner.check_round(spec)

    def survives(self, spec: RoundSpec, alive_per_stage: list[set[int]]) -> bool:
        return self.inner.survives(spec, alive_per_stage)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, item: str) -> Any:  # e.g. DP's release guard reads the inner protocol's options
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)


class ServerViewHook(TrainerHook):
    """The trainer side of the capture: ``θ_r`` at round start, the decoded mean, aborted rounds.

    It must run first among the hooks, so that ``aggregate`` sees the mean as decoded (a central-DP
    hook after it adds noise the server itself draws)."""

    name = "server_view"

    def __init__(self, trainer: Trainer, view: ServerView) -> None:
        self.trainer = trainer
        self.view = view

    def on_encoding(self, spec: FixedPointSpec, dimension: int) -> None:
        self.view.set_encoding(spec)

    def on_round_start(self, round_id: int, participants: Sequence[int]) -> None:
        self.view.begin(round_id, self.trainer.global_vector())

    def aggregate(self, round_id: int, mean: np.ndarray, contributors: Sequence[int]) -> np.ndarray:
        self.view.record_mean(round_id, mean, contributors)
        return mean

    def on_round_aborted(self, round_id: int, error: BaseException) -> None:
        self.view.aborted(round_id, error)


def capture_server_view(trainer: Trainer, aggregator: Aggregator) -> Aggregator:
    """Wrap ``aggregator`` so that ``trainer``'s run stores its server view; warns loudly (log and stderr).

    Idempotent per trainer: a second call (a second run on the same trainer) reuses the hook."""
    root = Path(trainer.config.run_dir) / VIEW_DIR
    view = ServerView(root, aggregator)
    hooks = trainer.hooks.hooks
    hooks[:] = [h for h in hooks if not isinstance(h, ServerViewHook)]
    hooks.insert(0, ServerViewHook(trainer, view))
    message = WARNING.format(path=root)
    if _LOG.hasHandlers():  # the run's log, when it has one; stderr always (without a handler, once)
        _LOG.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
    return CapturingAggregator(aggregator, view)

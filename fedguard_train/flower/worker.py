"""One fedguard client on one machine: the long-lived process behind a Flower SuperNode.

It holds what must outlive a single Flower message (see :mod:`fedguard_train.flower.ipc`): the base model
with its adapter, the client's data shard, its trainer hooks (e.g. the watermark regulariser) and, during
a round, the aggregator's :class:`~fedguard.federation.protocol.ClientSide` with its secrets.

Round ``r`` as this worker sees it (one request per protocol stage, relayed by the ClientApp):

1. the first stage's request carries ``θ_r`` (a :mod:`fedguard.wire` ``global-adapter`` message) and the
   round's public :class:`~fedguard.federation.protocol.RoundSpec`: the worker runs
   :meth:`Trainer.client_step` (local training on DeepSpeed, the hooks' loss and batch functions, e.g.
   the watermark regulariser), the hooks' ``client_update`` (DP clipping with the round's clip norm the
   server sent, :mod:`fedguard_train.flower.dp_split`; distributed DP adds its noise share in the ring), and encodes ``Δ_k`` into the ring exactly as
   :func:`fedguard.federation.fedavg.aggregate_updates` does in process — quantisation stream
   ``SecureRNG.for_testing(f"{seed}/aggregate/{r}").spawn(f"quantise/{k}")`` — so the same seed gives
   the same ring input, and hence bit-identical adapters; the protocol's own randomness (keys, masks)
   comes from OS entropy. It then builds the aggregator's client side and answers the stage message;
2. every later stage's request carries only the server's protocol message, answered by the same
   client side (which refuses out-of-order or foreign-round messages itself).

Fault injection for tests (``--fault``, never in a normal run): ``kill:R:STAGE`` kills this client's
whole SuperNode process group and this worker on receiving round ``R``'s ``STAGE`` message (a machine
that dies mid-round); ``garbage:R:STAGE`` answers that message with random bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedguard import wire
from fedguard.errors import ConfigError, FedGuardError, MessageError
from fedguard.federation.protocol import Aggregator, ClientSide, RoundSpec
from fedguard.rng import SecureRNG
from fedguard.updates import ClientUpdate
from fedguard_train.flower.dp_split import begin_client_round
from fedguard_train.flower.ipc import encode_frame, listen_private, read_frame
from fedguard_train.flower.rounds import BROADCAST_KIND, FirstStage, StageFailure, StageReply, stage_request

_LOG = logging.getLogger(__name__)



def quantise_rng(seed: int, round_id: int, client: int) -> SecureRNG:
    """The quantisation stream of ``client`` in ``round_id``: the one the in-process round uses
    (:meth:`Trainer._round` seeds ``f"{seed}/aggregate/{round}"``; ``aggregate_updates`` spawns per client)."""
    return SecureRNG.for_testing(f"{seed}/aggregate/{round_id}").spawn(f"quantise/{client}")


def round_spec_from(header: dict[str, Any], fixed_point: Any) -> RoundSpec:
    """The round's public parameters as the server sent them (checked by :class:`RoundSpec`)."""
    try:
        participants = tuple(int(c) for c in header["participants"])
        return RoundSpec(int(header["round"]), participants, int(header["vector_length"]), int(header["ring_bits"]),
                         fixed_point=fixed_point if header.get("fixed_point") else None,
                         min_contributors=int(header.get("min_contributors", 1)))
    except (KeyError, TypeError, ValueError) as err:
        raise MessageError(f"bad round header: {err}") from err


def client_aggregator(name: str, options: Any) -> Aggregator:
    """The aggregator a client's process builds: only its client side is used. For ``mpc`` that is
    :meth:`MpcAggregator.for_client <fedguard.secagg.mpc.aggregator.MpcAggregator.for_client>`: no compute
    party is started here, the shares are sealed to the keys pinned by ``aggregator_options.party_keys_file``
    (which the launcher hands each client at set-up, :mod:`fedguard_train.flower.mpc`), and a request naming
    other parties is refused (the client's dropout for that stage). Every other aggregator as configured."""
    if name == "mpc":
        from fedguard.secagg.mpc.aggregator import MpcAggregator

        return MpcAggregator.for_client(options)
    from fedguard.federation.registry import make_aggregator

    return make_aggregator(name, options)


class ClientWorker:
    """The client ``client`` of a run: its trainer (built with ``coordinator=False``) and aggregator."""

    def __init__(self, config: Any, client: int, *, fault: str | None = None) -> None:
        from fedguard_train.flower.dp_split import client_hooks
        from fedguard_train.trainers import trainer_class

        if not 0 <= client < config.n_parties:
            raise ConfigError(f"client must be in [0, {config.n_parties}), got {client}")
        self.config = config
        self.client = client
        # first: an aggregator that cannot be built (an MPC client without its key pin) fails before the model loads
        self.aggregator: Aggregator = client_aggregator(config.federation.aggregator,
                                                        config.federation.aggregator_options)
        try:  # the DP hook's client half (clip, distributed noise); the server keeps the accountant (dp_split)
            self.trainer = trainer_class(config.trainer)(config, hooks=client_hooks(config), quiet=True,
                                                         coordinator=False)
        except BaseException:
            self.aggregator.close()
            raise
        self.side: ClientSide | None = None
        self.fault = _parse_fault(fault)

    def close(self) -> None:
        self.aggregator.close()
        self.trainer.close()

    # -- requests --------------------------------------------------------------------------------------
    def handle(self, header: dict[str, Any], blobs: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
        op = header.get("op")
        if op == "hello":
            return {"client": self.client, "vector_length": self.trainer.layout.size + 1}, {}
        if op != "stage":
            raise MessageError(f"unknown request {op!r}")
        round_id, stage = header.get("round"), header.get("stage")
        self._maybe_fault(round_id, stage)
        if "protocol" not in blobs:
            raise MessageError("a stage request must carry the server's protocol message")
        out: dict[str, Any] = {}
        started = time.perf_counter()
        if "broadcast" in blobs:
            out = self._start_round(header, blobs["broadcast"])
        if self.side is None or self.side.spec.round_id != round_id:
            raise MessageError(f"client {self.client} has no round {round_id} under way")
        reply = self.side.handle(blobs["protocol"])
        if self.fault is not None and self.fault[0] == "garbage" and (round_id, stage) == self.fault[1:]:
            reply = os.urandom(len(reply))
        out["seconds"] = time.perf_counter() - started  # this stage's work here (training included), for timing
        return out, {"protocol": reply}

    def _start_round(self, header: dict[str, Any], broadcast: bytes) -> dict[str, Any]:
        trainer = self.trainer
        msg = wire.decode(broadcast)
        round_id = int(header["round"])
        if msg.kind != BROADCAST_KIND or msg.round != round_id or set(msg.arrays) != {"theta"}:
            raise MessageError(f"expected the {BROADCAST_KIND} message of round {round_id}")
        theta = np.array(msg.arrays["theta"])  # a writable copy: it is loaded into the model
        if theta.dtype != np.float32 or theta.shape != (trainer.layout.size,):
            raise MessageError(f"θ must be float32 of shape ({trainer.layout.size},), got {theta.dtype} {theta.shape}")
        self.side = None  # a new round replaces whatever the previous one left
        spec_r = round_spec_from(header, trainer.spec)
        if self.client not in spec_r.participants:
            raise MessageError(f"client {self.client} is not a participant of round {round_id}")
        begin_client_round(trainer.hooks, round_id, header)  # the round's DP clip norm, checked
        local = trainer.client_step(round_id, self.client, theta)
        update = trainer.hooks.client_update(ClientUpdate(self.client, round_id, local.delta, local.weight))
        upload = getattr(trainer, "upload", None)  # the run's upload plan (rotation, equal weights), if any
        if upload is not None:
            update = upload.forward(update)
        encoding = trainer.hooks.ring_encoding()
        q_rng = quantise_rng(self.config.seed, round_id, self.client)
        if encoding is None:
            from fedguard.encoding import encode_weighted

            ring = encode_weighted(update.vector, int(update.weight), trainer.spec, rng=q_rng, rounding="stochastic")
        else:
            ring = encoding.encode(update, q_rng)
        self.side = self.aggregator.client(spec_r, self.client, ring, rng=SecureRNG().spawn(f"protocol/{self.client}"))
        return {"loss": float(local.loss)}

    # -- fault injection (tests) -----------------------------------------------------------------------------
    def _maybe_fault(self, round_id: object, stage: object) -> None:
        if self.fault is None or self.fault[0] != "kill" or (round_id, stage) != self.fault[1:]:
            return
        pgid = os.environ.get("FEDGUARD_FLOWER_SUPERNODE_PGID")
        _LOG.warning("fault injection: client %d dies at round %s stage %s", self.client, round_id, stage)
        if pgid:
            try:
                os.killpg(int(pgid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(3)


class DirectExchange:
    """A :class:`~fedguard_train.flower.rounds.StageExchange` that hands each request straight to workers
    in this process (no network): what the Flower relay does, minus Flower. For tests and for separating
    Flower's cost from fedguard's in a benchmark. ``silent``: clients that never answer (a dead machine)."""

    def __init__(self, workers: dict[int, ClientWorker], *, silent: frozenset[int] = frozenset()) -> None:
        self.workers = workers
        self.silent = silent

    def __call__(self, round_id: int, stage: str, outbox: Mapping[int, bytes], first: FirstStage | None,
                 timeout: float) -> dict[int, StageReply | StageFailure]:
        answers: dict[int, StageReply | StageFailure] = {}
        for cid in sorted(outbox):
            if cid in self.silent or cid not in self.workers:
                continue
            header, blobs = stage_request(round_id, stage, outbox[cid], first)
            try:
                out_header, out_blobs = self.workers[cid].handle(header, blobs)
            except (FedGuardError, ValueError, KeyError, TypeError) as err:
                answers[cid] = StageFailure(f"{type(err).__name__}: {err}")
                continue
            loss = out_header.get("loss")
            answers[cid] = StageReply(out_blobs["protocol"], float(loss) if isinstance(loss, float) else None)
        return answers


def _parse_fault(fault: str | None) -> tuple[str, int, str] | None:
    if not fault:
        return None
    parts = fault.split(":")
    if len(parts) != 3 or parts[0] not in ("kill", "garbage") or not parts[1].isdigit():
        raise ConfigError(f"--fault must be kill:ROUND:STAGE or garbage:ROUND:STAGE, got {fault!r}")
    return parts[0], int(parts[1]), parts[2]


def serve(worker: ClientWorker, path: Path) -> None:
    """Answer requests on the Unix socket ``path`` (0600) until SIGTERM; one request per connection.
    A request that fails is answered with ``{"error": ...}`` (the server then counts this client as
    dropped for the stage), and the worker keeps serving."""
    with listen_private(path, 4) as server:
        def stop(*_: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    header, blobs = read_frame(conn)
                    out_header, out_blobs = worker.handle(header, blobs)
                except (FedGuardError, ValueError, KeyError, TypeError) as err:
                    _LOG.warning("client %d refused a request: %s", worker.client, err)
                    out_header, out_blobs = {"error": f"{type(err).__name__}: {err}"}, {}
                try:
                    conn.sendall(encode_frame(out_header, out_blobs))
                except OSError as err:
                    _LOG.warning("client %d could not answer: %s", worker.client, err)


def main(argv: list[str] | None = None) -> int:
    from fedguard_train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m fedguard_train.flower.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run's TrainConfig as JSON")
    parser.add_argument("--client", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--fault", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[worker {args.client}] %(levelname)s %(message)s")
    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    worker = ClientWorker(config, args.client, fault=args.fault)
    _LOG.info("client %d ready (%d travelling values)", args.client, worker.trainer.layout.size)
    try:
        serve(worker, Path(args.socket))
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Flower ServerApp of fedguard: the run's coordinator, with Flower's Grid as the network.

Flower starts it in a ``flwr-serverapp`` process for the whole run. It reads the run's settings (the
``fedguard-settings`` entry of the Flower run config: a JSON file the launcher wrote with the
:class:`~fedguard_train.config.TrainConfig`, resume/overwrite, timeouts, and the directory the run was
launched from, which it changes to so that the config's relative paths mean what they mean there), waits for the run's clients
(a ``hello`` round trip maps Flower node ids to fedguard client ids: each SuperNode's worker knows which
client it is), builds the coordinator trainer (:func:`fedguard_train.flower.coordinator.remote_trainer`)
and runs it with :class:`GridExchange` as its transport: one push and pull of Flower messages per protocol stage
(polled every ``poll`` seconds, :mod:`fedguard_train.flower.polling`),
bounded by the stage's timeout. A node missing from the answers is a dropout for that stage. At every
round start, nodes the server has not seen are asked who they are, so a client whose SuperNode restarted
(a new node id) rejoins from the next round.

Bytes: :class:`GridExchange` counts, per round and direction, the bytes of the Flower messages it sends
and receives as Flower serialises them (the deflated objects of each message: record, records dict,
message), beside fedguard's own accounting of the wire payloads inside them (the round table's
``bytes_up``/``bytes_down``). TLS and HTTP framing are not in either figure.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedguard.errors import ConfigError, ProtocolAbort
from fedguard_train.flower.messages import MESSAGE_TYPE, RECORD, hello_record, to_record
from fedguard_train.flower.polling import DEFAULT_POLL, check_poll, exchange_messages
from fedguard_train.flower.rounds import FirstStage, StageFailure, StageReply, Timeouts, stage_request

_LOG = logging.getLogger(__name__)

app = ServerApp()


def flower_size(message: Message) -> int:
    """Bytes of ``message`` as Flower serialises it for transfer (every deflated object it is made of)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


class GridExchange:
    """A :class:`~fedguard_train.flower.rounds.StageExchange` over Flower's :class:`~flwr.serverapp.Grid`."""

    def __init__(self, grid: Grid, n_clients: int, *, hello_timeout: float = 60.0, poll: float = DEFAULT_POLL) -> None:
        self.grid = grid
        self.n_clients = n_clients
        self.hello_timeout = hello_timeout
        self.poll = check_poll(poll)
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.flower_bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        self.round_trips: dict[int, int] = defaultdict(int)
        self.stage_times: dict[int, list[dict[str, Any]]] = defaultdict(list)

    def discover(self, *, wait_for_all: float = 0.0) -> None:
        """Ask nodes not seen yet which fedguard client they run; with ``wait_for_all`` > 0, keep asking until
        every client is known or that many seconds pass (:class:`ConfigError` naming who is missing)."""
        deadline = time.monotonic() + wait_for_all
        while True:
            unknown = [n for n in self.grid.get_node_ids() if n not in self.client_of]
            if unknown:
                msgs = [Message(RecordDict({RECORD: hello_record()}), dst_node_id=n, message_type=MESSAGE_TYPE,
                                group_id="hello", ttl=self.hello_timeout + 30) for n in unknown]
                for reply in self.send_and_receive(msgs, timeout=self.hello_timeout):
                    if reply.has_error():
                        continue
                    record = reply.content.config_records.get(RECORD)
                    client = record.get("client") if record is not None else None
                    if isinstance(client, int) and not isinstance(client, bool) and 0 <= client < self.n_clients:
                        old = self.node_of.get(client)
                        if old is not None:
                            self.client_of.pop(old, None)
                            _LOG.warning("client %d rejoined as node %d (was %d)", client, reply.metadata.src_node_id, old)
                        self.node_of[client] = reply.metadata.src_node_id
                        self.client_of[reply.metadata.src_node_id] = client
            if len(self.node_of) >= self.n_clients or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, 10 * self.poll))
        if wait_for_all > 0 and len(self.node_of) < self.n_clients:
            missing = sorted(set(range(self.n_clients)) - set(self.node_of))
            raise ConfigError(f"clients {missing} did not join within {wait_for_all:.0f} s")

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        """``Grid.send_and_receive`` polling every :attr:`poll` seconds instead of its fixed 3 s
        (:func:`fedguard_train.flower.polling.exchange_messages`)."""
        return exchange_messages(lambda msgs: self.grid.push_messages(msgs),
                                 lambda ids: self.grid.pull_messages(ids), messages, timeout=timeout,
                                 poll=self.poll, reply_to=lambda m: m.metadata.reply_to_message_id)

    def __call__(self, round_id: int, stage: str, outbox: Mapping[int, bytes], first: FirstStage | None,
                 timeout: float) -> dict[int, StageReply | StageFailure]:
        if first is not None:
            self.discover()  # a client whose SuperNode restarted rejoins here
        msgs = []
        for cid in sorted(outbox):
            node = self.node_of.get(cid)
            if node is None:
                continue  # never joined: silent
            header, blobs = stage_request(round_id, stage, outbox[cid], first)
            msg = Message(RecordDict({RECORD: to_record(header, blobs)}), dst_node_id=node, message_type=MESSAGE_TYPE,
                          group_id=f"{round_id}/{stage}", ttl=timeout + 30)
            self.flower_bytes[round_id]["down"] += flower_size(msg)
            msgs.append(msg)
        self.round_trips[round_id] += 1
        answers: dict[int, StageReply | StageFailure] = {}
        worker_seconds: list[float] = []
        started = time.perf_counter()
        replies = self.send_and_receive(msgs, timeout=timeout)
        wall = time.perf_counter() - started
        for reply in replies:
            sender = self.client_of.get(reply.metadata.src_node_id)
            if sender is None or sender not in outbox:
                continue
            cid = sender
            if reply.has_error():
                answers[cid] = StageFailure(f"Flower error {reply.error.code}: {reply.error.reason}")
                continue
            self.flower_bytes[round_id]["up"] += flower_size(reply)
            record = reply.content.config_records.get(RECORD)
            protocol = record.get("protocol") if record is not None else None
            loss = record.get("loss") if record is not None else None
            seconds = record.get("seconds") if record is not None else None
            if isinstance(seconds, float):
                worker_seconds.append(seconds)
            if not isinstance(protocol, bytes):
                answers[cid] = StageFailure("the reply carries no protocol message")
                continue
            answers[cid] = StageReply(protocol, float(loss) if isinstance(loss, float) else None)
        self.stage_times[round_id].append({"stage": stage, "wall_s": wall,
                                           "worker_max_s": max(worker_seconds, default=0.0)})
        return answers


def run_from_settings(grid: Grid, settings: dict[str, Any]) -> dict[str, Any]:
    """The whole run described by ``settings`` (see the module doc); returns its summary."""
    from fedguard_train.config import TrainConfig
    from fedguard_train.flower.coordinator import remote_trainer
    from fedguard_train.report import write_report

    def failed(err: BaseException) -> None:
        out = settings.get("summary")
        if out:
            Path(out).write_text(json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}"}))

    try:
        if settings.get("cwd"):  # relative paths of the config mean what they mean where the run was launched
            os.chdir(str(settings["cwd"]))
        config = TrainConfig.from_dict(settings["config"])
        timeouts = Timeouts(**settings.get("timeouts", {}))
        exchange = GridExchange(grid, config.n_parties, hello_timeout=float(settings.get("hello_timeout", 60.0)),
                                poll=float(settings.get("poll", DEFAULT_POLL)))
        exchange.discover(wait_for_all=float(settings.get("join_timeout", 600.0)))
        trainer = remote_trainer(config, exchange, timeouts=timeouts, quiet=False)
    except Exception as err:
        failed(err)
        raise
    label = trainer.aggregator_label
    summary: dict[str, Any] = {"status": "failed"}
    try:
        result = trainer.run(resume=bool(settings.get("resume")), overwrite=bool(settings.get("overwrite")))
        write_report(Path(config.run_dir), config=config.to_dict(), history=result.history, baseline=result.baseline,
                     partition=trainer.partition, counts=trainer.counts, title=trainer.title, aggregator=label)
        summary = {"status": "stopped" if result.stopped else "completed", "stopped": result.stopped,
                   "history": result.history}
    except ProtocolAbort as err:
        summary = {"status": "aborted", "error": str(err), "nothing_revealed": bool(err.nothing_revealed)}
        raise
    except Exception as err:
        summary = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        raise
    finally:
        summary.update(drops=[list(e) for e in trainer.drops.events],
                       flower_bytes={str(r): v for r, v in exchange.flower_bytes.items()},
                       round_trips={str(r): v for r, v in exchange.round_trips.items()},
                       stage_times={str(r): v for r, v in exchange.stage_times.items()},
                       nodes={str(c): n for c, n in exchange.node_of.items()})
        out = settings.get("summary")
        if out:
            Path(out).write_text(json.dumps(summary, indent=1, default=str))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get("fedguard-settings")
    if not isinstance(path, str) or not path:
        raise ConfigError("the Flower run config has no fedguard-settings (start runs with `fedguard flower run`)")
    logging.basicConfig(level=logging.INFO, format="[server] %(levelname)s %(name)s: %(message)s")
    run_from_settings(grid, json.loads(Path(path).read_text()))

"""The Flower ClientApp of fedguard: relays each protocol stage to this machine's client worker.

Flower starts this app in a new ``flwr-clientapp`` process for every message it delivers, so it holds
nothing: it takes the fedguard payloads out of the Flower :class:`~flwr.app.Message` (one
:class:`~flwr.app.ConfigRecord` named ``"fedguard"``, see :mod:`fedguard_train.flower.messages`), hands
them to the long-lived :mod:`fedguard_train.flower.worker` over its local socket (the SuperNode's
``--node-config 'fedguard-socket="..."'``) and returns the worker's answer as the reply. A worker that
refuses the request, or cannot be reached, becomes a Flower error reply: the server counts the client as
dropped for that stage.

This module imports flwr, the wire-free relay and nothing heavy (no torch): it runs once per message.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedguard_train.flower.ipc import request
from fedguard_train.flower.messages import (
    ACTION,
    RECORD,
    WORKER_ERROR_CODE,
    from_worker_reply,
    to_worker_request,
)

app = ClientApp()

CONNECT_SECONDS = 600.0
"""How long the relay waits for the worker's socket to appear (the worker loads its model first)."""
REQUEST_SECONDS = 24 * 3600.0
"""Upper bound on one request (local training happens inside the first stage's request); the server's
stage timeout is what really bounds a round."""


def _relay(msg: Message, context: Context) -> Message:
    path = str(context.node_config.get("fedguard-socket", ""))
    if not path:
        return Message(Error(code=WORKER_ERROR_CODE, reason="this SuperNode has no fedguard-socket in its "
                             "--node-config"), reply_to=msg)
    record = msg.content.config_records.get(RECORD)
    if record is None:
        return Message(Error(code=WORKER_ERROR_CODE, reason=f"the message carries no {RECORD!r} config record"),
                       reply_to=msg)
    header, blobs = to_worker_request(record)
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            out_header, out_blobs = request(path, header, blobs, timeout=REQUEST_SECONDS)
            break
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if time.monotonic() > deadline:
                return Message(Error(code=WORKER_ERROR_CODE, reason=f"fedguard worker unreachable: {err}"),
                               reply_to=msg)
            time.sleep(0.2)
    if "error" in out_header:
        return Message(Error(code=WORKER_ERROR_CODE, reason=str(out_header["error"])), reply_to=msg)
    answer: ConfigRecord = from_worker_reply(out_header, out_blobs)
    return Message(RecordDict({RECORD: answer}), reply_to=msg)


app.query(ACTION)(_relay)

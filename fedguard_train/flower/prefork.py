"""``flwr-clientapp`` without a cold interpreter per message: a fork server per SuperNode (opt-out).

Flower 1.42's SuperNode has its SuperExec start a new ``flwr-clientapp`` process for every message it
receives (``SubprocessExecutor.launch``: ``Popen(["flwr-clientapp", "--runtime-api-address", ...,
"--token", ...])``, the command found on ``PATH``). Importing Flower in that process costs ~1.9 s of CPU
here (SQLAlchemy, Alembic, FastAPI); fedguard's protocols send one message per client per stage, so a
masking round with 3 clients on 2 cores paid ~12 s for imports alone. There is no Flower option to keep a
ClientApp process alive (its warm executor pools exist only for Kubernetes).

The override, all in fedguard's launcher and nothing in Flower:

* :func:`serve` — one fork server per SuperNode, started before it: it imports Flower's ``flwr-clientapp``
  entry point (and fedguard's ClientApp module) once, then listens on a 0600 Unix socket in the
  deployment's 0700 socket directory;
* :data:`SHIM` — an executable named ``flwr-clientapp`` in a directory the launcher puts first on the
  SuperNode's ``PATH``; it is what the SuperExec starts. Using only the standard library (~30 ms), it sends
  its arguments and its stdin/stdout/stderr descriptors to the fork server (``SCM_RIGHTS``), which forks a
  child that runs Flower's own ``flwr_clientapp()`` with exactly those arguments and descriptors. The shim
  relays SIGTERM/SIGINT to the child and exits with the child's status. If the fork server cannot be
  reached it ``exec``-s the real ``flwr-clientapp``: the message is handled as without the override.

What is the same: Flower's ClientApp code path (token, Runtime API, heartbeat, FAB install, the app's
``@app.query``), its arguments and environment (the fork server is started with the SuperNode's), one
process per message (a forked child, exiting after the message). What differs: the child starts with
Flower already imported (copy-on-write), so no state of one message can reach the next (each child is
forked from the pristine server, never from a previous child).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Final

from fedguard_train.flower.ipc import listen_private

SOCKET_ENV: Final[str] = "FEDGUARD_CLIENTAPP_FORK_SOCKET"
"""The fork server's socket, in the SuperNode's environment (read by the shim)."""
REAL_ENV: Final[str] = "FEDGUARD_CLIENTAPP_REAL"
"""The real ``flwr-clientapp`` the shim falls back to."""

SHIM: Final[str] = '''#!{python} -S
# fedguard: flwr-clientapp handed to the SuperNode's fork server (fedguard_train/flower/prefork.py)
import json, os, signal, socket, struct, sys
path, real = os.environ.get("{socket_env}", ""), os.environ.get("{real_env}", "")
args = sys.argv[1:]
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    payload = json.dumps(args).encode()
    socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
    head = conn.recv(4, socket.MSG_WAITALL)
    if len(head) != 4:
        raise OSError("the fork server closed the connection")
except OSError:
    if not real:
        sys.exit("flwr-clientapp: no fork server and no real flwr-clientapp to fall back to")
    os.execv(real, [real, *args])
child = struct.unpack("!i", head)[0]
def relay(signum, frame):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, relay)
signal.signal(signal.SIGINT, relay)
status = conn.recv(4, socket.MSG_WAITALL)
sys.exit(struct.unpack("!i", status)[0] if len(status) == 4 else 1)
'''


def write_shim(directory: Path, python: str = sys.executable) -> Path:
    """The ``flwr-clientapp`` shim in ``directory`` (created, mode 0700); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    shim = directory / "flwr-clientapp"
    shim.write_text(SHIM.format(python=python, socket_env=SOCKET_ENV, real_env=REAL_ENV))
    shim.chmod(0o700)
    return shim


def _run_child(conn: socket.socket, fds: list[int], args: list[str], go: int) -> None:
    """In the forked child: become ``flwr-clientapp ARGS`` on the shim's descriptors; never returns.
    ``go``: a pipe the parent writes to once the shim has the child's pid (so that the exit status can never
    arrive first)."""
    code = 1
    try:
        os.read(go, 1)
        os.close(go)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = ["flwr-clientapp", *args]
        try:
            flwr_clientapp()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 — the child must report and exit, whatever happened
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(struct.pack("!i", code))
        except OSError:
            pass
        os._exit(code)


def _receive(conn: socket.socket) -> tuple[list[str], list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, 4 + 65536, 3)
    if len(msg) < 4:
        raise OSError("short request")
    size = struct.unpack("!I", msg[:4])[0]
    body = msg[4:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise OSError("truncated request")
        body += more
    args = json.loads(body.decode())
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        for fd in fds:
            os.close(fd)
        raise ValueError("the request must be a list of strings")
    return args, list(fds)


def serve(path: Path) -> None:
    """Fork a ``flwr-clientapp`` child per connection on the Unix socket ``path`` (0600) until SIGTERM."""
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401 — the point: import once, fork many times

    import fedguard_train.flower.client_app  # noqa: F401 — the ClientApp module Flower loads

    with listen_private(path, 16) as server:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel

        def stop(*_: object) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        while True:
            conn, _ = server.accept()
            try:
                args, fds = _receive(conn)
            except (OSError, ValueError) as err:
                print(f"prefork: refused a request: {err}", file=sys.stderr, flush=True)
                conn.close()
                continue
            go_read, go_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                server.close()
                os.close(go_write)
                _run_child(conn, fds, args, go_read)
            os.close(go_read)
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(struct.pack("!i", pid))
            except OSError:
                pass
            os.write(go_write, b"g")
            os.close(go_write)
            conn.close()  # the child holds its own copy and reports the exit status through it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard_train.flower.prefork", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    serve(Path(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())

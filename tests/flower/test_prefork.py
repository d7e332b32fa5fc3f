"""The flwr-clientapp fork server (fedguard_train.flower.prefork): the shim the SuperExec starts runs Flower's
own flwr-clientapp entry point in a child forked from a server that imported Flower once — same arguments,
same descriptors, same exit status — and falls back to the real command when no server answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedguard_train.flower import flower_available
from fedguard_train.flower.prefork import REAL_ENV, SOCKET_ENV, write_shim

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(not flower_available(), reason="flwr is not installed (pip install 'fedguard[flower]')"),
              pytest.mark.timeout(300)]


@pytest.fixture
def fork_server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    sockets = tmp_path / "s"
    sockets.mkdir(mode=0o700)
    sock = sockets / "f.sock"
    server = subprocess.Popen([sys.executable, "-m", "fedguard_train.flower.prefork", "--socket", str(sock)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the fork server did not start"
            time.sleep(0.1)
        yield sock, server
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=10)


def _shim(tmp_path: Path, sock: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    shim = write_shim(tmp_path / "bin")
    env = dict(os.environ)
    env.update({SOCKET_ENV: str(sock), REAL_ENV: str(Path(sys.executable).parent / "flwr-clientapp")})
    t0 = time.perf_counter()
    done = subprocess.run([str(shim), *args], capture_output=True, text=True, env=env, timeout=120)
    return done, time.perf_counter() - t0


def test_shim_runs_flwr_clientapp_in_a_forked_child(tmp_path: Path, fork_server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, server = fork_server
    shim = tmp_path / "bin" / "flwr-clientapp"
    ok, _ = _shim(tmp_path, sock, "--help")
    assert ok.returncode == 0 and "usage: flwr-clientapp" in ok.stdout  # the child wrote on the shim's stdout
    assert oct(shim.stat().st_mode & 0o777) == "0o700" and oct(sock.stat().st_mode & 0o777) == "0o600"
    bad, _ = _shim(tmp_path, sock, "--bogus")
    assert bad.returncode == 2 and "--token" in bad.stderr  # argparse's refusal, its status relayed
    warm = min(_shim(tmp_path, sock, "--help")[1] for _ in range(3))
    cold = min(_shim(tmp_path, tmp_path / "absent.sock", "--help")[1] for _ in range(2))  # falls back: real command
    assert warm < cold  # Flower is not imported again per message (~1.9 s of CPU here)
    assert server.poll() is None  # each request forks; the server itself never runs a ClientApp


def test_shim_falls_back_to_the_real_command_without_a_server(tmp_path: Path) -> None:
    done, _ = _shim(tmp_path, tmp_path / "absent.sock", "--help")
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout


def test_a_malformed_request_is_refused_and_the_server_keeps_serving(
        tmp_path: Path, fork_server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    import socket
    import struct

    sock, server = fork_server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock))
        payload = b'{"not": "a list"}'
        socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
        assert conn.recv(4) == b""  # closed without forking anything
    ok, _ = _shim(tmp_path, sock, "--help")
    assert ok.returncode == 0 and server.poll() is None

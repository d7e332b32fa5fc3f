"""The parts of the Flower deployment that need no running Flower: TLS material, the local IPC frames, the
launcher's refusals before any process starts."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from fedguard.errors import ConfigError, MessageError
from fedguard_train.flower.certs import make_tls
from fedguard_train.flower.ipc import MAX_HEADER_BYTES, encode_frame, read_frame, request
from fedguard_train.flower.launcher import FlowerOptions
from fedguard_train.flower.rounds import Timeouts


def test_tls_material_chains_names_the_hosts_and_keeps_keys_private(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    files = make_tls(tmp_path / "certs", hosts=("127.0.0.1", "server.example.org"))
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.key, files.ca_key):
        assert key.stat().st_mode & 0o077 == 0
    before = files.key.read_bytes()
    assert make_tls(tmp_path / "certs").key.read_bytes() == before  # a complete set is reused, never replaced
    files.cert.unlink()
    with pytest.raises(ConfigError, match="partial TLS set"):
        make_tls(tmp_path / "certs")
    assert files.key.read_bytes() == before
    with pytest.raises(ConfigError):
        make_tls(tmp_path / "other", hosts=())


def test_ipc_frames_round_trip_and_malformed_frames_raise_message_error(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            header, blobs = read_frame(conn)
            conn.sendall(encode_frame({"seen": header}, {k: v[::-1] for k, v in blobs.items()}))

    thread = threading.Thread(target=echo)
    thread.start()
    header, blobs = request(path, {"op": "stage", "round": 3}, {"protocol": b"abc", "empty": b""}, timeout=10)
    thread.join()
    server.close()
    assert header == {"seen": {"op": "stage", "round": 3}} and blobs == {"protocol": b"cba", "empty": b""}

    def parse(data: bytes) -> None:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            read_frame(b)

    good = encode_frame({"op": "x"}, {"p": b"12345"})
    for bad in (b"XXXX" + good[4:], good[:-2], good[:8] + b"[1,2]" + good[8 + 5:],
                b"FGIP" + (MAX_HEADER_BYTES + 1).to_bytes(4, "little"),
                encode_frame({"op": "x"})[:8] + b"{}" + b"", b""):
        with pytest.raises(MessageError):
            parse(bad)
    a, b = socket.socketpair()
    with a, b:  # a blob list that lies about its entries
        raw = b'{"blobs":[["p",-1]]}'
        a.sendall(b"FGIP" + len(raw).to_bytes(4, "little") + raw)
        with pytest.raises(MessageError, match="bad blob"):
            read_frame(b)
    with pytest.raises(MessageError):
        encode_frame({}, {str(i): b"" for i in range(9)})


def test_options_and_deployment_refuse_bad_input_before_any_process(tmp_path: Path, task: Path) -> None:
    from fedguard_train.flower.launcher import Deployment
    from tests.train.conftest import tiny_config

    with pytest.raises(ConfigError) as err:
        FlowerOptions(stage_timeout=0, first_timeout=-1, join_timeout=float("nan"), run_timeout=0, torch_threads=0,
                      poll=0, superlink_restarts=-1)
    assert len(err.value.problems) == 7
    with pytest.raises(ConfigError):
        Timeouts(first=0)
    dp = tiny_config(tmp_path / "dp", task, dp={"noise_multiplier": 1.0, "clip_norm": 0.1, "target_delta": 1e-3})
    with Deployment(dp) as accepted:  # dp: runs over Flower (the hook split client/server: dp_split)
        assert accepted.config.dp is not None
    mpc = tiny_config(tmp_path / "mpc", task, federation={"clients": 2, "rounds": 1, "aggregator": "mpc",
                                                          "aggregator_options": {"backend": "simulated"}})
    with pytest.raises(ConfigError, match="backend 'simulated' cannot run over Flower"):
        Deployment(mpc)  # its parties live in the server: the clients could take the keys only from the server
    remote = tiny_config(tmp_path / "mpc2", task, federation={
        "clients": 2, "rounds": 1, "aggregator": "mpc",
        "aggregator_options": {"backend": "network", "listen": "127.0.0.1:1", "control_key_file": "c.key"}})
    with pytest.raises(ConfigError, match="needs party_keys_file"):
        Deployment(remote)  # parties run elsewhere: the clients must be given their pin
    plain = tiny_config(tmp_path / "p", task)
    with pytest.raises(ConfigError, match="faults name clients"):
        Deployment(plain, FlowerOptions(faults={5: "kill:1:input"}))
    masking = tiny_config(tmp_path / "m", task, federation={"clients": 2, "rounds": 1, "aggregator": "masking",
                                                            "aggregator_options": {"threshold": 3}})
    with pytest.raises(ConfigError, match="threshold"):
        Deployment(masking)
    assert not (tmp_path / "m" / "run" / "flower").exists()  # nothing was started or written


def test_workers_share_the_cores_instead_of_oversubscribing_them() -> None:
    from fedguard_train.flower.launcher import worker_threads

    assert worker_threads(3, cores=2) == 1 and worker_threads(2, cores=8) == 4 and worker_threads(1, cores=2) == 2
    assert worker_threads(10, cores=16) == 1 and worker_threads(0, cores=4) == 4


def test_mpc_set_up_makes_party_keys_and_the_clients_pin_before_any_process(tmp_path: Path, task: Path) -> None:
    """``aggregator: mpc`` (crypten, the default) over Flower: the launcher gives each party a long-term key
    (0600), the clients the pin of those keys, and the run a configuration naming them (network parties on
    loopback); a second deployment of the same run dir (``--resume``) finds the same keys and pin, and a pin
    that names other keys is refused rather than replaced. Nothing is started here."""
    from fedguard.secagg.mpc import MpcOptions
    from fedguard.secagg.mpc.network import read_party_key
    from fedguard.secagg.mpc.pin import read_party_keys, write_party_keys
    from fedguard.secagg.mpc.sharing import public_key_bytes
    from fedguard_train.flower.launcher import Deployment
    from tests.train.conftest import tiny_config

    config = tiny_config(tmp_path / "mpc", task, federation={"clients": 2, "rounds": 1, "aggregator": "mpc",
                                                             "aggregator_options": {"n_parties": 2}})
    with Deployment(config) as deployment:
        assert deployment.mpc is not None and deployment.mpc.managed
        deployment._prepare_mpc(deployment.mpc)
        options = deployment.config.federation.aggregator_options
        assert not deployment.procs  # no process yet
    assert isinstance(options, MpcOptions) and options.backend == "network" and options.n_parties == 2
    assert options.listen is not None and options.listen.startswith("127.0.0.1:")
    mpc_dir = tmp_path / "mpc" / "run" / "flower" / "mpc"
    keys = [mpc_dir / f"party{r}.key" for r in range(2)]
    assert all(k.stat().st_mode & 0o077 == 0 for k in keys) and (mpc_dir / "control.key").stat().st_mode & 0o077 == 0
    pinned = read_party_keys(str(options.party_keys_file), 2)
    assert pinned == tuple(public_key_bytes(read_party_key(k)) for k in keys)
    with Deployment(config) as again:  # a resumed deployment: the same parties, the same pin
        assert again.mpc is not None
        again._prepare_mpc(again.mpc)
        assert read_party_keys(str(again.config.federation.aggregator_options.party_keys_file)) == pinned
    write_party_keys(mpc_dir / "party_keys.json", (b"\x01" * 32, b"\x02" * 32), overwrite=True)
    with Deployment(config) as conflicting, pytest.raises(ConfigError, match="refusing to overwrite"):
        assert conflicting.mpc is not None
        conflicting._prepare_mpc(conflicting.mpc)


def test_a_relative_run_dir_gives_absolute_launcher_paths(tmp_path: Path, task: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Flower process runs in <run_dir>/flower: the launcher's own paths (config, settings, app, certs,
    MPC keys) must be absolute there, and the workers are started where the run was launched (so a relative
    run_dir or data path means what it means to `fedguard train`). Nothing is started here."""
    from fedguard_train.config import TrainConfig
    from fedguard_train.flower.launcher import Deployment
    from tests.train.conftest import tiny_config

    monkeypatch.chdir(tmp_path)
    raw = tiny_config(tmp_path / "rel", task, federation={"clients": 2, "rounds": 1, "aggregator": "mpc",
                                                          "aggregator_options": {"n_parties": 2}}).to_dict()
    raw["run_dir"] = "runs/relative"
    with Deployment(TrainConfig.from_dict(raw)) as deployment:
        assert deployment.dir == tmp_path / "runs" / "relative" / "flower" and deployment.origin == tmp_path
        assert deployment.flower.dir.is_absolute() and deployment.mpc is not None
        deployment._prepare_mpc(deployment.mpc)
        options = deployment.config.federation.aggregator_options
        assert Path(str(options.party_keys_file)).is_absolute() and Path(str(options.control_key_file)).is_absolute()

"""TLS material for a Flower deployment: a private certificate authority and the SuperLink's certificate.

Flower's SuperLink serves its Fleet, Control and Runtime APIs over TLS given a certificate and key
(``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``); SuperNodes and the ``flwr`` CLI verify it against a
root certificate (``--root-certificates``). :func:`make_tls` creates, with the ``cryptography`` package:

* ``ca.pem`` — a self-signed CA certificate (ECDSA P-256, valid ``days``): give it to every client
  machine; it is public;
* ``ca.key`` — the CA's private key (mode 0600): whoever holds it can impersonate the server to every
  client; keep it offline after set-up;
* ``server.pem`` / ``server.key`` (0600) — the SuperLink's certificate, signed by the CA, whose subject
  alternative names are the addresses clients dial (``127.0.0.1`` and ``localhost`` by default).

Existing files are never overwritten (:func:`fedguard.files.atomic_write` with ``overwrite=False``): a
second set-up in the same directory reuses what is there if it is complete, and refuses a partial set.
TLS authenticates the server and encrypts the link; it does not authenticate clients (Flower's SuperNode
authentication is separate) and it hides nothing from the server: what the server may learn is bounded
by fedguard's aggregator, not by TLS (docs/threat-model.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedguard.errors import ConfigError
from fedguard.files import atomic_write

FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the TLS material in one directory."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        return self.directory / "server.key"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(directory: str | Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30,
             now: datetime.datetime | None = None) -> TlsFiles:
    """Create (or reuse, when all four files exist) the CA and server certificate in ``directory``."""
    if not hosts:
        raise ConfigError("hosts must name at least one address the clients dial")
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"days must be an int >= 1, got {days!r}")
    files = TlsFiles(Path(directory))
    present = [name for name in FILES if (files.directory / name).exists()]
    if len(present) == len(FILES):
        return files
    if present:
        raise ConfigError(f"{files.directory} holds only {', '.join(present)} of {', '.join(FILES)}: "
                          "refusing to overwrite a partial TLS set; remove it or choose another directory")
    files.directory.mkdir(parents=True, exist_ok=True)
    files.directory.chmod(0o700)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedguard flower CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(until)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))

    atomic_write(files.ca_key, _pem_key(ca_key), mode=0o600, overwrite=False)
    atomic_write(files.key, _pem_key(server_key), mode=0o600, overwrite=False)
    atomic_write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=False)
    atomic_write(files.cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=False)
    return files

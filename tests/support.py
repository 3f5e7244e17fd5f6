"""Helpers shared by the tests: an event loop on a thread, a front door started on it, TLS certificates."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import pathlib
import threading

from service.config import ServerConfig
from service.server import RunningServer, create_server


class LoopThread:
    """An event loop on a daemon thread: servers live there, tests call them over real sockets."""

    def __init__(self, name: str = "test-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 300.0):
        """Runs `coro` on the loop and waits for its result, at most `timeout` seconds."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stops the loop and its thread; idempotent."""
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def start_front_door(loop: LoopThread, backend, **kwargs) -> RunningServer:
    """create_server on 127.0.0.1, any free port, with a metrics exporter on any free port."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.1", grace_s=0.0)
    return loop.call(create_server(config, backend, **kwargs))


def self_signed_cert(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(cert.pem, key.pem) in `folder`: a self-signed certificate for localhost and 127.0.0.1, valid an hour,
    which is its own root (give it as the client's root certificates). Needs `cryptography`."""
    return _write(folder / "cert.pem", folder / "key.pem", _certificate("localhost", ca=True, hosts=True))


@dataclasses.dataclass(frozen=True)
class MutualTls:
    """PEM files for mutual TLS, all valid an hour: a CA, a server certificate it signed for localhost and
    127.0.0.1, a client certificate it signed, and two client certificates it did not sign (one from another CA,
    one self-signed), which a server that trusts only the CA must refuse."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    foreign_cert: pathlib.Path
    foreign_key: pathlib.Path
    self_signed_cert: pathlib.Path
    self_signed_key: pathlib.Path


def mutual_tls(folder: pathlib.Path) -> MutualTls:
    """Writes a `MutualTls` set into `folder`. Needs `cryptography`."""
    ca = _certificate("test CA", ca=True)
    other_ca = _certificate("another CA", ca=True)
    pem = {"ca": ca,
           "server": _certificate("localhost", issuer=ca, hosts=True, usage="server"),
           "client": _certificate("client", issuer=ca, usage="client"),
           "foreign": _certificate("client", issuer=other_ca, usage="client"),
           "self-signed": _certificate("client", usage="client")}
    paths = [_write(folder / f"{stem}.pem", folder / f"{stem}-key.pem", pair) for stem, pair in pem.items()]
    return MutualTls(paths[0][0], *(path for pair in paths[1:] for path in pair))


def _certificate(common_name: str, *, issuer=None, ca: bool = False, hosts: bool = False, usage: str = ""):
    """(certificate, private key): signed by `issuer` (a (certificate, key) pair), else by its own key.

    hosts: names localhost and 127.0.0.1 (a server's certificate); usage: "server" or "client" adds the
    extended key usage TLS checks for that side."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    if usage:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(cert_path: pathlib.Path, key_path: pathlib.Path, pair) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes a (certificate, key) pair as PEM (the key unencrypted); returns the two paths."""
    from cryptography.hazmat.primitives import serialization

    cert, key = pair
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path

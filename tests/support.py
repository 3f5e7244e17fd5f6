"""Helpers shared by the tests: an event loop on a thread, a front door started on it, a TLS certificate."""
from __future__ import annotations

import asyncio
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
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path

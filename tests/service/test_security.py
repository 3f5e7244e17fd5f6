"""Transport security against real servers with real certificates made here: mutual TLS (a CA that signs the
clients it lets in), the bearer token beside it, the checks on the TLS files, and /metrics on its own address.
The command-line side (--cert, --key) is in test_cli_errors.py."""
from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.cli import main
from service.client import AsyncAttributionClient, AttributionClient, RetryPolicy, ServiceError
from service.config import ServerConfig
from workers.errors import InvalidArgument

pytest.importorskip("cryptography")

from tests.support import MutualTls, mutual_tls  # noqa: E402  (needs cryptography)

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> MutualTls:
    return mutual_tls(tmp_path_factory.mktemp("mtls"))


@pytest.fixture(scope="module")
def images(demo_batch) -> np.ndarray:
    return demo_batch.images[:2].numpy()  # (2, 3, 64, 64) float32 pixels


def mtls_overrides(pki: MutualTls, **more) -> dict:
    """ServerConfig keys for a front door on mutual TLS that trusts `pki.ca` only."""
    return {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca), **more}


@pytest.fixture(scope="module")
def mtls_server(start_server, pki):
    """Mutual TLS and the token `t0ken`, both asked."""
    harness = start_server(**mtls_overrides(pki, auth_token="t0ken"))
    yield harness
    harness.stop()


def client(harness, pki: MutualTls, which: str | None = "client", **kwargs) -> AttributionClient:
    """A client that trusts the server's CA and shows the `which` certificate of `pki` (None: none)."""
    if which is not None:
        kwargs.update(client_cert=getattr(pki, f"{which}_cert"), client_key=getattr(pki, f"{which}_key"))
    return AttributionClient(harness.address, root_certificates=pki.ca, retry=NO_RETRY, **kwargs)


def test_a_client_certificate_the_ca_signed_gets_in_and_the_token_is_still_asked(mtls_server, pki, images):
    with client(mtls_server, pki, token="t0ken") as c:
        assert c.explain(images, method="vanilla").maps.shape == (2, 1, 64, 64)
    with client(mtls_server, pki) as c:  # the certificate is not the token
        with pytest.raises(ServiceError) as info:
            c.models(timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client(mtls_server, pki, token="wrong") as c:
        with pytest.raises(ServiceError) as info:
            c.models(timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("which", [None, "foreign", "self_signed"])
def test_a_client_without_a_certificate_the_ca_signed_is_refused_in_the_handshake(mtls_server, pki, which):
    """No certificate, one from another CA, a self-signed one: the connection closes before any call, so even
    the right token and the health service (open without a token) get nothing."""
    with client(mtls_server, pki, which, token="t0ken") as c:
        with pytest.raises(ServiceError) as info:
            c.models(timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.value.code() == grpc.StatusCode.UNAVAILABLE
    with client(mtls_server, pki) as c:  # health needs the certificate, not the token
        answer = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_alone_with_the_async_client_and_pem_bytes(start_server, pki, images):
    harness = start_server(**mtls_overrides(pki))

    async def main() -> tuple:
        async with AsyncAttributionClient(harness.address, root_certificates=pki.ca.read_bytes(),
                                          client_cert=pki.client_cert.read_bytes(),
                                          client_key=pki.client_key.read_bytes()) as c:
            return await c.models(), await c.explain(images, method="vanilla")

    try:
        models, result = asyncio.run(main())
        assert models[0].name == "demo" and result.maps.shape == (2, 1, 64, 64)
        with client(harness, pki, None) as c:
            with pytest.raises(ServiceError) as info:
                c.models(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        harness.stop()


def test_a_client_certificate_needs_its_key(pki):
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        AttributionClient("127.0.0.1:1", root_certificates=pki.ca, client_cert=pki.client_cert)


# ------------------------------------------------------------ config --

def test_a_client_ca_needs_tls_and_its_files_are_checked_naming_the_key(pki, tmp_path, start_server):
    with pytest.raises(InvalidArgument, match="server.tls_client_ca: needs tls_cert and tls_key"):
        ServerConfig.from_dict({"tls_client_ca": str(pki.ca)})
    key, cert, client_ca = ServerConfig.from_dict(mtls_overrides(pki)).read_tls()
    assert client_ca == pki.ca.read_bytes() and b"PRIVATE KEY" in key and b"CERTIFICATE" in cert
    missing = tmp_path / "missing.pem"
    for overrides, said in (({"tls_client_ca": str(missing)}, f"server.tls_client_ca: cannot read {missing}: No such"),
                            ({"tls_client_ca": str(pki.client_key)}, "server.tls_client_ca: "
                                                                    f"{pki.client_key} holds no PEM certificate"),
                            ({"tls_key": str(pki.server_cert)}, "server.tls_key: "
                                                               f"{pki.server_cert} holds no PEM private key")):
        config = ServerConfig.from_dict(mtls_overrides(pki, **overrides))
        with pytest.raises(InvalidArgument) as info:
            config.read_tls()
        assert said in str(info.value)
        with pytest.raises(InvalidArgument) as info:  # a server is never started on a file it cannot use
            start_server(**mtls_overrides(pki, **overrides))
        assert said in str(info.value)


def test_serve_check_reads_the_tls_files(pki, tmp_path, capsys):
    """`attribution serve --check` (no Ray) says which TLS file is wrong before anything starts."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server": mtls_overrides(pki)}))
    assert main(["serve", "--config", str(config), "--check"]) == 0
    config.write_text(json.dumps({"server": mtls_overrides(pki, tls_client_ca=str(tmp_path / "nope.pem"))}))
    assert main(["serve", "--config", str(config), "--check"]) == 2
    assert capsys.readouterr().err.strip() == ("attribution serve: invalid config: server.tls_client_ca: "
                                               f"cannot read {tmp_path / 'nope.pem'}: No such file or directory")


# ----------------------------------------------------------- metrics --

def test_metrics_listen_on_their_own_address_only(start_server):
    """gRPC on 127.0.0.1, /metrics on 127.0.0.2: each answers on its own address and not on the other's."""
    harness = start_server(metrics_port=0, metrics_host="127.0.0.2")
    try:
        port = harness.running.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200 and b"attribution_" in answer.read()
        for host, busy in (("127.0.0.1", port), ("127.0.0.2", harness.running.port)):
            with socket.socket() as s:
                assert s.connect_ex((host, busy)) != 0, f"{host}:{busy} should not be listening"
    finally:
        harness.stop()

"""Client-side balancing over several front doors: a target naming more than one address.

    AttributionClient("10.0.0.5:50051,10.0.0.6:50051")      # or a list of addresses
    AttributionClient("dns:///attribution.internal:50051")  # every address the name resolves to

Such a channel uses gRPC's `round_robin` policy with client-side health checking
(`grpc.health.v1`, the overall service): calls spread over every front door that reports
SERVING, and one that stops answering or reports NOT_SERVING is left out until it is back.
Host names in a list are resolved once, when the client is made (a `dns:///` name is
re-resolved by gRPC itself); the first one stays the channel's authority, so TLS still checks
certificates against the name and not an address. One plain address keeps gRPC's default
(`pick_first`).
"""
from __future__ import annotations

import ipaddress
import json
import socket
from typing import Sequence

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r}: give host:port (e.g. 10.0.0.5:50051 or [::1]:50051)")
    return host.strip("[]"), int(port)


def _resolve(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """(gRPC target, extra channel options): several addresses become one balanced `ipv4:`/`ipv6:` target."""
    if isinstance(target, str) and target.startswith("dns:"):
        return target, [("grpc.service_config", SERVICE_CONFIG)]
    addresses = [a for a in (target.split(",") if isinstance(target, str) else list(target)) if a.strip()]
    if len(addresses) <= 1:
        return (addresses[0].strip() if addresses else str(target)), []
    by_family: dict[int, list[str]] = {4: [], 6: []}
    first_host = None
    for address in addresses:
        host, port = _split(address)
        first_host = first_host or host
        for ip in _resolve(host, port):
            version = ipaddress.ip_address(ip).version
            by_family[version].append(f"{ip}:{port}" if version == 4 else f"[{ip}]:{port}")
    family = 4 if by_family[4] else 6  # one scheme per target: IPv4 where there is any
    options = [("grpc.service_config", SERVICE_CONFIG)]
    try:
        ipaddress.ip_address(first_host)
    except ValueError:
        options.append(("grpc.default_authority", f"{first_host}:{_split(addresses[0])[1]}"))
    return f"ipv{family}:" + ",".join(dict.fromkeys(by_family[family])), options

"""Channel targets and options: one server, several servers, or a DNS name.

Several servers are balanced by gRPC itself (round_robin over a static address list, or
over what a dns:/// name resolves to), so the client needs no balancer of its own. Each
call goes to one server for its whole life, so Generate is always safe; but Submit then
Stream/Cancel by id are separate calls and may land on different servers, which know only
their own requests (NOT_FOUND): use one target for that pattern.

With several servers the channel also watches each one's grpc.health.v1 status and sends
nothing to a server that is not SERVING (draining on shutdown, or no worker up), and a call
that a server refuses with UNAVAILABLE before answering anything is retried (at most twice
more, on the next server). Without these a server that is shutting down keeps accepting
calls and fails every one it is picked for until it exits.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Sequence

Target = str | Sequence[str]
ChannelOptions = list[tuple[str, str | int]]

ROUND_ROBIN_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": "shoal.v1.Inference"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
# Targets that already name a gRPC resolver scheme are passed through untouched.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def split_targets(target: Target) -> list[str]:
    """ "a:1,b:2" or ["a:1", "b:2,c:3"] -> ["a:1", "b:2", "c:3"] (blank parts dropped)."""
    parts: Iterable[str] = [target] if isinstance(target, str) else target
    out = [p.strip() for part in parts for p in part.split(",")]
    if not (out := [p for p in out if p]):
        raise ValueError("no target given (expected host:port)")
    return out


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {address!r} must be host:port")
    return host.strip("[]"), port


def _ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP literal as is; a host name resolved once (IPv4 first), as the ipv4:/ipv6:
    schemes take addresses only."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return ipaddress.ip_address(socket.getaddrinfo(host, None, family)[0][4][0])
        except (socket.gaierror, IndexError):
            continue
    raise ValueError(f"cannot resolve host {host!r}")


def static_list_target(addresses: Sequence[str]) -> str:
    """["127.0.0.1:5001", "127.0.0.1:5002"] -> "ipv4:127.0.0.1:5001,127.0.0.1:5002"."""
    resolved = []
    for address in addresses:
        host, port = _host_port(address)
        resolved.append((_ip_of(host), port))
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError("several targets must all be IPv4 or all IPv6, not a mix")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def channel_target(
    target: Target, options: Iterable[tuple[str, str | int]] = ()
) -> tuple[str, ChannelOptions]:
    """The (target, options) pair to open a channel with.

    - "host:port": that server, gRPC defaults.
    - several targets (a list, or a comma-separated string): a static address list
      balanced round_robin.
    - "dns:///name:port": every address the name resolves to, round_robin.
    """
    addresses = split_targets(target)
    opts: ChannelOptions = list(options)
    if len(addresses) == 1 and not addresses[0].startswith("dns:"):
        return addresses[0], opts
    if len(addresses) == 1:
        resolved = addresses[0]
    elif any(a.startswith(_SCHEMES) for a in addresses):
        raise ValueError("several targets must be plain host:port, without a scheme")
    else:
        resolved = static_list_target(addresses)
    if not any(name == "grpc.service_config" for name, _ in opts):
        opts.append(("grpc.service_config", ROUND_ROBIN_CONFIG))
    return resolved, opts


def auth_metadata(auth_token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: insecure channels can't carry call credentials, so the bearer
    token travels as a plain `authorization` header."""
    return (("authorization", f"Bearer {auth_token}"),) if auth_token else ()

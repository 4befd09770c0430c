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

TLS: `channel_credentials(tls_ca, tls_cert, tls_key)` gives the credentials of a secure
channel (or None for a plaintext one). The server's certificate must name the host the
target gives: its IP address as a subjectAltName when the target is an IP, its DNS name
otherwise. For several servers use one DNS name (dns:///name:port) that every server's
certificate carries.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

Target = str | Sequence[str]
ChannelOptions = list[tuple[str, str | int]]
Pem = str | os.PathLike[str] | bytes  # a PEM file's path, or its contents

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


# Channel options that name the host a TLS server's certificate is checked against.
_NAME_OPTIONS = ("grpc.default_authority", "grpc.ssl_target_name_override")


def channel_target(
    target: Target, options: Iterable[tuple[str, str | int]] = (), *, tls: bool = False
) -> tuple[str, ChannelOptions]:
    """The (target, options) pair to open a channel with.

    - "host:port": that server, gRPC defaults.
    - several targets (a list, or a comma-separated string): a static address list
      balanced round_robin.
    - "dns:///name:port": every address the name resolves to, round_robin.

    With `tls`, every server's certificate is checked against one name (gRPC checks the
    channel's authority, not each address): several targets must then give the same host
    (say "10.0.0.5:5001,10.0.0.5:5002"), unless an option in `_NAME_OPTIONS` names it;
    servers on different hosts go behind one DNS name (dns:///name:port) instead.
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
        if tls and not any(name in _NAME_OPTIONS for name, _ in opts):
            hosts = {_host_port(a)[0] for a in addresses}
            if len(hosts) > 1:
                raise ValueError(
                    "with TLS, several targets must share one host name, which every server's "
                    "certificate carries: use dns:///NAME:PORT for servers on several hosts"
                )
            opts.append(("grpc.default_authority", addresses[0]))
    if not any(name == "grpc.service_config" for name, _ in opts):
        opts.append(("grpc.service_config", ROUND_ROBIN_CONFIG))
    return resolved, opts


def _read_pem(value: Pem, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as err:
        raise ValueError(f"{name} {os.fspath(value)}: {err.strerror or err}") from None


def channel_credentials(
    tls_ca: Pem | None = None,
    tls_cert: Pem | None = None,
    tls_key: Pem | None = None,
    *,
    tls: bool = False,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None (plaintext) when no TLS argument is given.

    `tls_ca`: the CA certificate(s) the server's certificate must chain to (default: the
    system's roots). `tls_cert` + `tls_key`: this client's certificate for mutual TLS.
    `tls=True` asks for TLS with the system's roots and no other argument. Each is a path
    or the PEM bytes; ValueError names the one that can't be read or is given alone."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key (a client certificate) go together")
    if not tls and tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read_pem(tls_ca, "tls_ca"),
        private_key=None if tls_key is None else _read_pem(tls_key, "tls_key"),
        certificate_chain=None if tls_cert is None else _read_pem(tls_cert, "tls_cert"),
    )


def auth_metadata(auth_token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: the bearer token as an `authorization` header, on plaintext and
    TLS channels alike (gRPC's call credentials refuse plaintext channels). Without TLS
    it travels in clear text: trusted networks only."""
    return (("authorization", f"Bearer {auth_token}"),) if auth_token else ()

"""`python -m client health`: one probe for Docker's HEALTHCHECK and Kubernetes exec probes.

Asks the standard grpc.health.v1 service, over plaintext or TLS with the same options as
every command (--tls-ca, --tls-cert/--tls-key for mutual TLS, --tls-server-name), and
exits 0 only when the answer is SERVING. Anything else (NOT_SERVING while the workers
load or the server drains, a refused connection, a failed TLS handshake, no answer in
time) prints one line saying what went wrong, with what to try where the cause is known,
and exits 1: the status Docker and Kubernetes take as unhealthy.

The call has a deadline (--timeout, HEALTH_TIMEOUT_S by default) and does not wait for a
connection, so a probe always ends within that time.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from client.errors import ShoalError
from client.sync import ShoalClient

HEALTH_TIMEOUT_S = 5.0  # seconds; a probe passes --timeout below its runner's own limit


def cmd_health(client: ShoalClient, args: argparse.Namespace) -> int:
    timeout = HEALTH_TIMEOUT_S if args.timeout is None else args.timeout
    where = f"{client.target}{' (' + args.service + ')' if args.service else ''}"
    try:
        status = client.health(args.service, timeout=timeout)
    except ShoalError as err:
        if err.code is grpc.StatusCode.NOT_FOUND:  # grpc's health service says no more
            problem = f"the server has no service {args.service!r}"
        else:
            problem = f"{err.code.name}: {err.details}{connection_hint(err.details, args)}"
        print(f"unhealthy: {where}: {problem}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"unhealthy: {where} is {status} (no worker ready, or draining)", file=sys.stderr)
        return 1
    print(f"{where}: SERVING")
    return 0


def connection_hint(details: str, args: argparse.Namespace) -> str:
    """What to try, for the failures whose cause the message shows ("" if none)."""
    tls = bool(args.tls or args.tls_ca or args.tls_cert)
    if "Connection refused" in details:
        return " -- nothing listens there: is the server up, and is this its --port?"
    if "CERTIFICATE_VERIFY_FAILED" in details or "Hostname Verification" in details:
        return (
            " -- the server's certificate did not verify: --tls-ca must name the CA that "
            "signed it, and the certificate must carry the target's host (else give "
            "--tls-server-name with a name it carries)"
        )
    if "Socket closed" in details or "handshake" in details.lower():
        if not tls:
            return (
                " -- the server closed the connection: if it serves TLS (--tls-cert), give "
                "--tls-ca with the CA of its certificate"
            )
        if args.tls_cert is None:
            return (
                " -- the server closed the connection during the TLS handshake: if it wants "
                "client certificates (mutual TLS, --tls-client-ca), give --tls-cert and --tls-key"
            )
        return (
            " -- the server refused the TLS handshake: is --tls-cert signed by the CA the "
            "server trusts for clients (--tls-client-ca)?"
        )
    return ""

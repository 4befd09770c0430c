"""`python -m client health` (client/health.py): the probe of Docker's HEALTHCHECK and the
Kubernetes exec probes, against real servers over plaintext, TLS and mutual TLS.

Exit 0 only when the server says SERVING; otherwise exit 1 with one line that says why
(and what to give, where the failure shows it), always within the --timeout.
Certificates come from tests/test_tls.py's test CAs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from service_harness import REPO, RunningServer, ServerGroup, free_port, wait_for
from test_container_files import dockerfile_instructions
from test_tls import FLAGS, Ca, Pki, cli, server_flags

from client import AsyncShoalClient, ShoalClient, ShoalError
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, client_ca, rogue = (Ca.make(directory, n) for n in ("ca", "client-ca", "rogue-ca"))
    server_cert, server_key = ca.issue(directory, "server", server=True)
    client_cert, client_key = client_ca.issue(directory, "client", server=False)
    rogue_cert, rogue_key = rogue.issue(directory, "rogue-client", server=False)
    return Pki(
        ca.path, server_cert, server_key, client_ca.path, client_cert, client_key,
        rogue.path, rogue_cert, rogue_key,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plain(module_servers: ServerGroup) -> RunningServer:
    return module_servers.start(*FLAGS, log="plain.log")


@pytest.fixture(scope="module")
def tls(module_servers: ServerGroup, pki: Pki) -> RunningServer:
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return module_servers.start(*FLAGS, *server_flags(pki), log="tls.log", credentials=credentials)


@pytest.fixture(scope="module")
def mtls(module_servers: ServerGroup, pki: Pki) -> RunningServer:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    flags = server_flags(pki, mutual=True)
    return module_servers.start(*FLAGS, *flags, log="mtls.log", credentials=credentials)


def health(target: str, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = cli("health", "--target", target, *flags, env=env)
    return done.returncode, done.stdout, done.stderr


def test_plaintext_serving_exits_0(plain: RunningServer) -> None:
    code, out, err = health(plain.target)
    assert code == 0, err
    assert out.strip() == f"{plain.target}: SERVING"
    code, out, _ = health(plain.target, "--service", "shoal.v1.Inference")
    assert code == 0 and "SERVING" in out


def test_the_client_libraries_report_the_status(plain: RunningServer) -> None:
    with ShoalClient(plain.target, timeout=10) as shoal:
        assert shoal.health() == "SERVING" == shoal.health("shoal.v1.Inference")
        with pytest.raises(ShoalError) as unknown:
            shoal.health("no.such.Service")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND

    async def via_aio() -> str:
        async with AsyncShoalClient(plain.target, timeout=10) as client:
            return await client.health()

    assert asyncio.run(via_aio()) == "SERVING"


def test_an_unknown_service_is_unhealthy(plain: RunningServer) -> None:
    code, out, err = health(plain.target, "--service", "no.such.Service")
    assert code == 1 and not out
    assert "the server has no service 'no.such.Service'" in err


def test_tls_with_the_ca_exits_0(tls: RunningServer, pki: Pki) -> None:
    code, out, err = health(tls.target, "--tls-ca", str(pki.ca))
    assert code == 0 and "SERVING" in out, err
    # As a probe inside a container sets it: the CA from the environment.
    code, _, err = health(tls.target, env={"SHOAL_TLS_CA": str(pki.ca)})
    assert code == 0, err


def test_tls_without_the_ca_fails_saying_what_to_give(tls: RunningServer, pki: Pki) -> None:
    code, out, err = health(tls.target)  # plaintext to a TLS port
    assert code == 1 and not out
    assert err.startswith(f"unhealthy: {tls.target}: UNAVAILABLE"), err
    assert "if it serves TLS (--tls-cert), give --tls-ca" in err
    code, _, err = health(tls.target, "--tls-ca", str(pki.rogue_ca))  # a CA that didn't sign it
    assert code == 1 and "the server's certificate did not verify" in err, err


def test_a_certificate_that_does_not_name_the_target(tls: RunningServer, pki: Pki) -> None:
    """The server's certificate carries 127.0.0.1 and localhost, not other.example."""
    ca = ("--tls-ca", str(pki.ca))
    code, _, err = health(tls.target, *ca, "--tls-server-name", "other.example")
    assert code == 1 and "--tls-server-name" in err, err
    port = tls.target.rpartition(":")[2]
    code, out, err = health(f"localhost:{port}", *ca, "--tls-server-name", "127.0.0.1")
    assert code == 0 and "SERVING" in out, err
    env = {"SHOAL_TLS_SERVER_NAME": "localhost"}
    assert health(tls.target, *ca, env=env)[0] == 0


def test_mutual_tls_needs_the_client_certificate(mtls: RunningServer, pki: Pki) -> None:
    ca = ("--tls-ca", str(pki.ca))
    code, out, err = health(mtls.target, *ca)
    assert code == 1 and not out
    assert "give --tls-cert and --tls-key" in err, err
    rogue = ("--tls-cert", str(pki.rogue_cert), "--tls-key", str(pki.rogue_key))
    code, _, err = health(mtls.target, *ca, *rogue)
    assert code == 1 and "--tls-client-ca" in err, err
    mine = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    code, out, err = health(mtls.target, *ca, *mine)
    assert code == 0 and "SERVING" in out, err
    env = {"SHOAL_TLS_CERT": str(pki.client_cert), "SHOAL_TLS_KEY": str(pki.client_key)}
    assert health(mtls.target, *ca, env=env)[0] == 0


def test_nothing_listening_fails_at_once() -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, _, err = health(target, "--timeout", "3")
    assert code == 1 and "nothing listens there" in err, err
    assert time.monotonic() - started < 3 + 10  # the timeout, and Python's start-up at most


def test_a_silent_listener_fails_within_the_timeout() -> None:
    """A port that accepts connections and never answers (a hung process): the deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, _, err = health(target, "--timeout", "1")
        took = time.monotonic() - started
    assert code == 1 and "DEADLINE_EXCEEDED" in err, err
    assert took < 1 + 10, took


def test_a_draining_server_is_not_serving(servers: ServerGroup) -> None:
    server = servers.start(*FLAGS, "--drain-grace-s", "30")
    request = pb.GenerateRequest(prompt="finish me", max_new_tokens=1900, ignore_eos=True)
    with server.channel() as channel:
        call = pb_grpc.InferenceStub(channel).Generate(request, timeout=120)
        next(call)  # running: the drain waits for it
        server.process.send_signal(signal.SIGTERM)
        seen: list[str] = []

        def not_serving() -> bool:
            code, _, err = health(server.target, "--timeout", "2")
            seen.append(err)
            return code == 1 and "is NOT_SERVING (no worker ready, or draining)" in err

        wait_for(not_serving, 30, lambda: f"health says NOT_SERVING while draining: {seen}")
        assert server.process.poll() is None  # still draining
        drained = threading.Thread(target=call.cancel)  # the drain then ends at once
        drained.start()
        drained.join()
    assert server.process.wait(timeout=30) == 0


def test_the_dockerfile_probe_line_works_with_and_without_tls(
    plain: RunningServer, tls: RunningServer, pki: Pki
) -> None:
    """The HEALTHCHECK's command line, run by a shell with the container's variables: TLS
    from TLS_CERT alone (the server's own certificate as the trusted one), or a CA given."""
    line = next(rest for kw, rest in dockerfile_instructions() if kw == "HEALTHCHECK").partition(
        " CMD "
    )[2]
    assert line.startswith("shoal health ")
    # `python -m client` is what the image's `shoal` script runs.
    line = line.replace("shoal health", f"{sys.executable} -m client health", 1)

    def probe(server: RunningServer, **env: str) -> subprocess.CompletedProcess:
        port = server.target.rpartition(":")[2]
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "TLS_"))}
        environ.update(PYTHONPATH=str(REPO), PORT=port, **env)
        return subprocess.run(
            ["/bin/sh", "-c", line], cwd=REPO, env=environ, capture_output=True, text=True
        )

    assert probe(plain).returncode == 0
    cert, key = str(pki.server_cert), str(pki.server_key)
    assert probe(tls, TLS_CERT=cert, TLS_KEY=key).returncode == 0
    assert probe(tls, TLS_CERT=cert, TLS_KEY=key, SHOAL_TLS_CA=str(pki.ca)).returncode == 0
    refused = probe(tls, TLS_CERT=cert, TLS_KEY=key, SHOAL_TLS_CA=str(pki.rogue_ca))
    assert refused.returncode == 1 and "did not verify" in refused.stderr
    assert probe(tls).returncode == 1  # TLS_CERT unset: plaintext, refused by the TLS port

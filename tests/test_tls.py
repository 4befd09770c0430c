"""TLS and mutual TLS on the gRPC port and the HTTP API, with certificates made here.

A test CA signs the server's certificate (subjectAltName IP 127.0.0.1 and DNS localhost,
so both kinds of target verify); a second CA signs client certificates for mutual TLS;
a third, unrelated one stands for a certificate the server must not trust.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_harness import REPO, RunningServer, ServerGroup, free_port

from client import AsyncShoalClient, ShoalClient, ShoalError, channel_credentials
from client.cli import parse_args
from server.config import ServerConfig
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

FLAGS = ("--workers", "1", "--max-batch-size", "4", "--kv-cache-mb", "8")
TOKEN = "s3cret-token"
TIMEOUT = 30.0


# --- certificates ---------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path  # the CA certificate, PEM

    @classmethod
    def make(cls, directory: Path, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, _write_cert(cert, directory / f"{name}.pem"))

    def issue(self, directory: Path, name: str, *, server: bool) -> tuple[Path, Path]:
        """A leaf certificate and its key: (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:  # the target is given by IP or by name: the certificate carries both
            names = [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (
            _write_cert(cert, directory / f"{name}.pem"),
            _write_key(key, directory / f"{name}-key.pem"),
        )


@dataclass
class Pki:
    ca: Path  # signs the server's certificate: what clients trust
    server_cert: Path
    server_key: Path
    client_ca: Path  # signs client certificates: what a mutual-TLS server trusts
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # trusted by nobody
    rogue_cert: Path  # a client certificate the rogue CA signed
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Ca.make(directory, "shoal-test-ca")
    client_ca = Ca.make(directory, "shoal-test-client-ca")
    rogue = Ca.make(directory, "shoal-test-rogue-ca")
    server_cert, server_key = ca.issue(directory, "server", server=True)
    client_cert, client_key = client_ca.issue(directory, "client", server=False)
    rogue_cert, rogue_key = rogue.issue(directory, "rogue-client", server=False)
    return Pki(
        ca.path,
        server_cert,
        server_key,
        client_ca.path,
        client_cert,
        client_key,
        rogue.path,
        rogue_cert,
        rogue_key,
    )


def server_flags(pki: Pki, *, mutual: bool = False) -> tuple[str, ...]:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    return (*flags, "--tls-client-ca", str(pki.client_ca)) if mutual else flags


def ssl_client_context(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# --- servers: one with TLS and one with mutual TLS and a token, each with the HTTP API ---------


@pytest.fixture(scope="module")
def tls_server(module_servers: ServerGroup, pki: Pki) -> RunningServer:
    return module_servers.start(
        *FLAGS,
        *server_flags(pki),
        "--http-port",
        str(free_port()),
        log="tls.log",
        credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
    )


@pytest.fixture(scope="module")
def mtls_server(module_servers: ServerGroup, pki: Pki) -> RunningServer:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    return module_servers.start(
        *FLAGS,
        *server_flags(pki, mutual=True),
        "--auth-token",
        TOKEN,
        "--http-port",
        str(free_port()),
        log="mtls.log",
        credentials=credentials,
    )


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code a call failed with."""
    with pytest.raises(ShoalError) as caught:
        call()
    return caught.value.code


# --- TLS -----------------------------------------------------------------------------------------


def test_library_over_tls_with_the_ca_as_a_path_and_as_bytes(
    tls_server: RunningServer, pki: Pki
) -> None:
    with ShoalClient(tls_server.target, tls_ca=pki.ca, timeout=TIMEOUT) as shoal:
        info = shoal.model_info()
        assert info.vocab_size > 0
        done = shoal.generate_text("Hello", max_new_tokens=6, ignore_eos=True)
        assert done.usage is not None and done.usage.completion_tokens == 6

    async def via_aio() -> int:
        async with AsyncShoalClient(
            tls_server.target, tls_ca=pki.ca.read_bytes(), timeout=TIMEOUT
        ) as client:
            done = await client.generate_text("Hello", max_new_tokens=6, ignore_eos=True)
            assert done.usage is not None
            return done.usage.completion_tokens

    assert asyncio.run(via_aio()) == 6


def test_a_host_name_target_and_several_targets_verify(tls_server: RunningServer, pki: Pki) -> None:
    port = tls_server.target.rpartition(":")[2]
    # By name: the certificate's DNS name; several: round_robin, by a static list of one
    # host (checked against that host) or a DNS name.
    targets = (
        f"localhost:{port}",
        f"127.0.0.1:{port},127.0.0.1:{port}",
        f"localhost:{port},localhost:{port}",
        f"dns:///localhost:{port}",
    )
    for target in targets:
        with ShoalClient(target, tls_ca=pki.ca, timeout=TIMEOUT) as shoal:
            assert shoal.model_info().vocab_size > 0, target
    # Different hosts: no single name to check every certificate against, unless one is named.
    with pytest.raises(ValueError, match="share one host name"):
        ShoalClient(f"127.0.0.1:{port},localhost:{port}", tls_ca=pki.ca)
    named = [("grpc.ssl_target_name_override", "localhost")]
    mixed = f"127.0.0.1:{port},localhost:{port}"
    with ShoalClient(mixed, tls_ca=pki.ca, options=named, timeout=TIMEOUT) as shoal:
        assert shoal.model_info().vocab_size > 0


def test_plaintext_and_untrusting_clients_are_refused(tls_server: RunningServer, pki: Pki) -> None:
    with ShoalClient(tls_server.target, timeout=TIMEOUT) as plain:
        assert refused(plain.model_info) == grpc.StatusCode.UNAVAILABLE
    with ShoalClient(tls_server.target, tls_ca=pki.rogue_ca, timeout=TIMEOUT) as wrong_ca:
        assert refused(wrong_ca.model_info) == grpc.StatusCode.UNAVAILABLE
    with ShoalClient(tls_server.target, tls=True, timeout=TIMEOUT) as system_roots:
        assert refused(system_roots.model_info) == grpc.StatusCode.UNAVAILABLE


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "client", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


def test_cli_over_tls(tls_server: RunningServer, pki: Pki) -> None:
    target = ("--target", tls_server.target)
    info = cli(*target, "--tls-ca", str(pki.ca), "info", "--json")
    assert info.returncode == 0, info.stderr
    assert '"vocab_size"' in info.stdout
    generated = cli(
        *target, "generate", "Hello", "--max-new-tokens", "4", "--ignore-eos", "--tls-ca",
        str(pki.ca),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    via_env = cli(*target, "stats", env={"SHOAL_TLS_CA": str(pki.ca)})
    assert via_env.returncode == 0, via_env.stderr
    plain = cli(*target, "info")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_http_api_over_https_only(tls_server: RunningServer, pki: Pki) -> None:
    assert tls_server.http.startswith("https://")
    with httpx.Client(verify=ssl_client_context(pki.ca), timeout=TIMEOUT) as http:
        models = http.get(f"{tls_server.http}/v1/models")
        assert models.status_code == 200 and models.json()["data"]
        body = {"prompt": "Hello", "max_tokens": 3}
        models_id = models.json()["data"][0]["id"]
        done = http.post(f"{tls_server.http}/v1/completions", json={**body, "model": models_id})
        assert done.status_code == 200, done.text
    plain_url = tls_server.http.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # the TLS port doesn't speak plain HTTP
        httpx.get(f"{plain_url}/v1/models", timeout=TIMEOUT)
    with pytest.raises(httpx.ConnectError):  # a certificate the client doesn't trust
        httpx.get(f"{tls_server.http}/v1/models", verify=ssl_client_context(pki.rogue_ca))
    assert "https://" in tls_server.log.read_text()


# --- mutual TLS and the bearer token ------------------------------------------------------------


def test_mutual_tls_wants_a_certificate_the_client_ca_signed(
    mtls_server: RunningServer, pki: Pki
) -> None:
    target = mtls_server.target
    with ShoalClient(target, tls_ca=pki.ca, auth_token=TOKEN, timeout=TIMEOUT) as no_cert:
        assert refused(no_cert.model_info) == grpc.StatusCode.UNAVAILABLE
    rogue = {"tls_cert": pki.rogue_cert, "tls_key": pki.rogue_key}
    with ShoalClient(target, tls_ca=pki.ca, auth_token=TOKEN, timeout=TIMEOUT, **rogue) as other:
        assert refused(other.model_info) == grpc.StatusCode.UNAVAILABLE
    mine = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with ShoalClient(target, tls_ca=pki.ca, auth_token=TOKEN, timeout=TIMEOUT, **mine) as shoal:
        assert shoal.model_info().vocab_size > 0
        done = shoal.generate_text("Hello", max_new_tokens=4, ignore_eos=True)
        assert done.usage is not None and done.usage.completion_tokens == 4


def test_the_bearer_token_still_applies_over_tls(mtls_server: RunningServer, pki: Pki) -> None:
    mine = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with ShoalClient(mtls_server.target, tls_ca=pki.ca, timeout=TIMEOUT, **mine) as no_token:
        assert refused(no_token.model_info) == grpc.StatusCode.UNAUTHENTICATED
    wrong = {"auth_token": "wrong", **mine}
    with ShoalClient(mtls_server.target, tls_ca=pki.ca, timeout=TIMEOUT, **wrong) as shoal:
        assert refused(shoal.model_info) == grpc.StatusCode.UNAUTHENTICATED
    # The raw stub over the harness's mutual-TLS channel: TLS passes, the token is missing.
    with pytest.raises(grpc.RpcError) as caught:
        mtls_server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_with_a_client_certificate(mtls_server: RunningServer, pki: Pki) -> None:
    tls = ("--target", mtls_server.target, "--tls-ca", str(pki.ca), "--auth-token", TOKEN)
    mine = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    done = cli(*tls, *mine, "generate", "Hi", "--max-new-tokens", "3", "--ignore-eos")
    assert done.returncode == 0, done.stderr
    env = {"SHOAL_TLS_CERT": str(pki.client_cert), "SHOAL_TLS_KEY": str(pki.client_key)}
    assert cli(*tls, "info", env=env).returncode == 0
    without = cli(*tls, "info")
    assert without.returncode == 1 and "UNAVAILABLE" in without.stderr


def test_http_api_under_mutual_tls(mtls_server: RunningServer, pki: Pki) -> None:
    url = f"{mtls_server.http}/v1/models"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    mine = ssl_client_context(pki.ca, pki.client_cert, pki.client_key)
    assert httpx.get(url, verify=mine, headers=auth, timeout=TIMEOUT).status_code == 200
    assert httpx.get(url, verify=mine, timeout=TIMEOUT).status_code == 401
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(url, verify=ssl_client_context(pki.ca), headers=auth, timeout=TIMEOUT)
    rogue = ssl_client_context(pki.ca, pki.rogue_cert, pki.rogue_key)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=rogue, headers=auth, timeout=TIMEOUT)


# --- settings: checked before anything starts ---------------------------------------------------


def test_server_config_checks_the_tls_flags(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.client_ca)
    config = ServerConfig(model="m", tls_cert=cert, tls_key=key, tls_client_ca=ca)
    assert config.tls_enabled and not ServerConfig(model="m").tls_enabled
    with pytest.raises(ValueError, match=r"--tls-key / \$TLS_KEY\) must be set with --tls-cert"):
        ServerConfig(model="m", tls_cert=cert)
    with pytest.raises(ValueError, match=r"--tls-cert / \$TLS_CERT\) must be set with --tls-key"):
        ServerConfig(model="m", tls_key=key)
    with pytest.raises(ValueError, match=r"--tls-client-ca.*needs --tls-cert and --tls-key"):
        ServerConfig(model="m", tls_client_ca=ca)
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"--tls-cert.*must name an existing file"):
        ServerConfig(model="m", tls_cert=missing, tls_key=key)
    with pytest.raises(ValueError, match=r"--tls-client-ca.*must name an existing file"):
        ServerConfig(model="m", tls_cert=cert, tls_key=key, tls_client_ca=missing)
    env = {"TLS_CERT": cert, "TLS_KEY": key, "TLS_CLIENT_CA": ca}
    from_env = ServerConfig.from_args(["--model", "m"], env)
    assert (from_env.tls_cert, from_env.tls_key, from_env.tls_client_ca) == (cert, key, ca)


def test_a_key_that_is_not_the_certificates_fails_the_start(default_model: Path, pki: Pki) -> None:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(default_model), "--port", "0", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0
    assert "--tls-cert" in proc.stderr and "--tls-key" in proc.stderr, proc.stderr


def test_client_tls_arguments(pki: Pki, tmp_path: Path) -> None:
    assert channel_credentials() is None
    assert channel_credentials(pki.ca) is not None
    assert channel_credentials(tls=True) is not None
    with pytest.raises(ValueError, match="go together"):
        channel_credentials(pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match=r"tls_ca .*nope\.pem"):
        ShoalClient("127.0.0.1:1", tls_ca=tmp_path / "nope.pem")
    args = parse_args(["--tls-ca", str(pki.ca), "info"])
    assert args.tls_ca == str(pki.ca) and args.tls_cert is None and not args.tls
    after = parse_args(["info", "--tls-ca", str(pki.ca), "--tls"])
    assert after.tls_ca == str(pki.ca) and after.tls
    for bad in (
        ["--tls-cert", str(pki.client_cert), "info"],
        ["--tls-ca", str(tmp_path / "nope.pem"), "info"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_raw_plaintext_stub_is_refused(tls_server: RunningServer) -> None:
    with grpc.insecure_channel(tls_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

"""The HTTP API's request-body limit (server/http_limits.py) on a real server.

The server runs with `--max-body-bytes 65536`, so bodies over the limit stay small. A
Content-Length over the limit is answered 413 before the body is sent at all; a chunked
body is refused as soon as what was read passes the limit (the test never ends it); a
body of exactly the limit still works; the `openai` SDK raises APIStatusError with the
server's message; a stream running meanwhile is not disturbed, and each refusal is one
log line.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from service_harness import RunningServer, ServerGroup, free_port

pytestmark = pytest.mark.timeout(120)

LIMIT = 65536
JSON = {"content-type": "application/json"}
NAMED = "(--max-body-bytes / $MAX_BODY_BYTES)"


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    return module_servers.start(
        *("--workers", "1", "--max-batch-size", "4", "--kv-cache-mb", "16"),
        *("--http-port", str(free_port()), "--max-body-bytes", str(LIMIT)),
        log="http_limits.log",
    )


@pytest.fixture(scope="module")
def model_id(server: RunningServer) -> str:
    return httpx.get(f"{server.http}/v1/models", timeout=30).json()["data"][0]["id"]


def body_of(size: int, model_id: str) -> bytes:
    """A valid completion body of exactly `size` bytes (padded with an unknown field)."""
    head = {"model": model_id, "prompt": "Hello", "max_tokens": 2, "pad": ""}
    pad = size - len(json.dumps(head, separators=(",", ":")))
    assert pad >= 0
    body = json.dumps({**head, "pad": "x" * pad}, separators=(",", ":")).encode()
    assert len(body) == size
    return body


def raw_exchange(server: RunningServer, head: bytes, body_part: bytes) -> bytes:
    """Send the head and part of a body on a new connection, then read the answer
    (the rest of the body is never sent)."""
    host, port = server.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer


def error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]


def refusals(server: RunningServer) -> int:
    return server.log.read_text().count("refused: request body")


def test_a_content_length_over_the_limit_is_413_before_the_body_is_sent(
    server: RunningServer,
) -> None:
    before = refusals(server)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"content-length: 5242880\r\n\r\n"
    )
    started = time.monotonic()
    status, error = error_of(raw_exchange(server, head, b'{"prompt": "'))  # 5 MiB promised
    assert time.monotonic() - started < 5  # answered at once, not after a read timeout
    assert status == 413 and error["type"] == "invalid_request_error"
    assert error["message"] == f"request body is 5242880 bytes; the limit is {LIMIT} bytes {NAMED}"
    assert refusals(server) == before + 1


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server: RunningServer) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\n"
        b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"a" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 80 KiB
    status, error = error_of(raw_exchange(server, head, chunks))  # no last chunk: never ends
    assert status == 413
    assert error["message"].startswith("request body is at least ")
    assert error["message"].endswith(f"bytes; the limit is {LIMIT} bytes {NAMED}")


def test_httpx_chunked_and_sized_bodies_over_the_limit_get_413(
    server: RunningServer, model_id: str
) -> None:
    def pieces() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield body_of(2 * LIMIT, model_id)

    with httpx.Client(base_url=server.http, headers=JSON, timeout=30) as http:
        chunked = http.post("/v1/completions", content=pieces())
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert chunked.status_code == 413, chunked.text
        sized = http.post("/v1/completions", content=body_of(10 * LIMIT, model_id))
        assert sized.status_code == 413, sized.text
        assert f"is {10 * LIMIT} bytes" in sized.json()["error"]["message"]
        # The same connection goes on (the rest of the body was read and dropped).
        assert http.get("/health").status_code == 200


def test_a_body_of_exactly_the_limit_works(server: RunningServer, model_id: str) -> None:
    with httpx.Client(base_url=server.http, headers=JSON, timeout=60) as http:
        fits = http.post("/v1/completions", content=body_of(LIMIT, model_id))
        assert fits.status_code == 200, fits.text
        assert fits.json()["usage"]["completion_tokens"] == 2
        over = http.post("/v1/completions", content=body_of(LIMIT + 1, model_id))
        assert over.status_code == 413, over.text
        assert f"is {LIMIT + 1} bytes" in over.json()["error"]["message"]


def test_the_openai_sdk_raises_api_status_error_with_the_message(
    server: RunningServer, model_id: str
) -> None:
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "a" * LIMIT}], max_tokens=2
        )
    assert caught.value.status_code == 413
    assert f"the limit is {LIMIT} bytes {NAMED}" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_stream_runs_on_while_bodies_are_refused(server: RunningServer, model_id: str) -> None:
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 48, "stream": True}
    events: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{server.http}/v1/completions", json=body | {"ignore_eos": True}, timeout=60
        ) as reply:
            events.extend(line for line in reply.iter_lines() if line.startswith("data: "))

    streaming = threading.Thread(target=stream)
    streaming.start()
    before = refusals(server)
    with httpx.Client(base_url=server.http, headers=JSON, timeout=30) as http:
        for _ in range(5):
            refused = http.post("/v1/completions", content=body_of(3 * LIMIT, model_id))
            assert refused.status_code == 413
    streaming.join(timeout=60)
    assert events[-1] == "data: [DONE]"
    text_events = [json.loads(e[6:]) for e in events[:-1]]
    assert text_events[-1]["choices"][0]["finish_reason"] == "length"
    assert refusals(server) == before + 5  # one log line each
    assert server.process.poll() is None and server.health() == 1

"""The chat page at `/` in a real, headless browser (Debian's chromium + chromedriver, Selenium).

One real server (the random `default_model`, HTTP API on a free port) serves the page and
the OpenAI-compatible API it calls. The tests type into the page and click its buttons:

- an answer streams in (the text grows chunk by chunk) and ends with its finish reason shown;
- the live panel shows numbers from `GET /stats`;
- Stop aborts the fetch during a long answer and the server cancels the request: its
  `/stats` shows nothing running within a few seconds, and it generated far fewer tokens
  than the same seeded request generates when left alone.

Skipped, with the reason, when selenium, chromium or chromedriver is missing and cannot be
installed (as root without chromium, the module first tries `apt-get install -y chromium
chromium-driver`, bounded in time). Selenium is only ever given these two binaries: it never
downloads a browser or a driver.

`SHOAL_CHAT_SCREENSHOT=docs/chat-page.png pytest tests/test_chat_page.py` also serves the
real default model (tests/gguf_model.py) and saves a screenshot of a real answer there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from service_harness import REPO, RunningServer, free_port, start_server, wait_for

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(900)  # a first run may install chromium (bounded below)

APT_TIMEOUT_S = 480
# Seeds whose answers to STOP_PROMPT run long on the random model (over 1000 tokens here).
STOP_SEEDS = (39, 34)
STOP_PROMPT = " ".join(["Tell me a very long story about the sea."] * 3)
STOP_MAX_TOKENS = 1900  # with the prompt, within the random model's 2048-token context


# -- the browser ------------------------------------------------------------------------------
def _binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _apt_install() -> str:
    """Install Debian's chromium and chromium-driver (root only); a line saying how it went."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get: not installing them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # another apt-get may be running
    install = ["apt-get", *lock, "install", "-y", "-q", "chromium", "chromium-driver"]
    deadline = time.monotonic() + APT_TIMEOUT_S
    try:
        for cmd in (install, ["apt-get", *lock, "update", "-q"], install):
            left = deadline - time.monotonic()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            if cmd is install and done.returncode == 0:
                return "apt-get installed them, yet chromium or chromedriver is not on PATH"
        return f"apt-get failed: {(done.stderr or done.stdout).strip()[-300:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get took over {APT_TIMEOUT_S} s"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    found = _binaries()
    if found is None:
        outcome = _apt_install()
        found = _binaries()
        if found is None:
            pytest.skip(f"chromium and chromedriver (Debian packages) are not installed: {outcome}")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager (which downloads browsers) is never run.
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# -- the server -------------------------------------------------------------------------------
class Served:
    def __init__(self, server: RunningServer, http_port: int) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{http_port}/"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.load(resp)

    def post(self, path: str, body: dict) -> Any:
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.load(resp)

    def total_tokens(self) -> int:
        with grpc.insecure_channel(self.server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            return stub.GetStats(pb.GetStatsRequest(), timeout=5).total.total_tokens


def serve(model: Path, log: Path, *flags: str) -> tuple[RunningServer, Served]:
    """A server (one worker) with its HTTP API on a free port; it is up once gRPC serves."""
    http_port = free_port()
    server = start_server(model, log, "--http-port", str(http_port), "--workers", "1", *flags)
    return server, Served(server, http_port)


@pytest.fixture(scope="module")
def served(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server, served = serve(default_model, tmp_path_factory.mktemp("chat-page") / "server.log")
    yield served
    assert server.stop() == 0, server.log.read_text()


# -- the page ---------------------------------------------------------------------------------
def set_field(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def open_page(driver: webdriver.Chrome, served: Served, **fields: str) -> None:
    driver.get(served.url)
    model = served.get("v1/models")["data"][0]["id"]
    wait_for(lambda: driver.find_element(By.ID, "model").text == model, 10, "model shown")
    driver.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    for name, value in fields.items():
        set_field(driver, name.replace("_", "-"), value)


def ask(driver: webdriver.Chrome, text: str) -> Any:
    """Type `text`, click Send, and return the new assistant message once text streams in.
    The page records the length of the answer's text at each change (window.lengths)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.execute_script(
        """window.lengths = [];
        new MutationObserver((changes) => {
          for (const c of changes) {
            const text = c.target.closest && c.target.closest('.msg.assistant .text');
            if (text) window.lengths.push(text.textContent.length);
          }
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});"""
    )
    set_field(driver, "message", text)
    driver.find_element(By.ID, "send").click()
    answers = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before:], 10, "an answer"
    )
    answer = answers[0]
    wait_for(lambda: answer.find_element(By.CLASS_NAME, "text").text, 30, "streamed text")
    return answer


def state(answer: Any) -> str:
    return answer.get_attribute("data-state")


def test_answer_streams_and_finishes(browser: webdriver.Chrome, served: Served, tmp_path: Path):
    open_page(browser, served, temperature="0.8", max_tokens="40", seed="1")
    answer = ask(browser, "Hello! Who are you?")
    wait_for(lambda: state(answer) != "streaming", 60, "the answer finishes")
    meta = answer.find_element(By.CLASS_NAME, "meta").text
    assert state(answer) == "done", meta
    assert answer.get_attribute("data-finish") in ("stop", "length"), meta
    assert meta.startswith("finish: "), meta
    text = answer.find_element(By.CLASS_NAME, "text").text
    lengths = [n for n in browser.execute_script("return window.lengths") if n]
    assert len(set(lengths)) >= 2, f"the answer arrived in one piece: {lengths}"
    assert lengths == sorted(lengths) and lengths[-1] == len(text), lengths
    assert browser.find_element(By.ID, "status").text.startswith("Done"), meta
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()
    # The live panel: numbers from /stats, refreshed every second.
    panel = {k: browser.find_element(By.ID, f"stat-{k}").text for k in ("queue", "running", "tps")}
    workers = browser.find_element(By.ID, "stat-workers").text
    assert re.fullmatch(r"\d+", panel["queue"]) and re.fullmatch(r"\d+", panel["running"]), panel
    assert re.fullmatch(r"\d+\.\d", panel["tps"]) and workers == "1", (panel, workers)
    browser.save_screenshot(str(tmp_path / "chat-page.png"))


def test_stop_cancels_the_request(browser: webdriver.Chrome, served: Served):
    # A seeded request that, left alone, runs long (the same seed samples the same tokens).
    model = served.get("v1/models")["data"][0]["id"]
    for seed in STOP_SEEDS:
        body = {"model": model, "max_tokens": STOP_MAX_TOKENS, "temperature": 1.0, "seed": seed,
                "messages": [{"role": "user", "content": STOP_PROMPT}]}  # fmt: skip
        natural = served.post("v1/chat/completions", body)["usage"]["completion_tokens"]
        if natural >= 800:
            break
    else:
        pytest.fail(f"none of the seeds {STOP_SEEDS} answers in 800 tokens or more: add one")

    open_page(browser, served, temperature="1", max_tokens=str(STOP_MAX_TOKENS), seed=str(seed))
    wait_for(lambda: served.get("stats")["running"] == 0, 10, "an idle server")
    tokens_before = served.total_tokens()
    answer = ask(browser, STOP_PROMPT)
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: state(answer) != "streaming", 5, "the page ends the answer")
    meta = answer.find_element(By.CLASS_NAME, "meta").text
    assert (state(answer), meta) == ("stopped", "stopped"), f"{natural} tokens: {meta}"
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()

    def idle() -> bool:
        stats = served.get("stats")
        return stats["running"] == stats["waiting"] == stats["pending_queue_length"] == 0

    wait_for(idle, 5, lambda: f"nothing running after Stop: {served.get('stats')}", 0.1)
    generated = served.total_tokens() - tokens_before
    assert generated < natural // 2, f"{generated} tokens after Stop, {natural} when left alone"
    # The page polls /stats every second: after the stop its panel shows nothing running.
    wait_for(lambda: browser.find_element(By.ID, "stat-running").text == "0", 5, "panel idle")


def test_server_error_is_shown(browser: webdriver.Chrome, served: Served):
    open_page(browser, served, max_tokens="100000")
    set_field(browser, "message", "Hello?")
    browser.find_element(By.ID, "send").click()
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    wait_for(lambda: state(answer) == "error", 10, "the error shown")
    status = browser.find_element(By.ID, "status").text
    # The OpenAI error object's message, as the server wrote it (400: max_tokens too large).
    assert status.startswith("Error: ") and "max_tokens" in status, status
    assert answer.find_element(By.CLASS_NAME, "meta").text == "error: " + status[len("Error: ") :]


def test_token_is_sent_as_bearer(
    browser: webdriver.Chrome, default_model: Path, tmp_path: Path
) -> None:
    server, served = serve(default_model, tmp_path / "server.log", "--auth-token", "s3cret")
    try:
        browser.get(served.url)
        wait_for(lambda: "bearer token" in browser.find_element(By.ID, "status").text, 10, "401")
        assert browser.find_element(By.ID, "stat-running").text == "–"  # /stats needs it too
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        set_field(browser, "token", "s3cret")
        set_field(browser, "max-tokens", "8")
        answer = ask(browser, "Hello?")  # the token's change event lists the models again
        wait_for(lambda: state(answer) != "streaming", 30, "the answer finishes")
        assert state(answer) == "done", answer.text
        wait_for(lambda: browser.find_element(By.ID, "stat-running").text == "0", 5, "panel")
    finally:
        assert server.stop() == 0, server.log.read_text()


@pytest.mark.skipif(
    not os.environ.get("SHOAL_CHAT_SCREENSHOT"), reason="SHOAL_CHAT_SCREENSHOT unset"
)
def test_screenshot_of_a_real_answer(browser: webdriver.Chrome, tmp_path: Path):
    from gguf_model import smollm2_gguf_path

    server, served = serve(smollm2_gguf_path(), tmp_path / "server.log")
    try:
        open_page(browser, served, system="You are a helpful assistant.",
                  temperature="0.2", max_tokens="64", seed="1")  # fmt: skip
        for question in ("What is the capital of France?", "And of Italy?"):
            answer = ask(browser, question)
            wait_for(lambda a=answer: state(a) != "streaming", 60, "the answer finishes")
            assert state(answer) == "done", answer.text
        browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()  # closed
        time.sleep(1.2)  # one more /stats refresh in the panel
        out = REPO / os.environ["SHOAL_CHAT_SCREENSHOT"]
        browser.save_screenshot(str(out))
    finally:
        assert server.stop() == 0, server.log.read_text()

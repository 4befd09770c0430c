"""Run the README's client-generation commands exactly as written (`make clients`).

The README's "Other languages" part marks three ```sh blocks with an HTML comment before each:

- `<!-- make clients: tools -->`: how to install protoc and the plugins. An `apt-get install`
  line runs (as root, after `apt-get update` if needed) only when one of the commands it
  installs is missing from PATH; an `npm install` line runs once, in a cache
  (.venv/clients-tools/, again only when the line changes), and its node_modules is what
  `./node_modules` means in the next blocks.
- `<!-- make clients: generate -->` and `<!-- make clients: buf -->`: each runs with bash -e,
  as it is, in its own fresh scratch directory (build/clients/<block>/, ignored) that holds a
  copy of protos/ and a link to that node_modules, as the repository root would. Then the
  generated files must be exactly the expected ones (Go messages and grpc-go service in
  gen/go/shoal/v1/, ts-proto's grpc-js client in gen/ts/, protobuf-es in gen/es/), and
  nothing may be written anywhere else (such as ./github.com/... from go_package).

Exit status 0 when every block ran and made what it should, 1 when one failed. With
--skip-unavailable (the test suite's mode) it installs nothing unless it runs as root, and
exits 77 when a tool could not be installed here (not root, no npm, no registry): nothing
was checked.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CACHE = REPO / ".venv" / "clients-tools"
SCRATCH = REPO / "build" / "clients"
EXPECTED = {
    "gen/go/shoal/v1/inference.pb.go",
    "gen/go/shoal/v1/inference_grpc.pb.go",
    "gen/ts/shoal/v1/inference.ts",
    "gen/es/shoal/v1/inference_pb.ts",
}
# What each Debian package of the tools block puts on PATH.
APT_COMMANDS = {
    "protobuf-compiler": "protoc",
    "protoc-gen-go": "protoc-gen-go",
    "golang-goprotobuf-dev": "protoc-gen-go",
    "protoc-gen-go-grpc": "protoc-gen-go-grpc",
}
SKIP = 77


class Unavailable(Exception):
    """A tool could not be installed here (as opposed to a command that is wrong)."""


def blocks(text: str) -> dict[str, str]:
    """The ```sh blocks that follow `<!-- make clients: NAME -->`, by NAME."""
    found = re.findall(r"<!-- make clients: (\w+) -->\s*```sh\n(.*?)```", text, re.S)
    return dict(found)


def logical_lines(block: str) -> list[str]:
    """Commands of a block: backslash continuations joined, comments and blanks dropped."""
    joined = block.replace("\\\n", " ")
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def run(command: str, cwd: Path, timeout: float) -> None:
    print(f"+ ({cwd.relative_to(REPO) if cwd.is_relative_to(REPO) else cwd}) {command}", flush=True)
    subprocess.run(["bash", "-e", "-c", command], cwd=cwd, check=True, timeout=timeout)


def apt_line(line: str) -> None:
    packages = [w for w in shlex.split(line)[2:] if not w.startswith("-")]
    needed = [p for p in packages if p in APT_COMMANDS and not shutil.which(APT_COMMANDS[p])]
    if not needed:
        print(f"clients: {', '.join(packages)}: already on PATH", flush=True)
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(needed)} missing; `{line}` needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update"):
        if attempt == "update":
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=False)
        print(f"+ {line}", flush=True)
        if subprocess.run(["bash", "-c", line], env=env, timeout=600, check=False).returncode == 0:
            return
    raise Unavailable(f"`{line}` failed")


def npm_line(line: str, root_only: bool) -> Path:
    """Run the npm line in the cache, once per distinct line; its node_modules."""
    stamp = CACHE / "installed-by"
    if stamp.is_file() and stamp.read_text() == line and (CACHE / "node_modules").is_dir():
        print(f"clients: npm tools cached in {CACHE.relative_to(REPO)}", flush=True)
        return CACHE / "node_modules"
    if not shutil.which("npm"):
        raise Unavailable("npm not found (install Node.js and npm)")
    if root_only and os.geteuid() != 0:
        raise Unavailable(f"npm tools not installed and not root (run `make clients` once): {line}")
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    try:
        run(line, CACHE, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"`{line}` failed: {error}") from None
    stamp.write_text(line)
    return CACHE / "node_modules"


def tree(root: Path) -> set[str]:
    """Files under root, not following links (so not into the node_modules link)."""
    return {
        str((Path(folder) / name).relative_to(root))
        for folder, _, names in os.walk(root)
        for name in names
        if not (Path(folder) / name).is_symlink()
    }


def generate(name: str, block: str, node_modules: Path) -> None:
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "protos", work / "protos")
    (work / "node_modules").symlink_to(node_modules)
    before = tree(work)
    run(block, work, timeout=300)
    made = tree(work) - before
    if made != EXPECTED:
        missing, extra = sorted(EXPECTED - made), sorted(made - EXPECTED)
        raise AssertionError(f"block {name!r}: missing {missing}, unexpected {extra}")
    print(f"clients: {name}: made {', '.join(sorted(made))}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-unavailable",
        action="store_true",
        help=f"install only as root; exit {SKIP} when a tool cannot be installed",
    )
    args = parser.parse_args()
    start = time.monotonic()
    found = blocks(README.read_text())
    if set(found) != {"tools", "generate", "buf"}:
        print(
            f"clients: README.md must mark blocks tools, generate, buf (found {sorted(found)})",
            file=sys.stderr,
        )
        return 1
    node_modules = None
    try:
        for line in logical_lines(found["tools"]):
            if line.startswith("apt-get install"):
                apt_line(line)
            elif line.startswith("npm install"):
                node_modules = npm_line(line, args.skip_unavailable)
            else:
                print(f"clients: tools block: do not know how to run {line!r}", file=sys.stderr)
                return 1
        if node_modules is None:
            print("clients: tools block has no `npm install` line", file=sys.stderr)
            return 1
    except Unavailable as error:
        print(f"clients: SKIPPED: {error}", file=sys.stderr)
        return SKIP if args.skip_unavailable else 1
    try:
        for name in ("generate", "buf"):
            generate(name, found[name], node_modules)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as error:
        print(f"clients: FAILED: {error}", file=sys.stderr)
        return 1
    print(f"clients: README generation commands OK ({time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

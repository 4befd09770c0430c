"""Build hook: the gRPC stubs of protos/ are generated at build time, never committed.

Everything else about the package is in pyproject.toml. `build_py` runs grpcio-tools' protoc
(a [build-system] requirement) on protos/shoal/**/*.proto:

- a regular build (`pip install .`, `pip wheel .`, `python -m build`) writes
  shoal/v1/inference_pb2.py, inference_pb2.pyi and inference_pb2_grpc.py into the build
  directory, so they ship in the wheel and the source tree is left alone;
- an editable install (`pip install -e .`) writes them into the source tree (./shoal/v1/, as
  `make protos` does), where the editable install's import hook finds the `shoal` package.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = "protos"


def proto_files() -> list[str]:
    """The .proto files under protos/shoal/, relative to protos/ (as protoc names them)."""
    base = ROOT / PROTO_ROOT
    return sorted(p.relative_to(base).as_posix() for p in base.glob("shoal/**/*.proto"))


def stub_files(out_dir: Path) -> list[str]:
    """What protoc writes for each .proto: NAME_pb2.py, NAME_pb2.pyi, NAME_pb2_grpc.py."""
    out = []
    for proto in proto_files():
        stem = str(out_dir / proto.removesuffix(".proto"))
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return out


def generate_stubs(out_dir: Path) -> None:
    protos = proto_files()
    if not protos:
        # SystemExit, not an Exception: setuptools turns an exception of build_py in an editable
        # install into a warning, and the install would "succeed" without stubs.
        raise SystemExit(f"shoal build: no .proto files under {ROOT / PROTO_ROOT / 'shoal'}")
    if importlib.util.find_spec("grpc_tools") is None:
        raise SystemExit("shoal build: grpcio-tools (a [build-system] requirement) is missing")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        *(f"{PROTO_ROOT}/{p}" for p in protos),
    ]  # fmt: skip
    print("shoal build: generating gRPC stubs:", " ".join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"shoal build: protoc failed (exit {result.returncode}; see above)")
    missing = [f for f in stub_files(out_dir) if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"shoal build: protoc did not write {missing}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        if self.editable_mode:
            generate_stubs(ROOT)
            super().run()
        else:
            # Copy the sources first, then write fresh stubs over any stale ones the tree held.
            super().run()
            generate_stubs(Path(self.build_lib).resolve())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [f for f in stub_files(Path(self.build_lib)) if f not in outputs]


setup(cmdclass={"build_py": BuildPyWithStubs})

"""Packaging: the wheel carries the generated gRPC stubs and the `shoal` console script, and the
installed project imports from any directory (not only from the repository root).

The wheel is built offline from a copy of the sources without any generated file, with the
build tools already in this environment (`pip wheel --no-build-isolation --no-index`), so the
build hook in setup.py must run protoc itself.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = tuple(f"shoal/v1/inference_{s}" for s in ("pb2.py", "pb2.pyi", "pb2_grpc.py"))
GENERATED = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi", "*_pb2_grpc.pyi")


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: imports must come from the installed project."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def copy_sources(dest: Path) -> None:
    """What a fresh clone holds for the build: metadata, protos/ and the packages that
    pyproject.toml's package discovery includes, without stubs, caches or build leftovers."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.split(".")[0].rstrip("*") for p in patterns}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", *GENERATED)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in sorted(tops | {"protos"}):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("pip", "setuptools", "grpc_tools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed here: cannot build the wheel offline")
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("dist")
    copy_sources(src)
    assert not [p for pat in GENERATED for p in src.rglob(pat)], "the copy must hold no stubs"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-index", "-q", "-w", str(out), str(src)]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=src, env=clean_env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("shoal-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_has_stubs_and_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in ("shoal/__init__.py", "shoal/v1/__init__.py", *STUBS, "client/commands.py"):
            assert name in names, f"{name} missing from {wheel.name}"
        pb2 = zf.read("shoal/v1/inference_pb2.py").decode()
        pb2_grpc = zf.read("shoal/v1/inference_pb2_grpc.py").decode()
        [ep_name] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(ep_name).decode())
    assert "shoal/v1/inference.proto" in pb2  # generated from the proto, not an empty file
    assert "class InferenceStub" in pb2_grpc
    assert "from shoal.v1 import inference_pb2" in pb2_grpc
    assert entry_points["console_scripts"]["shoal"] == "client.commands:main"


def test_wheel_imports_and_runs_its_cli(wheel: Path, tmp_path: Path) -> None:
    """The wheel's own files (unpacked, first on the path) import and `shoal --help` runs."""
    unpacked = tmp_path / "wheel"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    env = clean_env() | {"PYTHONPATH": str(unpacked)}
    code = (
        "import sys, shoal.v1.inference_pb2_grpc as g, client\n"
        "from client.commands import main\n"
        f"assert g.__file__.startswith({str(unpacked)!r}), g.__file__\n"
        f"assert client.__file__.startswith({str(unpacked)!r}), client.__file__\n"
        "sys.argv = ['shoal', '--help']\n"
        "sys.exit(main())\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "generate" in result.stdout


def test_installed_project_imports_outside_the_repo(tmp_path: Path) -> None:
    """This environment's install (`make install`: pip install -e) works from any directory."""
    code = (
        "import client, shoal.v1.inference_pb2, shoal.v1.inference_pb2_grpc\n"
        "from client import ShoalClient\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"import from {tmp_path} failed:\n{result.stderr}"


def test_installed_console_script(tmp_path: Path) -> None:
    script = shutil.which("shoal", path=sysconfig.get_path("scripts"))
    assert script, f"no `shoal` script in {sysconfig.get_path('scripts')}: run `make install`"
    result = subprocess.run(
        [script, "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "generate" in result.stdout

"""The process boundary, checked on the source (AST, nothing is imported).

DESIGN: the front never touches model arrays, the worker never touches gRPC,
and only the shared-memory channel (with the plain dataclasses it carries)
crosses between them; framing is binary, never pickle. So:

- server/ imports from worker only `worker.channel` (and its submodules);
  the worker process is spawned by module name;
- worker/channel/ imports only the standard library and itself;
- worker/ imports neither server nor client nor gRPC, except `worker.batch`,
  the offline runner, which drives the front's pipeline (server/) over an
  in-process engine and still imports no client or gRPC;
- the worker process (`worker.process` and everything it imports, at any
  depth) loads nothing of server/ or client/;
- client/ imports neither server nor worker;
- nothing in server/ or worker/channel/ imports pickle.

Boundary rules count every import, at any depth (type-only ones too).
`importlib.import_module` and `__import__` with a literal name count as imports.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What server/ may import from worker/: name -> whether submodules are allowed too.
SERVER_MAY_IMPORT = {"worker.channel": True}
OFFLINE_FRONT = "worker/batch.py"  # may import server/: it runs the front's pipeline in-process
ARRAY_LIBS = {"numpy", "cupy"}
PICKLE_LIBS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill"}
GRPC_LIBS = {"grpc", "grpc_health", "grpc_reflection", "shoal"}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # absolute dotted name: `import a.b` -> a.b; `from .x import y` -> pkg.x
    name: str | None  # the imported name of a from-import (None for `import` and `*`)
    runtime: bool  # runs when the file is imported (module level, not TYPE_CHECKING)
    text: str  # the import as written (relative ones with their resolved module)

    def candidates(self) -> tuple[str, ...]:
        """Modules this may load: `from a import b` is a.b if b is a submodule, else a."""
        return (self.module,) if self.name is None else (self.module, f"{self.module}.{self.name}")

    def refers_to(self, packages: Iterable[str]) -> bool:
        return any(in_package(c, packages) for c in self.candidates())

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT).as_posix()}:{self.line}: {self.text}"


def in_package(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path) -> None:
        self.path = path
        module = module_name(path)
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self._runtime = True

    def _add(self, node: ast.stmt | ast.expr, module: str, name: str | None, text: str) -> None:
        self.imports.append(Import(self.path, node.lineno, module, name, self._runtime, text))

    def _nested(self, nodes: Iterable[ast.AST | None], runtime: bool) -> None:
        saved, self._runtime = self._runtime, self._runtime and runtime
        for child in nodes:
            if child is not None:
                self.visit(child)
        self._runtime = saved

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # Decorators and defaults run at import time; the body does not.
        if not isinstance(node, ast.Lambda):
            self._nested(node.decorator_list, True)
        self._nested([*node.args.defaults, *node.args.kw_defaults], True)
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        self._nested(body, False)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._nested(node.body, not is_type_checking(node.test))
        self._nested(node.orelse, True)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, None, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        written = "." * node.level + module
        if node.level:
            package = self.package.split(".")
            package = package[: len(package) - (node.level - 1)]
            module = ".".join([*package, *([module] if module else [])])
            written = f"{written} (= {module})"
        for alias in node.names:
            name = None if alias.name == "*" else alias.name
            self._add(node, module, name, f"from {written} import {alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
            isinstance(func, ast.Attribute)
            and func.attr == "import_module"
            and isinstance(func.value, ast.Name)
            and func.value.id == "importlib"
        )
        if dynamic and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(node, arg.value, None, f"{ast.unparse(func)}({arg.value!r})")
        self.generic_visit(node)


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    text = path.read_text(encoding="utf-8") if source is None else source
    collector = _Collector(path)
    collector.visit(ast.parse(text, filename=str(path)))
    return collector.imports


def python_files(*dirs: str) -> list[Path]:
    files = [
        p for d in dirs for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts
    ]
    assert files, f"no .py files under {dirs}: is ROOT ({ROOT}) the repository root?"
    return files


def all_imports(*dirs: str) -> Iterator[Import]:
    for path in python_files(*dirs):
        yield from imports_of(path)


def report(violations: list[str], rule: str) -> str:
    return f"{rule}:\n  " + "\n  ".join(violations)


def server_may_import(imp: Import) -> bool:
    for name in imp.candidates():
        for allowed, submodules in SERVER_MAY_IMPORT.items():
            if name == allowed or (submodules and name.startswith(allowed + ".")):
                return True
    return False


def worker_violations(imports: Iterable[Import]) -> list[str]:
    def forbidden(imp: Import) -> tuple[str, ...]:
        offline = imp.file.relative_to(ROOT).as_posix() == OFFLINE_FRONT
        return ("client", *GRPC_LIBS) if offline else ("server", "client", *GRPC_LIBS)

    return [imp.where() for imp in imports if imp.refers_to(forbidden(imp))]


def channel_violations(imports: Iterable[Import]) -> list[str]:
    def allowed(imp: Import) -> bool:
        top = imp.module.split(".")[0]
        return top in sys.stdlib_module_names or in_package(imp.module, ("worker.channel",))

    return [imp.where() for imp in imports if not allowed(imp)]


def server_violations(imports: Iterable[Import]) -> list[str]:
    return [
        imp.where() for imp in imports if imp.refers_to(("worker",)) and not server_may_import(imp)
    ]


def client_violations(imports: Iterable[Import]) -> list[str]:
    return [imp.where() for imp in imports if imp.refers_to(("server", "worker"))]


def pickle_violations(imports: Iterable[Import]) -> list[str]:
    return [imp.where() for imp in imports if imp.refers_to(PICKLE_LIBS)]


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def reachable_imports(start: str, targets: Iterable[str], runtime_only: bool) -> list[str]:
    """Imports of `targets` that importing `start` may run, following worker/ modules.

    Each entry reads `a -> b -> file:line: import x`: the chain that loads it.
    With runtime_only, imports inside functions and TYPE_CHECKING are not followed.
    """
    found: list[str] = []
    seen: set[str] = set()
    queue: deque[tuple[str, tuple[str, ...]]] = deque()

    def enqueue(name: str, chain: tuple[str, ...]) -> None:
        # Importing a.b.c runs a/__init__.py, a/b/__init__.py and a/b/c.py.
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in seen and module_file(prefix) is not None:
                seen.add(prefix)
                queue.append((prefix, (*chain, prefix)))

    enqueue(start, ())
    while queue:
        name, chain = queue.popleft()
        path = module_file(name)
        assert path is not None
        for imp in imports_of(path):
            if runtime_only and not imp.runtime:
                continue
            if imp.refers_to(targets):
                found.append(" -> ".join([*chain[:-1], imp.where()]))
            for candidate in imp.candidates():
                if in_package(candidate, ("worker",)):
                    enqueue(candidate, chain)
    return found


# --- the rules, on the repository -----------------------------------------------------------


def test_worker_imports_neither_server_nor_client() -> None:
    violations = worker_violations(all_imports("worker"))
    assert not violations, report(
        violations, "worker/ must not import server, client, gRPC or the generated stubs"
    )


def test_server_imports_only_the_channel_side_of_worker() -> None:
    violations = server_violations(all_imports("server"))
    allowed = ", ".join(f"{m}{'[.*]' if sub else ''}" for m, sub in SERVER_MAY_IMPORT.items())
    assert not violations, report(violations, f"server/ may import from worker only {allowed}")


def test_client_imports_neither_server_nor_worker() -> None:
    violations = client_violations(all_imports("client"))
    assert not violations, report(violations, "client/ must not import server or worker")


def test_no_pickle_in_server_or_channel() -> None:
    violations = pickle_violations(all_imports("server", "worker/channel"))
    assert not violations, report(
        violations, "server/ and worker/channel/ must not import pickle: framing is binary"
    )


def test_channel_imports_only_the_standard_library() -> None:
    violations = channel_violations(all_imports("worker/channel"))
    assert not violations, report(violations, "worker/channel/ is standard library only")


def test_worker_process_never_loads_the_front() -> None:
    violations = reachable_imports("worker.process", ("server", "client", *GRPC_LIBS), False)
    assert not violations, report(violations, "the worker process must not import the front")


CHANNEL_MODULES = sorted(module_name(p) for p in python_files("worker/channel"))


@pytest.mark.parametrize("module", CHANNEL_MODULES)
def test_modules_shared_with_server_load_no_array_library(module: str) -> None:
    violations = reachable_imports(module, ARRAY_LIBS, runtime_only=True)
    assert not violations, report(
        violations, f"{module} is imported by the front: no NumPy/CuPy at module level"
    )


# --- the checker itself, on made-up sources -------------------------------------------------


def fake(relpath: str, source: str) -> list[Import]:
    return imports_of(ROOT / relpath, source)


def test_checker_catches_forbidden_imports() -> None:
    server_src = (
        "import worker.model\n"
        "from worker import batch_processor, sequence\n"
        "from worker.channel.ring import Ring\n"
        "from worker.channel import types\n"
        "import worker\n"
        "def f():\n"
        "    import pickle\n"
        "    import worker.kv_cache\n"
        "x = importlib.import_module('worker.attention')\n"
    )
    imports = fake("server/fake.py", server_src)
    assert server_violations(imports) == [
        "server/fake.py:1: import worker.model",
        "server/fake.py:2: from worker import batch_processor",
        "server/fake.py:2: from worker import sequence",
        "server/fake.py:5: import worker",
        "server/fake.py:8: import worker.kv_cache",
        "server/fake.py:9: importlib.import_module('worker.attention')",
    ]
    assert pickle_violations(imports) == ["server/fake.py:7: import pickle"]
    worker_src = (
        "from client.sync import ShoalClient\nimport grpc\nimport serverless\n"
        "from server.frontend import Frontend\n"
    )
    assert worker_violations(fake("worker/fake.py", worker_src)) == [
        "worker/fake.py:1: from client.sync import ShoalClient",
        "worker/fake.py:2: import grpc",
        "worker/fake.py:4: from server.frontend import Frontend",
    ]
    assert worker_violations(fake(OFFLINE_FRONT, worker_src)) == [
        f"{OFFLINE_FRONT}:1: from client.sync import ShoalClient",
        f"{OFFLINE_FRONT}:2: import grpc",
    ]
    channel_src = "import struct\nfrom worker.channel.types import Priority\nfrom worker import x\n"
    assert channel_violations(fake("worker/channel/fake.py", channel_src)) == [
        "worker/channel/fake.py:3: from worker import x"
    ]
    client_src = "from server.app import main\nfrom worker import sequence\nimport client.aio\n"
    assert client_violations(fake("client/fake.py", client_src)) == [
        "client/fake.py:1: from server.app import main",
        "client/fake.py:2: from worker import sequence",
    ]


def test_checker_resolves_relative_imports_and_import_time() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import ring\n"
        "from ..sequence import Priority\n"
        "if TYPE_CHECKING:\n"
        "    import numpy\n"
        "else:\n"
        "    import cupy\n"
        "class C:\n"
        "    import numpy.linalg\n"
        "    def f(self):\n"
        "        import cupy\n"
    )
    imports = fake("worker/channel/fake.py", src)
    assert [(i.line, i.candidates()[-1], i.runtime) for i in imports] == [
        (1, "typing.TYPE_CHECKING", True),
        (2, "worker.channel.ring", True),
        (3, "worker.sequence.Priority", True),
        (5, "numpy", False),
        (7, "cupy", True),
        (9, "numpy.linalg", True),
        (11, "cupy", False),
    ]
    assert (
        imports[2].where()
        == "worker/channel/fake.py:3: from ..sequence (= worker.sequence) import Priority"
    )

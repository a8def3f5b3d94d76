"""The package's rooms and the rules between them (docs/architecture.md, "What may import what").

Read from the source with ``ast`` (every import, also those inside
functions), and for the core once more by importing it in a fresh
interpreter: the core must be usable without zmq, h5py or any I/O library.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

PACKAGE = "sf_bsread_writer"
SOURCE = ROOT / PACKAGE

# Who may import whom inside the package: the first part of the importing
# module's path (below the package) -> the parts it may import. A module may
# always import its own part. docs/architecture.md has the same table.
ALLOWED = {
    "core": set(),
    "h5": {"core"},
    "transport": {"core"},
    "config": {"core"},
    "process": set(),
    "registry": {"process"},
    "httpserver": set(),
    "client": set(),
    "buffer": {"core", "transport", "config", "process", "httpserver", "registry", "archive"},
    "writer": {"core", "h5", "transport", "config", "process", "httpserver", "registry", "archive"},
    "archive": {"core", "transport", "config", "process"},
    "ca": {"core", "config", "process"},
    "web": {"core", "h5", "transport", "config", "process", "archive"},
    "remote": {"core"},
    "tools": {"core", "config", "process", "registry", "client", "transport", "archive"},
    "__init__": {"tools"},
}

# The core decides; it does no I/O. Libraries it may use: pure computation only.
CORE_MAY_IMPORT = {
    # standard library, without any I/O, thread or clock module
    "__future__", "array", "bisect", "collections", "dataclasses", "enum", "functools", "hashlib", "json",
    "logging", "math", "operator", "re", "struct", "sys", "types", "typing", "zlib",
    # compression and arrays (bsread's codecs)
    "numpy", "bitshuffle", "lz4",
}
# What importing the whole core must not load, whatever imports it indirectly.
NOT_LOADED_BY_CORE = ["zmq", "h5py", "hdf5plugin", "caproto", "bottle", "requests", "epics", "bsread", "aiohttp",
                      "socket", "selectors", "subprocess", "asyncio", "urllib.request", "http.client"]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Package modules that ``name`` imports (absolute and relative, at any depth of the code)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from . import config" names a module; "from .x import y" names x (y may be a module too)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in names:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.startswith(PACKAGE) and target != name:
                targets.add(target)
    return targets


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_table_names_every_part_of_the_package():
    assert {_part(name) for name in MODULES} == set(ALLOWED)


def test_every_import_follows_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        part = _part(name)
        for target in targets:
            other = _part(target)
            if other != part and other not in ALLOWED[part] and target != PACKAGE:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Not even through an import inside a function: a cycle is a cycle."""
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if target == PACKAGE:
                continue  # the package's __init__ imports nothing of its own
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(name for name in MODULES if _part(name) == "core"))
def test_a_core_module_imports_no_io_library_and_reads_no_clock(name):
    """Statically: ``time``, ``threading``, ``socket``, ``os`` ... are not even imported."""
    outside = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            outside.add((node.module or "").split(".")[0])
    outside.discard(PACKAGE)
    assert outside <= CORE_MAY_IMPORT, f"{name} imports {sorted(outside - CORE_MAY_IMPORT)}"


def test_importing_the_whole_core_loads_no_io_library():
    """In a fresh interpreter: what the core pulls in indirectly counts too."""
    core = sorted(name for name in MODULES if _part(name) == "core")
    script = (f"import sys\nfor name in {core!r}:\n    __import__(name)\n"
              f"print(__import__('json').dumps(sorted(m for m in {NOT_LOADED_BY_CORE!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert len(core) >= 10  # the parser found the core

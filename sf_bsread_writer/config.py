"""Every option of every command, its default and its environment variable, once.

Each command (buffer, writer, gateway, CA bridge, simulator) declares its
options here as a list of :class:`Option`. :func:`parse_args` builds the
argparse parser from that list and takes defaults from the environment, so
that a systemd unit can keep all settings in an environment file
(``EnvironmentFile=``) and the command line can still override them:

    command line  >  environment (PREFIX + DEST upper-cased)  >  default

The environment variable of an option is ``<prefix><DEST>``, for example
``SF_BSREAD_BUFFER_OUTPUT_PORT`` for the buffer's ``--output_port``. The
complete list is printed by ``--help`` and in docs/configuration.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.bsread.timebase import MAX_CLOCK_SKEW

__all__ = [
    "Option",
    "parse_args",
    "build_parser",
    "BUFFER_OPTIONS",
    "BUFFER_ENV_PREFIX",
    "WRITER_OPTIONS",
    "WRITER_ENV_PREFIX",
    "GATEWAY_OPTIONS",
    "GATEWAY_ENV_PREFIX",
    "BRIDGE_OPTIONS",
    "BRIDGE_ENV_PREFIX",
    "SIMULATE_OPTIONS",
    "SIMULATE_ENV_PREFIX",
    "LOG_LEVELS",
    "DEFAULT_BIND",
    "DEFAULT_MAX_MESSAGE_BYTES",
]

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# Secure default: nothing listens beyond this machine unless told to.
DEFAULT_BIND = "127.0.0.1"


def _bool(text: str | bool) -> bool:
    """Parse a boolean from an environment file ("1", "true", "yes", "on")."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false, yes/no)")


# tcp://[interface;]host:port (host a name, an IPv4 or a bracketed IPv6 address), or another transport.
_ADDRESS = re.compile(r"tcp://(?:[^;/\s]+;)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+|\*):([0-9]{1,5})"
                      r"|(?:ipc|inproc|pgm|epgm|vmci|ws|wss)://\S+")


class InvalidOption(argparse.ArgumentTypeError, ValueError):
    """An option value that argparse reports with this message (and the environment parser as a ValueError)."""


def zmq_address(text: str) -> str:
    """A ZeroMQ address to connect to, checked when the command starts: ``tcp://host:port`` (or ipc://, ...)."""
    value = text.strip()
    match = _ADDRESS.fullmatch(value)
    if not match or (match.group(2) is not None and not 0 < int(match.group(2)) < 65536):
        raise InvalidOption(f"not a ZeroMQ address: {text!r} (expected tcp://host:port, e.g. tcp://127.0.0.1:8889)")
    return value


_ARCHIVE = re.compile(r"nats://[^/\s]+(?:,nats://[^/\s]+)*/[A-Za-z0-9_-]{1,64}")


def stream_address(text: str) -> str:
    """A writer's source: a ZeroMQ address, or a buffer's archive ``nats://HOST:PORT[,HOST:PORT]/NAME``."""
    value = text.strip()
    if value.startswith("nats://"):
        if not _ARCHIVE.fullmatch(value):
            raise InvalidOption(f"not an archive address: {text!r} (expected nats://HOST:PORT/NAME, NAME the "
                                "buffer's --name)")
        return value
    return zmq_address(text)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


@dataclass(frozen=True)
class Option:
    """One command-line option, also settable from the environment.

    ``flags`` empty means a positional argument (then ``dest`` is its name).
    ``kind`` is "value" (takes an argument), "flag" (store_true) or "list"
    (may be repeated; environment value is comma separated).
    """

    dest: str
    flags: tuple[str, ...] = ()
    default: Any = None
    type: Callable[[str], Any] = str
    help: str = ""
    kind: str = "value"
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    required: bool = False

    @property
    def hidden(self) -> bool:
        """An internal option (``help=argparse.SUPPRESS``): parsed, but in neither ``--help`` nor the reference.

        argparse hides an option only when its help *is* ``SUPPRESS``; the
        environment note appended to every help would turn it into visible text
        (``==SUPPRESS== [env ...]``), so a hidden option gets neither.
        """
        return self.help == argparse.SUPPRESS


def _env_name(prefix: str, option: Option) -> str:
    return prefix + option.dest.upper()


def _from_env(prefix: str, option: Option, environ: Mapping[str, str]) -> tuple[bool, Any]:
    """(found, value) of the option's environment variable; ValueError naming the variable when it is invalid."""
    name = _env_name(prefix, option)
    if name not in environ:
        return False, None
    raw = environ[name]
    try:
        if option.kind == "flag":
            return True, _bool(raw)
        if option.kind == "list":
            return True, [option.type(item.strip()) for item in raw.split(",") if item.strip()]
        return True, option.type(raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: {error}") from None


def build_parser(
    prog: str,
    description: str,
    options: Sequence[Option],
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> argparse.ArgumentParser:
    """Build an argparse parser whose defaults come from ``environ``."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every option can also be set in the environment as {env_prefix}<DEST> "
        f"(e.g. {_env_name(env_prefix, options[0])}); the command line wins.",
    )
    for option in options:
        try:
            found, env_value = _from_env(env_prefix, option, environ)
        except ValueError as error:
            # A usage error like a bad option: exit 2 (process.ExitCode.CONFIGURATION), which no unit restarts.
            parser.error(str(error))
        default = env_value if found else option.default
        env_help = f" [env {_env_name(env_prefix, option)}; default: {default!r}]"
        help_text = argparse.SUPPRESS if option.hidden else option.help + env_help
        if not option.flags:
            # A positional that the environment may supply.
            parser.add_argument(
                option.dest,
                nargs=None if (option.required and not found) else "?",
                default=default,
                type=option.type,
                help=help_text,
                metavar=option.metavar or option.dest,
            )
            continue
        kwargs: dict[str, Any] = {"dest": option.dest, "default": default, "help": help_text}
        if option.kind == "flag":
            kwargs["action"] = "store_true"
        elif option.kind == "list":
            kwargs.update(action="append", type=option.type, metavar=option.metavar)
            # argparse appends to the default list in place: give it a copy.
            kwargs["default"] = list(default or [])
        else:
            kwargs.update(type=option.type, choices=option.choices, metavar=option.metavar)
        parser.add_argument(*option.flags, **kwargs)
    return parser


def parse_args(
    prog: str,
    description: str,
    options: Sequence[Option],
    env_prefix: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` for one command; see the module docstring for precedence."""
    parser = build_parser(prog, description, options, env_prefix, environ)
    args = parser.parse_args(argv)
    for option in options:
        if option.required and getattr(args, option.dest) in (None, [], ""):
            parser.error(f"{option.dest} is required (argument or {_env_name(env_prefix, option)})")
    return args


_log_option = Option(
    "log_level", ("--log_level", "--log-level"), "INFO", _log_level, "Log level.", metavar="LEVEL"
)

# --------------------------------------------------------------------------
# sf_bsread_buffer
# --------------------------------------------------------------------------
BUFFER_ENV_PREFIX = "SF_BSREAD_BUFFER_"
BUFFER_OPTIONS: list[Option] = [
    Option("stream", (), None, zmq_address, "Source stream address, e.g. tcp://ioc:9999.", required=True,
           metavar="STREAM"),
    Option("output_port", ("-o", "--output_port", "--output-port"), 8888, int,
           "Port of the live output (0: any free port)."),
    Option("buffer_length", ("-b", "--buffer_length", "--buffer-length"), 1000, int,
           "Most messages the ring holds (oldest evicted first)."),
    Option("buffer_bytes", ("--buffer-bytes", "--buffer_bytes"), 2 * 1024**3, int,
           "Most bytes of raw frames the ring holds (oldest evicted first)."),
    Option("max_message_bytes", ("--max-message-bytes",), DEFAULT_MAX_MESSAGE_BYTES, int,
           "A message larger than this is rejected as oversize."),
    Option("source_mode", ("--source-mode", "--source_mode"), "pull", str,
           "How to connect to the source.", choices=("pull", "sub")),
    Option("output_mode", ("--output-mode", "--output_mode"), "pub", str,
           "Live output socket: pub (fan-out, drops for slow viewers) or push (one legacy consumer).",
           choices=("pub", "push")),
    Option("replay_port", ("--replay-port", "--replay_port"), 8889, int,
           "Port of the replay endpoint that writers use (0: any free port)."),
    Option("rest_port", ("--rest-port", "--rest_port"), 8890, int,
           "Port of the HTTP status API (0: any free port)."),
    Option("max_writers", ("--max-writers",), 16, int,
           "Most replay sessions (writers) served at once; a further request is refused with a reason."),
    Option("replay_inflight_bytes", ("--replay-inflight-bytes",), 64 * 1024**2, int,
           "Most bytes sent to one writer and not yet acknowledged (at least one message): bounds what a "
           "writer that stops reading pins in the buffer's memory."),
    Option("bind", ("--bind",), DEFAULT_BIND, str, "Address to bind all listening sockets to."),
    Option("name", ("--name",), "BSBUFFER", str, "Name of this buffer (logs, status, CA status PV prefix)."),
    Option("ca", ("--ca",), False, _bool, "Serve the stream and the status over EPICS Channel Access.", kind="flag"),
    Option("ca_prefix", ("--ca-prefix", "--ca_prefix"), "", str, "Prefix of every channel PV."),
    Option("ca_max_rate", ("--ca-max-rate",), 10.0, float,
           "With --ca: most messages per second passed to the gateway, so most updates per second of a PV."),
    Option("web", ("--web",), False, _bool,
           "Serve the buffer over HTTP and websockets (sf_bsread_web as a child process; docs/web-api.md).",
           kind="flag"),
    Option("web_port", ("--web-port",), 8891, int, "With --web: port of the web service (0: any free port)."),
    Option("web_bind", ("--web-bind",), DEFAULT_BIND, str,
           "With --web: address the web service binds to; beyond loopback it needs --web-tokens."),
    Option("web_tokens", ("--web-tokens",), None, str,
           "With --web: file of access tokens, one per line (re-read on SIGHUP).", metavar="FILE"),
    Option("web_max_rate", ("--web-max-rate",), 10.0, float,
           "With --web: most messages per second passed to the web service, so the fastest live update."),
    Option("web_allow_origins", ("--web-allow-origin",), [], str,
           "With --web: a web page origin (scheme://host[:port]) besides the service's own whose websockets are "
           "accepted (repeatable, or comma separated); see --allow-origin of sf_bsread_web.",
           kind="list", metavar="ORIGIN"),
    _log_option,
    Option("max_clock_skew", ("--max-clock-skew",), MAX_CLOCK_SKEW, float,
           "Seconds a source's global timestamp may differ from the receive time; beyond (or when absent) "
           "the receive time is the message's time for start_now/stop_now."),
    Option("analyzer", ("--analyzer",), False, _bool,
           "Log anomalies of the incoming stream at INFO: channels missing from a pulse (as the original), "
           "pulse-id jumps, resets, header changes.", kind="flag"),
    Option("archive", ("--archive",), None, str,
           "Archive every message in NATS JetStream: nats://HOST:PORT[,HOST:PORT...] (stream sfbs_<--name>; "
           "docs/archive.md). The archiver runs as a child process; the buffer runs on when the broker is away."),
    Option("archive_max_bytes", ("--archive-max-bytes",), -1, int,
           "With --archive: most bytes the archive keeps; the oldest are discarded (-1: unlimited)."),
    Option("archive_max_age", ("--archive-max-age",), 0.0, float,
           "With --archive: seconds the archive keeps a message (0: unlimited)."),
    Option("archive_replicas", ("--archive-replicas",), 1, int,
           "With --archive: copies of the archive in a JetStream cluster (1, 3 or 5)."),
]

# --------------------------------------------------------------------------
# sf_bsread_writer
# --------------------------------------------------------------------------
WRITER_ENV_PREFIX = "SF_BSREAD_WRITER_"
WRITER_OPTIONS: list[Option] = [
    Option("stream_address", (), None, stream_address,
           "The buffer's replay endpoint (pulses older than its ring come from its archive, if it has one), "
           "nats://HOST:PORT/NAME to read buffer NAME's archive alone (docs/archive.md), or, with --direct, "
           "a plain bsread stream.", required=True),
    Option("output_file", (), None, str, "HDF5 file to write (/dev/null: consume without writing).",
           required=True),
    Option("user_id", (), None, int, "Run as this uid (and its gid) before touching files; -1 keeps the user.",
           required=True),
    Option("rest_port", (), None, int, "Port of the REST API (0: any free port).", required=True),
    Option("rest_host", ("--rest-host", "--rest_host"), DEFAULT_BIND, str, "Address of the REST API."),
    Option("direct", ("--direct",), False, _bool,
           "STREAM_ADDRESS is a plain bsread stream (live only), not a buffer's replay endpoint.", kind="flag"),
    Option("direct_mode", ("--direct-mode",), "pull", str, "Socket type for --direct.", choices=("pull", "sub")),
    Option("output_root", ("--output-root", "--output_root"), None, str,
           "When set, every output file must resolve inside this directory."),
    Option("stop_deadline", ("--stop-deadline", "--stop_deadline"), 10.0, float,
           "Seconds to wait for the stop pulse once the source is silent; then close and record what is missing."),
    Option("flush_interval", ("--flush-interval",), 1.0, float,
           "Seconds between flushes of the file (what survives a kill -9)."),
    Option("max_message_bytes", ("--max-message-bytes",), DEFAULT_MAX_MESSAGE_BYTES, int,
           "A message larger than this is rejected (set it as the buffer's --max-message-bytes); the replay "
           "request says it, so a buffer sends a larger one as a missing pulse (oversize), and the socket takes "
           "no part over twice it."),
    Option("max_clock_skew", ("--max-clock-skew",), MAX_CLOCK_SKEW, float,
           "With --direct: seconds a source's global timestamp may differ from the receive time; beyond "
           "(or when absent) the receive time is the message's time for start_now/stop_now."),
    Option("decompress_images", ("--decompress-images",), False, _bool,
           "Store bitshuffle_lz4 images decompressed (plain datasets any HDF5 reader opens, without the "
           "filter plugin; bigger files, more CPU) instead of as the compressed chunks received.", kind="flag"),
    Option("finished_grace", ("--finished-grace",), 0.0, float,
           "Seconds the REST API keeps answering 'finished' after the file is closed and the summary written, "
           "before the process exits. 0 (the original's behaviour): gone at once, for clients that wait for "
           "the process to end; a client that polls /status for 'finished' sets it longer than its poll "
           "interval (or reads the summary, or takes a gone writer as finished)."),
    _log_option,
]

# --------------------------------------------------------------------------
# sf_bsread_gateway
# --------------------------------------------------------------------------
GATEWAY_ENV_PREFIX = "SF_BSREAD_GATEWAY_"
GATEWAY_OPTIONS: list[Option] = [
    Option("buffer_output", (), None, zmq_address, "The buffer's live output address, e.g. tcp://host:8888.",
           required=True),
    Option("status_url", ("--status-url",), None, str,
           "The buffer's HTTP status base URL (e.g. http://host:8890) for the NAME: status PVs."),
    Option("source_mode", ("--source-mode",), "sub", str, "Socket type towards the buffer output.",
           choices=("sub", "pull")),
    Option("ca_prefix", ("--ca-prefix", "--ca_prefix"), "", str, "Prefix of every channel PV."),
    Option("name", ("--name",), "BSBUFFER", str, "Prefix of the status PVs (NAME:PULSE_ID, ...)."),
    Option("max_rate", ("--max-rate",), 10.0, float, "Most updates per second of one PV."),
    Option("total_rate", ("--total-rate",), 20000.0, float, "Most PV updates per second in all."),
    Option("writable", ("--writable",), False, _bool, "Allow caput (default: read-only).", kind="flag"),
    Option("allow_hosts", ("--allow-host",), [], str,
           "With --writable: only these peer IP addresses may write (repeatable).", kind="list", metavar="IP"),
    Option("acf", ("--acf",), None, str,
           "The site's EPICS access-security file (instead of the one --writable/--allow-host "
           "write): ASG DEFAULT governs every PV, ASG WRITABLE the NAME:MAX_RATE control PV.", metavar="FILE"),
    Option("parent_pid", ("--parent-pid",), 0, int,
           "Exit when this process is gone (set by the buffer for --ca; 0: never)."),
    Option("server", ("--server",), "softioc", str,
           "CA server: softioc, the only one (EPICS records, C fan-out; docs/gateway.md); kept so that "
           "existing configurations still parse.", choices=("softioc",)),
    Option("record_updates", ("--record-updates",), "batch", str,
           "How the ai/longin records of a message are set: batch (one call from C per message, posted by an "
           "EPICS thread: ~0.5 us a record) or set (pythonSoftIOC's set, ~100 us a record); batch falls back "
           "to set where the compiled part is not built (docs/gateway.md).", choices=("batch", "set")),
    # The opt-in of batches before they were the default: still parses (means --record-updates batch).
    Option("record_batch", ("--record-batch",), False, _bool, argparse.SUPPRESS, kind="flag"),
    Option("ioc_child", ("--ioc-child",), False, _bool, argparse.SUPPRESS, kind="flag"),
    _log_option,
]

# --------------------------------------------------------------------------
# sf_bsread_web
# --------------------------------------------------------------------------
WEB_ENV_PREFIX = "SF_BSREAD_WEB_"
WEB_OPTIONS: list[Option] = [
    Option("feed", (), None, zmq_address,
           "The buffer's stream to show live: its --web feed, or its live output (PUB), e.g. tcp://host:8888.",
           required=True),
    Option("status_url", ("--status-url",), None, str,
           "The buffer's HTTP base URL (e.g. http://host:8890) for /api/v1/status when FEED carries no status "
           "(a buffer's live output); a buffer's --web feed carries its status and needs none."),
    Option("replay", ("--replay",), None, zmq_address,
           "The buffer's replay endpoint (e.g. tcp://host:8889) for /api/v1/range.", required=True),
    Option("source_mode", ("--source-mode",), "sub", str, "Socket type towards the feed.", choices=("sub", "pull")),
    Option("port", ("--port",), 8891, int, "Port to serve HTTP and websockets on (0: any free port)."),
    Option("bind", ("--bind",), DEFAULT_BIND, str,
           "Address to bind to; anything but loopback needs --tokens."),
    Option("tokens", ("--tokens",), None, str,
           "File of access tokens, one per line (# comments); re-read on SIGHUP. Without it the service is "
           "open, which it allows on loopback only.", metavar="FILE"),
    Option("max_rate", ("--max-rate",), 10.0, float,
           "Most feed messages per second taken, so the fastest live update a client can get."),
    Option("max_range_pulses", ("--max-range-pulses",), 100_000, int,
           "Most pulse ids one /api/v1/range request may span (413 beyond)."),
    Option("max_range_bytes", ("--max-range-bytes",), 256 * 1024**2, int,
           "Most bytes of values one /api/v1/range request may collect (413 beyond)."),
    Option("range_timeout", ("--range-timeout",), 30.0, float,
           "Seconds a /api/v1/range request may take (504 beyond; a range reaching into the future waits)."),
    Option("allow_origins", ("--allow-origin",), [], str,
           "A web page origin (scheme://host[:port], e.g. https://status.psi.ch) besides the service's own whose "
           "websockets are accepted (repeatable, or comma separated). A browser sends a page's origin with its "
           "websocket: one from any other site is refused (403), so that another site's page cannot use a token "
           "the browser holds. Clients that send no Origin (programs) are not affected.",
           kind="list", metavar="ORIGIN"),
    Option("listen_fd", ("--listen-fd",), None, int,
           "Serve on this inherited listening TCP socket instead of binding --bind/--port (the buffer's --web "
           "passes its own, so that the port stays its while the service restarts)."),
    Option("parent_pid", ("--parent-pid",), 0, int,
           "Exit when this process is gone (set by the buffer for --web; 0: never)."),
    _log_option,
]

# --------------------------------------------------------------------------
# sf_bsread_ca_bridge
# --------------------------------------------------------------------------
BRIDGE_ENV_PREFIX = "SF_BSREAD_CA_BRIDGE_"
BRIDGE_OPTIONS: list[Option] = [
    Option("pvs", ("--pv",), [], str, "An upstream PV to bring into the stream (repeatable).",
           kind="list", metavar="NAME"),
    Option("pv_file", ("--pv-file",), None, str, "File with one PV name per line (# comments)."),
    Option("port", ("--port",), None, int, "Port of the bsread stream this bridge publishes.", required=False),
    Option("bind", ("--bind",), DEFAULT_BIND, str, "Address to bind the stream to."),
    Option("mode", ("--mode",), "push", str, "bsread socket type.", choices=("push", "pub")),
    Option("rate", ("--rate",), 100.0, float, "Messages per second."),
    Option("pulse_id_pv", ("--pulse-id-pv",), None, str,
           "PV whose value is the pulse id; default: derived from time at the nominal rate."),
    _log_option,
]

# --------------------------------------------------------------------------
# sf_bsread_simulate
# --------------------------------------------------------------------------
SIMULATE_ENV_PREFIX = "SF_BSREAD_SIMULATE_"
SIMULATE_OPTIONS: list[Option] = [
    Option("profile", ("--profile",), "mixed", str, "What to send.",
           choices=("camera", "scalars", "mixed", "demo")),
    Option("port", ("--port",), 9999, int, "Port to bind the stream to (0: any free port)."),
    Option("bind", ("--bind",), DEFAULT_BIND, str, "Address to bind to."),
    Option("mode", ("--mode",), "push", str, "Socket type.", choices=("push", "pub")),
    Option("rate", ("--rate",), 100.0, float, "Messages per second (0: as fast as possible)."),
    Option("count", ("--count",), 0, int, "Messages to send (0: until stopped)."),
    Option("start_pulse_id", ("--start-pulse-id",), 0, int,
           "First pulse id (0: derived from the current time, SwissFEL-like)."),
    Option("pulse_id_step", ("--pulse-id-step",), 1, int, "Pulse-id increment per message."),
    Option("compression", ("--compression",), "none", str, "Compression of array channels.",
           choices=("none", "bitshuffle_lz4", "lz4")),
    Option("n_channels", ("--n-channels",), 500, int, "Channels of the 'scalars' profile."),
    Option("image_shape", ("--image-shape",), "1280x1024", str,
           "Camera image size WIDTHxHEIGHT (bsread shape order)."),
    _log_option,
]


# --------------------------------------------------------------------------
# Reference documentation, generated from the lists above
# --------------------------------------------------------------------------
COMMANDS: list[tuple[str, str, list[Option]]] = [
    ("sf_bsread_buffer", BUFFER_ENV_PREFIX, BUFFER_OPTIONS),
    ("sf_bsread_writer", WRITER_ENV_PREFIX, WRITER_OPTIONS),
    ("sf_bsread_gateway", GATEWAY_ENV_PREFIX, GATEWAY_OPTIONS),
    ("sf_bsread_web", WEB_ENV_PREFIX, WEB_OPTIONS),
    ("sf_bsread_ca_bridge", BRIDGE_ENV_PREFIX, BRIDGE_OPTIONS),
    ("sf_bsread_simulate", SIMULATE_ENV_PREFIX, SIMULATE_OPTIONS),
]


def markdown_reference() -> str:
    """docs/configuration.md: every option of every command (regenerate with
    ``python -m sf_bsread_writer.config > docs/configuration.md``)."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `sf_bsread_writer/config.py` by `python -m sf_bsread_writer.config`; "
        "a test fails when this file is out of date.",
        "",
        "Precedence: command line > environment variable > default. Flags take 1/0, true/false, "
        "yes/no, on/off in the environment; repeatable options take a comma-separated list.",
    ]
    for command, prefix, options in COMMANDS:
        out += ["", f"## {command}", "", "| option | environment | default | meaning |", "|---|---|---|---|"]
        for option in options:
            if option.hidden:  # internal (e.g. the gateway's IOC child): not for users
                continue
            spelled = ", ".join(f"`{flag}`" for flag in option.flags) if option.flags else \
                f"`{(option.metavar or option.dest).upper()}` (positional)"
            if option.choices:
                spelled += " (" + "\\|".join(str(choice) for choice in option.choices) + ")"
            default = "required" if option.required else f"`{option.default!r}`"
            out.append(f"| {spelled} | `{_env_name(prefix, option)}` | {default} | {option.help} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")


_ORIGIN = re.compile(r"https?://[a-z0-9.\-\[\]:]+", re.ASCII)


def parse_origins(values: Sequence[str]) -> tuple[str, ...]:
    """``--allow-origin`` values (each may be a comma list) as normalised origins; ValueError names a bad one.

    An origin is what a browser sends: ``scheme://host[:port]``, lower case, no path, no ``*``.
    """
    origins = []
    for value in values:
        for item in value.split(","):
            origin = item.strip().lower().rstrip("/")
            if not origin:
                continue
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{item.strip()!r} is not an origin: give scheme://host[:port], "
                                 "e.g. https://status.example.org")
            origins.append(origin)
    return tuple(dict.fromkeys(origins))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; a bind to anything else (0.0.0.0 too) reaches other hosts."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""``sf_bsread_web``: the buffer over HTTP and websockets, as its own process (docs/web-api.md).

Threads: the asyncio loop (aiohttp: every request and websocket) and one
feed thread (``feed.FeedReader`` on the buffer's rate-limited ``--web``
feed, or any bsread stream), which parses each message and hands it to the
loop, and keeps the buffer's status that travels on the same feed. Past ranges run
in worker threads (ZeroMQ replay, h5py). What a client gets is decided by
``web.live`` (latest values, subscriptions, bounded queues) and
``web.range_query``; this module only moves bytes and reads the clock.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from sf_bsread_writer import process
from sf_bsread_writer.config import (
    WEB_ENV_PREFIX,
    WEB_OPTIONS,
    parse_args,
    parse_origins,
)
from sf_bsread_writer.web.auth import TokenFileError, TokenSet, is_loopback, read_tokens
from sf_bsread_writer.web.range_query import RangeLimits
from sf_bsread_writer.web.state import WebService, WebSettings

__all__ = ["main", "serve"]

logger = logging.getLogger(__spec__.name if __spec__ else __name__)

PARENT_CHECK_SECONDS = 1.0


async def serve(settings: WebSettings, tokens: TokenSet) -> int:
    """Run until SIGTERM/SIGINT (or the parent process is gone); returns the exit code."""
    from aiohttp import web

    from sf_bsread_writer.web.app import make_app

    service = WebService(settings, tokens)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_tokens)
    app = make_app(service)
    # shutdown_timeout: a stop must end well within the 5 s the buffer gives its children before SIGKILL.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    if settings.listen_fd is not None:
        listener = socket.socket(fileno=settings.listen_fd)  # the buffer's, already listening
        site: web.BaseSite = web.SockSite(runner, listener)
    else:
        site = web.TCPSite(runner, settings.bind, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as error:
        logger.error("cannot listen on %s:%s: %s", settings.bind, settings.port, error)
        await runner.cleanup()
        return process.start_error_code(error)  # a port in use: 2, never restarted (process.ExitCode)
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # the real one for port 0
    service.start_feed(loop)
    service.start_status()  # polls the buffer once a second from now on: the rate plots' recent past
    url = f"http://{settings.bind}:{port}"
    process.print_ready({"url": url, "port": port, "bind": settings.bind, "tokens": tokens.required,
                         "feed": settings.feed, "replay": settings.replay, "status_url": settings.status_url})
    logger.info("web service at %s (%s), feed %s, replay %s", url,
                "tokens required" if tokens.required else "open: loopback only", settings.feed, settings.replay)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), PARENT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                pass
            if settings.parent_pid and not process.pid_alive(settings.parent_pid):
                logger.warning("parent process %d is gone; web service exits", settings.parent_pid)
                break
    finally:
        service.stop_feed()
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``sf_bsread_web FEED [--status-url URL] --replay ADDRESS [--port P] [--bind H] [--tokens FILE]``."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = parse_args("sf_bsread_web", "Serve a bsread buffer over HTTP and websockets.", WEB_OPTIONS,
                      WEB_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    tokens = TokenSet()
    if args.tokens:
        try:
            tokens = TokenSet(read_tokens(args.tokens))
        except TokenFileError as error:
            logger.error("%s", error)
            return 2
    if not tokens.required and not is_loopback(args.bind):
        logger.error("--bind %s reaches other hosts: give --tokens FILE (one token per line), or bind 127.0.0.1",
                     args.bind)
        return 2
    for name in ("max_rate", "range_timeout"):
        if not getattr(args, name) > 0:
            logger.error("--%s must be > 0", name.replace("_", "-"))
            return 2
    if args.max_range_pulses < 1 or args.max_range_bytes < 1:
        logger.error("--max-range-pulses and --max-range-bytes must be >= 1")
        return 2
    try:
        allow_origins = parse_origins(args.allow_origins)
    except ValueError as error:
        logger.error("--allow-origin %s", error)
        return 2
    settings = WebSettings(
        feed=args.feed, status_url=args.status_url.rstrip("/") if args.status_url else None, replay=args.replay, source_mode=args.source_mode,
        port=args.port, bind=args.bind, tokens_file=os.path.abspath(args.tokens) if args.tokens else None,
        max_rate=args.max_rate, limits=RangeLimits(max_pulses=args.max_range_pulses,
                                                   max_bytes=args.max_range_bytes),
        range_timeout=args.range_timeout, parent_pid=args.parent_pid or 0, listen_fd=args.listen_fd,
        allow_origins=allow_origins)
    return asyncio.run(serve(settings, tokens))


if __name__ == "__main__":
    sys.exit(main())

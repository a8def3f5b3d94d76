"""The buffer's HTTP API (Bottle): ``GET /status``, ``/statistics`` (JSON) and ``/metrics`` (Prometheus).

Thin: every answer is a rendering of the latest published snapshot
(``status.BufferStatus``); the HTTP threads never touch the ring or a
socket. Field meanings: docs/buffer.md.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bottle

from sf_bsread_writer.httpserver import install_json_errors
from sf_bsread_writer.status import BufferStatus, prometheus_text

__all__ = ["make_app"]

PATHS = "GET /status, /statistics, /metrics"


def make_app(get_status: Callable[[], BufferStatus]) -> bottle.Bottle:
    """The HTTP API; ``get_status`` returns the latest published snapshot."""
    app = bottle.Bottle()

    @app.get("/status")
    def _status() -> dict[str, Any]:
        return get_status().status_answer()

    @app.get("/statistics")
    def _statistics() -> dict[str, Any]:
        return get_status().statistics_answer()

    @app.get("/metrics")
    def _metrics() -> str:
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return prometheus_text(get_status())

    install_json_errors(app, PATHS)
    return app

"""Drive a writer over its REST API, from Python or in one line from a shell.

    from sf_bsread_writer.client import WriterClient
    writer = WriterClient("http://127.0.0.1:4000")
    writer.set_parameters({"general/created": "...", "general/user": "...",
                           "general/process": "...", "general/instrument": "..."})
    writer.start_pulse_id(123)
    writer.stop_pulse_id(456)
    writer.wait_for("finished")

    $ sf_bsread_writer_client http://127.0.0.1:4000 start_pulse_id 123
    $ sf_bsread_writer_client http://127.0.0.1:4000 parameters general/user=e12345 general/process=daq ...
    $ sf_bsread_writer_client http://127.0.0.1:4000 statistics

Every call has a timeout. An answer with ``state: error`` raises
:class:`WriterError` carrying the server's message and HTTP status; a writer
that cannot be reached raises ``requests.RequestException``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import requests

__all__ = ["WriterClient", "WriterError", "main"]


class WriterError(RuntimeError):
    """The writer answered ``state: error``: ``status`` is its message, ``http_status`` the code (400, 409, ...)."""

    def __init__(self, status: str, http_status: int, answer: dict | None = None) -> None:
        super().__init__(f"writer refused ({http_status}): {status}")
        self.status = status
        self.http_status = http_status
        self.answer = answer or {}


class WriterClient:
    """One writer's REST API. ``timeout`` (seconds) applies to every request.

    ``warning`` is what the last start's answer warned about the range (pulses older than the
    buffer's oldest, a buffer that holds nothing yet), None when it had nothing to say.
    """

    def __init__(self, base_url: str, timeout: float = 10.0, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session or requests.Session()
        self.warning: str | None = None

    def _call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> dict:
        response = self._session.request(
            method, self.base_url + path, json=body, timeout=self.timeout if timeout is None else timeout)
        try:
            answer = response.json()
        except ValueError:
            raise WriterError(f"not a JSON answer: {response.text[:200]!r}", response.status_code) from None
        if not isinstance(answer, dict) or answer.get("state") != "ok":
            status = answer.get("status", answer) if isinstance(answer, dict) else answer
            raise WriterError(str(status), response.status_code, answer if isinstance(answer, dict) else None)
        return answer

    # -- the endpoints -----------------------------------------------------------
    def status(self) -> str:
        return self._call("GET", "/status")["status"]

    def statistics(self) -> dict:
        return self._call("GET", "/statistics")["statistics"]

    def set_parameters(self, parameters: dict) -> dict:
        return self._call("POST", "/parameters", parameters)["parameters"]

    def parameters(self) -> dict:
        return self._call("GET", "/parameters")["parameters"]

    def start_pulse_id(self, pulse_id: int, output_file: str | None = None) -> str:
        body = {"output_file": output_file} if output_file is not None else None
        return self._started(self._call("PUT", f"/start_pulse_id/{pulse_id}", body))

    def stop_pulse_id(self, pulse_id: int) -> str:
        return self._call("PUT", f"/stop_pulse_id/{pulse_id}")["status"]

    def start_now(self, output_file: str | None = None) -> str:
        body = {"output_file": output_file} if output_file is not None else None
        return self._started(self._call("PUT", "/start_now", body))

    def _started(self, answer: dict) -> str:
        warning = answer.get("warning")
        self.warning = str(warning) if warning else None
        return answer["status"]

    def stop_now(self) -> str:
        return self._call("PUT", "/stop_now")["status"]

    def stop(self, timeout: float = 70.0) -> str:
        """Close the file now; the answer comes once it is closed (hence the longer timeout)."""
        return self._call("GET", "/stop", timeout=timeout)["status"]

    def kill(self, timeout: float = 70.0) -> str:
        """Close the file and let the process exit at once."""
        return self._call("GET", "/kill", timeout=timeout)["status"]

    # -- helpers -----------------------------------------------------------------
    def wait_for(self, *states: str, timeout: float = 60.0, interval: float = 0.2) -> str:
        """Poll ``/status`` until it is one of ``states``; a writer that has exited counts as finished."""
        wanted = set(states) or {"finished"}
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.status()
            except requests.ConnectionError:
                if "finished" in wanted or "exited" in wanted:
                    return "exited"
                raise
            if status in wanted:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer still {status!r} after {timeout}s (waiting for {', '.join(sorted(wanted))})")
            time.sleep(interval)


def _parameters_argument(items: Sequence[str]) -> dict:
    """``'{json}'``, ``@file.json`` or ``key=value ...`` into a dict."""
    if len(items) == 1 and items[0].startswith("@"):
        with open(items[0][1:], encoding="utf-8") as file:
            return json.load(file)
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        return json.loads(items[0])
    parameters = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"expected key=value, not {item!r}")
        parameters[key] = value
    return parameters


COMMANDS = {
    "status": "print the writer's state",
    "statistics": "print the statistics",
    "parameters": "set parameters: '{json}', @file.json or key=value ... (no argument: print them)",
    "start_pulse_id": "start at PULSE_ID [OUTPUT_FILE]",
    "stop_pulse_id": "stop after PULSE_ID (inclusive)",
    "start_now": "start from now [OUTPUT_FILE]",
    "stop_now": "stop at the current time",
    "stop": "close the file now and end the writer",
    "kill": "close the file and end the writer at once",
    "wait": "wait until the writer is STATE... (default finished; an exited writer counts as finished)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI ``sf_bsread_writer_client URL COMMAND [ARGS]``: prints the answer as JSON; 1 if refused, 2 if unreachable."""
    parser = argparse.ArgumentParser(
        prog="sf_bsread_writer_client", description="Drive a sf_bsread_writer over its REST API.",
        epilog="commands: " + "; ".join(f"{name}: {text}" for name, text in COMMANDS.items()))
    parser.add_argument("url", help="the writer's REST address, e.g. http://127.0.0.1:4000")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("arguments", nargs="*", help="arguments of the command")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    args = parser.parse_args(argv)
    client = WriterClient(args.url, timeout=args.timeout)
    command, arguments = args.command, args.arguments

    try:
        if command in ("start_pulse_id", "stop_pulse_id"):
            if not arguments or len(arguments) > (2 if command == "start_pulse_id" else 1):
                parser.error(f"{command} takes a pulse id" + (" and optionally an output file"
                                                               if command == "start_pulse_id" else ""))
            if command == "start_pulse_id":
                result: Any = {"status": client.start_pulse_id(arguments[0], *arguments[1:])}
            else:
                result = {"status": client.stop_pulse_id(arguments[0])}
        elif command == "start_now":
            result = {"status": client.start_now(*arguments[:1])}
        elif command == "parameters":
            if arguments:
                try:
                    parameters = _parameters_argument(arguments)
                except (ValueError, OSError) as error:
                    parser.error(f"parameters: {error}")
                result = {"parameters": client.set_parameters(parameters)}
            else:
                result = {"parameters": client.parameters()}
        elif command == "statistics":
            result = {"statistics": client.statistics()}
        elif command == "wait":
            result = {"status": client.wait_for(*arguments, timeout=max(args.timeout, 60.0))}
        else:
            result = {"status": getattr(client, command)()}
    except WriterError as error:
        print(json.dumps({"state": "error", "status": error.status, "http_status": error.http_status}))
        return 1
    except (requests.RequestException, TimeoutError) as error:
        print(f"cannot reach the writer at {args.url}: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"state": "ok", **result}, indent=2 if command in ("statistics", "parameters") else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

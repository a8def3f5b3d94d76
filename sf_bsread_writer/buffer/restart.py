"""(pure) When a supervised child that ended by itself is started again: the one restart policy.

The buffer's :class:`~sf_bsread_writer.buffer.children.ChildSupervisor` (the gateway, the web service, the
archiver) asks it after every unasked exit; it decides from the clock it is fed (``now``) and the exit code,
so that the backoff is tested with a fake clock, not by waiting. The gateway's replacement of its IOC
(``ca/supervisor.py``) is not a restart after a fault but a planned hand-over to a warm standby; a gateway
whose IOC failed ends, and this policy restarts the gateway.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RestartPolicy"]

#: ``process.ExitCode.CONFIGURATION`` (this module imports no shell): a bad option or a port in use fails the
#: same way on every start, as systemd's ``RestartPreventExitStatus=2`` says for the units.
CONFIGURATION = 2


@dataclass
class RestartPolicy:
    """Backoff ``first_backoff`` (1 s), doubled after each quick death up to ``max_backoff`` (30 s).

    A child that ran ``stable_after`` seconds (60) before it died had served: its restart waits
    ``first_backoff`` again, not the backoff of old faults. An exit code in ``permanent`` (2, a configuration
    error) is never restarted: the child stays down and says why in its log (``child_up`` 0). Any other exit
    that nobody asked for, also 0 or a signal (a negative code), is a fault and restarted.
    """

    first_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 60.0
    permanent: frozenset[int] = frozenset({CONFIGURATION})
    _backoff: float = field(default=0.0, init=False, repr=False)
    _started: float | None = field(default=None, init=False, repr=False)

    def started(self, now: float) -> None:
        """A child was started at ``now``."""
        self._started = now

    def next_start(self, now: float, exit_code: int) -> float | None:
        """When to start the child that ended at ``now`` with ``exit_code``; None: never (a permanent error)."""
        if exit_code in self.permanent:
            return None
        ran = 0.0 if self._started is None else now - self._started
        if self._backoff <= 0 or ran >= self.stable_after:
            self._backoff = self.first_backoff
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)
        return now + delay

"""The EPICS environment of this package's CA server and CA client, with secure defaults.

Channel Access finds its peers by UDP broadcast unless told otherwise, and
both the gateway's server (an EPICS IOC) and the bridge's client (pyepics/libca)
read their settings from ``EPICS_*`` variables once, when first used. These
functions complete the environment before that happens: an address the
site configured always wins; with none configured, everything stays on
127.0.0.1 and nothing is broadcast. docs/gateway.md, "EPICS environment".
"""
from __future__ import annotations

from collections.abc import MutableMapping

__all__ = ["prepare_server_environment", "prepare_client_environment"]

# The beacon/interface defaults used when the environment does not name any:
# nothing leaves this machine, nothing is broadcast.
_LOOPBACK_DEFAULTS = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
}
# The same for the pvAccess server the softioc gateway also runs (pvxs): it broadcasts too unless told.
_PVA_LOOPBACK_DEFAULTS = {
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
}


# EPICS base's own switch for real-time threads (libCom's POSIX epicsThread). As root, or for a user with
# real-time rights, EPICS runs its threads SCHED_FIFO (cbLow 58, rsrv's event threads 18 ...) and locks all
# the IOC's memory at iocInit (mlockall: 1.2 GB locked, RSS 241 against 68 MB for one record). A gateway has
# no hardware to serve on time, and real time cost it: ten clients on 1000 PVs sometimes left the CA process
# at 140-155 % CPU in priority-inheritance lock waits (docs/performance.md, issue 22). The systemd unit
# refuses real time anyway (RestrictRealtime=yes, no capabilities); a site that wants it sets YES.
_REALTIME = "EPICS_ALLOW_POSIX_THREAD_PRIORITY_SCHEDULING"


def prepare_server_environment(environ: MutableMapping[str, str]) -> list[str]:
    """Complete ``environ`` for a CA server the way EPICS base reads it; returns what was changed.

    * EPICS_CAS_SERVER_PORT (server only) wins over EPICS_CA_SERVER_PORT;
      it is copied, so that the READY line and the IOC agree.
    * EPICS_CAS_BEACON_PORT defaults to EPICS_CA_REPEATER_PORT, as in EPICS
      base.
    * Secure default: when the environment names no server interface, the
      server listens on 127.0.0.1 only, and when it names no beacon
      addresses, beacons go to 127.0.0.1 only (EPICS base would broadcast
      them on every interface). Set the standard variables to serve a network.
    * No real-time threads and no locked memory: EPICS_ALLOW_POSIX_THREAD_PRIORITY_SCHEDULING
      defaults to NO (the reason is beside ``_REALTIME``).
    """
    changes: list[str] = []

    def put(key: str, value: str) -> None:
        environ[key] = value
        changes.append(f"{key}={value}")

    if environ.get("EPICS_CAS_SERVER_PORT"):
        if environ.get("EPICS_CA_SERVER_PORT") != environ["EPICS_CAS_SERVER_PORT"]:
            put("EPICS_CA_SERVER_PORT", environ["EPICS_CAS_SERVER_PORT"])
    if not environ.get("EPICS_CAS_BEACON_PORT") and environ.get("EPICS_CA_REPEATER_PORT"):
        put("EPICS_CAS_BEACON_PORT", environ["EPICS_CA_REPEATER_PORT"])
    if not environ.get("EPICS_CAS_INTF_ADDR_LIST"):
        put("EPICS_CAS_INTF_ADDR_LIST", _LOOPBACK_DEFAULTS["EPICS_CAS_INTF_ADDR_LIST"])
    if not environ.get("EPICS_CAS_BEACON_ADDR_LIST") and not environ.get("EPICS_CAS_AUTO_BEACON_ADDR_LIST"):
        put("EPICS_CAS_AUTO_BEACON_ADDR_LIST", _LOOPBACK_DEFAULTS["EPICS_CAS_AUTO_BEACON_ADDR_LIST"])
        put("EPICS_CAS_BEACON_ADDR_LIST", _LOOPBACK_DEFAULTS["EPICS_CAS_BEACON_ADDR_LIST"])
    if not any(environ.get(key) for key in _PVA_LOOPBACK_DEFAULTS):
        for key, value in _PVA_LOOPBACK_DEFAULTS.items():
            put(key, value)
    if not environ.get(_REALTIME):
        put(_REALTIME, "NO")
    return changes


def prepare_client_environment(environ: MutableMapping[str, str]) -> list[str]:
    """Secure default for a CA client: no address list configured -> search 127.0.0.1 only."""
    if environ.get("EPICS_CA_ADDR_LIST") or environ.get("EPICS_CA_AUTO_ADDR_LIST"):
        return []
    environ["EPICS_CA_ADDR_LIST"] = "127.0.0.1"
    environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    return ["EPICS_CA_ADDR_LIST=127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST=NO"]

"""EPICS Channel Access: the gateway that serves a buffer as PVs, and the bridge that brings PVs into a stream.

``policy`` (every decision of the gateway, pure: channel plan, spare records,
when to restart, alarms, status values, rates), ``ioc`` (the one server:
EPICS records in a pythonSoftIOC process, and the supervisor that replaces
it), ``gateway`` (the ``sf_bsread_gateway`` command, its ingest and status
poller), ``bridge`` (``sf_bsread_ca_bridge``: CA PVs -> bsread),
``environment`` (EPICS variables with loopback defaults). The type mapping
is pure and lives in ``ca.camapping``.
"""

"""EPICS Channel Access: the gateway that serves a buffer as PVs, and the bridge that brings PVs into a stream.

``server`` (the caproto pieces: PVs that follow a stream, access by peer
address, a hardened context), ``gateway`` (the ``sf_bsread_gateway``
process), ``bridge`` (``sf_bsread_ca_bridge``: CA PVs -> bsread),
``environment`` (EPICS variables with loopback defaults). The type mapping
is pure and lives in ``ca.camapping``.
"""

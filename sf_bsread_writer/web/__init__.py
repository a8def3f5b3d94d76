"""The web service ``sf_bsread_web``: a buffer over HTTP and one websocket per client (docs/web-api.md).

Its own process, like the CA gateway: the buffer's ingest never shares a GIL
with web clients. ``service`` is the command and the I/O shell (aiohttp, the
feed reader thread), ``app`` the HTTP and websocket handlers, ``ranges`` the
past ranges out of the replay endpoint, ``auth`` the tokens. What clients
get is decided in the pure ``web.live`` and ``web.range_query``.
"""

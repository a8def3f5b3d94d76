"""The buffer: one bsread stream into a ring, served live, replayed to writers, and over HTTP.

``service`` (the Buffer: sockets and the loop thread), ``replay_endpoint``
(the ROUTER and its pure sessions), ``http_app`` (/status, /statistics,
/metrics), ``children`` (the supervised CA gateway, later the web
service), ``cli`` (``sf_bsread_buffer``).
"""

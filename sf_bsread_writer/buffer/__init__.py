"""The buffer: one bsread stream into a ring, served live, replayed to writers, and over HTTP.

``settings`` (BufferSettings: every option, one record), ``service`` (the
Buffer: the loop thread and its sockets), ``ingest`` (one received message:
validated, timed, stored, counted), ``snapshot`` (the status the loop
publishes), ``feeds`` (the children's loopback feeds, carrying status),
``http_app`` (/status, /statistics, /metrics), ``children`` (the supervised
CA gateway and web service), ``cli`` (``sf_bsread_buffer``).
"""

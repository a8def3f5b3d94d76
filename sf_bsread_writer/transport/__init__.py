"""ZeroMQ shells shared by the services: moving whole bsread messages, the replay client, a live stream.

The buffer and the writer both move multipart messages at high rates; the
per-part machinery (and, later, a compiled path for whole messages) lives
here once. ``replay_client`` is the socket around ``replay.client_state``
(the writer's side of the replay protocol); ``direct`` reads a plain live
stream for ``sf_bsread_writer --direct``.
"""

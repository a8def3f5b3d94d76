"""The archive: a buffer's history on disk in NATS JetStream, beyond its RAM ring (docs/archive.md).

- ``records`` (pure): names, the stored form, headers, stream settings, a reader's range decisions;
- ``publisher``: the archiver, the buffer's child process (replay client -> JetStream);
- ``reader``: a pulse range from JetStream as a writer's source (``nats://HOST:PORT/NAME``);
- ``reach_back``: a buffer's replay session that reads what its ring no longer holds from the archive.

Importing this package loads nothing: ``records`` is pure and the shells load nats-py when imported.
"""

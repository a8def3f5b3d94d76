"""The pure core: every decision of the product, with no I/O.

Nothing in this package opens a socket, a file or a thread, imports zmq,
h5py, caproto, bottle or requests, or reads a clock: frames and ``now``
go in, typed records and decisions come out (tests/test_architecture.py
enforces the imports). The services around it are thin shells.

``protocol`` (the bsread wire format), ``ring`` (raw messages by seq,
pulse id and time), ``replay_messages`` / ``replay_session`` /
``replay_client`` (the replay protocol: vocabulary, the buffer's side of a
session, the writer's side), ``acquisition`` (which REST request is legal
when; when a quiet source ends a run), ``pulse_range`` (what belongs in
the file, what is missing), ``status`` (typed status snapshots and their
renderings), ``rates`` (rates over a window), ``timebase`` (a message's time:
source or receive clock), ``jsontext`` (strict, bounded JSON from the network),
``camapping`` (bsread -> Channel Access types).
"""

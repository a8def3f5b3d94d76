"""The replay protocol, the whole of it: the vocabulary (``messages``), the buffer's side of a session
(``session``, pure) and its ROUTER (``endpoint``), the writer's side (``client_state``, pure) and its
DEALER (``client``). docs/replay-protocol.md is the prose."""

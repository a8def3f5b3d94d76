"""The archive on a 3-server JetStream cluster (replicas 3): one server killed with kill -9 mid-stream.

Archiving and a range read go on, nothing is lost or stored twice, and the
killed server rejoins and is current again. Three real ``nats-server``s on
loopback, routes between them, stores in ``tmp_path``; cleaned up by pid.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from sf_bsread_writer.archive.reader import ArchiveSource
from sf_bsread_writer.replay.messages import Data, End, Gap
from tests.helpers import NATS_SERVER, NatsServer, free_port, wait_for
from tests.test_archive import archive_status, archived_up_to, small_message
from tests.test_buffer import push_source, running_buffer

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (Debian package "
                                "nats-server; .ci/run installs it)")

DEADLINE = 60.0


@pytest.fixture
def cluster(tmp_path):
    cluster_ports = [free_port() for _ in range(3)]
    servers = []
    try:
        for index in range(3):
            routes = [port for other, port in enumerate(cluster_ports) if other != index]
            servers.append(NatsServer(tmp_path / f"n{index}", name=f"n{index}",
                                      cluster=(cluster_ports[index], routes)))
        yield servers
    finally:
        for server in servers:
            server.stop()


def stream_info(url: str, stream: str):
    import nats

    async def info():
        connection = await nats.connect(url, max_reconnect_attempts=0)
        try:
            return await connection.jetstream().stream_info(stream)
        finally:
            await connection.close()

    return asyncio.run(info())


def test_one_of_three_servers_killed_mid_stream_nothing_lost_and_it_rejoins(cluster):
    urls = ",".join(server.url for server in cluster)
    archive = f"{urls}/CLUSTER"
    with push_source() as (source, address), \
            running_buffer(address, max_clock_skew=1e9, archive=urls, name="CLUSTER", archive_replicas=3) as buffer:
        wait_for(lambda: archive_status(buffer).state == "archiving", DEADLINE, message="archiving on the cluster")
        for pulse_id in range(1, 101):
            source.send_multipart(small_message(pulse_id))
        wait_for(lambda: archived_up_to(buffer, 100), DEADLINE, message="100 archived")
        info = stream_info(cluster[0].url, "sfbs_CLUSTER")
        assert info.config.num_replicas == 3
        leader = next(server for server in cluster if server.name == info.cluster.leader)
        survivors = [server for server in cluster if server is not leader]

        # A range read in flight across the kill, from a survivor.
        events: list = []
        reader = ArchiveSource(f"{survivors[0].url}/CLUSTER", start_pulse_id=1, stop_pulse_id=300).start()

        def read() -> None:
            while not events or not isinstance(events[-1], End):
                event = reader.receive(0.2)
                if event is not None:
                    events.append(event)
        thread = threading.Thread(target=read, daemon=True)
        thread.start()

        leader.kill()  # kill -9 the stream's leader, mid-stream
        for pulse_id in range(101, 301):
            source.send_multipart(small_message(pulse_id))
        status = wait_for(lambda: archived_up_to(buffer, 300), DEADLINE, message="300 archived after the kill")
        assert status.lost == 0 and status.unarchived_at_start == 0
        thread.join(DEADLINE)
        reader.close()
        assert [event.pulse_id for event in events if isinstance(event, Data)] == list(range(1, 301))
        assert not [event for event in events if isinstance(event, Gap)]

        leader.start()  # it rejoins on its own store and catches up
        def current() -> bool:
            info = stream_info(survivors[0].url, "sfbs_CLUSTER")
            replicas = info.cluster.replicas or []
            return info.state.messages == 300 and len(replicas) == 2 and all(r.current for r in replicas)
        wait_for(current, DEADLINE, interval=0.2, message="the killed server current again")
    stored = []
    with ArchiveSource(f"{leader.url}/CLUSTER", start_pulse_id=1, stop_pulse_id=300) as again:
        wait_for(lambda: (event := again.receive(0.2)) is not None and stored.append(event) is None
                 and isinstance(event, End), DEADLINE, message="the range read from the rejoined server")
    assert [event.pulse_id for event in stored if isinstance(event, Data)] == list(range(1, 301))

"""A plain TCP socket between two worker processes: the yardstick for the parameter server.

``tcp_gbps(client, sender, receiver, nbytes)`` moves ``nbytes`` from a task on ``sender`` to a
task on ``receiver`` over one socket between their hosts (the addresses the workers listen on, so
across the emulated links when the workers are in network namespaces) and returns GB/s as the
receiver saw it: from accepting the connection to the last byte, into one preallocated buffer.
What a push or a fetch of the same size achieves between the same two processes in the same
run, divided by this, is the share of the wire the parameter server uses.
"""
from __future__ import annotations

import socket
import time
import uuid

import numpy as np
from distributed import Queue, get_worker

CHUNK = 1 << 22  # bytes per send/recv call
DEADLINE = 120.0  # seconds either side waits for the other


def tcp_gbps(client, sender: str, receiver: str, nbytes: int) -> float:
    """GB/s of ``nbytes`` over one socket from worker ``sender`` to worker ``receiver``."""
    ports = Queue(f"tcp-yardstick-{uuid.uuid4().hex[:8]}", client=client)
    got = client.submit(_receive, ports.name, nbytes, workers=[receiver], pure=False)
    sent = client.submit(_send, ports.name, nbytes, workers=[sender], pure=False)
    seconds = got.result(timeout=DEADLINE)
    sent.result(timeout=DEADLINE)
    return nbytes / seconds / 1e9


def _host() -> str:
    return get_worker().address.split("://")[-1].rsplit(":", 1)[0]


def _receive(queue: str, nbytes: int) -> float:
    buf = np.ones(nbytes, np.uint8)  # touched: page faults are not the socket's cost
    view = memoryview(buf)
    with socket.create_server((_host(), 0)) as server:
        server.settimeout(DEADLINE)
        Queue(queue).put(server.getsockname()[:2], timeout=DEADLINE)
        conn, _ = server.accept()
    with conn:
        conn.settimeout(DEADLINE)
        n, start = 0, time.perf_counter()  # the sender writes as soon as it has connected
        while n < nbytes:
            k = conn.recv_into(view[n:n + CHUNK])
            if not k:
                raise ConnectionError(f"tcp yardstick: sender closed after {n} of {nbytes} bytes")
            n += k
        seconds = time.perf_counter() - start
        conn.sendall(b"k")
    return seconds


def _send(queue: str, nbytes: int) -> None:
    payload = memoryview(np.ones(nbytes, np.uint8))
    host, port = Queue(queue).get(timeout=DEADLINE)
    with socket.create_connection((host, port), timeout=DEADLINE) as conn:
        for i in range(0, nbytes, CHUNK):
            conn.sendall(payload[i:i + CHUNK])
        conn.recv(1)  # the receiver has everything

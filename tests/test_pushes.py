"""The push schedule every parameter-server client follows (``ps.pushes``), as a pure object:
how many pushes travel, how many buffers exist, what staleness each acknowledgement gives."""
from __future__ import annotations

import pytest

from daskbelief.ps.pushes import PushWindow, fetch_due, push_due


@pytest.mark.parametrize("overlap,max_in_flight", [(False, 3), (True, 1), (True, 3)])
def test_pushes_in_flight_and_buffers_stay_within_the_window(overlap, max_in_flight):
    window = PushWindow(8, max_in_flight, overlap)
    limit = max_in_flight if overlap else 0
    in_flight_seen, version = [], 0
    for step in range(20):
        if window.must_settle():
            window.settled([(version + 1, version - 1)])
            version += 1
        buf = window.buffer()
        window.launch([f"reply-{step}"], buf, [version])
        while window.over():
            assert window.oldest()[0][0].startswith("reply-")
            window.settled([(version + 1, version - 1)])
            version += 1
        in_flight_seen.append(len(window.flight))
    assert max(in_flight_seen) == limit and window.made == limit + 1
    assert set(window.staleness) == {1}  # each settled push: one update between base and its own
    assert window.drop() == limit and not window.flight and len(window.free) == window.made


def test_a_buffer_released_or_dropped_is_reused_not_remade():
    window = PushWindow(4, 2, True)
    first = window.buffer()
    window.release(first)
    assert window.buffer() is first and window.made == 1
    window.launch(["r"], first, [0])
    assert window.drop() == 1 and window.buffer() is first


def test_fetch_and_push_follow_n_fetch_and_n_push():
    assert [s for s in range(10) if fetch_due(s, 3)] == [3, 6, 9]  # step 0 uses the first fetch
    assert [push_due(k, 4) for k in (1, 3, 4, 5)] == [False, False, True, True]

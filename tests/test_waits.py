"""The one way to wait: each wait ends with the value, with what ``give_up`` says, or on its
deadline with an error naming what it waited for."""
from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from daskbelief import waits


def counter_reaching(n: int):
    """A check that is truthy (the call's number) from its ``n``-th call on."""
    calls = itertools.count(1)
    return lambda: (lambda k: k if k >= n else None)(next(calls))


@pytest.mark.parametrize("wait", ["until", "until_async"])
def test_until_returns_the_first_truthy_value_gives_up_when_told_and_names_what_it_waited_for(wait):
    def run(check, **kwargs):
        call = getattr(waits, wait)(check, every=0.001, **kwargs)
        return asyncio.run(call) if wait == "until_async" else call

    assert run(counter_reaching(3), timeout=10, what="three calls") == 3
    with pytest.raises(waits.WaitTimeout, match="gave up after 0s waiting for a check that never"):
        run(lambda: 0, timeout=0.05, what="a check that never holds")
    with pytest.raises(KeyError, match="stopped"):
        run(lambda: None, timeout=10, what="x", give_up=lambda: KeyError("stopped"))


def test_result_waits_in_slices_and_stops_on_give_up_or_deadline():
    from concurrent.futures import Future

    done = Future()
    threading.Timer(0.05, done.set_result, ["value"]).start()
    assert waits.result(done, timeout=10, every=0.01, what="a timer") == "value"
    never = Future()
    with pytest.raises(waits.WaitTimeout, match="waiting for a future never set"):
        waits.result(never, timeout=0.05, every=0.01, what="a future never set")
    asked = []

    def third_time():
        asked.append(1)
        return RuntimeError("its worker left") if len(asked) == 3 else None

    with pytest.raises(RuntimeError, match="its worker left"):
        waits.result(never, timeout=10, every=0.01, what="x", give_up=third_time)
    assert len(asked) == 3  # asked between slices, until it said stop


def test_read_failures_reads_what_fails_after_nobody_awaits_it():
    """A task given up on that fails later is read when it ends: asyncio reports nothing as
    never retrieved. Without ``read_failures`` it does (the control), so the check can fail."""
    import gc

    def unread_reports(read: bool) -> list:
        reports = []

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _, context: reports.append(context["message"]))
            gate = asyncio.Event()

            async def fails_later():
                await gate.wait()
                raise OSError("Unable to contact Actor's worker")
            task = asyncio.ensure_future(fails_later())
            if read:
                waits.read_failures([task])
            gate.set()  # nobody awaits the task any more: it fails on its own
            await asyncio.sleep(0.05)
            del task
            gc.collect()
        asyncio.run(main())
        return reports

    assert unread_reports(read=False) == ["Task exception was never retrieved"]
    assert unread_reports(read=True) == []

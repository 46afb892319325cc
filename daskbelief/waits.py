"""The one way to wait: every wait has a deadline, and when it gives up it says what it waited for.

``until`` polls a condition (``until_async`` inside a coroutine), ``result`` waits for a future
(a Dask future, an actor call's future, or a ``concurrent.futures.Future``) in slices,
``result_async`` does the same inside a coroutine.
Between slices an optional ``give_up()`` is asked whether waiting still makes sense: it returns
an exception to raise (e.g. the worker that should answer is gone) or None to keep waiting. This
is how a caller stops waiting for an actor on a dead worker, whose reply distributed 2026.8 may
never deliver.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable


class WaitTimeout(TimeoutError):
    """A wait ran past its deadline; the message names what was awaited and for how long."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"gave up after {seconds:.0f}s waiting for {what}")
        self.what, self.seconds = what, seconds


def until(check: Callable, *, timeout: float, what: str, every: float = 0.1, give_up=None):
    """Call ``check()`` every ``every`` seconds until it returns something truthy; return that.
    Raises ``WaitTimeout`` after ``timeout`` seconds, or what ``give_up()`` returns."""
    polls = _polls(check, timeout, what, every, give_up)
    try:
        while True:
            time.sleep(next(polls))
    except StopIteration as done:
        return done.value


async def until_async(check: Callable, *, timeout: float, what: str, every: float = 0.1, give_up=None):
    """``until`` inside a coroutine: the event loop serves others between checks."""
    polls = _polls(check, timeout, what, every, give_up)
    try:
        while True:
            await asyncio.sleep(next(polls))
    except StopIteration as done:
        return done.value


def _polls(check, timeout: float, what: str, every: float, give_up):
    """``until``'s loop, without its sleeping: yields the seconds to sleep before the next check,
    returns the first truthy value ``check()`` gave."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        _stop_if(give_up)
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout)
        yield min(every, max(deadline - time.monotonic(), 0.0))


def result(future, *, timeout: float, what: str, every: float = 1.0, give_up=None):
    """The value of ``future``, awaited in slices of ``every`` seconds for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=max(min(every, deadline - time.monotonic()), 0.001))
        except TimeoutError:
            pass
        _stop_if(give_up)
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout)


def results(futures, *, timeout: float, what: str, every: float = 1.0, give_up=None) -> list:
    """The values of ``futures`` in order, all within one deadline of ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    return [result(f, timeout=max(deadline - time.monotonic(), 0.001), what=what, every=every,
                   give_up=give_up) for f in futures]


async def result_async(awaitable, *, timeout: float, what: str, every: float = 1.0, give_up=None):
    """``result`` for a coroutine: await ``awaitable`` in slices, cancelling it on giving up."""
    task = asyncio.ensure_future(awaitable)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(min(every, deadline - time.monotonic()), 0.001))
            if done:
                return task.result()
            _stop_if(give_up)
            if time.monotonic() >= deadline:
                raise WaitTimeout(what, timeout)
    except BaseException:
        task.cancel()
        read_failures([task])  # a cancelled gather ends with CancelledError as its exception
        raise


def read_failures(tasks) -> None:
    """Read each asyncio task's failure when it ends, also once nobody awaits it any more (a
    call given up on, whose reply then fails): asyncio would report it as never retrieved."""
    for task in tasks:
        task.add_done_callback(_read_failure)


def _read_failure(task) -> None:
    if not task.cancelled():
        task.exception()


def _stop_if(give_up) -> None:
    error = give_up() if give_up is not None else None
    if error is not None:
        raise error

"""Sandblaster's backup-task policy: a pure function of start and end times, no cluster."""
from __future__ import annotations

import pytest

from daskbelief.train.backup import portions_to_back_up


def finished(n: int, end: float = 0.0, duration: float = 1.0) -> dict:
    """Portions 0..n-1 finished at ``end`` after ``duration`` seconds each."""
    return {p: (end, duration) for p in range(n)}


def test_nothing_is_copied_before_most_portions_are_done():
    running = {18: 0.0, 19: 0.0}
    assert portions_to_back_up(100.0, running, finished(8), total=20) == []  # 8 of 20 done
    assert portions_to_back_up(100.0, running, finished(14), total=20) == []  # 70% < 75%
    assert portions_to_back_up(100.0, running, finished(15), total=20) == [15, 16, 17, 18, 19]


def test_a_running_portion_is_copied_once_it_runs_much_longer_than_the_typical_one():
    running = {8: 10.0, 9: 7.5}  # start times; the typical portion takes 1 s
    done = finished(8, end=10.0)
    assert portions_to_back_up(11.0, running, done, total=10) == [9]
    assert portions_to_back_up(12.0, running, done, total=10) == [9]  # 8 at exactly 2 s: not yet
    assert portions_to_back_up(12.1, running, done, total=10) == [8, 9]


def test_a_portion_still_waiting_in_the_tail_is_queued_behind_a_straggler():
    done = {p: (5.0 + p, 1.0) for p in range(8)}  # the 8th finished at t=12: the tail begins
    running = {8: 11.9}
    assert portions_to_back_up(13.9, running, done, total=10) == []  # 9 waits since 12: 1.9 s
    assert portions_to_back_up(14.1, running, done, total=10) == [8, 9]
    assert portions_to_back_up(14.1, running, done, total=10, launched={9}) == [8]


def test_the_limit_is_strict_and_follows_the_median_not_the_mean():
    done = finished(8)
    done[6] = done[7] = (0.0, 100.0)  # two slow finishers do not make slowness typical
    assert portions_to_back_up(2.0, {8: 0.0}, done, total=9) == []  # exactly 2 x median
    assert portions_to_back_up(2.01, {8: 0.0}, done, total=9) == [8]
    assert portions_to_back_up(4.0, {8: 0.0}, done, total=9, slow_factor=5.0) == []


def test_tiny_portions_are_not_copied_for_a_hiccup():
    done = finished(8, duration=0.002)  # 2 ms portions: 2 x median is 4 ms
    assert portions_to_back_up(0.04, {8: 0.0, 9: 0.0}, done, total=10) == []  # 40 ms late: no
    assert portions_to_back_up(0.06, {8: 0.0, 9: 0.0}, done, total=10) == [8, 9]
    assert portions_to_back_up(0.04, {8: 0.0, 9: 0.0}, done, total=10, min_late=0.0) == [8, 9]


def test_a_portion_already_copied_is_never_copied_again():
    running = {8: 0.0, 9: 0.0}
    assert portions_to_back_up(50.0, running, finished(8), total=10, launched={8}) == [9]
    assert portions_to_back_up(50.0, running, finished(8), total=10, launched={8, 9}) == []


def test_too_few_finished_portions_say_nothing_about_typical():
    half = {"min_done_fraction": 0.5}
    assert portions_to_back_up(50.0, {2: 0.0}, finished(2), total=3, **half) == []  # 2 < 3
    assert portions_to_back_up(50.0, {2: 0.0}, finished(2), total=3, min_done=2, **half) == [2]
    assert portions_to_back_up(50.0, {}, {}, total=0) == []


@pytest.mark.parametrize("fraction,expect", [(0.0, [8, 9]), (0.9, []), (0.8, [8, 9])])
def test_the_done_fraction_is_a_setting(fraction, expect):
    assert portions_to_back_up(9.0, {8: 0.0}, finished(8), total=10,
                               min_done_fraction=fraction) == expect

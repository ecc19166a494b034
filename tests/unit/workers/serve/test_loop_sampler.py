"""The step profile's stack sampler counts where a thread spends its wall time, blocked calls included."""

from __future__ import annotations

import sys
import threading
import time

from stratus_workers.serve.loop import StackSampler


def _blocked(until: threading.Event) -> None:
    until.wait(5.0)  # blocked in C, the interpreter lock released


def _spinning(seconds: float) -> int:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # Python code, holding the interpreter lock
        n += 1
    return n


def test_samples_split_between_a_blocked_wait_and_python_code() -> None:
    released = threading.Event()
    switch = sys.getswitchinterval()
    sampler = StackSampler(threading.get_ident(), interval=0.001)
    sampler.start()
    try:
        waiter = threading.Timer(0.3, released.set)
        waiter.start()
        _blocked(released)
        _spinning(0.3)
        taken = sampler.take()
    finally:
        sampler.halt.set()
        sampler.join()
        sys.setswitchinterval(switch)
    functions = dict(taken["functions"])
    assert taken["samples"] > 100
    blocked = functions.get(f"_blocked test_loop_sampler.py:{_blocked.__code__.co_firstlineno}", 0.0)
    spinning = functions.get(f"_spinning test_loop_sampler.py:{_spinning.__code__.co_firstlineno}", 0.0)
    # 0.3 s each: the shares come out near a half each (the switch interval keeps Python code from being undersampled).
    assert 0.3 < blocked < 0.7 and 0.3 < spinning < 0.7, taken
    assert sampler.take()["samples"] < 5  # counting starts anew

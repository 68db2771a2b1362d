"""Spare trial processes (sweep/trial_process.py): started ahead, imports done, one trial each."""

from __future__ import annotations

import threading
import time

from sweep.trial_process import Spares


def test_a_spare_outlives_the_thread_that_asked_for_it():
    """PR_SET_PDEATHSIG kills a child when the thread that started it ends: a spare asked for
    by a trial's thread (which ends with that trial) must still live for the next trial."""
    spares = Spares()
    asking = threading.Thread(target=spares.prepare, args=({"OMP_NUM_THREADS": "1"},))
    asking.start()
    asking.join()
    proc = spares.ready({"OMP_NUM_THREADS": "1"}, timeout_s=120)
    time.sleep(1.0)
    assert proc.poll() is None  # alive, waiting for its spec
    assert spares.take({"OMP_NUM_THREADS": "2"}) is None  # another environment: no spare
    spares.close()
    assert proc.wait(timeout=30) == 0  # told there is no trial: exits cleanly


def test_several_spares_for_trials_that_start_together():
    spares = Spares()
    env = {"OMP_NUM_THREADS": "1"}
    spares.prepare(env, 2)
    spares.prepare(env, 2)  # already on their way: no more
    first = spares.ready(env, timeout_s=120)
    deadline = time.monotonic() + 120
    while len(spares.waiting.get(tuple(env.items()), [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spares.take(env) is first
    second = spares.take(env)
    assert second is not None and second is not first
    assert spares.take(env) is None  # two asked for, two given
    for proc in (first, second):
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    spares.close()

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

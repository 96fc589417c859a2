#!/usr/bin/env python3
"""A probe of host stalls, run by bench.py beside every measurement.

On a shared virtual machine the host sometimes does not run this guest's
vCPUs for tens of milliseconds; whatever runs then (the server, loadgen)
is late, and a round's p99 measures the host, not the server. This probe
sleeps 2 ms at a time under SCHED_FIFO (when allowed: as root), so that
inside the guest nothing but interrupts can hold it back: when it wakes
much later than asked, the whole machine was held back.

It prints "ready" once started, and on SIGTERM one JSON line (it also
ends, silently, once its parent is gone):
  policy    SCHED_FIFO, or SCHED_OTHER when it could not raise itself (its
            lateness then includes the guest's own load and says little)
  worst_ms  the latest wake-up, beyond the 2 ms asked
  late_ms   the total of the wake-ups more than 1 ms late
Python 3.11 standard library only; it uses about 500 wake-ups a second.
"""

import json
import os
import signal
import time

PERIOD_S = 0.002
LATE_S = 0.001


def main():
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
        policy = "SCHED_FIFO"
    except (OSError, AttributeError):
        policy = "SCHED_OTHER"
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    worst = late_total = 0.0
    parent = os.getppid()
    print("ready", flush=True)
    # Also ends if bench.py is gone (killed), not to outlive it.
    while not stopping and os.getppid() == parent:
        t = time.monotonic()
        time.sleep(PERIOD_S)
        late = time.monotonic() - t - PERIOD_S
        worst = max(worst, late)
        if late > LATE_S:
            late_total += late
    print(json.dumps({"policy": policy, "worst_ms": worst * 1e3, "late_ms": late_total * 1e3}), flush=True)


if __name__ == "__main__":
    main()

"""Python's cyclic garbage collector, held off while the guest waits.

A collection of the oldest generation walks every tracked object; in a process that has built
up a large heap (an orchestrator, a test run) one pass takes tens of milliseconds, and it runs in
whichever thread happens to allocate. Inside the handshake or the downtime that is time the guest
is kept waiting, so the collector is off there and back on afterwards. Nesting and threads are
counted: it comes back on when the last holder leaves, and only if it was on before the first.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()

"""Thread pools whose threads run at a lower CPU priority than the rest of the process."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def pool(name: str, threads: int, nice: int = 0) -> ThreadPoolExecutor:
    """`threads` threads named `name`, each at `nice` (Linux gives each thread its own)."""
    return ThreadPoolExecutor(
        max_workers=threads, thread_name_prefix=name, initializer=_lower, initargs=(nice,)
    )


def _lower(nice: int) -> None:
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

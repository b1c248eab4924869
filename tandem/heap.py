"""A serving process's heap: the start-up heap kept out of the cyclic garbage collector's way,
what start-up freed and large blocks once freed handed back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import platform
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h). Setting either stops glibc moving both by itself.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Larger blocks are mapped on their own and unmapped when freed. A request's images, tensors
# and bodies stay under it (a drafted photo, a 224x224 float tensor); a large PNG's decoding
# (Pillow allocates 16 MiB blocks) goes over.
MMAP_THRESHOLD = 4 * 1024 * 1024
# Free memory atop a heap kept for the next requests rather than handed back and asked for
# again: glibc's default, 128 KiB, is under one request's photo. bench.ab at 16 clients
# against glibc left to itself: 8 MiB read a p50 1.4 % higher (slower in 8 of 10 turns),
# 64 MiB 3.4 % lower (faster in 10 of 10).
TRIM_THRESHOLD = 64 * 1024 * 1024


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """Serve within the block: large freed blocks go back to the system (see
    return_large_blocks), and what start-up allocated (modules, the app, the models' wrappers)
    is never scanned by a collection, which otherwise walks that whole heap (about 90,000
    objects in a proxy) with the GIL held, stalling every request in flight for 40 to 60 ms."""
    return_large_blocks()
    gc.collect()
    give_back_free_memory()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # objects that die after serving can be collected again


def give_back_free_memory() -> bool:
    """Hand the heaps' free memory back to the system now (glibc's malloc_trim; False
    elsewhere). Start-up frees much that glibc keeps: the check that classifies the bundled
    photo with each model before serving (check_model) left a proxy 33 to 50 MB larger."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def return_large_blocks() -> bool:
    """Give large freed blocks back to the system at once (glibc only; False elsewhere).

    glibc maps a block over its threshold on its own, but raises the threshold to the size of
    each such block freed, up to 32 MiB: after the first large image, Pillow's 16 MiB blocks
    came from heaps that kept them. Sixteen 40 MP PNGs at once left a proxy at 1.45 GB of
    resident memory, all of it free, where it had started at 0.27 GB; with the threshold fixed
    it went back to 0.33 GB."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and trim)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library, if it is glibc: platform.libc_ver reads the interpreter's
    file to tell, so once."""
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None

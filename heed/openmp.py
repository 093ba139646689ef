"""Keep torch's OpenMP thread pools from slowing the engine's worker thread down.

libgomp (torch's OpenMP runtime on Linux) gives every thread that runs a
parallel region a pool of its own, and while the pools together hold more
threads than the machine has cores, a team stops spinning between parallel
regions and sleeps on a futex instead: every small op of a decoding step then
waits for its helper threads to wake up. The app loads the model on one thread
(one pool) and generates on the engine's worker (a second pool). Measured on
the embedded model (fp32, 2 threads, 2 cores; ``python bench/openmp_pools.py``
-> ``bench/results/openmp_pools.json``), the worker with the loading thread's
pool given back: 8 rows at once 1.33x the tokens/s (82 against 62), one row
1.13x (18.7 against 16.5).

``give_back_pool`` frees the calling thread's pool (OpenMP 5's
``omp_pause_resource_all``); its next parallel region makes a new one. Only
libgomp is touched: other runtimes (LLVM's libomp on macOS) pause every
thread's pool at once, which is not what a thread that only waits should do.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import re

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t's soft pause: libgomp ends the calling thread's pool threads
_LIBGOMP = re.compile(r"/libgomp[^/]*\.so(\.\d+)*$")  # libgomp.so.1, libgomp.so.1.0.0, libgomp-a34b3233.so.1.0.0


def _loaded_libgomp() -> list[str]:
    """Paths of the libgomp this process has loaded (torch's own copy first)."""
    try:
        with open("/proc/self/maps") as f:
            # address perms offset dev inode path: the path is the sixth field and may hold spaces.
            fields = [line.rstrip("\n").split(maxsplit=5) for line in f]
    except OSError:  # not Linux: no /proc
        return []
    paths = [f[5] for f in fields if len(f) == 6 and _LIBGOMP.search(f[5])]
    return sorted(dict.fromkeys(paths), key=lambda p: "torch" not in p)


@functools.lru_cache(maxsize=1)
def _pause():
    import torch  # noqa: F401  (loads torch's OpenMP runtime, whose pools are the ones to free)

    for path in _loaded_libgomp():
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError) as exc:  # an old libgomp without OpenMP 5
            log.debug("no omp_pause_resource_all in %s: %s", os.path.basename(path), exc)
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    log.debug("no libgomp with omp_pause_resource_all loaded: threads keep their OpenMP pools")
    return None


def give_back_pool() -> bool:
    """Free the calling thread's OpenMP pool (call it before waiting on another thread's torch work).

    True when a libgomp runtime took the call (whether or not the thread had a
    pool); False where there is none to ask, or from inside a parallel region.
    """
    fn = _pause()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0

"""Give freed heap memory back to the OS in long-running replicas.

A large image (a 24 MP photo, a 1080p frame at full resolution) makes a replica allocate hundreds
of MB for decoding, resizing and ONNX Runtime buffers. The memory is freed when the request ends,
but glibc keeps it in its arenas, so the replica's RSS stays at its peak for good; and crops of every
width spread over threads fragment the arenas further. ``malloc_trim(0)`` returns the free pages,
including those in the middle of a heap (glibc ≥ 2.8 madvises them away).

:class:`HeapTrimmer` runs it from a daemon thread when the process has grown by ``min_growth_mb``
since the last trim, checked every ``interval_s``, so a replica under steady load is not trimmed
over and over. ctypes releases the GIL for the call, and glibc takes each arena's lock in turn,
so requests keep running while it trims.

``LIVELENS_HEAP_TRIM_S`` sets the interval for every replica (``0`` turns trimming off; the
memory benchmark deploys once each way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ENV_INTERVAL = "LIVELENS_HEAP_TRIM_S"
DEFAULT_INTERVAL_S = 15.0
DEFAULT_MIN_GROWTH_MB = 32.0


def _libc(symbol: str, argtypes: list, restype: type):
    """A function of the C library, or ``None`` where it has none (musl, macOS lack these)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = getattr(ctypes.CDLL(name), symbol)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _libc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS)."""
    return _libc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


#: ``mallopt``'s parameter number for the mmap threshold (glibc's ``M_MMAP_THRESHOLD``).
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, given back when freed.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MB on 64-bit), after
    which frame-sized buffers (a detector's image pyramid, a decoded 1080p frame) come from the
    arenas instead; with several requests in flight the heap then rises and falls by hundreds of MB
    with the work, and the trimmer only catches up every ``interval_s``. A fixed threshold turns
    that dynamic raise off (``mallopt`` documents this). The price is a page fault per page of
    each large buffer; its effect on latency is for the serving benchmark to show.

    Returns:
        True when the C library took the setting (glibc), False otherwise.
    """
    fn = _libc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return fn is not None and fn(_M_MMAP_THRESHOLD, int(nbytes)) == 1


def rss_mb() -> float:
    """This process's resident set size in MB (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class HeapTrimmer:
    """Trims the heap when RSS has grown by ``min_growth_mb`` since the last trim.

    Attributes:
        interval_s: How often RSS is checked.
        min_growth_mb: Growth since the last trim that triggers the next one.
        trims: Trims done so far.
        released_mb: RSS given back in all, as measured before and after each trim.
    """

    interval_s: float = DEFAULT_INTERVAL_S
    min_growth_mb: float = DEFAULT_MIN_GROWTH_MB
    trims: int = 0
    released_mb: float = 0.0
    _floor_mb: float = field(default=0.0, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._trim = _libc_trim()
        self._floor_mb = rss_mb()

    @property
    def available(self) -> bool:
        """Whether this C library can trim at all."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim now if the process grew enough since the last trim; True when it trimmed."""
        if self._trim is None:
            return False
        before = rss_mb()
        if before - self._floor_mb < self.min_growth_mb:
            # Also follow RSS down (memory freed by Python's own allocator) so growth is measured
            # from where the process really stands.
            self._floor_mb = min(self._floor_mb, before)
            return False
        self._trim(0)
        after = rss_mb()
        self.trims += 1
        self.released_mb += max(0.0, before - after)
        self._floor_mb = after
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.maybe_trim()
            except Exception:  # an optimisation must never take a replica down
                log.exception("heap trim failed; trimming stops in this process")
                return

    def start(self) -> HeapTrimmer:
        """Start the daemon thread (once)."""
        if self._thread is None and self.available and self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="livelens-heap-trim", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (tests; replicas just exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_PROCESS_TRIMMER: HeapTrimmer | None = None
_LOCK = threading.Lock()


def start_heap_trimmer() -> HeapTrimmer | None:
    """The process's trimmer, started on the first call (every replica calls it in its constructor).

    The first call also fixes glibc's mmap threshold (:func:`fix_mmap_threshold`): without it a
    replica's RSS swings by hundreds of MB with the frames in flight, and the trimmer alone only
    catches up later. ``LIVELENS_HEAP_TRIM_S=0`` leaves both off (the memory benchmark's baseline).

    Returns ``None`` when ``LIVELENS_HEAP_TRIM_S`` is ``0`` or the C library cannot trim.

    Raises:
        ValueError: ``LIVELENS_HEAP_TRIM_S`` is not a number ≥ 0.
    """
    global _PROCESS_TRIMMER
    raw = os.environ.get(ENV_INTERVAL, "")
    interval = float(raw) if raw.strip() else DEFAULT_INTERVAL_S
    if not (math.isfinite(interval) and interval >= 0):
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: want finite seconds ≥ 0 (0 turns trimming off)")
    if interval == 0:
        return None
    with _LOCK:
        if _PROCESS_TRIMMER is None:
            fix_mmap_threshold()  # frame-sized buffers are mapped and given back, not kept in the arenas
            trimmer = HeapTrimmer(interval_s=interval)
            if not trimmer.available:
                log.info("no malloc_trim in this C library; replica heaps are not trimmed")
                return None
            _PROCESS_TRIMMER = trimmer.start()
        return _PROCESS_TRIMMER

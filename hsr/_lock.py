"""A readers-writer lock for the indexes and caches: any number of concurrent searches, one writer.

The contract (docs/design.md, "Concurrency"): searches run in parallel with each other (the
kernels release the GIL); ``add``, ``remove``, ``rebuild`` (and ``CodeKVCache.add`` on the GPU) wait for the
searches in flight and block new ones while they run, so every search sees the index as it was
between two writes — never a half-merged forest or a half-grown array.

Reads nest (a search inside ``index.reading()``), and so do writes (``KVIndex.append`` writes
its values and calls ``add`` under one write). Readers do not wait for waiting writers, so a
nested read can never deadlock; a thread that reads may not start a write (a clear error
instead of a deadlock).
"""
from __future__ import annotations

import functools
import threading

__all__ = ["RWLock", "reads", "writes"]


class RWLock:
    """Many readers or one (re-entrant) writer."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._free = threading.Condition(self._mutex)
        self._readers: dict[int, int] = {}  # thread id -> 1 for each thread holding a read
        # a thread's read nesting depth: a nested read (plan and run inside attend, a search
        # inside index.reading()) then costs a thread-local increment, not the mutex
        self._local = threading.local()
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0  # writers waiting: only then does a last reader notify

    def held(self) -> str | None:
        """``"write"``, ``"read"`` or None: what the calling thread holds."""
        me = threading.get_ident()
        if self._writer == me:
            return "write"
        return "read" if me in self._readers else None

    def acquire_read(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth:  # already reading: no writer can be in, nothing to wait for
            self._local.depth = depth + 1
            return
        me = threading.get_ident()
        with self._mutex:
            if self._writer is not None and self._writer != me:
                while self._writer is not None:
                    self._free.wait()
            self._readers[me] = 1
        self._local.depth = 1

    def release_read(self) -> None:
        depth = self._local.depth - 1
        self._local.depth = depth
        if depth:
            return
        me = threading.get_ident()
        with self._mutex:
            del self._readers[me]
            if self._waiting and not self._readers:
                self._free.notify_all()

    def acquire_write(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._writer == me:
                self._depth += 1
                return
            if me in self._readers:
                raise RuntimeError("an index cannot be changed by a thread that is searching it "
                                   "(add/remove inside index.reading())")
            self._waiting += 1
            while self._writer is not None or self._readers:
                self._free.wait()
            self._waiting -= 1
            self._writer = me
            self._depth = 1

    def release_write(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._free.notify_all()

    def read(self) -> "_Held":
        """Context manager holding a read."""
        return _Held(self.acquire_read, self.release_read)

    def write(self) -> "_Held":
        """Context manager holding the write."""
        return _Held(self.acquire_write, self.release_write)

    def __getstate__(self):  # a lock is not state: a copy gets a fresh one
        return {}

    def __setstate__(self, state):
        self.__init__()


class _Held:
    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire, release):
        self._acquire = acquire
        self._release = release

    def __enter__(self):
        self._acquire()
        return self

    def __exit__(self, *exc):
        self._release()
        return False


def reads(method):
    """Decorator: run ``method`` under ``self._lock``'s read side."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        lock = self._lock  # acquire/release directly: a context manager object costs ~0.3 us
        lock.acquire_read()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release_read()
    return locked


def writes(method):
    """Decorator: run ``method`` under ``self._lock``'s write side."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        lock = self._lock
        lock.acquire_write()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release_write()
    return locked

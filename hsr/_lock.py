"""A fair readers-writer lock for the indexes and caches: any number of concurrent searches, one writer.

The contract (docs/design.md, "Concurrency"): searches run in parallel with each other (the
kernels release the GIL); ``add``, ``remove``, ``rebuild`` (and ``CodeKVCache.add`` on the GPU) wait for the
searches in flight and block new ones while they run, so every search sees the index as it was
between two writes — never a half-merged forest or a half-grown array.

Fairness: a waiting writer holds back new *top-level* reads, so it waits only for the searches
already in flight (without this, two threads searching in a loop kept a writer out for good).
The readers it held back go in as soon as that write ends, ahead of any next writer, so readers
cannot starve either: reads and writes alternate in phases.

Reads nest (a search inside ``index.reading()``), and so do writes (``KVIndex.append`` writes
its values and calls ``add`` under one write). A nested read only bumps the thread's read depth
and never waits, so a thread that reads cannot deadlock on a writer waiting for it; a thread
that writes may read. A thread that reads may not start a write (a clear error instead of a
deadlock). One caveat of any fair lock: a thread that holds a read of one lock and then starts
a top-level read of *another* may wait for that other lock's writer; the library never holds
reads of two indexes at once.
"""
from __future__ import annotations

import functools
import threading

__all__ = ["RWLock", "reads", "writes"]


class RWLock:
    """Many readers or one (re-entrant) writer; a waiting writer holds back new top-level reads.

    Phases alternate: the readers that a writer held back (or that arrived while it wrote) are
    admitted together when it releases, before the next writer goes in.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._free = threading.Condition(self._mutex)
        self._readers: dict[int, int] = {}  # thread id -> 1 for each thread holding a read
        # a thread's read nesting depth: a nested read (plan and run inside attend, a search
        # inside index.reading()) then costs a thread-local increment, not the mutex
        self._local = threading.local()
        self._writer: int | None = None
        self._depth = 0
        self._waiting = 0  # writers waiting: they hold back new top-level reads
        self._blocked = 0  # top-level readers waiting for a write phase to end
        self._admitted = 0  # readers let in by the last release_write, not yet in: writers wait
        self._phase = 0  # bumped by every release_write that ends a write phase

    def held(self) -> str | None:
        """``"write"``, ``"read"`` or None: what the calling thread holds."""
        me = threading.get_ident()
        if self._writer == me:
            return "write"
        return "read" if me in self._readers else None

    def acquire_read(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth:  # already reading: no writer can be in, and a waiting one waits for us
            self._local.depth = depth + 1
            return
        me = threading.get_ident()
        with self._mutex:
            if self._writer != me and (self._writer is not None or self._waiting):
                phase = self._phase
                self._blocked += 1
                try:
                    while self._phase == phase:
                        self._free.wait()
                except BaseException:  # interrupted while waiting: leave the counts whole
                    if self._phase == phase:
                        self._blocked -= 1
                    else:
                        self._admitted -= 1
                        self._free.notify_all()
                    raise
                self._admitted -= 1  # the release that changed the phase admitted us
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
            try:
                while self._writer is not None or self._readers or self._admitted:
                    self._free.wait()
            except BaseException:  # interrupted: the readers held back only by us may go
                self._waiting -= 1
                if self._writer is None and not self._waiting:
                    self._admit()
                raise
            self._waiting -= 1
            self._writer = me
            self._depth = 1

    def release_write(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._admit()

    def _admit(self) -> None:
        """A new read phase (under the mutex): every reader waiting now goes in before the
        next writer."""
        self._admitted += self._blocked
        self._blocked = 0
        self._phase += 1
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

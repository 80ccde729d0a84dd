"""The readers-writer lock (``hsr._lock.RWLock``) is fair: a waiting writer holds back new
top-level reads, nested reads never wait, and the readers held back go in before the next writer.

Every step is ordered by events and by the lock's own waiting counts (polled), not by sleeps
that hope a thread got somewhere; each wait is bounded, so a regression fails, never hangs.
"""
import threading
import time

import pytest

from hsr._lock import RWLock

WAIT = 5.0  # seconds: generous bound on any single step (they take microseconds)


def _until(cond, what):
    """Poll ``cond`` (a state another thread reaches by blocking in the lock) for up to WAIT s."""
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1e-4)


def _thread(fn):
    errors = []

    def target():
        try:
            fn()
        except BaseException as exc:  # pragma: no cover - reported by the test
            errors.append(exc)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, errors


def _join(*pairs):
    for t, errors in pairs:
        t.join(WAIT)
        assert not t.is_alive(), "a thread is still blocked in the lock"
        assert not errors, errors


def test_a_waiting_writer_holds_back_new_readers_but_not_nested_reads():
    lock = RWLock()
    order = []
    holding, release = threading.Event(), threading.Event()
    nested_done = threading.Event()

    def first_reader():
        with lock.read():
            order.append("r1 in")
            holding.set()
            _until(lambda: lock._waiting == 1 and lock._blocked == 1, "writer and reader 2 to wait")
            with lock.read():  # nested: passes the waiting writer (else a deadlock)
                with lock.read():
                    order.append("r1 nested")
            nested_done.set()
            release.wait(WAIT)
            order.append("r1 out")

    def writer():
        with lock.write():
            order.append("w")

    def second_reader():
        with lock.read():
            order.append("r2")

    r1 = _thread(first_reader)
    assert holding.wait(WAIT)
    w = _thread(writer)
    _until(lambda: lock._waiting == 1, "the writer to wait")
    r2 = _thread(second_reader)
    _until(lambda: lock._blocked == 1, "the second reader to wait behind the writer")
    assert nested_done.wait(WAIT), "a nested read deadlocked behind the waiting writer"
    assert order == ["r1 in", "r1 nested"]  # neither the writer nor reader 2 got in
    release.set()
    _join(r1, w, r2)
    assert order == ["r1 in", "r1 nested", "r1 out", "w", "r2"]
    assert lock.held() is None and not lock._readers and lock._admitted == lock._blocked == 0


def test_readers_held_back_go_in_before_the_next_writer():
    lock = RWLock()
    order = []
    in_write, release = threading.Event(), threading.Event()

    def writer1():
        with lock.write():
            in_write.set()
            release.wait(WAIT)
            order.append("w1")

    def reader(name):
        def run():
            with lock.read():
                order.append(name)
        return run

    def writer2():
        with lock.write():
            order.append("w2")

    w1 = _thread(writer1)
    assert in_write.wait(WAIT)
    readers = [_thread(reader(f"r{i}")) for i in range(3)]
    _until(lambda: lock._blocked == 3, "the readers to wait for the writer")
    w2 = _thread(writer2)
    _until(lambda: lock._waiting == 1, "the second writer to wait")
    release.set()
    _join(w1, *readers, w2)
    # one write phase, then the three readers together, then the next writer: neither side starves
    assert order[0] == "w1" and sorted(order[1:4]) == ["r0", "r1", "r2"] and order[4] == "w2"


def test_a_writer_may_read_and_writes_nest():
    lock = RWLock()
    with lock.write():
        with lock.read():  # a writer reading (e.g. a search inside index.writing())
            assert lock.held() == "write"
            with lock.write():
                pass
        assert lock.held() == "write"
    assert lock.held() is None
    with lock.read():
        assert lock.held() == "read"
        with pytest.raises(RuntimeError, match="searching"):
            lock.acquire_write()
    assert lock.held() is None


def test_an_interrupted_writer_lets_the_readers_it_held_back_go():
    lock = RWLock()
    holding, release, interrupt = threading.Event(), threading.Event(), threading.Event()
    wait = lock._free.wait
    writer_ident = []

    def interrupting_wait(timeout=None):  # a KeyboardInterrupt reaching the waiting writer
        if interrupt.is_set() and threading.get_ident() in writer_ident:
            raise KeyboardInterrupt
        return wait(timeout)

    lock._free.wait = interrupting_wait

    def first_reader():
        with lock.read():
            holding.set()
            release.wait(WAIT)

    def writer():
        writer_ident.append(threading.get_ident())
        with pytest.raises(KeyboardInterrupt):
            lock.acquire_write()

    got_in = threading.Event()

    def second_reader():
        with lock.read():
            got_in.set()

    r1 = _thread(first_reader)
    assert holding.wait(WAIT)
    w = _thread(writer)
    _until(lambda: lock._waiting == 1, "the writer to wait")
    r2 = _thread(second_reader)
    _until(lambda: lock._blocked == 1, "the reader to wait behind the writer")
    interrupt.set()
    with lock._mutex:
        lock._free.notify_all()
    _join(w)
    assert got_in.wait(WAIT), "a reader stayed blocked behind a writer that gave up"
    release.set()
    _join(r1, r2)
    assert lock._waiting == lock._blocked == lock._admitted == 0 and not lock._readers

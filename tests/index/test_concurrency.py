"""Readers and writers at once: no crash, and every search sees one state of the index.

With a threshold below every score a search reports every live key, so one consistent state
means: every query of a batch reports the same ids, and they are exactly the live ids of a
state between the writer's steps (a prefix of the ids for appends). Each test runs a bounded
number of rounds (a few seconds at most).
"""
import threading
import time

import numpy as np
import pytest

import hsr


def _run_writer(fn, errors, stop):
    def target():
        try:
            fn(stop)
        except Exception as exc:  # pragma: no cover - reported by the test
            errors.append(exc)
        finally:
            stop.set()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("method,d", [("tree", 8), ("code", 32), ("auto", 32)])
def test_appends_while_searching(method, d):
    rng = np.random.default_rng(0)
    K = rng.standard_normal((20000, d)).astype(np.float32)
    index = hsr.HSRIndex(K[:5000], method=method, buffer_size=256)
    errors, stop = [], threading.Event()

    def write(stop):
        for s in range(5000, len(K), 4):
            if stop.is_set():
                return
            index.add(K[s:s + 4])
            time.sleep(0.0002)  # let the searches interleave with the appends

    t = _run_writer(write, errors, stop)
    rounds = 0
    deadline = time.monotonic() + 4.0
    while not stop.is_set() and time.monotonic() < deadline:
        before = index.n_total
        lims, _, ids = index.range_search(K[:16], -1e30)
        after = index.n_total
        counts = np.diff(lims)
        assert (counts == counts[0]).all(), "queries of one batch saw different states"
        assert before <= counts[0] <= after
        assert np.array_equal(np.sort(ids[:counts[0]]), np.arange(counts[0]))
        c = index.count(K[:4], -1e30)
        assert (c == c[0]).all()
        rounds += 1
    stop.set()
    t.join(10)
    assert not errors, errors
    assert rounds >= 3


def test_removals_while_searching():
    rng = np.random.default_rng(1)
    K = rng.standard_normal((20000, 8)).astype(np.float32)
    index = hsr.HSRIndex(K, method="tree")
    errors, stop = [], threading.Event()
    order = rng.permutation(20000)

    def write(stop):
        for s in range(0, 15000, 50):
            if stop.is_set():
                return
            index.remove(order[s:s + 50])
            time.sleep(0.0005)

    t = _run_writer(write, errors, stop)
    deadline = time.monotonic() + 4.0
    while not stop.is_set() and time.monotonic() < deadline:
        lims, _, ids = index.range_search(K[:8], -1e30)
        counts = np.diff(lims)
        assert (counts == counts[0]).all()
        got = np.sort(ids[:counts[0]])
        assert len(np.unique(got)) == len(got)
    stop.set()
    t.join(10)
    assert not errors, errors


def test_kv_append_while_attending():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((12000, 32)).astype(np.float32)
    v = rng.standard_normal((12000, 16)).astype(np.float32)
    kv = hsr.KVIndex(k[:2000], v[:2000])
    errors, stop = [], threading.Event()

    def write(stop):
        for s in range(2000, 12000, 8):
            if stop.is_set():
                return
            kv.add(k[s:s + 8], v[s:s + 8])
            time.sleep(0.0005)

    t = _run_writer(write, errors, stop)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    deadline = time.monotonic() + 4.0
    while not stop.is_set() and time.monotonic() < deadline:
        out, info = hsr.hsr_attention(q, kv, kind="softmax", eps=1e-2, return_info=True)
        assert np.isfinite(out).all() and (info.dropped_bound <= 1e-2 + 1e-12).all()
        assert np.isfinite(hsr.hsr_attention(q, kv, kind="relu", alpha=2, bias=0.3)).all()
    stop.set()
    t.join(10)
    assert not errors, errors


def test_a_reader_cannot_write():
    index = hsr.HSRIndex(np.ones((10, 4), dtype=np.float32))
    with index.reading():
        with pytest.raises(RuntimeError, match="searching"):
            index.add(np.ones(4, dtype=np.float32))
    index.add(np.ones(4, dtype=np.float32))
    assert len(index) == 11


def _saver(path, rounds):
    import numpy as np

    import hsr

    rng = np.random.default_rng(3)
    for i in range(rounds):
        hsr.HSRIndex(rng.standard_normal((2000 + 100 * i, 16)).astype(np.float32)).save(path)


def test_loading_while_another_process_saves(tmp_path):
    """Saves are atomic (temporary file + rename): a reader in another process always loads a
    whole index, never a half-written file."""
    import multiprocessing as mp

    path = str(tmp_path / "shared.hsr")
    hsr.HSRIndex(np.ones((100, 16), dtype=np.float32)).save(path)
    proc = mp.get_context("spawn").Process(target=_saver, args=(path, 40))
    proc.start()
    loads = 0
    deadline = time.monotonic() + 60
    while proc.is_alive() and time.monotonic() < deadline:
        idx = hsr.HSRIndex.load(path)  # must never raise
        assert len(idx) in [100] + [2000 + 100 * i for i in range(40)]
        loads += 1
    proc.join(30)
    assert proc.exitcode == 0
    assert loads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["shared.hsr"]  # no temporary left behind

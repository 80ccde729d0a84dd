"""Progress on long work (hsr._progress): on stderr only on a terminal or with HSR_PROGRESS=1."""
import io

import numpy as np
import pytest

import hsr
import hsr._progress as P
import hsr.index.tree as T


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(P, "MIN_INTERVAL", 0.0)  # print every update
    monkeypatch.delenv("HSR_PROGRESS", raising=False)


def _count(stream, n=3):
    with P.Progress("work", total=n, unit="keys", stream=stream) as p:
        for _ in range(n):
            p.update(1)
    return stream.getvalue()


def test_silent_when_stderr_is_not_a_terminal(fast):
    assert _count(io.StringIO()) == ""


def test_prints_with_hsr_progress_1(fast, monkeypatch):
    monkeypatch.setenv("HSR_PROGRESS", "1")
    lines = _count(io.StringIO()).splitlines()  # not a terminal: one line per update
    assert lines[0] == "work: 1/3 keys, 33%, 0.0 s"
    assert lines[-1].startswith("work: 3/3 keys, ") and lines[-1].endswith(", done")


def test_terminal_rewrites_one_line_and_hsr_progress_0_silences_it(fast, monkeypatch):
    out = _count(_Tty())
    assert out.count("\r") >= 3 and out.endswith("done\n") and out.count("\n") == 1
    monkeypatch.setenv("HSR_PROGRESS", "0")
    assert _count(_Tty()) == ""


def test_throttled_to_about_two_lines_a_second(monkeypatch):
    monkeypatch.setenv("HSR_PROGRESS", "1")
    s = io.StringIO()
    with P.Progress("work", total=10_000, stream=s) as p:
        for _ in range(10_000):
            p.update(1)
    assert len(s.getvalue().splitlines()) <= 3  # the first update, the final line, at most one between


def test_stages_and_message(fast, monkeypatch):
    monkeypatch.setenv("HSR_PROGRESS", "1")
    s = io.StringIO()
    p = P.Progress("convert", total=2, unit="steps", stream=s)
    p.stage("read")
    p.message("a notice")
    p.stage("write")
    p.close()
    assert s.getvalue().splitlines() == [
        "convert: 0/2 steps, 0%, read, 0.0 s", "a notice", "convert: 1/2 steps, 50%, write, 0.0 s",
        "convert: 2/2 steps, 0.0 s, done"]
    monkeypatch.setenv("HSR_PROGRESS", "0")
    s = io.StringIO()
    q = P.Progress("convert", stream=s)
    q.stage("read")
    q.message("a notice")  # a notice prints whatever the setting
    q.close()
    assert s.getvalue() == "a notice\n"


@pytest.mark.parametrize("setting", [None, "1"])
def test_index_builds_report_over_the_threshold(fast, monkeypatch, capsys, setting):
    if setting:
        monkeypatch.setenv("HSR_PROGRESS", setting)
    monkeypatch.setattr(T, "PROGRESS_MIN_KEYS", 1000)
    rng = np.random.default_rng(0)
    K = rng.standard_normal((3000, 32)).astype(np.float32)
    small = hsr.HSRIndex(K[:999], method="code")
    small.range_search(K[:1], 1.0)
    assert capsys.readouterr().err == ""  # under the threshold: never
    code = hsr.HSRIndex(K, method="code")
    code.range_search(K[:1], 1.0)  # codes are made by the first search
    hsr.HSRIndex(K[:, :8], method="tree")
    err = capsys.readouterr().err
    if setting is None:  # pytest's stderr is not a terminal
        assert err == ""
    else:
        assert "hsr: coding keys: 3000/3000 keys" in err and "done" in err
        assert "hsr: building a tree over 3000 keys" in err and "partition" in err


def test_chunked_coding_gives_the_same_codes(monkeypatch):
    rng = np.random.default_rng(1)
    K = rng.standard_normal((T._PROGRESS_CHUNK + 5000, 16)).astype(np.float32)
    a = hsr.HSRIndex(K, method="code")
    a._catch_up()
    monkeypatch.setattr(T, "PROGRESS_MIN_KEYS", 1000)
    b = hsr.HSRIndex(K, method="code")
    b._catch_up()
    for name in ("codes", "scale", "err"):
        np.testing.assert_array_equal(getattr(a._codes, name), getattr(b._codes, name))
    assert a._codes.max_err == b._codes.max_err

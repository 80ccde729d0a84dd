"""A rank that fails mid-query makes every rank raise, within the timeout; nothing hangs.

Each scenario runs 3 gloo processes with a 4 s process-group timeout under a hard deadline
(the launcher kills what is left), so the test itself cannot hang."""

import pytest

from tests.distributed._launch import run_world

pytest.importorskip("torch.distributed")

TIMEOUT = 4.0


def _check_others(results, seconds, *, within):
    assert seconds < 55
    for r in (0, 2):
        res = results[r]
        assert res is not None and "error" not in res, res
        assert res["first"] is not None
        name, msg = res["seen"]
        assert name == "ShardError", (name, msg)
        assert res["elapsed"] < within, res["elapsed"]
    return [results[r]["seen"][1] for r in (0, 2)]


def test_a_rank_raising_is_reported_on_every_rank(tmp_path):
    results, seconds = run_world("raise", 3, tmp_path, timeout=TIMEOUT)
    msgs = _check_others(results, seconds, within=TIMEOUT)  # reported at once, not after the timeout
    for m in msgs:
        assert "rank 1" in m and "injected failure on rank 1" in m
    assert results[1]["seen"][0] == "RuntimeError"  # the failing rank raises its own exception
    for r in range(3):  # the group stays usable after a reported failure
        assert (results[r]["again"] == results[r]["first"]).all()


def test_a_rank_dying_is_reported_on_every_rank(tmp_path):
    results, seconds = run_world("die", 3, tmp_path, timeout=TIMEOUT)
    assert results[1] is None
    for m in _check_others(results, seconds, within=TIMEOUT + 5):
        assert "did not answer within" in m


def test_a_hanging_rank_times_out_on_every_rank(tmp_path):
    results, seconds = run_world("hang", 3, tmp_path, timeout=TIMEOUT, deadline=30.0)
    assert results[1] is None  # killed by the launcher or still asleep: never reported
    for m in _check_others(results, seconds, within=TIMEOUT + 5):
        assert "timeout" in m.lower()

"""A SearchPlan knows the GPUBlockIndex state it was made for: run and range_search refuse it
on another index or once the index has changed (issue 23: a stale plan must not silently
compute over blocks that no longer hold what it saw). Small sizes: the Triton interpreter is slow.
"""
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import build_index, hsr_decode  # noqa: E402
from hsr.kernels.search import SearchPlan  # noqa: E402

STALE = r"this plan was made for the index at version \d+ .*; the index has changed since .*plan again"


def _index(device, seed=0, N=40):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 1, 32, generator=gen).to(torch.float16)
    k = torch.randn(1, 1, N, 32, generator=gen).to(torch.float16)
    v = torch.randn(1, 1, N, 32, generator=gen).to(torch.float16)
    index = build_index(k.to(device), v.to(device), block_size=16, n_sub=4, method="none")
    return q.to(device), index


def test_a_fresh_plan_runs_and_records_the_state(device):
    q, index = _index(device)
    v0 = index.version
    plan = index.plan(q, 0.0, per_row=True)
    assert plan.made_for.version == v0 and plan.made_for.n_valid == 40
    assert plan.made_for.num_blocks == index.num_blocks
    out = index.run(q, plan, scale=0.2)
    again = index.run(q, index.plan(q, 0.0), scale=0.2)
    torch.testing.assert_close(out, again)
    index.range_search(q, 0.0, plan=plan)
    assert index.version == v0  # planning and running change nothing


def test_a_plan_is_refused_after_a_field_changes(device):
    q, index = _index(device)
    plan = index.plan(q, 0.0, per_row=True)
    index.n_valid = 30  # e.g. the cache shrank: the plan's blocks now hold keys it may not read
    with pytest.raises(ValueError, match=STALE):
        index.run(q, plan)
    with pytest.raises(ValueError, match=STALE):
        index.range_search(q, 0.0, plan=plan)
    with pytest.raises(ValueError, match=r"40 keys in 3 blocks\); the index has changed since \(now version 1 \(30 keys"):
        index.run(q, plan)
    index.run(q, index.plan(q, 0.0))  # planned again: runs


@pytest.mark.parametrize("write", ["values", "keys via a view", "bounds"])
def test_a_plan_is_refused_after_a_tensor_is_written_in_place(device, write):
    q, index = _index(device)
    plan = index.plan(q, 0.0)
    v0 = index.version
    if write == "values":
        index.vp.mul_(2)
    elif write == "keys via a view":
        index.kp[0, 0, 3] = 1.0
    else:
        index.radius.zero_()
    assert index.version > v0
    with pytest.raises(ValueError, match=STALE):
        index.run(q, plan)


def test_a_plan_is_refused_on_another_index(device):
    q, a = _index(device, seed=0)
    _, b = _index(device, seed=1)  # same shapes: only the record tells them apart
    plan = a.plan(q, 0.0)
    with pytest.raises(ValueError, match="made for another GPUBlockIndex"):
        b.run(q, plan)
    with pytest.raises(ValueError, match="made for another GPUBlockIndex"):
        b.range_search(q, 0.0, plan=plan)
    # a grown cache is a new index (build_index again): the old plan would miss the new keys
    _, grown = _index(device, seed=0, N=56)
    with pytest.raises(ValueError, match="made for another GPUBlockIndex"):
        grown.run(q, plan)


def test_a_hand_built_plan_is_checked_against_the_number_of_blocks(device):
    q, index = _index(device)
    _, grown = _index(device, seed=0, N=56)
    plan = index.plan(q, 0.0)
    by_hand = SearchPlan(plan.union_num_blocks, plan.union_indices)
    assert by_hand.made_for is None
    with pytest.raises(ValueError, match="this plan lists 3 blocks; the index has 4"):
        grown.run(q, by_hand)
    torch.testing.assert_close(index.run(q, by_hand), index.run(q, plan))


def test_inference_tensors_still_see_field_changes(device):
    with torch.inference_mode():
        q, index = _index(device)
        plan = index.plan(q, 0.0)
        index.run(q, plan)
        index.n_valid = 20
        with pytest.raises(ValueError, match=STALE):
            index.run(q, plan)


def test_planned_decode_still_runs(device):
    q, index = _index(device)
    out = hsr_decode(q, index, tau=0.0, kind="softmax", mode="planned")
    assert torch.isfinite(out.float()).all()

"""One rank of a distributed test: ``python -m tests.distributed._worker SCENARIO RANK WORLD DIR [TIMEOUT]``.

Initialises gloo through a FileStore in DIR, runs SCENARIO and pickles what it saw (results
or the exception) to ``DIR/rank<R>.pkl``. The tests compare those with single-index results.
"""

import datetime
import os
import pickle
import sys
import time
import traceback

import numpy as np
import torch.distributed as dist

import hsr
import hsr.distributed as hd
from tests.distributed import _data


def battery(rank, world, folder):
    res = {}
    k, v = _data.kv_cache()
    cache = hd.ShardedKVCache.from_full(k, v, dense_below=0)  # shards search their index (no dense path)
    res["starts"] = cache.starts.tolist()
    for m_name, m in (("decode", _data.M_DECODE), ("prefill", _data.M_PREFILL)):
        q = _data.queries(m)
        for causal in (False, True):
            for name, kind, opts in _data.CASES:
                if m_name == "prefill" and name in ("soft_topk", "relu_a3_heads"):
                    continue  # keep the run short: topk over 700 x 4 rows is the slow one
                qq = q if rank == 0 else None  # queries are broadcast from rank 0
                out, info = hsr.hsr_attention(qq, cache, kind=kind, causal=causal, return_info=True, **opts)
                res[(m_name, causal, name)] = (out, info.lse, info.dropped_bound, info.keys_selected)
    # new tokens go to the last rank
    kn, vn = _data.new_tokens()
    cache.add(kn, vn)
    res["after_add_local"] = cache.local.heads[0][0].index.n_total
    q = _data.queries(1)
    res["after_add"] = hsr.hsr_attention(q, cache, kind="softmax", tau=2.0, causal=True)
    # each rank saves and loads its own shard
    cache.save(os.path.join(folder, "kv"))
    loaded = hd.ShardedKVCache.load(os.path.join(folder, "kv"))
    res["loaded"] = hsr.hsr_attention(q, loaded, kind="softmax", tau=2.0, causal=True)
    res["loaded_n"] = len(loaded)
    # one head (KVIndex shards), tree backend, no broadcast (every rank passes q)
    k1, v1, q1 = _data.one_head()
    one = hd.ShardedKVCache.from_full(k1, v1, broadcast_queries=False, method="tree")
    for name, kind, opts in (("relu", "relu", dict(alpha=2, bias=0.2)), ("soft_tau", "softmax", dict(tau=1.5)),
                             ("soft_eps", "softmax", dict(eps=1e-4)), ("soft_topk", "softmax", dict(topk=7))):
        out, info = hsr.hsr_attention(q1, one, kind=kind, causal=True, return_info=True, **opts)
        res[("one", name)] = (out, info.lse, info.dropped_bound)
    res[("one", "single")] = hsr.hsr_attention(q1[0], one, kind="relu", bias=0.2)
    # the sharded index: range search and top-k with global ids
    ks, qs = _data.search_keys()
    idx = hd.ShardedIndex.from_full(ks)
    res["range"] = tuple(idx.range_search(qs if rank == 0 else None, 2.5))
    res["range_causal"] = tuple(idx.range_search(qs, np.linspace(1.0, 3.0, 6), max_id=np.arange(6) * 350))
    res["topk"] = tuple(idx.search(qs, 9, max_id=1700))
    idx.save(os.path.join(folder, "idx"))
    idx2 = hd.ShardedIndex.load(os.path.join(folder, "idx"))
    res["range_loaded"] = tuple(idx2.range_search(qs, 2.5))
    ids = idx2.add(ks[:4] * 3)
    res["added_ids"] = ids
    res["range_added"] = tuple(idx2.range_search(qs, 2.5))
    # remove spans every shard and the added keys; ntotal counts live keys on every rank
    gone = np.r_[0, 3, 999, 1000, 1499, 1999, 2001]
    idx2.remove(gone)
    res["removed_sizes"] = (idx2.ntotal, len(idx2), idx2.n_total)
    res["removed_range"] = tuple(idx2.range_search(qs, 2.5))
    res["removed_count"] = idx2.count(qs, 2.5)
    res["removed_topk"] = tuple(idx2.search(qs, 9))
    for bad in ([0], [2004], [5, 5]):  # removed, out of range, repeated: an error on every rank
        try:
            idx2.remove(bad)
            res[("remove_error", bad[0])] = None
        except (ValueError, RuntimeError) as exc:
            res[("remove_error", bad[0])] = str(exc)
    res["after_errors"] = idx2.ntotal
    return res


def code(rank, world, folder):
    """CodeKVCache shards (the GPU path), run by Triton's interpreter on CPU tensors."""
    import torch

    from hsr.kernels import CodeKVCache

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 300, 16, generator=g)
    v = torch.randn(1, 2, 300, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g) * 1.5
    a, b = hd.shard_range(300, world, rank)
    cache = hd.ShardedKVCache(CodeKVCache(k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous()))
    full = CodeKVCache(k, v)
    res = {}
    for kind, opts in (("softmax", dict(tau=1.0)), ("relu", dict(bias=0.2))):
        out = hsr.hsr_attention(q if rank == 0 else None, cache, kind=kind, causal=True, **opts)
        res[kind] = (out.numpy(), hsr.hsr_attention(q, full, kind=kind, causal=True, **opts).numpy())
    return res


def striped(rank, world, folder):
    """A striped CodeKVCache decode loop (Triton's interpreter on CPU tensors): every rank's
    merged output per step, one cache's decode loop beside it, and a NaN caught by check()."""
    import torch

    from hsr.kernels import CodeKVCache

    g = torch.Generator().manual_seed(1)
    n0, steps = 21, 5  # a prompt no multiple of the world size: stripes of unequal length
    k = torch.randn(1, 2, n0 + steps, 16, generator=g)
    v = torch.randn(1, 2, n0 + steps, 16, generator=g)
    q = torch.randn(steps, 1, 4, 1, 16, generator=g) * 1.5
    res = {}
    for kind, opts in (("softmax", dict(tau=0.5)), ("relu", dict(bias=0.1))):
        local = CodeKVCache(*hd.stripe(k[:, :, :n0], v[:, :, :n0], world, rank), capacity=32)
        step = hd.StripedDecodeStep(local, n0, q[0], kind=kind, **opts)
        one = CodeKVCache(k[:, :, :n0].contiguous(), v[:, :, :n0].contiguous(), capacity=32)
        ref = one.decode_step(q[0], k[:, :, :1], v[:, :, :1], kind=kind, **opts)
        outs, refs = [], []
        for i in range(steps):
            t = slice(n0 + i, n0 + i + 1)
            outs.append(step(q[i], k[:, :, t], v[:, :, t]).clone().numpy())
            refs.append(ref(q[i], k[:, :, t], v[:, :, t]).clone().numpy())
        res[kind] = (outs, refs, len(local))
    # the certified step: the same outputs, and a bound over every rank's keys
    local = CodeKVCache(*hd.stripe(k[:, :, :n0], v[:, :, :n0], world, rank), capacity=32)
    cstep = hd.StripedDecodeStep(local, n0, q[0], kind="softmax", tau=0.5, certify=True)
    bounds, shares, couts = [], [], []
    for i in range(steps):
        t = slice(n0 + i, n0 + i + 1)
        couts.append(cstep(q[i], k[:, :, t], v[:, :, t]).clone().numpy())
        bounds.append(cstep.bound.clone().numpy())
        sc = q[i].double().reshape(1, 2, 2, 16) @ k[:, :, :n0 + i + 1].double().transpose(-1, -2)
        w = torch.exp((sc - sc.amax(-1, keepdim=True)) * 16 ** -0.5)
        shares.append((torch.where(sc < 0.5, w, 0).sum(-1) / w.sum(-1)).reshape(1, 4, 1).numpy())
    res["certified"] = (couts, bounds, shares)
    bad = q[0].clone()
    bad[0, 1, 0, 3] = float("nan")
    res["nan_row"] = step(bad, k[:, :, :1], v[:, :, :1]).clone().numpy()
    try:
        step.check()
        res["check"] = None
    except Exception as exc:  # every rank must raise
        res["check"] = (type(exc).__name__, str(exc))
    return res


def fault(rank, world, folder, mode):
    """Rank 1 fails in the middle of the second query; the others must raise, never hang."""
    k, v = _data.kv_cache()
    cache = hd.ShardedKVCache.from_full(k, v)
    q = _data.queries(1)
    first = hsr.hsr_attention(q, cache, kind="relu", bias=0.3)
    if rank == 1:
        if mode == "die":
            os._exit(7)
        if mode == "hang":
            time.sleep(10)  # longer than the timeout (the test passes 4 s)
            os._exit(0)
        if mode == "raise":
            import hsr.distributed.kv as kvmod

            def broken(*a, **kw):
                raise RuntimeError("injected failure on rank 1")
            kvmod.cpu_partial = broken
    t0 = time.perf_counter()
    seen = None
    try:
        hsr.hsr_attention(q, cache, kind="relu", bias=0.3)
    except Exception as exc:  # record what every rank raised
        seen = (type(exc).__name__, str(exc))
    elapsed = time.perf_counter() - t0
    again = None
    if mode == "raise":  # the group is still usable after a reported failure
        if rank == 1:
            import hsr.distributed.kv as kvmod
            from hsr.distributed.partial import cpu_partial
            kvmod.cpu_partial = cpu_partial
        again = hsr.hsr_attention(q, cache, kind="relu", bias=0.3)
    return {"first": first, "seen": seen, "elapsed": elapsed, "again": again}


def main():
    if sys.argv[1] in ("code", "striped"):  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
    scenario, rank, world, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        if scenario == "battery":
            out = battery(rank, world, folder)
        elif scenario == "code":
            out = code(rank, world, folder)
        elif scenario == "striped":
            out = striped(rank, world, folder)
        else:
            out = fault(rank, world, folder, scenario)
    except BaseException as exc:
        out = {"error": (type(exc).__name__, str(exc), traceback.format_exc())}
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(out, fh)
    sys.stdout.flush()
    os._exit(0)  # skip the process group's teardown: a failed peer must not make us wait


if __name__ == "__main__":
    main()

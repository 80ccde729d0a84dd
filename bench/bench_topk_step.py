"""The GPU code cache's top-k mode in a decode loop, beside its threshold step and SDPA.

    python bench/bench_topk_step.py --out bench/results/topk_step_<device>_<date>.json

As ``bench/bench_decode_loop.py`` (whose inputs and timing it reuses): a cache of ``n - steps``
real keys (capacity ``n``), ``--steps`` consecutive captured steps, each adding one token and
attending, median time per step over ``--reps`` repetitions, inputs in the steps' buffers:

* ``topk``: ``cache.decode_step(..., topk=k)`` with ``k`` = ``--top`` of ``n`` (each row keeps
  its k best keys, ties at the k-th kept): every key scored, the selection on the device
  (``hsr.kernels._select.select_kth``: each row's k-th best and the positions reaching it), a
  softmax over those that reads only the kept keys' values (the gather), the merge (one
  captured graph);
* ``topk_certified``: the same, also writing each row's certified dropped share (its softmax
  scans every score: the certificate sums the dropped ones);
* ``tau``: the threshold step keeping about the same share (each row's tau at its top ``--top``
  of the scores at the start), the filter in front;
* ``sdpa_best``: the faster of SDPA captured at the final length and SDPA over the masked
  static cache (``bench_decode_loop.sdpa_captured``).

Parts of the top-k step, each captured alone at length n, no add: ``score`` (the kernel writing
every key's score), ``select`` (our selection), and for comparison in the same run
``torch_topk`` (each row's k best values, unsorted: the k-th alone) and ``torch_topk_positions``
(the k + 64 best, sorted, with positions: what the softmax read before); the whole step without
its add in both forms: ``gather`` (the default) and ``scan`` (the certified form's softmax,
reading every score). The output of the last step is checked against an fp32 reference
(softmax over each row's keys scoring at least its k-th best fp32 score).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import default_out, save  # noqa: E402
from bench_decode_loop import capture, make_inputs, scores, sdpa_captured, time_loop  # noqa: E402

from hsr.kernels._select import select_kth  # noqa: E402
from hsr.kernels.codes import CodeKVCache  # noqa: E402


def topk_reference(q, k, v, kk, scale):
    """fp32 softmax over each row's keys scoring at least its k-th best (every key visible)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    s = scores(q, k)
    kth = s.topk(kk, dim=-1).values[..., -1:]
    w = torch.softmax(torch.where(s >= kth, s * scale, -math.inf), -1)
    return (w.reshape(B, Hkv, -1, s.shape[-1]) @ v.float()).reshape(B, Hq, M, D), (s >= kth).sum(-1)


def one_config(real, D, n, B, steps, reps, top, dev):
    q, k, v = make_inputs(real, D, n, B, steps, dev)
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = D ** -0.5
    n0 = n - steps
    kk = max(1, int(round(top * n)))
    s0 = scores(q, k[:, :, :n0])[:, :, 0]
    tau = torch.quantile(s0[0], 1 - top, dim=-1)[None].expand(B, -1).contiguous()[..., None].contiguous()
    del s0
    knew = [k[:, :, n0 + i:n0 + i + 1].contiguous() for i in range(steps)]
    vnew = [v[:, :, n0 + i:n0 + i + 1].contiguous() for i in range(steps)]
    res = dict(D=D, Hq=Hq, Hkv=Hkv, n=n, B=B, steps=steps, topk=kk)
    cache = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n)
    reset = lambda: cache.crop(n0)  # noqa: E731
    step = cache.decode_step(q, knew[0], vnew[0], kind="softmax", topk=kk)

    def feed(st):
        st.q.copy_(q)  # q in place (a model writes its projection there), the new token copied

        return lambda i: st(None, knew[i], vnew[i])

    res["topk_ms"] = time_loop(feed(step), steps, reps, reset)
    out = step.out.float().clone()
    cache.check()
    ref, kept = topk_reference(q, k, v, kk, scale)
    res["topk_max_err"] = float((out - ref).abs().max())
    res["topk_kept_per_row_mean"] = float(kept.float().mean())
    del step
    cstep = cache.decode_step(q, knew[0], vnew[0], kind="softmax", topk=kk, certify=True)
    res["topk_certified_ms"] = time_loop(feed(cstep), steps, reps, reset)
    res["topk_bound_max"] = float(cstep.bound.max())
    res["topk_bound_median"] = float(cstep.bound.float().median())
    del cstep
    tstep = cache.decode_step(q, knew[0], vnew[0], kind="softmax", tau=tau)
    res["tau_ms"] = time_loop(feed(tstep), steps, reps, reset)
    del tstep
    # parts at length n: every key's score, then the selection
    sc = cache._score_all(q)
    sc[:, len(cache):] = float("-inf")  # (not written: no reader of the step looks there; torch.topk does)
    g = capture(lambda: cache._score_all(q))
    res["part_score_ms"] = time_loop(lambda i: g.replay(), steps, reps)
    layout = (Hq, 1, Hq // Hkv, Hkv)
    g = capture(lambda: select_kth(sc, kk, cache.lengths, layout))
    res["part_select_ms"] = time_loop(lambda i: g.replay(), steps, reps)
    sel = select_kth(sc, kk, cache.lengths, layout)
    ref_kth = torch.topk(sc, kk, dim=1).values[:, -1]
    res["select_equals_torch_topk"] = bool(torch.equal(sel.threshold, ref_kth))
    res["select_list_mean"] = float(sel.count.float().mean())
    res["select_list_max"] = int(sel.count.max())
    g = capture(lambda: torch.topk(sc, kk, dim=1, sorted=False).values.amin(1))
    res["part_torch_topk_ms"] = time_loop(lambda i: g.replay(), steps, reps)
    g = capture(lambda: torch.topk(sc, min(kk + 64, n), dim=1, sorted=True))
    res["part_torch_topk_positions_ms"] = time_loop(lambda i: g.replay(), steps, reps)
    sc = None  # free the parts' scores before the whole steps allocate theirs
    for form, certify in (("gather", False), ("scan", True)):
        g = capture(lambda certify=certify: cache._topk(q, kk, scale=scale, certify=certify))
        res[f"part_{form}_ms"] = time_loop(lambda i: g.replay(), steps, reps)
        res[f"part_{form}_max_err"] = float((cache._topk(q, kk, scale=scale, certify=certify)[0].float()
                                             - ref).abs().max())
    t_graph, t_static = sdpa_captured(q, k, v, knew[-1], vnew[-1], n0, n, steps, reps)
    res["sdpa_graph_ms"], res["sdpa_static_ms"] = t_graph, t_static
    best = min(t_graph, t_static)
    res["sdpa_best_ms"] = best
    res["topk_vs_sdpa_best"] = best / res["topk_ms"]
    res["tau_vs_sdpa_best"] = best / res["tau_ms"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=float, default=0.01)
    ap.add_argument("--real", default=str(ROOT / "bench" / "cache" / "gpu_real_keys.npz"))
    ap.add_argument("--out", default=default_out("topk_step.json"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    real = np.load(args.real)
    rows = []
    for D in args.dims:
        for n in args.n:
            for B in args.batch:
                r = one_config(real, D, n, B, args.steps, args.reps, args.top, dev)
                rows.append(r)
                print(f"d{D} {r['Hq']}/{r['Hkv']} n={n:6d} B={B} k={r['topk']}: topk {r['topk_ms']*1e3:7.1f} us "
                      f"(certified {r['topk_certified_ms']*1e3:7.1f}; alone: gather {r['part_gather_ms']*1e3:6.1f}, "
                      f"scan {r['part_scan_ms']*1e3:6.1f}; score {r['part_score_ms']*1e3:6.1f}, select "
                      f"{r['part_select_ms']*1e3:6.1f} (torch.topk {r['part_torch_topk_ms']*1e3:6.1f} / "
                      f"{r['part_torch_topk_positions_ms']*1e3:6.1f}), exact {r['select_equals_torch_topk']}, "
                      f"list {r['select_list_mean']:.0f}) | tau "
                      f"{r['tau_ms']*1e3:6.1f} | sdpa best {r['sdpa_best_ms']*1e3:6.1f} | "
                      f"topk x{r['topk_vs_sdpa_best']:.2f}, tau "
                      f"x{r['tau_vs_sdpa_best']:.2f} | err {r['topk_max_err']:.1e}, kept/row "
                      f"{r['topk_kept_per_row_mean']:.1f}, bound max {r['topk_bound_max']:.1e}", flush=True)
                torch.cuda.empty_cache()
                save(args.out, rows, steps=args.steps, top=args.top)  # a timeout keeps what ran
    save(args.out, rows, steps=args.steps, top=args.top,
         keys="SmolLM2-135M post-RoPE keys of unseen text (stdlib sources), tiled; random values")


if __name__ == "__main__":
    main()

"""The GPU side of :class:`~hsr.distributed.ShardedKVCache`: a :class:`hsr.kernels.CodeKVCache`
shard's partial ``(out, lse)`` (its filter, attend and split merge) and the merge of the ranks'
partials on the device (NCCL gathers device tensors; gloo goes through host memory)."""

from __future__ import annotations

import time

import numpy as np

from .merge import merge_attention

__all__ = ["check_queries", "partial", "gather_merge"]


def check_queries(local, q):
    """Rank 0's decode queries ``(B, Hq, 1, D)`` on the shard's device and dtype."""
    import torch

    if not torch.is_tensor(q) or q.dim() != 4:
        raise TypeError(f"a CodeKVCache shard takes a (B, Hq, 1, D) tensor, got {type(q).__name__}")
    if q.shape[0] != local.B or q.shape[3] != local.D or q.shape[1] % local.Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the shards (B={local.B}, Hkv={local.Hkv}, D={local.D})")
    if q.shape[2] != 1:
        raise ValueError(f"CodeKVCache shards serve decode (one query position), got M={q.shape[2]}")
    return q.to(device=local.device, dtype=local.dtype).contiguous()


def partial(local, Q, *, kind, alpha, bias, scale, tau_rows, causal):
    """``(B*Hq*M, D + 1)`` float32 on the device: each row's ``[out | lse]`` over this shard.
    A decode query sits after every key of every shard, so the shard's own causal call (its
    query at its last position) sees all of it, as it should, causal or not."""
    import torch

    if Q.shape[2] != 1:
        raise ValueError(f"CodeKVCache shards serve decode (one query position), got M={Q.shape[2]}")
    B, Hq, M, D = Q.shape
    dev = local.device
    bias_t = torch.from_numpy(np.array(bias, dtype=np.float32)).to(dev, non_blocking=True)
    if kind == "relu":
        tau_t = bias_t / scale
    elif tau_rows is None:
        raise ValueError("softmax on CodeKVCache shards keeps the keys with score >= tau: give tau=")
    else:
        tau_t = torch.from_numpy(np.array(tau_rows, dtype=np.float32)).to(dev, non_blocking=True)
    plan = local.plan(Q, tau_t, bias=bias_t)
    out, lse = local.run(Q, plan, kind=kind, alpha=alpha, scale=scale)
    return torch.cat([out.float().reshape(B * Hq * M, D), lse.reshape(-1, 1)], dim=1)


def gather_merge(sharded, part, shape, timing):
    """Gather every rank's ``[out | lse | failed]`` rows and merge them on the device."""
    import torch

    comm = sharded.comm
    local = sharded.local
    B, Hq, M = shape
    D = local.D
    t = time.perf_counter()
    rows = B * Hq * M
    packed = torch.zeros(rows, D + 2, dtype=torch.float32, device=local.device)
    if part is not None:
        packed[:, :D + 1] = part
    else:
        packed[:, D + 1] = 1.0
    got = comm.all_gather(packed, "sharded attention", keep_on_wire=True)  # (world, rows, D + 2)
    comm.check(got[:, 0, D + 1].cpu().numpy() if rows else np.zeros(comm.world), "sharded attention")
    timing["gather"] = sharded._stamp(t)
    t = time.perf_counter()
    if got.device.type == "cpu":  # gloo: the partials are in host memory; merge there, send the result
        g = got.numpy()
        out, _ = merge_attention(g[:, :, :D], g[:, :, D])
        out = torch.from_numpy(out.astype(np.float32)).to(local.device, non_blocking=True)
    else:
        O, L = got[:, :, :D], got[:, :, D]
        top = L.max(dim=0).values
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.where(torch.isfinite(L), torch.exp(L - safe), torch.zeros_like(L))
        tot = w.sum(dim=0)
        out = (w.unsqueeze(-1) * O).sum(dim=0) / torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
    timing["merge"] = sharded._stamp(t)
    return out.reshape(B, Hq, M, D)

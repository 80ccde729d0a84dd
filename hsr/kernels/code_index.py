"""``GPUCodeIndex``: an :class:`hsr.HSRIndex`'s keys on a device (``HSRIndex.to("cuda")``),
searched with the Triton code filter of :class:`hsr.kernels.CodeKVCache`, results as torch
tensors in FAISS's order. The survivors of the filter are scored exactly by
``_score_rows_kernel`` (fp32, ieee) and compared with the threshold."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._protocol import FaissNames
from .._typing import Device
from ..index import HSRIndex
from ..index.results import RangeResult, SearchResult
from ._compat import patch_interpreter
from ._validate import check_triton_device
from .codes import CodeKVCache

patch_interpreter()

__all__ = ["GPUCodeIndex"]


@triton.jit
def _score_rows_kernel(Q, K, SURV, OUT, S, s_q, s_k, s_o,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    # OUT fp32 (ROWS, S): <Q[r], K[SURV[j]]> accumulated in fp32 (ieee) from the stored values,
    # for a range search's survivors (every row against the union of survivors).
    pid = tl.program_id(0)
    offs_j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < S
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS)
    idx = tl.load(SURV + offs_j, mask=j_ok, other=0)
    k = tl.load(K + idx[:, None].to(tl.int64) * s_k + offs_d[None, :], mask=j_ok[:, None], other=0.0)
    q = tl.load(Q + offs_r[:, None] * s_q + offs_d[None, :])
    sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    tl.store(OUT + offs_r[:, None] * s_o + offs_j[None, :], sc, mask=j_ok[None, :])


class GPUCodeIndex(FaissNames):
    """An :class:`hsr.HSRIndex`'s keys on a device (``HSRIndex.to("cuda")``): the same range
    search with the code filter, returning torch tensors.

    Parameters
    ----------
    keys : Tensor, (n, d) on the device
        Row i is key id i (``d`` a power of two in [16, 256]).
    seed : int
        Seeds the random rotation.

    Notes
    -----
    Scores are fp32 accumulations of the stored values (ieee, in the order the hardware
    chooses), so a key within fp32 rounding of tau may differ from the CPU's canonical set;
    every other key is decided the same way. The filter never drops a key whose GPU score is
    ``>= tau``.
    """

    #: query rows filtered together (one tile of the filter kernel)
    ROWS = 64

    def __init__(self, keys: torch.Tensor, *, seed: int = 0) -> None:
        if not torch.is_tensor(keys) or keys.dim() != 2:
            raise ValueError(f"keys must be a (n, d) tensor, got {type(keys).__name__} "
                             f"{tuple(keys.shape) if torch.is_tensor(keys) else ''}")
        check_triton_device("GPUCodeIndex", keys=keys)
        self.seed = seed
        self.cache = CodeKVCache(keys[None, None], None, seed=seed)
        # liveness by id, sized with the cache's capacity (ids past n_total read True, unused)
        self.alive = torch.ones(self.cache.capacity, dtype=torch.bool, device=keys.device)
        self._n_dead = 0

    @property
    def dim(self) -> int:
        return self.cache.D

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def __len__(self) -> int:
        """Live keys (removed ones do not count), as :class:`hsr.HSRIndex`."""
        return self.cache.n - self._n_dead

    @property
    def n_total(self) -> int:
        """Ids handed out (live and removed): the next added key gets this id."""
        return self.cache.n

    def add(self, keys: torch.Tensor) -> torch.Tensor:
        """Append keys ``(t, d)`` (or one ``(d,)``); returns their ids ``(t,)`` int64."""
        if not torch.is_tensor(keys):
            raise TypeError("keys must be a torch tensor")
        k = keys.reshape(1, self.dim) if keys.dim() == 1 else keys
        start = self.cache.n
        self.cache.add(k[None, None], None)
        if self.alive.numel() < self.cache.capacity:  # grows with the cache's storage, not per add
            grown = torch.ones(self.cache.capacity, dtype=torch.bool, device=self.device)
            grown[:self.alive.numel()] = self.alive
            self.alive = grown
        return torch.arange(start, self.cache.n, device=self.device)

    def remove(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Delete keys by id: searches stop reporting them, ids never shift.

        Raises
        ------
        TypeError
            Ids that are not integers.
        ValueError
            An id out of range, repeated, or already removed.
        """
        i = torch.as_tensor(ids, device=self.device).reshape(-1)
        if i.dtype.is_floating_point or i.dtype == torch.bool:
            raise TypeError(f"ids must be integers, got dtype {i.dtype}")
        i = i.long()
        bad = (i < 0) | (i >= self.n_total)
        if bool(bad.any()):
            raise ValueError(f"ids out of range [0, {self.n_total}): {i[bad][:5].tolist()}")
        if torch.unique(i).numel() != i.numel():
            raise ValueError("ids are repeated")
        if not bool(self.alive[i].all()):
            raise ValueError(f"ids already removed: {i[~self.alive[i]][:8].tolist()}")
        self.alive[i] = False
        self._n_dead += int(i.numel())

    def to(self, device: Device, *, dtype: torch.dtype | None = None) -> GPUCodeIndex | HSRIndex:
        """This index on ``device``, the same keys, ids and removals (FAISS's
        ``index_gpu_to_cpu``): ``"cpu"`` gives an :class:`hsr.HSRIndex` (float32 keys, code
        filter, the same rotation seed); another device a ``GPUCodeIndex`` there (``dtype``:
        the keys' dtype, default this one's)."""
        dev = torch.device(device)
        keys = self.cache.k[0, 0, :self.n_total]
        dead = torch.nonzero(~self.alive[:self.n_total]).reshape(-1)
        if dev.type == "cpu":
            out = HSRIndex(keys.float().cpu().numpy(), dim=self.dim, method="code", seed=self.seed)
            if dead.numel():
                out.remove(dead.cpu().numpy())
            return out
        out = GPUCodeIndex(keys.to(dev, dtype or keys.dtype).contiguous(), seed=self.seed)
        if dead.numel():
            out.remove(dead.to(dev))
        return out

    def range_search(self, queries: torch.Tensor, tau: float | torch.Tensor) -> RangeResult:
        """Every key with score ``>= tau`` per query, as CSR torch tensors on the device.

        Parameters
        ----------
        queries : Tensor, (m, d) or (d,)
        tau : float or Tensor (m,)

        Returns
        -------
        RangeResult ``(lims, D, I)`` of tensors, FAISS's order as on the CPU index
            ``lims`` (m + 1,) int64; ``D`` (lims[-1],) float32 scores; ``I`` (lims[-1],)
            int64 ids, ascending within each query.
        """
        q = self._queries(queries)
        m = q.shape[0]
        t = torch.as_tensor(tau, dtype=torch.float32, device=self.device)
        t = t.expand(m).contiguous() if t.dim() == 0 else t.contiguous()
        if t.shape != (m,):
            raise ValueError(f"tau must be a scalar or have shape ({m},), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("tau contains NaN or Inf")
        counts, ids, scores = [], [], []
        for r0 in range(0, m, self.ROWS):
            qc = q[r0:r0 + self.ROWS]
            tc = t[r0:r0 + self.ROWS]
            plan = self.cache.plan(qc[None, :, None, :], tc[None, :, None])
            surv = plan.survivors(0).contiguous()
            sc = self._scores(qc, surv)
            keep = (sc >= tc[:, None]) & self.alive[surv.long()][None, :]
            r, c = torch.nonzero(keep, as_tuple=True)  # row-major: ids ascend within a row
            counts.append(keep.sum(1))
            ids.append(surv[c].long())
            scores.append(sc[r, c])
        lims = torch.zeros(m + 1, dtype=torch.int64, device=self.device)
        if m:
            lims[1:] = torch.cumsum(torch.cat(counts), 0)
        cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=self.device)
        return RangeResult(lims, cat(scores, torch.float32), cat(ids, torch.int64))

    def _queries(self, queries):
        q = queries.reshape(1, -1) if torch.is_tensor(queries) and queries.dim() == 1 else queries
        if not torch.is_tensor(q) or q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (m, {self.dim}) tensors")
        return q.to(device=self.device, dtype=self.cache.dtype).contiguous()

    def _scores(self, qc, ids):
        """``(len(qc), len(ids))`` fp32 scores of at most ROWS queries against the keys ``ids``."""
        rows = max(16, triton.next_power_of_2(qc.shape[0]))
        qp = torch.zeros(rows, self.dim, dtype=qc.dtype, device=self.device)
        qp[:qc.shape[0]] = qc
        sc = torch.empty(rows, max(1, ids.numel()), dtype=torch.float32, device=self.device)
        if ids.numel():
            k = self.cache.k[0, 0]
            _score_rows_kernel[(triton.cdiv(ids.numel(), 64),)](
                qp, k, ids, sc, ids.numel(), qp.stride(0), k.stride(0), sc.stride(0),
                ROWS=rows, BLOCK_N=64, HEAD_DIM=self.dim, num_warps=4)
        return sc[:qc.shape[0], :ids.numel()]

    def count(self, queries: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
        """Number of keys with score ``>= tau`` per query, ``(m,)`` int64."""
        return torch.diff(self.range_search(queries, tau)[0])

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        """The ``k`` best live keys per query (FAISS's ``search``): ``SearchResult(D, I)`` of
        ``(m, k)`` tensors, best first, padded with ``-inf`` / ``-1`` past the live keys.

        Top-k has no threshold to filter with: every live key is scored (fp32 of the stored
        values, as :meth:`range_search` scores its survivors), then ``torch.topk``. Equal
        scores may come in another order than on the CPU."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._queries(queries)
        m, n = q.shape[0], self.n_total
        D = torch.full((m, k), float("-inf"), dtype=torch.float32, device=self.device)
        I = torch.full((m, k), -1, dtype=torch.int64, device=self.device)  # noqa: E741 (FAISS's name)
        if not m or not n:
            return SearchResult(D, I)
        every = torch.arange(n, dtype=torch.int32, device=self.device)
        kk = min(k, n)
        for r0 in range(0, m, self.ROWS):
            sc = self._scores(q[r0:r0 + self.ROWS], every).masked_fill(~self.alive[None, :n], float("-inf"))
            best, idx = torch.topk(sc, kk, dim=1)
            D[r0:r0 + self.ROWS, :kk] = best
            I[r0:r0 + self.ROWS, :kk] = torch.where(torch.isfinite(best), idx, -1)
        return SearchResult(D, I)

    topk = search

    def __repr__(self):
        return f"GPUCodeIndex(n={len(self)}, dim={self.dim}, device={self.device}, dtype={self.cache.dtype})"

"""The code filter on the GPU: a KV cache with per-key int8 codes, filter -> compact -> attend.

Layout (``CodeKVCache``; every tensor on the cache's device, capacity ``C >= n``)::

    k, v       (B, Hkv, C, D)   keys / values as given (bf16, fp16 or fp32), row = position
    codes      (B, Hkv, C, DP)  int8 codes of ``R k`` (R: one random rotation, (D, D)), DP = D
                                rounded up to a multiple of 32 (zero columns)
    scale      (B, Hkv, C)      fp32 step s_j:  R k_j ~= s_j c_j, |c| <= 127
    err        (B, Hkv, C)      fp32 upper bound of ||k_j - R^T s_j c_j|| (rounded up)
    max_norm, max_err (B, Hkv)  fp64 largest ||k_j|| and err_j of the head (size the slack)

The bound (as on the CPU, ``hsr/index/_code_kernels.py``): ``<q, k> <= s <R q, c> + ||q|| err``.
The query side is split into two int8 parts, ``R q = a1 qi1 + a2 qi2 + rq``, so the filter is
two exact int8 tensor-core products with int32 accumulation; ``||rq|| * max s||c||``, the
rounding of the fp32 bound arithmetic, and the gap between the kernel's fp32-accumulated
score and the real dot product make one per-row slack. A key *survives* when its bound
reaches ``tau - slack`` for any query row of its kv head's group (the GQA group shares one
read of the codes); each filter program writes its survivors to its own segment of the list.

Kernels (four launches per step and a memset, no host synchronisation, so a step can be
captured in a CUDA graph):

1. ``_rotate_kernel``: grid (B*Hkv, DP/32); the group's query rows times ``R^T`` (fp32 ieee).
2. ``_code_filter_kernel``: a persistent grid (about four programs per multiprocessor);
   each program splits the rotated rows into their int8 parts and thresholds once, then
   strides over key tiles (pipelined loads), reads DP+8 bytes per key and appends the
   survivors.
3. ``_code_attend_kernel``: grid (splits, B*Hkv); each split walks its share of the survivor
   list, gathers K rows, computes the exact fp32 scores of the group's rows, keeps
   ``score >= tau`` (and the causal limit), and accumulates softmax (online) or ReLU^alpha.
4. ``merge_partials`` (block_sparse.py): the log-sum-exp merge of the splits. ReLU partials
   are written in the same form (``lse = log sum w``), so one merge serves both.

"Exact" on the GPU: the selected set is ``{j : s_j >= tau}`` with ``s_j`` the kernel's fp32
accumulation of the stored 16-bit products; it equals the CPU canonical set except possibly
for keys within fp32 rounding (``~d 2^-24 |q||k|``) of tau, and the filter never drops a key
of that set (tests check both against a float64 reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from ._compat import interpreting, patch_interpreter
from ._validate import check_alpha, resolve_kind
from ._softmax import LOG2E, _online_softmax_step, _weighted_values, _weights_epilogue
from .._deprecation import renamed as _renamed
from .._lock import RWLock, reads, writes
from .block_sparse import _num_sms, merge_partials

patch_interpreter()

__all__ = ["CodeKVCache", "CodePlan"]

CMAX = 127
_EPS64 = 2.0 ** -53


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _load_rows(X, x_scalar, s_xb, s_xh, s_xm, b, head, mrow, r_ok, fill, X_TENSOR: tl.constexpr):
    # one value per query row from a (B, Hq, M)-strided tensor (or a scalar): tau or bias
    if X_TENSOR:
        x = tl.load(X + b.to(tl.int64) * s_xb + head * s_xh + mrow * s_xm, mask=r_ok, other=fill)
    else:
        x = tl.where(r_ok, x_scalar, fill)
    return x.to(tl.float32)


@triton.jit
def _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS: tl.constexpr, D: tl.constexpr):
    # the G*M query rows of kv head h of batch b as one (ROWS, D) tile (rows past G*M: zeros)
    offs_r = tl.arange(0, ROWS)
    r_ok = offs_r < G * M
    head = h * G + offs_r // M
    mrow = offs_r % M
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * s_qb + head[:, None].to(tl.int64) * s_qh + mrow[:, None] * s_qm
                + offs_d[None, :], mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return q, r_ok, head, mrow


@triton.jit
def _rotate_kernel(Q, ROT, QR, s_qb, s_qh, s_qm, G, M, Hkv,
                   ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DP: tl.constexpr, BLOCK_J: tl.constexpr):
    # QR fp32 (B*Hkv, ROWS, DP) = the group's query rows times ROT^T, columns [pid_j*BLOCK_J, ...)
    # per program (ieee fp32: its rounding is bounded for any summation order and is a term
    # of the filter's slack); columns past HEAD_DIM are zeros.
    pid = tl.program_id(0)
    pid_j = tl.program_id(1)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, pid // Hkv, pid % Hkv, G, M, ROWS, HEAD_DIM)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    r = tl.load(ROT + offs_j[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_j[:, None] < HEAD_DIM, other=0.0)
    qr = tl.dot(q.to(tl.float32), tl.trans(r), input_precision="ieee")
    offs_r = tl.arange(0, ROWS)
    tl.store(QR + (pid.to(tl.int64) * ROWS + offs_r)[:, None] * DP + offs_j[None, :], qr)


@triton.jit
def _round_half(x):
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), -127.0), 127.0)


@triton.jit
def _query_parts(qr, q, tau, r_ok, maxn, maxe, defect, HEAD_DIM: tl.constexpr):
    """Split rotated rows ``qr (ROWS, DP)`` into two int8 parts ``a1 i1 + a2 i2`` and return
    them with the threshold ``tau - slack`` per row (module docstring: every fp32 rounding on
    the way is a term of the slack). ``q (ROWS, D)`` gives the norms."""
    a1 = tl.max(tl.abs(qr), 1) / 127.0
    a1 = tl.where(a1 > 0.0, a1, 1.0)
    i1 = _round_half(qr / a1[:, None])
    r1 = qr - a1[:, None] * i1
    a2 = tl.max(tl.abs(r1), 1) / 127.0
    a2 = tl.where(a2 > 0.0, a2, 1.0)
    i2 = _round_half(r1 / a2[:, None])
    rq = r1 - a2[:, None] * i2
    up = 1.0 + 1e-5  # covers the rounding of the norms themselves
    r1n = tl.sqrt(tl.sum(r1 * r1, 1))
    rqn = tl.sqrt(tl.sum(rq * rq, 1)) * up + 2.4e-7 * r1n  # fp32 rounding of rq: 2^-22 |r1|
    qf = q.to(tl.float32)
    qn = tl.sqrt(tl.sum(qf * qf, 1)) * up
    qrn = tl.sqrt(tl.sum(qr * qr, 1)) * up
    w = (1.0 + defect) * up * maxn + maxe  # >= max_j s_j ||c_j||
    u = 5.9604645e-08  # 2^-24
    dd = HEAD_DIM * 1.0
    slack = (rqn * w                                   # the query's int8 residual
             + 1.01 * dd * tl.sqrt(dd) * u * qn * w    # fp32 rotation of the query
             + 16.0 * u * (qrn * w + qn * maxe)        # fp32 bound arithmetic in the filter
             + 4.0 * dd * u * qn * maxn                # the kernels' fp32-accumulated score
             + 1e-30) * 1.001
    thr = tau - slack
    thr = thr - 2.4e-7 * (tl.abs(tau) + slack)  # the subtraction's own rounding
    thr = tl.where(r_ok, thr, float("inf"))
    return i1, i2, a1, a2, qn, thr


@triton.jit
def _code_filter_kernel(Q, QR, TAU, tau_scalar, MAXN, MAXE, CODES, SCALE, ERR, COUNT, SURV,
                        N, s_qb, s_qh, s_qm, s_tb, s_th, s_tm, s_cb, s_ch, s_cn, s_sb, s_sh,
                        G, M, Hkv, SURV_STRIDE, SEG, defect, NPROG,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DP: tl.constexpr, TAU_TENSOR: tl.constexpr, UPCAST: tl.constexpr,
                        STAGES: tl.constexpr):
    # QR fp32 (B*Hkv, ROWS, DP): the group's rotated query rows (_rotate_kernel). A persistent
    # grid: NPROG programs per (batch, kv head) derive the rows' int8 parts and thresholds once,
    # then stride over the key tiles (pipelined loads). Program p appends the survivors of any
    # row to its own segment SURV[bh, p*SEG : (p+1)*SEG] (int32, ascending positions) and writes
    # their number to COUNT[bh, p]: no atomics (thousands of tiles of one head would contend on
    # one counter) and a deterministic survivor order.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    offs_d = tl.arange(0, DP)
    offs_r = tl.arange(0, ROWS)
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    qr = tl.load(QR + (pid_bh.to(tl.int64) * ROWS + offs_r)[:, None] * DP + offs_d[None, :])
    tau = _load_rows(TAU, tau_scalar, s_tb, s_th, s_tm, b, head, mrow, r_ok, 0.0, TAU_TENSOR)
    i1, i2, a1, a2, qn, thr = _query_parts(qr, q, tau, r_ok, tl.load(MAXN + pid_bh), tl.load(MAXE + pid_bh),
                                           defect, HEAD_DIM)
    if UPCAST:
        q1 = i1
        q2 = i2
    else:
        q1 = i1.to(tl.int8)
        q2 = i2.to(tl.int8)
    cbase = CODES + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch
    sbase = b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    obase = SURV + pid_bh.to(tl.int64) * SURV_STRIDE + pid_n.to(tl.int64) * SEG
    n_tiles = tl.cdiv(N, BLOCK_N)
    found = 0
    for tile in tl.range(pid_n, n_tiles, NPROG, num_stages=STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        c = tl.load(cbase + offs_n[:, None].to(tl.int64) * s_cn + offs_d[None, :], mask=n_ok[:, None], other=0)
        if UPCAST:  # the interpreter's int8 matmul would wrap: integer-valued fp32 sums are exact
            p1 = tl.dot(q1, tl.trans(c.to(tl.float32)), input_precision="ieee")
            p2 = tl.dot(q2, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            p1 = tl.dot(q1, tl.trans(c)).to(tl.float32)  # exact int32, |.| < 2^24
            p2 = tl.dot(q2, tl.trans(c)).to(tl.float32)
        s = tl.load(SCALE + sbase + offs_n, mask=n_ok, other=0.0)
        e = tl.load(ERR + sbase + offs_n, mask=n_ok, other=0.0)
        ub = s[None, :] * (a1[:, None] * p1 + a2[:, None] * p2) + qn[:, None] * e[None, :]
        hit = tl.where(ub >= thr[:, None], 1, 0)
        keep = (tl.max(hit, 0) > 0) & n_ok
        keep_i = keep.to(tl.int32)
        pos = found + tl.cumsum(keep_i, 0) - 1
        tl.store(obase + pos, offs_n, mask=keep)
        found += tl.sum(keep_i, 0)
    tl.store(COUNT + pid_bh * NPROG + pid_n, found)


@triton.jit
def _code_attend_kernel(Q, K, V, TAU, tau_scalar, BIAS, bias_scalar, SURV, COUNT, O_PART, L_PART,
                        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                        s_tb, s_th, s_tm, s_bb, s_bh, s_bm,
                        N, M, G, Hkv, SURV_STRIDE, SEG, NPROG, SPLITS, BHM, qk_scale, scale,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        KIND: tl.constexpr, ALPHA: tl.constexpr, UPCAST: tl.constexpr,
                        TAU_TENSOR: tl.constexpr, BIAS_TENSOR: tl.constexpr):
    # TAU/BIAS: (B, Hq, M)-strided tensors or scalars. Partials: O_PART (SPLITS, BHM, D) fp32, L_PART (SPLITS, BHM)
    # natural-log lse (softmax) or log(sum w) (ReLU, KIND == 1); rows ordered (b, hq, m).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    q, r_ok, head, mrow = _load_query_rows(Q, s_qb, s_qh, s_qm, b, h, G, M, ROWS, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    tau = _load_rows(TAU, tau_scalar, s_tb, s_th, s_tm, b, head, mrow, r_ok, float("inf"), TAU_TENSOR)
    bias = _load_rows(BIAS, bias_scalar, s_bb, s_bh, s_bm, b, head, mrow, r_ok, 0.0, BIAS_TENSOR)
    limit = N - M + mrow  # causal: query m of M sits at N - M + m
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    for seg in range(pid_s, NPROG, SPLITS):  # split s takes the filter's segments s, s+SPLITS, ...
        sbase = SURV + pid_bh.to(tl.int64) * SURV_STRIDE + seg * SEG
        cnt = tl.load(COUNT + pid_bh * NPROG + seg)
        for off in range(0, cnt, BLOCK_N):
            offs_i = off + tl.arange(0, BLOCK_N)
            i_ok = offs_i < cnt
            idx = tl.load(sbase + offs_i, mask=i_ok, other=0)
            k = tl.load(kbase + idx[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=i_ok[:, None], other=0.0)
            v = tl.load(vbase + idx[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=i_ok[:, None], other=0.0)
            if UPCAST:
                sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            keep = i_ok[None, :] & (sc >= tau[:, None]) & (idx[None, :] <= limit[:, None]) & r_ok[:, None]
            if KIND == 0:
                s2 = tl.where(keep, sc * qk_scale, float("-inf"))
                m_i, l_i, acc = _online_softmax_step(s2, v, m_i, l_i, acc, UPCAST)
            else:
                z = tl.maximum(sc * scale - bias[:, None], 0.0)
                w = z
                for _ in tl.static_range(ALPHA - 1):
                    w = w * z
                w = tl.where(keep, w, 0.0)
                l_i += tl.sum(w, 1)
                # weights rounded to v's 16-bit dtype for the tensor cores, as softmax rounds P
                acc += _weighted_values(w, v, UPCAST)
    l_safe, lse = _weights_epilogue(m_i, l_i, KIND)
    o = acc / l_safe[:, None]
    row = (b * Hkv * G + head).to(tl.int64) * M + mrow
    tl.store(O_PART + (pid_s.to(tl.int64) * BHM + row)[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=r_ok[:, None])
    tl.store(L_PART + pid_s.to(tl.int64) * BHM + row, lse, mask=r_ok)


# ----------------------------------------------------------------------------- host side

def _random_rotation(d: int, seed: int, device) -> torch.Tensor:
    """A seeded Haar-random orthogonal ``(d, d)`` float64 matrix (rows = the basis)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    qm, rm = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(rm))).T.contiguous().to(device)


def _capturing() -> bool:
    """Inside CUDA-graph capture a value check would synchronise (not allowed): it is skipped
    there; the same call made eagerly (as the capture's warm-up is) checks."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, rounded toward +inf (so a bound stays a bound)."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


@dataclass(frozen=True)
class CodePlan:
    """The survivors of one filter step (plan), consumed by :meth:`CodeKVCache.run`.

    Attributes
    ----------
    surv : Tensor, (B*Hkv, P * seg) int32
        Surviving key positions of each (batch, kv head): filter program p wrote its
        ``count[bh, p]`` survivors, ascending, at ``surv[bh, p*seg:]``.
    count : Tensor, (B*Hkv, P) int32
    seg : int
        Length of one program's segment.
    tau, bias : (Tensor or None, float)
        The thresholds and ReLU biases as given: a ``(B, Hq, M)``-strided float32 tensor, or
        None and a number.
    rows : int
        Padded rows per (batch, kv head) (a power of two, >= 16).
    m : int
        Query positions per head.
    """

    surv: torch.Tensor
    count: torch.Tensor
    seg: int
    tau: tuple
    bias: tuple
    rows: int
    m: int

    def survivors(self, bh: int) -> torch.Tensor:
        """The surviving key positions of (batch, kv head) ``bh``, ascending (host sync)."""
        cnt = self.count[bh].tolist()
        parts = [self.surv[bh, p * self.seg:p * self.seg + c] for p, c in enumerate(cnt)]
        return torch.cat(parts) if parts else self.surv.new_zeros(0)

    def n_survivors(self) -> torch.Tensor:
        """Survivors per (batch, kv head), ``(B*Hkv,)`` int64 (on the device, no sync)."""
        return self.count.sum(1)


class CodeKVCache:
    """A ``(B, Hkv, n, D)`` KV cache with per-key int8 codes, on one device.

    Build it from keys and values (``CodeKVCache(k, v)``), from a CPU index
    (``hsr.KVCacheIndex.to("cuda")``), grow it with :meth:`add` (O(D) per key: the new keys'
    codes are written, nothing is rebuilt), and attend with :meth:`attend` (rotate, filter,
    attend and merge: four launches, no host synchronisation) or plan once with :meth:`plan`
    and run with :meth:`run`. Thread-safe like the CPU indexes: a readers-writer lock lets
    searches (``plan``, ``run``, ``attend``) run together and makes ``add`` wait for them, so
    no search sees a half-grown cache (about a microsecond per call on the host).

    Parameters
    ----------
    k, v : Tensor, (B, Hkv, n, D)
        Post-RoPE keys and values (bf16/fp16/fp32; D a power of two in [16, 256]). ``v=None``
        keeps keys only (an index: :meth:`search`, no attention).
    seed : int
        Seeds the random rotation.
    capacity : int, optional
        Rows to reserve (appends beyond it reallocate).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor | None, *, seed: int = 0, capacity: int | None = None) -> None:
        self._lock = RWLock()  # adds wait for searches in flight; searches run together
        self.has_values = v is not None
        if v is None:
            v = k  # validated alongside k, never stored
        if not (torch.is_tensor(k) and torch.is_tensor(v)):
            raise TypeError("k and v must be torch tensors (v may be None)")
        if k.dim() != 4 or v.shape[:3] != k.shape[:3] or v.dim() != 4:
            raise ValueError(f"k and v must be (B, Hkv, n, D) with the same B, Hkv, n; got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        if k.dtype not in (torch.float16, torch.bfloat16, torch.float32) or v.dtype != k.dtype:
            raise TypeError(f"k and v must share a float16/bfloat16/float32 dtype, got {k.dtype} and {v.dtype}")
        D = k.shape[-1]
        if D not in (16, 32, 64, 128, 256) or v.shape[-1] != D:
            raise ValueError(f"head dim must be a power of two in [16, 256] (and equal for k and v), got {D}")
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ValueError("k or v contains NaN or Inf")
        B, Hkv, n, _ = k.shape
        self.device = k.device
        self.dtype = k.dtype
        self.seed = int(seed)
        self.B, self.Hkv, self.D = B, Hkv, D
        self.DP = max(32, -(-D // 32) * 32)
        # the fp32 rotation is the rotation: codes use it upcast exactly, queries use it as is
        self.rot32 = _random_rotation(D, self.seed, self.device).float().contiguous()
        self.rot = self.rot32.double()
        g = self.rot.T @ self.rot - torch.eye(D, dtype=torch.float64, device=self.device)
        self.defect = float(torch.sqrt((g * g).sum())) * (1 + 1e-6) + 4.0 * D * D * _EPS64
        cap = max(int(capacity or 0), n, 64)
        self._alloc(cap)
        self.n = 0
        self.max_norm = torch.zeros(B, Hkv, dtype=torch.float64, device=self.device)
        self.max_err = torch.zeros(B, Hkv, dtype=torch.float64, device=self.device)
        self.add(k, v if self.has_values else None)

    # ------------------------------------------------------------------ storage
    def _alloc(self, cap: int) -> None:
        B, H, D, dev = self.B, self.Hkv, self.D, self.device
        old = getattr(self, "k", None)
        k = torch.zeros(B, H, cap, D, dtype=self.dtype, device=dev)
        v = torch.zeros(B, H, cap, D, dtype=self.dtype, device=dev) if self.has_values else None
        codes = torch.zeros(B, H, cap, self.DP, dtype=torch.int8, device=dev)
        scale = torch.zeros(B, H, cap, dtype=torch.float32, device=dev)
        err = torch.zeros(B, H, cap, dtype=torch.float32, device=dev)
        if old is not None:
            n = self.n
            k[:, :, :n] = self.k[:, :, :n]
            if v is not None:
                v[:, :, :n] = self.v[:, :, :n]
            codes[:, :, :n] = self.codes[:, :, :n]
            scale[:, :, :n] = self.scale[:, :, :n]
            err[:, :, :n] = self.err[:, :, :n]
        self.k, self.v, self.codes, self.scale, self.err = k, v, codes, scale, err
        self.capacity = cap

    def __len__(self) -> int:
        return self.n

    def append(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Deprecated name of :meth:`add`."""
        _renamed("CodeKVCache.append", "CodeKVCache.add")
        self.add(k, v)

    @writes
    def add(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Add ``(B, Hkv, t, D)`` keys and values (``v=None`` for a keys-only cache) at the next
        positions: writes their codes, steps and error bounds."""
        if (v is None) == self.has_values:
            raise ValueError("this cache holds values: add keys and values" if self.has_values
                             else "this cache holds keys only: add keys with v=None")
        if v is None:
            v = k
        if not (torch.is_tensor(k) and torch.is_tensor(v)):
            raise TypeError("k and v must be torch tensors")
        if k.dim() != 4 or k.shape[:2] != (self.B, self.Hkv) or k.shape[-1] != self.D or v.shape != k.shape:
            raise ValueError(f"add expects ({self.B}, {self.Hkv}, t, {self.D}) keys and values, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        t = k.shape[2]
        if t == 0:
            return
        if not _capturing() and not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ValueError("added k or v contains NaN or Inf")
        if self.n + t > self.capacity:
            self._alloc(max(2 * self.capacity, self.n + t))
        s, e = self.n, self.n + t
        kk = k.to(device=self.device, dtype=self.dtype)
        self.k[:, :, s:e] = kk
        if self.has_values:
            self.v[:, :, s:e] = v.to(device=self.device, dtype=self.dtype)
        k64 = kk.double()
        x = k64 @ self.rot.T
        amax = x.abs().amax(-1)
        step = _round_up_f32(amax / CMAX)
        st64 = step.double()
        c = torch.where(st64[..., None] > 0, torch.round(x / st64.clamp_min(1e-300)[..., None]), torch.zeros_like(x))
        c = c.clamp(-CMAX, CMAX)
        rel = 4.0 * self.D * _EPS64
        knorm = torch.sqrt((k64 * k64).sum(-1))
        e64 = torch.sqrt(((x - st64[..., None] * c) ** 2).sum(-1)) * (1 + rel) + (self.defect + rel) * knorm + 1e-300
        err = _round_up_f32(e64)
        self.codes[:, :, s:e, :self.D] = c.to(torch.int8)
        self.scale[:, :, s:e] = step
        self.err[:, :, s:e] = err
        self.max_norm = torch.maximum(self.max_norm, knorm.amax(-1))
        self.max_err = torch.maximum(self.max_err, err.double().amax(-1))
        self._maxn32 = _round_up_f32(self.max_norm).contiguous()
        # the host copy of the largest norm, for the eager overflow check (None: read it again)
        self._max_norm_host = None if _capturing() else float(self.max_norm.max())
        self._maxe32 = _round_up_f32(self.max_err).contiguous()
        self.n = e

    # ------------------------------------------------------------------ plan (filter)
    def _check_q(self, q, tau=None, bias=None):
        """Shapes, device and dtype of ``q``; then, outside CUDA-graph capture, its values and
        those of a tensor ``tau``/``bias`` (NaN tau, NaN/Inf bias), all in one synchronisation."""
        if not torch.is_tensor(q) or q.dim() != 4:
            raise ValueError(f"q must be a (B, Hq, M, D) tensor, got {type(q).__name__} "
                             f"{tuple(q.shape) if torch.is_tensor(q) else ''}")
        B, Hq, M, D = q.shape
        if B != self.B or D != self.D or Hq % self.Hkv:
            raise ValueError(f"q {tuple(q.shape)} does not fit the cache (B={self.B}, Hkv={self.Hkv}, D={self.D})")
        if q.device != self.device or q.dtype != self.dtype:
            raise ValueError(f"q must be {self.dtype} on {self.device}, got {q.dtype} on {q.device}")
        if M > self.n:
            raise ValueError(f"{M} query positions but only {self.n} keys: causal queries are the last positions")
        if not _capturing():
            # one reduction and one synchronisation: the norm of q with a tensor tau (clamped to
            # [-1, 1]: NaN stays, +-inf is allowed) and bias appended is finite exactly when none
            # holds a value it must not (a NaN threshold keeps no key, a NaN/Inf bias poisons the
            # weights: both silently); it also bounds q's largest row norm from above. Tensors on
            # another device are left to _per_row, which refuses them with its own message.
            on_q = lambda t: torch.is_tensor(t) and t.device == q.device  # noqa: E731
            if on_q(tau) or on_q(bias):
                parts = [q.reshape(-1).float()]
                if on_q(tau):
                    parts.append(tau.reshape(-1).float().clamp(-1.0, 1.0))
                if on_q(bias):
                    parts.append(bias.reshape(-1).float())
                norm = torch.linalg.vector_norm(torch.cat(parts)).item()
            else:
                norm = torch.linalg.vector_norm(q, dtype=torch.float32).item()
            if not math.isfinite(norm):  # the error path: say which input, at another sync or two
                if not bool(torch.isfinite(q).all()):
                    raise ValueError("q contains NaN or Inf")
                if on_q(tau) and bool(torch.isnan(tau).any()):
                    raise ValueError("tau contains NaN")
                if on_q(bias) and not bool(torch.isfinite(bias).all()):
                    raise ValueError("bias contains NaN or Inf")
                norm = math.inf  # finite values whose squares overflow fp32: far past the bound below
            # the bounds are fp32: |q| |k| past ~1e37 would overflow them (and drop keys)
            if self._max_norm_host is None:
                self._max_norm_host = float(self.max_norm.max())
            top = norm * self._max_norm_host
            if top >= 1e37:
                raise ValueError(f"|q|*|k| may reach {top:.3g}: beyond the fp32 bounds of the code filter; "
                                 "rescale q or k")

    def _per_row(self, x, q, name):
        """``(tensor or None, scalar, strides)`` of tau or bias: a number, or a tensor of shape
        (), (Hq,) or (B, Hq, M) (read in place through strides: no copy, graph-safe)."""
        B, Hq, M, _ = q.shape
        if not torch.is_tensor(x):
            x = float(x)
            if math.isnan(x) or (name == "bias" and math.isinf(x)):
                raise ValueError(f"{name} must be a number (not NaN), got {x}")
            return None, x, (0, 0, 0)
        if x.device != self.device or x.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor on {self.device}, got {x.dtype} on {x.device}")
        if x.dim() == 0:
            t = x.reshape(1, 1, 1).expand(B, Hq, M)
        elif tuple(x.shape) == (Hq,):
            t = x[None, :, None].expand(B, Hq, M)
        elif tuple(x.shape) == (B, Hq, M):
            t = x
        else:
            raise ValueError(f"{name} must be a number or have shape (), ({Hq},) or {(B, Hq, M)}, "
                             f"got {tuple(x.shape)}")
        return t, 0.0, t.stride()

    def search(self, q: torch.Tensor, tau: float | torch.Tensor, **kwargs: Any) -> CodePlan:
        """Deprecated name of :meth:`plan`."""
        _renamed("CodeKVCache.search", "CodeKVCache.plan")
        return self.plan(q, tau, **kwargs)

    @reads
    def plan(self, q: torch.Tensor, tau: float | torch.Tensor, *, bias: float | torch.Tensor = 0.0, block_n: int = 128,
             num_warps: int = 4, num_stages: int = 3, programs_per_sm: int | None = None) -> CodePlan:
        """Filter (plan): the keys whose bound reaches ``tau - slack`` for any row of their group.

        Parameters
        ----------
        q : Tensor, (B, Hq, M, D)
        tau : float or float32 Tensor of shape (), (Hq,) or (B, Hq, M)
            Raw-score thresholds (``<q, k> >= tau`` is kept).
        bias : float or float32 Tensor, same shapes
            ReLU bias, carried to :meth:`run`.
        block_n, num_warps, num_stages, programs_per_sm : tuning of the filter kernel (keys per
            tile, warps, pipelined tile loads, persistent programs per multiprocessor in all;
            default 8 for 16 or more (batch, kv head) pairs, else 2). The defaults are the best of
            a sweep on an H200 at 128K (``bench/results/gpu_codes_h200_2026-11-30_sweep.txt``).
        """
        self._check_q(q, tau, bias)
        return self._plan(q, tau, bias=bias, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                          programs_per_sm=programs_per_sm)

    def _plan(self, q, tau, *, bias=0.0, block_n=128, num_warps=4, num_stages=3, programs_per_sm=None):
        """:meth:`plan`'s body: ``q`` checked, the read lock held by the caller."""
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        rows = max(16, triton.next_power_of_2(G * M))
        tau_t, tau_s, ts = self._per_row(tau, q, "tau")
        bias_t, bias_s, _ = self._per_row(bias, q, "bias")
        BH = B * self.Hkv
        dev = self.device
        QR = torch.empty(BH, rows, self.DP, dtype=torch.float32, device=dev)
        _rotate_kernel[(BH, self.DP // 32)](
            q, self.rot32, QR, q.stride(0), q.stride(1), q.stride(2), G, M, self.Hkv,
            ROWS=rows, HEAD_DIM=D, DP=self.DP, BLOCK_J=32, num_warps=4)
        n_tiles = triton.cdiv(self.n, block_n)
        # persistent: about four programs per multiprocessor in all, each striding over tiles
        # and owning a segment of the survivor list big enough for all of its tiles
        pps = programs_per_sm if programs_per_sm is not None else (8 if BH >= 16 else 2)
        nprog = max(1, min(n_tiles, -(-int(pps) * _num_sms(dev) // BH)))
        seg = triton.cdiv(n_tiles, nprog) * block_n
        surv = torch.empty(BH, nprog * seg, dtype=torch.int32, device=dev)
        count = torch.empty(BH, nprog, dtype=torch.int32, device=dev)
        grid = (nprog, BH)
        _code_filter_kernel[grid](
            q, QR, count if tau_t is None else tau_t, tau_s, self._maxn32, self._maxe32, self.codes,
            self.scale, self.err, count, surv, self.n, q.stride(0), q.stride(1), q.stride(2),
            ts[0], ts[1], ts[2], self.codes.stride(0), self.codes.stride(1), self.codes.stride(2),
            self.scale.stride(0), self.scale.stride(1), G, M, self.Hkv, surv.stride(0), seg, self.defect,
            nprog, ROWS=rows, BLOCK_N=block_n, HEAD_DIM=D, DP=self.DP, TAU_TENSOR=tau_t is not None,
            UPCAST=interpreting(), STAGES=num_stages, num_warps=num_warps)
        return CodePlan(surv, count, seg, (tau_t, tau_s), (bias_t, bias_s), rows, M)

    # ------------------------------------------------------------------ run (attend)
    def attend_plan(self, q: torch.Tensor, plan: CodePlan, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Deprecated name of :meth:`run`."""
        _renamed("CodeKVCache.attend_plan", "CodeKVCache.run")
        return self.run(q, plan, **kwargs)

    @reads
    def run(self, q: torch.Tensor, plan: CodePlan, *, kind: str | None = None, alpha: int = 2,
            scale: float | None = None, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q (B, Hq, M, D)`` over a plan's survivors (keys with ``score >= tau``,
        causal: query m of M sits at position ``n - M + m``).

        ``kind="relu"``: weights ``relu(scale * score - bias) ** alpha`` (exact ReLU^alpha when
        ``tau = bias / scale``); ``kind="softmax"``: softmax over the kept keys. Returns
        ``(out (B, Hq, M, D) in q's dtype, lse (B, Hq, M) float32)``; rows with no kept key are
        zeros (lse -inf).
        """
        self._check_q(q)
        return self._run(q, plan, kind=kind, alpha=alpha, scale=scale, num_splits=num_splits)

    def _run(self, q, plan: CodePlan, *, kind=None, alpha=2, scale=None, num_splits=None):
        """:meth:`run`'s body: ``q`` checked, the read lock held by the caller."""
        kind = resolve_kind(kind, "CodeKVCache.run")
        if kind not in ("softmax", "relu"):
            raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
        if not self.has_values:
            raise ValueError("this cache holds keys only (v=None): no attention")
        check_alpha(alpha)
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        s = float(scale) if scale is not None else D ** -0.5
        BH = B * self.Hkv
        nprog = plan.count.shape[1]
        splits = int(num_splits or max(1, min(64, 2 * _num_sms(self.device) // BH)))
        splits = min(splits, nprog)
        BHM = B * Hq * M
        if plan.m != M or plan.rows != max(16, triton.next_power_of_2(G * M)):
            raise ValueError("the plan was made for other queries (different M or group size)")
        tau_t, tau_s = plan.tau
        bias_t, bias_s = plan.bias
        ts = tau_t.stride() if tau_t is not None else (0, 0, 0)
        bs = bias_t.stride() if bias_t is not None else (0, 0, 0)
        o_part = torch.empty(splits, BHM, D, dtype=torch.float32, device=self.device)
        l_part = torch.empty(splits, BHM, dtype=torch.float32, device=self.device)
        _code_attend_kernel[(splits, BH)](
            q, self.k, self.v, tau_t if tau_t is not None else plan.count, tau_s,
            bias_t if bias_t is not None else plan.count, bias_s, plan.surv, plan.count, o_part, l_part,
            q.stride(0), q.stride(1), q.stride(2), self.k.stride(0), self.k.stride(1), self.k.stride(2),
            self.v.stride(0), self.v.stride(1), self.v.stride(2), *ts, *bs,
            self.n, M, G, self.Hkv, plan.surv.stride(0), plan.seg, nprog, splits, BHM, s * LOG2E, s,
            ROWS=plan.rows, BLOCK_N=64, HEAD_DIM=D, KIND=0 if kind == "softmax" else 1, ALPHA=int(alpha),
            UPCAST=interpreting() or q.dtype == torch.float32, TAU_TENSOR=tau_t is not None,
            BIAS_TENSOR=bias_t is not None, num_warps=4)
        out = torch.empty(B, Hq, M, D, dtype=torch.float32, device=self.device)
        lse = torch.empty(B, Hq, M, dtype=torch.float32, device=self.device)
        merge_partials(o_part, l_part, out, lse, M)
        return out.to(q.dtype), lse

    @reads  # plan and run under one read: an add cannot fall between them
    def attend(self, q: torch.Tensor, *, tau: float | torch.Tensor | None = None, kind: str | None = None,
               alpha: int = 2, bias: float | torch.Tensor = 0.0, scale: float | None = None,
               num_splits: int | None = None) -> torch.Tensor:
        """Filter + attend in one call. ReLU^alpha defaults to ``tau = bias / scale`` (exact);
        softmax needs ``tau`` (raw score). Returns ``out (B, Hq, M, D)``."""
        kind = resolve_kind(kind, "CodeKVCache.attend")
        s = float(scale) if scale is not None else self.D ** -0.5
        if tau is None:
            if kind == "softmax":
                raise ValueError("softmax on the code cache keeps the keys with score >= tau: give tau=")
            tau = (bias / s).float() if torch.is_tensor(bias) else float(bias) / s
        # one check of q, tau and bias (their values cost a device sync) and one lock for the step
        self._check_q(q, tau, bias)
        plan = self._plan(q, tau, bias=bias)
        out, _ = self._run(q, plan, kind=kind, alpha=alpha, scale=s, num_splits=num_splits)
        return out

    def hsr_attention(self, q: torch.Tensor, *, kind: str = "relu", alpha: int = 2, bias: float | torch.Tensor = 0.0,
                      scale: float | None = None, tau: float | torch.Tensor | None = None, causal: bool = True
                      ) -> torch.Tensor:
        """The :func:`hsr.hsr_attention` entry for this cache (``q (B, Hq, M, D)`` on its device)."""
        if not (torch.is_tensor(q) and q.device == self.device):
            raise TypeError(f"a CodeKVCache on {self.device} takes query tensors (B, Hq, M, D) on the same device")
        if not causal and q.shape[2] > 1:
            raise ValueError("the code cache attends the last M positions causally: pass causal=True for M > 1")
        return self.attend(q, tau=tau, kind=kind, alpha=alpha, bias=bias, scale=scale)

    def keys_read_bytes(self) -> int:
        """Bytes one filter step reads: codes, steps and errors of every key of every head."""
        return self.B * self.Hkv * self.n * (self.DP + 8)

    def __repr__(self):
        return (f"CodeKVCache(B={self.B}, Hkv={self.Hkv}, n={self.n}, D={self.D}, dtype={self.dtype}, "
                f"device={self.device})")


def __getattr__(name):
    # GPUCodeIndex lives in code_index.py (it builds on CodeKVCache); its old path keeps working
    if name == "GPUCodeIndex":
        from .code_index import GPUCodeIndex

        return GPUCodeIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

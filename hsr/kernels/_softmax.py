"""Shared Triton pieces of the attention kernels: the online softmax and its constants.

This module owns

* the named constants ``LOG2E`` / ``LN2`` (host floats) and their ``tl.constexpr`` twins for
  use inside kernels (Triton only lets a jitted function read a global that is a constexpr);
* ``_dot``: ``tl.dot`` in float32 (ieee) when asked to upcast;
* ``_weighted_values``: weights times a value tile, accumulated in float32;
* ``_online_softmax_step`` (a tile of query rows) and ``_online_softmax_step_row`` (one query
  row): the FlashAttention update of the running max ``m_i``, the normaliser ``l_i`` and the
  accumulator ``acc`` with one tile of scores;
* ``_weights_epilogue``: the same for softmax or ReLU^alpha partials (``lse = log sum w``);
* ``_ipow``, ``_relu_base``, ``_relu_rows_step`` / ``_relu_row_step``: ``x ** ALPHA`` as
  ``ALPHA - 1`` unrolled products, the masked ReLU base ``relu(s * scale - bias)``, and the
  ReLU^alpha update of the running sums, scaled by the rows' running maximum;
* ``_softmax_epilogue``: the division by ``l_i`` and the natural-log lse, with empty rows
  (no finite score) giving 0 and ``-inf``;
* ``_query_tile`` and ``_store_rows``: the load of one head's query tile (queries are the
  last ``M`` of ``N`` positions, tiles aligned to absolute positions) and the store of its
  output and lse rows, as the prefill kernels share them;
* ``_pdl_enter``: the first statement of a kernel launched as a programmatic dependent
  launch (``launch_pdl=True``, :func:`~hsr.kernels._compat.pdl_supported`).

Convention: scores reach these helpers already multiplied by ``scale * LOG2E`` (the wrappers
fold ``LOG2E`` into ``qk_scale``), so every exponential is an ``exp2`` and the running max
``m_i`` is in base-2 units; masked scores are ``-inf``.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: log2(e): natural-log scores times LOG2E are base-2 scores, so exp(x) == exp2(x * LOG2E)
LOG2E = 1.4426950408889634
#: ln(2): a base-2 log-sum-exp times LN2 is the natural one
LN2 = 0.6931471805599453

_LN2 = tl.constexpr(LN2)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # The CPU interpreter cannot multiply bf16 and float32 inputs should not drop to tf32:
    # UPCAST does the product in float32 (ieee). On the GPU with 16-bit inputs it is False.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _weighted_values(w, v, UPCAST: tl.constexpr):
    """``w @ v`` in float32: w (ROWS, N) float32 weights, v (N, D) values.

    Without UPCAST the weights are cast to v's 16-bit dtype so the product runs on tensor
    cores (FlashAttention does the same with P); the accumulation stays float32.
    """
    if UPCAST:
        return _dot(w, v, UPCAST)
    else:
        return tl.dot(w.to(v.dtype), v)


@triton.jit
def _rescale(m_i, m_tile):
    """New running max and the base-2 max to subtract from the scores.

    A row whose max is still -inf (every score so far masked) subtracts 0 instead, so that
    ``exp2(-inf - -inf)`` (NaN) never happens: its weights are exp2(-inf) = 0.
    """
    m_new = tl.maximum(m_i, m_tile)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_use


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """One online-softmax update for a tile of query rows.

    Parameters
    ----------
    s : (ROWS, N) float32
        Base-2 scores of the tile (``scale * LOG2E * <q, k>``), ``-inf`` where masked.
    v : (N, D)
        The tile's values (masked keys may hold anything finite: their weight is 0).
    m_i, l_i : (ROWS,) float32
        Running base-2 max and normaliser ``sum exp2(s - m_i)``.
    acc : (ROWS, D) float32
        Running ``sum exp2(s - m_i) v``.

    Returns
    -------
    m_i, l_i, acc
        Updated; ``acc / l_i`` is the softmax average over every tile so far.
    """
    m_new, m_use = _rescale(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _weighted_values(p, v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _online_softmax_step_row(s, v, m_i, l_i, acc):
    """The same update for a single query row (no ``tl.dot``: a row is below its 16-row
    minimum): s (N,) float32 base-2 scores, v (N, D), m_i and l_i float32 scalars, acc (D,)
    float32."""
    m_new, m_use = _rescale(m_i, tl.max(s, 0))
    p = tl.math.exp2(s - m_use)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
    return m_new, l_i, acc


@triton.jit
def _softmax_epilogue(m_i, l_i):
    """``(l_safe, lse)`` from the running base-2 max and normaliser (any shape, elementwise).

    ``l_safe`` is ``l_i`` with empty rows (``l_i == 0``) replaced by 1, so ``acc / l_safe``
    gives 0 there; ``lse`` is the natural-log log-sum-exp of the scaled scores, ``-inf`` for
    empty rows (what the split merge expects).
    """
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    return l_safe, lse


@triton.jit
def _weights_epilogue(m_i, l_i, KIND: tl.constexpr, ALPHA: tl.constexpr):
    """``(l_safe, lse)`` for softmax (``KIND == 0``: :func:`_softmax_epilogue`) or ReLU^alpha
    (``KIND == 1``, sums kept scaled by the row maximum ``m`` of ``relu``: the natural log of
    the row's sum of weights, ``log l + ALPHA log m``, ``-inf`` for empty rows), so the split
    merge (log-sum-exp weights) averages ReLU partials correctly too."""
    if KIND == 0:
        l_safe, lse = _softmax_epilogue(m_i, l_i)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        lse = tl.where(l_i > 0.0, tl.log(l_safe) + ALPHA * tl.log(tl.where(m_i > 0.0, m_i, 1.0)),
                       float("-inf"))
    return l_safe, lse


@triton.jit
def _ipow(x, ALPHA: tl.constexpr):
    """``x ** ALPHA`` (elementwise) as ``ALPHA - 1`` products, unrolled at compile time."""
    p = x
    for _ in tl.static_range(ALPHA - 1):
        p = p * x
    return p


@triton.jit
def _running_max_init(ROWS: tl.constexpr, KIND: tl.constexpr):
    """The rows' running maximum before the first tile: ``-inf`` for softmax scores, 0 for the
    ReLU base (never negative)."""
    if KIND == 0:
        m = tl.full([ROWS], float("-inf"), tl.float32)
    else:
        m = tl.zeros([ROWS], tl.float32)
    return m


@triton.jit
def _relu_base(s, keep, qk_scale, bias):
    """``relu(s * qk_scale - bias)`` where ``keep``, 0 elsewhere (the base of ReLU^alpha)."""
    return tl.where(keep, tl.maximum(s * qk_scale - bias, 0.0), 0.0)


@triton.jit
def _relu_rows_step(x, v, m_i, l_i, acc, ALPHA: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one tile of ReLU^alpha into rows' running sums, scaled by each row's running
    maximum ``m`` of the base ``x (ROWS, N)`` (0 where masked): the weights are
    ``p = (x / m) ** ALPHA`` in [0, 1] and the sums are rescaled by ``(m_old / m_new) ** ALPHA``
    when ``m`` grows. Raw powers would underflow fp32 (``x ** 16`` for ``x < 4e-3``: a row whose
    keys all fire weakly would come out zero) or overflow a 16-bit ``p @ v``; these cannot.
    ``m_i`` starts at 0; :func:`_weights_epilogue` turns ``(m, l)`` into ``log sum w``."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    inv = tl.where(m_new > 0.0, 1.0 / tl.where(m_new > 0.0, m_new, 1.0), 0.0)
    p = _ipow(x * inv[:, None], ALPHA)
    corr = _ipow(m_i * inv, ALPHA)  # (old max over new max, in [0, 1]) ** alpha
    l_i = l_i * corr + tl.sum(p, 1)
    acc = acc * corr[:, None] + _weighted_values(p, v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _relu_row_step(x, v, m_i, l_i, acc, ALPHA: tl.constexpr):
    """:func:`_relu_rows_step` for one row: ``x (N,)``, ``v (N, D)``, scalar ``m_i``, ``l_i``."""
    m_new = tl.maximum(m_i, tl.max(x, 0))
    inv = tl.where(m_new > 0.0, 1.0 / tl.where(m_new > 0.0, m_new, 1.0), 0.0)
    p = _ipow(x * inv, ALPHA)
    corr = _ipow(m_i * inv, ALPHA)
    l_i = l_i * corr + tl.sum(p, 0)
    acc = acc * corr + tl.sum(p[:, None] * v.to(tl.float32), 0)
    return m_new, l_i, acc


@triton.jit
def _query_tile(Q, b, h, sqb, sqh, sqm, pid_m, M, N, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Query tile ``pid_m`` of head ``(b, h)``, in absolute positions so that a tile never
    straddles a query block: tiles are aligned to ``BLOCK_M`` from position 0 and the first
    one holds query position ``N - M``.

    Returns ``(q, t_abs, offs_m, rows, row_ok, offs_d)``: the tile ``(BLOCK_M, HEAD_DIM)``
    (zeros outside the queries), its first absolute position, the rows' absolute positions,
    their query rows, whether each is a query, and the head-dim offsets.
    """
    q0 = N - M
    t_abs = (q0 // BLOCK_M) * BLOCK_M + pid_m * BLOCK_M
    offs_m = t_abs + tl.arange(0, BLOCK_M)
    rows = offs_m - q0
    row_ok = (rows >= 0) & (rows < M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None].to(tl.int64) * sqm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    return q, t_abs, offs_m, rows, row_ok, offs_d


@triton.jit
def _store_rows(O, LSE, out, lse, b, h, rows, row_ok, offs_d, sob, soh, som, slb, slh):
    """Store a query tile's output rows (in ``O``'s dtype) and lse rows, the real ones only."""
    tl.store(O + b.to(tl.int64) * sob + h * soh + rows[:, None].to(tl.int64) * som
             + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * slb + h * slh + rows, lse, mask=row_ok)


@triton.jit
def _pdl_enter():
    # A programmatic dependent launch lets this kernel's programs be scheduled while the kernel
    # before it in the stream still runs (its launch latency hidden). Wait until that kernel
    # has ended and its writes are visible (the wait returns at once where there is none),
    # then let the next such kernel be scheduled: it waits the same way, so every kernel of
    # the chain starts its work only after all before it have finished, as without PDL.
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()

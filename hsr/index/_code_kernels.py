"""numba kernels of the code filter: per-key int8 codes with an exact per-key error bound.

Everything is a module-level function over flat arrays; ``codes.py`` holds the arrays.

Layout (``n`` keys, dimension ``d``, padded dimension ``dp = d`` rounded up to even)
-----------------------------------------------------------------------------------

==============  ======================  ==================================================
array           shape, dtype            meaning
==============  ======================  ==================================================
rot             (dp, d) float64         rotation (rows = the basis; zero rows pad d to dp)
codes           (n_blocks, dp/2, 32, 2) int8 codes of ``rot @ k``, 32 keys per block in id
                int8                    order, transposed in pairs of dimensions: entry
                                        ``[b, p, t, h]`` is dimension ``2p + h`` of key
                                        ``32*b + t``. A block is one contiguous 32*dp-byte
                                        read, and 32 bytes hold two dimensions of 16 keys
                                        side by side: the operand layout of the
                                        multiply-add-pairs instruction (``_pair_dot``)
scale           (n,) float32            per-key step ``s``: ``rot @ k ~= s * c``, ``|c| <= 127``
err             (n,) float32            ``>= ||k - rot^T (s c)||``, rounded up (see below)
==============  ======================  ==================================================

The bound
---------
For any matrix ``R``, ``<q, k> = <R q, s c> + <q, k - R^T s c>``, so by Cauchy-Schwarz

    <q, k>  <=  s * <R q, c>  +  ||q|| * ||k - R^T s c||

The query side is quantised too, so the inner loop is an exact integer dot product:
``R q = a * qi + rq`` with ``qi`` int16 and ``|rq_j| <= a / 2``; then
``s <R q, c> <= s * a * <qi, c> + ||rq|| * s ||c||``. ``<qi, c>`` is summed in int32 (exact:
``QMAX`` keeps it from overflowing) in pairs of dimensions by the CPU's multiply-add-pairs
instructions (``pair_dot_RxB``, written as LLVM IR). The remaining terms (``||rq|| * max_j s_j ||c_j||``,
the float32 evaluation of the bound, the rotation's rounding, and the gap between the
canonical score and the real dot product) are one per-query slack computed in ``codes.py``; a key is a
*candidate* when its bound reaches ``tau - slack`` and is then decided by its canonical score.
So no key whose canonical score is ``>= tau`` is ever dropped.

``err`` is computed in float64 from the rotated key ``x = R k`` as ``||x - s c||`` plus the
distance between that and ``||k - R^T s c||``: ``(defect(R) + 2 dp^1.5 2^-53) ||k||``, where
``defect(R) >= ||R^T R - I||_2`` is measured once (``codes.py``), then rounded up to float32.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._numerics import dot_canonical4


#: keys per code block (one transposed block is read at once, its sums run in vector lanes)
BLOCK = 32
#: largest code magnitude: int8 codes in [-127, 127]
CMAX = 127
#: candidates a row collects before they are verified in one batch
_PENDING = 64


@njit(cache=True, nogil=True, parallel=True)
def quantize(x, knorm, defect, start, codes, scale, err):
    """Quantise rotated keys ``x (k, dp)`` float64 (ids ``start .. start+k-1``) in place into
    ``codes``, ``scale`` and ``err``; ``knorm (k,)`` are the keys' norms (float64)."""
    k, dp = x.shape
    rel = 4.0 * dp * 2.0 ** -53
    for i in prange(k):
        gid = start + i
        b = gid // BLOCK
        t = gid % BLOCK
        amax = 0.0
        for j in range(dp):
            a = abs(x[i, j])
            if a > amax:
                amax = a
        s = np.float32(amax / CMAX)
        if np.float64(s) * CMAX < amax:  # round the step up so codes stay within +-127
            s = np.nextafter(s, np.float32(np.inf))
        s64 = np.float64(s)
        e2 = 0.0
        for j in range(dp):
            c = 0.0
            if s64 > 0.0:
                c = np.rint(x[i, j] / s64)
                if c > CMAX:
                    c = CMAX
                elif c < -CMAX:
                    c = -CMAX
            codes[b, j >> 1, t, j & 1] = np.int8(c)
            r = x[i, j] - s64 * c
            e2 += r * r
        e = np.sqrt(e2) * (1.0 + rel) + (defect + rel) * knorm[i] + 1e-300
        e32 = np.float32(e)
        if np.float64(e32) < e:
            e32 = np.nextafter(e32, np.float32(np.inf))
        scale[gid] = s
        err[gid] = e32


# ------------------------------------------------------------------ the integer products
def _madd_flavour() -> str:
    """Which multiply-add-pairs the host has: ``"avx512"`` (``vpmaddwd`` on 512 bits, which
    LLVM fuses with the accumulation into ``vpdpwssd`` where AVX512-VNNI is present),
    ``"avx2"`` (256 bits) or ``"generic"`` (portable vector IR, correct everywhere). Generic
    whenever numba is told to compile for another CPU than this one (``NUMBA_CPU_NAME``):
    its cache may then be loaded on a machine without these instructions."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "generic"
    try:
        from llvmlite import binding

        feats = binding.get_host_cpu_features()
    except Exception:  # an unknown host: the portable form
        return "generic"
    if feats.get("avx512bw", False):
        return "avx512"
    if feats.get("avx2", False):
        return "avx2"
    return "generic"


_FLAVOUR = _madd_flavour()
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)


def _madd(builder, w, q):
    """``<16 x i32>``: ``w[2t] q[2t] + w[2t+1] q[2t+1]`` of two ``<32 x i16>`` vectors (exact:
    each sum is at most ``2 * 127 * 32767`` in magnitude)."""
    if _FLAVOUR == "avx512":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [w.type, q.type]),
                                            "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [w, q])
    if _FLAVOUR == "avx2":
        v16 = ir.VectorType(_I16, 16)
        v8 = ir.VectorType(_I32, 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v16, v16]), "llvm.x86.avx2.pmadd.wd")
        lo = ir.Constant(_V16, list(range(16)))
        hi = ir.Constant(_V16, list(range(16, 32)))
        a = builder.call(fn, [builder.shuffle_vector(w, w, lo), builder.shuffle_vector(q, q, lo)])
        b = builder.call(fn, [builder.shuffle_vector(w, w, hi), builder.shuffle_vector(q, q, hi)])
        return builder.shuffle_vector(a, b, ir.Constant(_V16, list(range(16))))
    ev = ir.Constant(_V16, list(range(0, 32, 2)))
    od = ir.Constant(_V16, list(range(1, 32, 2)))
    prod = []
    for sel in (ev, od):
        x = builder.sext(builder.shuffle_vector(w, w, sel), _V16)
        y = builder.sext(builder.shuffle_vector(q, q, sel), _V16)
        prod.append(builder.mul(x, y))
    return builder.add(prod[0], prod[1])


def _data(context, builder, ty, value):
    """The data pointer of a numba array argument of an intrinsic (``ty`` its numba type)."""
    return context.make_array(ty)(context, builder, value).data


def _make_pair_dot(R: int, B: int):
    """An intrinsic ``pair_dot(codes, cbase, cstride, qp, qbase, qstride, npairs, out)``: the
    exact int32 products of R query rows with B code blocks, register-blocked like a GEMM's
    micro-kernel (2 R B vector accumulators, one read and widening of each 64-byte slice of
    codes for all R rows, one broadcast of each row's pair for all B blocks).

    ``codes`` is the flat int8 code array, block k at ``cbase + k * cstride``; ``qp`` the flat
    int32 array of query pairs (two int16 halves: dimension 2p low, 2p + 1 high), row i at
    ``qbase + i * qstride``; ``out[(i B + k) 32 + t]`` receives ``<qi_i, c_(block k, lane t)>``.
    Written as LLVM IR because numba's own arithmetic widens int16 products to int64 and never
    reaches the multiply-add-pairs instructions (measured 8x slower on the same layout)."""

    @intrinsic
    def pair_dot(typingctx, codes, cbase, cstride, qp, qbase, qstride, npairs, out):
        sig = types.void(codes, cbase, cstride, qp, qbase, qstride, npairs, out)

        def codegen(context, builder, signature, args):
            ca, cb, cs, qa, qb, qs, npr, oa = args
            types_ = signature.args
            cptr, qptr, optr = (_data(context, builder, types_[i], v) for i, v in ((0, ca), (3, qa), (7, oa)))
            cb, cs, qb, qs, npr = (builder.sext(v, _I64) if v.type.width < 64 else v for v in (cb, cs, qb, qs, npr))
            zero = ir.Constant(_V16, None)
            entry = builder.basic_block
            loop = builder.append_basic_block("pd_loop")
            done = builder.append_basic_block("pd_done")
            builder.cbranch(builder.icmp_signed(">", npr, ir.Constant(_I64, 0)), loop, done)
            builder.position_at_end(loop)
            p = builder.phi(_I64)
            p.add_incoming(ir.Constant(_I64, 0), entry)
            accs = []
            for _ in range(2 * R * B):
                a = builder.phi(_V16)
                a.add_incoming(zero, entry)
                accs.append(a)
            # one pair of dimensions of B blocks: 2 x 32 bytes each, widened to int16 once
            w = []
            for k in range(B):
                base = builder.add(builder.add(cb, builder.mul(cs, ir.Constant(_I64, k))),
                                   builder.mul(p, ir.Constant(_I64, 2 * BLOCK)))
                for h in range(2):
                    ptr = builder.gep(cptr, [builder.add(base, ir.Constant(_I64, BLOCK * h))])
                    v = builder.load(builder.bitcast(ptr, ir.PointerType(ir.VectorType(_I8, 32))), align=1)
                    w.append(builder.sext(v, ir.VectorType(_I16, 32)))
            new = []
            for i in range(R):
                qv = builder.load(builder.gep(qptr, [builder.add(qb, builder.add(builder.mul(qs, ir.Constant(_I64, i)), p))]))
                qvec = builder.insert_element(ir.Constant(_V16, ir.Undefined), qv, ir.Constant(_I32, 0))
                qvec = builder.shuffle_vector(qvec, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, None))
                q16 = builder.bitcast(qvec, ir.VectorType(_I16, 32))
                for k in range(B):
                    for h in range(2):
                        j = 2 * (i * B + k) + h
                        new.append(builder.add(accs[j], _madd(builder, w[2 * k + h], q16)))
            p1 = builder.add(p, ir.Constant(_I64, 1))
            p.add_incoming(p1, loop)
            for a, v in zip(accs, new):
                a.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", p1, npr), loop, done)
            builder.position_at_end(done)
            res = []
            for v in new:
                ph = builder.phi(_V16)
                ph.add_incoming(zero, entry)
                ph.add_incoming(v, loop)
                res.append(ph)
            for j, v in enumerate(res):
                dst = builder.gep(optr, [ir.Constant(_I64, 16 * j)])
                builder.store(v, builder.bitcast(dst, ir.PointerType(_V16)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return pair_dot


#: one row, one block (single searches, the remainder kernel); one row, four blocks (a few
#: queries: four independent accumulator pairs hide the multiply-add latency, measured 4x
#: the one-block rate); eight rows, one block (batches: 16 accumulators, one code read per
#: eight rows)
pair_dot_1x1 = _make_pair_dot(1, 1)
pair_dot_1x4 = _make_pair_dot(1, 4)
pair_dot_8x1 = _make_pair_dot(8, 1)
#: four rows, one block: the bounds of a GQA group's few query rows (:func:`code_bounds`), half
#: the products of the 8-row form padded with zero rows
pair_dot_4x1 = _make_pair_dot(4, 1)


@njit(cache=True, nogil=True)
def _collect_near(i, r, p, first, cnt, ubs, th, near, alive, has_dead, cand, ncand, shift, rscale, hist, looked):
    """Append the lanes of one block whose bound ``ubs[t]`` reaches ``th`` (and are alive) to
    row slot i's pending list, and in the same pass the histogram of ``rscale ub + shift``
    (<= 0, quarter e-folds) of the block's non-candidates (those below ``near`` in the last
    bin); counts the lanes looked at."""
    looked[r, p] += cnt
    last = hist.shape[2] - 1
    nc = ncand[i]
    for t in range(cnt):
        if has_dead and alive[first + t] == 0:
            continue
        if ubs[t] >= th:
            cand[i, nc] = first + t
            nc += 1
        elif ubs[t] < near:  # below the near edge: the last bin (e^-_FAR) bounds it
            hist[r, p, last] += 1
        else:
            k = int(np.floor(-4.0 * (rscale * np.float64(ubs[t]) + shift)))
            hist[r, p, min(max(k, 0), last)] += 1
    ncand[i] = nc


@njit(cache=True, nogil=True)
def _verify(Q, r, i, p, tau_r, keys, cand, ncand, sc4, cap, buf_ids, buf_sc, counts, stats, want_rem, rscale, rem):
    """Decide row r's pending candidates (slot i) by their canonical scores, four at a time,
    appending the hits (ascending ids) to its buffer."""
    nc = ncand[i]
    if nc == 0:
        return
    stats[r, p] += nc
    for x in range(nc, (nc + 3) // 4 * 4):
        cand[i, x] = cand[i, nc - 1]
    for x in range(0, nc, 4):
        dot_canonical4(Q[r], keys, cand[i, x], cand[i, x + 1], cand[i, x + 2], cand[i, x + 3], sc4)
        for y in range(min(4, nc - x)):
            if sc4[y] >= tau_r:
                c = counts[r, p]
                if c < cap:
                    buf_ids[r, p, c] = cand[i, x + y]
                    buf_sc[r, p, c] = sc4[y]
                counts[r, p] = c + 1
            elif want_rem:
                rem[r, p] += np.exp(rscale * (np.float64(sc4[y]) - tau_r))
    ncand[i] = 0


#: code blocks per task of :func:`code_bounds`
_BOUND_CHUNK = 16


@njit(cache=True, nogil=True, inline="always")
def _block_bounds(b, m, dh, QP8, qa, qn, slack, cflat, scale, err, n, widen, acc, out):
    """:func:`code_bounds` of block ``b`` for every row."""
    first = b * BLOCK
    cnt = min(BLOCK, n - first)
    for g in range(0, m, 8):
        if m - g <= 4:
            pair_dot_4x1(cflat, b * dh * 2 * BLOCK, dh * 2 * BLOCK, QP8, g * dh, dh, dh, acc)
        else:
            pair_dot_8x1(cflat, b * dh * 2 * BLOCK, dh * 2 * BLOCK, QP8, g * dh, dh, dh, acc)
        for i in range(min(8, m - g)):
            a = qa[g + i]
            qq = qn[g + i]
            sl = slack[g + i]
            # 1-D slices: the lane loop then compiles to vector arithmetic (2-D indexing kept
            # it scalar: 3.5 ns a bound)
            o = out[g + i, first:first + cnt]
            sc = scale[first:first + cnt]
            er = err[first:first + cnt]
            ac = acc[i * BLOCK:i * BLOCK + cnt]
            for t in range(cnt):
                o[t] = np.float64(sc[t]) * a * np.float64(ac[t]) + (qq * np.float64(er[t]) + sl) * widen


@njit(cache=True, nogil=True, parallel=True)
def code_bounds(QP, qa, qn, slack, codes, scale, err, n, widen, out):
    """``out[r, j] = s_j a_r <qi_r, c_j> + (||q_r|| err_j + slack_r) * widen`` for ids
    ``j < n``, float64 ``(m, n)``: the centre of key j's score interval plus ``widen`` times
    its half-width, in one pass (no ``(m, n)`` temporaries). ``widen = +-(1 + 4 eps)`` gives
    the upper / lower bounds. ``QP (m8, dp/2)`` int32 query pairs, rows padded with zeros to a
    multiple of 8; parallel over blocks; eight rows share each read of a block
    (``pair_dot_8x1``; the last group of at most four rows ``pair_dot_4x1``)."""
    m = out.shape[0]
    dh = QP.shape[1]
    nb = (n + BLOCK - 1) // BLOCK
    cflat = codes.reshape(-1)
    qflat = QP.reshape(-1)
    for c in prange((nb + _BOUND_CHUNK - 1) // _BOUND_CHUNK):
        acc = np.empty(8 * BLOCK, dtype=np.int32)  # one per chunk of blocks (per block: 25% of the time)
        for b in range(c * _BOUND_CHUNK, min(nb, (c + 1) * _BOUND_CHUNK)):
            _block_bounds(b, m, dh, qflat, qa, qn, slack, cflat, scale, err, n, widen, acc, out)



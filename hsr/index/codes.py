"""The code filter: per-key int8 codes with an exact error bound, and filter-then-verify.

:class:`CodeStore` holds the codes of a growing key set (the keys themselves stay with the
:class:`~hsr.HSRIndex`, which owns ids, liveness and the full-precision rows). A search reads
every visible key's code once per tile of queries, keeps the keys whose upper bound reaches
``tau - slack`` and decides each of those by its canonical score (``_code_kernels`` explains
the bound and why nothing whose canonical score is ``>= tau`` is ever dropped).

Growth is ``O(d)`` per key: appending writes the key's code, step and error; nothing is
rebuilt. Coding is lazy: keys appended since the last search are coded in one batch by the
next search (``sync``), so a decode step's ``add`` is a copy.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _batch_kernels as BK
from . import _code_kernels as CK

__all__ = ["CodeStore", "ROTATIONS"]

ROTATIONS = ("random", "pca", "none")
#: query rows that share one pass over a range of codes (``_batch_kernels``)
_TILE_ROWS = BK.TILE_ROWS
_EPS64 = 2.0 ** -53
#: e-folds below tau past which a key's mass is only counted (e^-40 each) in a remainder
_FAR = 40.0
_U32 = 2.0 ** -24


def _rotation(kind: str, d: int, dp: int, sample: np.ndarray | None, seed: int) -> np.ndarray:
    """``(dp, d)`` float64 rotation: a seeded random orthogonal matrix, the principal axes of
    ``sample`` (rows sorted by variance), or the identity; rows ``d .. dp-1`` are zero."""
    rot = np.zeros((dp, d))
    if kind == "none":
        rot[:d] = np.eye(d)
    elif kind == "random":
        g = np.random.default_rng(seed).standard_normal((d, d))
        qm, rm = np.linalg.qr(g)
        rot[:d] = (qm * np.sign(np.diag(rm))).T  # sign fix: a Haar-distributed rotation
    else:
        if sample is None or sample.shape[0] < 2:
            rot[:d] = np.eye(d)
        else:
            x = sample.astype(np.float64)
            x = x - x.mean(axis=0)
            _, v = np.linalg.eigh(x.T @ x)
            rot[:d] = v[:, ::-1].T
    return rot


def _defect(rot: np.ndarray) -> float:
    """An upper bound on ``||R^T R - I||_2`` (its Frobenius norm, padded for its rounding)."""
    d = rot.shape[1]
    g = rot.T @ rot - np.eye(d)
    return float(np.sqrt((g * g).sum())) * (1.0 + 1e-6) + 4.0 * d * d * _EPS64


class CodeStore:
    """int8 codes of keys ``0 .. n-1`` after a rotation, with per-key steps and error bounds.

    Parameters
    ----------
    dim : int
        Key dimension ``d``.
    rotation : {"random", "pca", "none"}
        Applied before quantising: a seeded random orthogonal matrix spreads each key's
        energy evenly over the coordinates (a smaller largest coordinate, so a finer step);
        ``"pca"`` uses the principal axes of the first keys coded.
    seed : int
        Seeds the random rotation.
    canonical_eps : float
        Unit roundoff of the index's working dtype (``2**-24`` for float32): sizes the gap
        between a canonical score and the real dot product.
    """

    def __init__(self, dim: int, rotation: str = "random", seed: int = 0, canonical_eps: float = 2.0 ** -24):
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.dim = int(dim)
        self.dp = self.dim + (self.dim % 2)
        self.rotation = rotation
        self.seed = int(seed)
        self._u = float(canonical_eps)
        # |<qi, c>| <= dp * QMAX * 127 must fit int32
        self.qmax = int(min(32767, (2 ** 31 - 1) // (CK.CMAX * self.dp)))
        self.rot = None
        self.defect = 0.0
        self.codes = np.zeros((0, self.dp // 2, CK.BLOCK, 2), dtype=np.int8)
        self.scale = np.zeros(0, dtype=np.float32)
        self.err = np.zeros(0, dtype=np.float32)
        self.n = 0
        self.max_err = 0.0
        self._hit_share = 0.0  # the share of a block range's keys one row found, recently (see _cap)
        self._layouts = {}

    # ------------------------------------------------------------------ growth
    def _reserve(self, n: int) -> None:
        if n <= self.scale.shape[0]:
            return
        cap = max(n, 2 * self.scale.shape[0], 1024)
        cap = -(-cap // CK.BLOCK) * CK.BLOCK
        codes = np.zeros((cap // CK.BLOCK, self.dp // 2, CK.BLOCK, 2), dtype=np.int8)
        codes[:self.codes.shape[0]] = self.codes
        scale = np.zeros(cap, dtype=np.float32)
        scale[:self.n] = self.scale[:self.n]
        err = np.zeros(cap, dtype=np.float32)
        err[:self.n] = self.err[:self.n]
        self.codes, self.scale, self.err = codes, scale, err

    def sync(self, keys: np.ndarray) -> None:
        """Code the keys ``keys[self.n:]`` (rows = ids; the working dtype of the index)."""
        n = keys.shape[0]
        if n <= self.n:
            return
        if self.rot is None:
            self.rot = _rotation(self.rotation, self.dim, self.dp, keys[:8192], self.seed)
            self.defect = _defect(self.rot)
        self._reserve(n)
        # bounded float64 temporaries: a chunk's keys cast to float64 and rotated are 2 * 8 * dp
        # bytes a row, 64 MiB for 2^16 rows at d = 64 (a quarter of 1M such keys' bytes)
        for s in range(self.n, n, 1 << 13):
            e = min(n, s + (1 << 13))
            k = keys[s:e]
            x = k @ self.rot.T if self.rotation != "none" else np.pad(k.astype(np.float64), ((0, 0), (0, self.dp - self.dim)))
            knorm = np.sqrt(np.einsum("ij,ij->i", k, k, dtype=np.float64))
            CK.quantize(np.ascontiguousarray(x, dtype=np.float64), knorm, self.defect, s, self.codes, self.scale,
                        self.err)
            self.max_err = max(self.max_err, float(self.err[s:e].max()))
        self.n = n

    def nbytes_per_key(self) -> int:
        """Bytes a scan reads per key: the code, its step and its error."""
        return self.dp + 8

    # ------------------------------------------------------------------ queries
    def _queries(self, Q: np.ndarray, tau: np.ndarray, max_norm: float):
        """Quantised rotated queries and the per-query thresholds of the filter.

        Returns ``QP (m8, dp/2) int32`` (the int16 query codes ``qi`` as pairs of dimensions,
        ``2p`` in the low half; rows padded with zeros to ``m8``, a multiple of 8, for the
        kernels' 8-row groups), ``qa (m,)`` (query step), ``qn (m,)`` (norms) and
        ``thr (m,)``: ``tau - slack``, the slack covering every rounding between a key's
        bound and its canonical score (see ``_code_kernels``), ``slack (m,)``, and the
        float32 ``qa32, qn32, thr32`` the filter runs on (``thr32`` rounded down)."""
        # one compiled pass (the numpy form of the same arithmetic took 37 us of a 32K search)
        return BK.prepare_queries(Q, self.rot, float(self.qmax), self.dim, self._query_w(max_norm),
                                  float(self.max_err), float(max_norm), self._u,
                                  np.ascontiguousarray(tau, dtype=np.float64))

    def _query_w(self, max_norm: float) -> float:
        """``w >= max_j s_j ||c_j||``, the code norm bound of the queries' slack."""
        return (1.0 + self.defect) * (1.0 + 1e-12) * max_norm + self.max_err

    def _layout(self, m, nb):
        """The tasks of a search of m queries over nb blocks: ``(n_parts, part_b, tile_r,
        task_tile, task_part)``. Threads go across query tiles when there are enough of them,
        else across block ranges too (one query: ``2 * threads`` ranges, so a thread that
        finishes early takes another). Cached per ``(m, nb, threads)``: a decode loop asks the
        same layout at every step (building it took a tenth of a 32K single search)."""
        nt = numba.get_num_threads()
        key = (m, nb, nt)
        got = self._layouts.get(key)
        if got is None:
            n_tiles = -(-m // _TILE_ROWS)
            n_parts = int(max(1, min(nb, -(-2 * nt // n_tiles))))
            part_b = np.linspace(0, nb, n_parts + 1).astype(np.int64)
            tile_r = np.minimum(np.arange(n_tiles + 1, dtype=np.int64) * _TILE_ROWS, m)
            task_tile = np.repeat(np.arange(n_tiles, dtype=np.int64), n_parts)
            task_part = np.tile(np.arange(n_parts, dtype=np.int64), n_tiles)
            got = (n_parts, part_b, tile_r, task_tile, task_part)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = got
        return got

    def _cap(self, per_part: int) -> int:
        """Room for one row's hits in one block range of ``per_part`` keys: a quarter more than
        the largest share of a range's keys a recent search found (at least 1024, at most the
        range). Kept as a share, not a count, so a search split into more or fewer ranges
        (another thread count, another batch size) gets room in proportion; a row whose hits
        do not fit is re-run (``BK.code_search``). Unused room costs address space only."""
        return int(min(per_part, max(1024, self._hit_share * per_part), 1 << 20))

    def _saw(self, most: int, per_part: int) -> None:
        """Remember the share of its range one row's hits took, and forget a larger one slowly:
        searches that alternate between thresholds (a range search, then a top-k's much higher
        one) would otherwise re-run every other call (measured: 3.5x the time of a 1M-key
        batch)."""
        self._hit_share = min(1.0, max(1.25 * most / per_part, 0.9 * self._hit_share))

    def range_search(self, Q, tau, lim, keys, alive, has_dead, max_norm, remainder_scale=None):
        """CSR ``(lims, ids, scores, codes_evaluated, keys_verified, remainder)`` of the keys
        with canonical ``score >= tau`` and id ``<= lim``; ids ascending within each row.

        With ``remainder_scale = s``, ``remainder (m,)`` bounds ``sum exp(s (score - tau))``
        over the visible live keys not reported (else None): the dropped mass of a softmax
        over the reported keys, relative to ``exp(s tau)``."""
        n = self.n
        m = Q.shape[0]
        nb = -(-n // CK.BLOCK)
        n_parts, part_b, tile_r, task_tile, task_part = self._layout(m, nb)
        per_part = -(-nb // n_parts) * CK.BLOCK
        cap = self._cap(per_part)
        if remainder_scale is None:  # the whole search in one compiled call
            lims, ids, scores, coded, verified, most = BK.code_search(
                Q, self.rot, float(self.qmax), self.dim, self._query_w(max_norm), float(self.max_err),
                float(max_norm), self._u, tau, lim, keys, self.codes, self.scale, self.err, alive, has_dead, n,
                task_tile, task_part, tile_r[:-1], tile_r[1:], part_b[:-1], part_b[1:], _TILE_ROWS, cap)
            self._saw(most, per_part)
            return lims, ids, scores, coded, verified, None
        # the remainder too: the kernel that also bounds what it does not report
        QP, qa, qn, thr, slack, qa32, qn32, thr32 = self._queries(Q, tau, max_norm)
        rscale = float(remainder_scale)
        # keys bounded further than _FAR e-folds below tau are only counted (each < e^-_FAR)
        near32 = (thr32 - np.float32(_FAR / rscale)).astype(np.float32)
        counts = np.zeros((m, n_parts), dtype=np.int64)
        stats = np.zeros((m, n_parts), dtype=np.int64)
        rem = np.zeros((m, n_parts))
        hist = np.zeros((m, n_parts, int(4 * _FAR) + 1), dtype=np.int64)
        looked = np.zeros((m, n_parts), dtype=np.int64)
        buf_ids = np.empty((m, n_parts, cap), dtype=np.int64)
        buf_sc = np.empty((m, n_parts, cap), dtype=keys.dtype)
        args = (QP, qa32, qn32, thr32, tau, lim, Q, keys, self.codes, self.scale, self.err, alive, has_dead, n,
                task_tile, task_part, tile_r[:-1], tile_r[1:], part_b[:-1], part_b[1:], cap, buf_ids, buf_sc,
                counts, stats)
        BK.code_range_remainder(*args, near32, slack, rscale, rem, hist, looked)
        lims = np.empty(m + 1, dtype=np.int64)
        coded = np.empty(m, dtype=np.int64)
        most = BK.csr_lims(counts, lim, n, lims, coded)
        ids, scores = BK.rerun_and_gather(QP, qa32, qn32, thr32, tau, lim, Q, keys, self.codes, self.scale, self.err,
                                          alive, has_dead, n, len(task_tile), tile_r[:-1], tile_r[1:], part_b[:-1],
                                          part_b[1:], _TILE_ROWS, cap, buf_ids, buf_sc, counts, lims, most)
        self._saw(most, per_part)
        # the far keys' bound, taken at the near threshold (a float32 value) plus the slack
        with np.errstate(over="ignore", invalid="ignore"):
            far_bound = np.exp(rscale * (near32.astype(np.float64) + slack - tau))
        far_bound = np.where(np.isfinite(far_bound), far_bound, np.where(np.isneginf(near32), 0.0, np.inf))
        # far: every visible key not looked at closely (visible - looked at), a count that
        # may include removed keys (an overcount keeps the bound)
        n_far = np.clip(np.minimum(lim, n - 1) + 1, 0, n) - looked.sum(axis=1)
        far_mass = np.where(n_far > 0, n_far * np.where(n_far > 0, far_bound, 0.0), 0.0)
        # bin k holds terms below exp(-k/4) (the last bin also everything further down)
        edges = np.exp(-np.arange(hist.shape[2]) / 4.0) * (1.0 + 1e-6)
        remainder = (rem.sum(axis=1) + hist.sum(axis=1) @ edges + far_mass) * (1.0 + 1e-12)
        return lims, ids, scores, coded, stats.sum(axis=1), remainder

    def upper_bounds(self, Q, max_norm, out=None):
        """Upper bounds of the canonical scores of every coded key, ``(m, n)`` float64, into
        ``out`` when given: the upper half of :meth:`bounds` in one compiled pass."""
        QP, qa, qn, _, slack = self._queries(Q, np.zeros(Q.shape[0]), max_norm)[:5]
        out = np.empty((Q.shape[0], self.n)) if out is None else out
        if self.n:
            CK.code_bounds(QP, qa, qn, slack, self.codes, self.scale, self.err, self.n, 1.0 + 4 * _EPS64, out)
        return out

    def bounds(self, Q, max_norm):
        """Upper and lower bounds of the canonical scores of every coded key, ``(m, n)``
        float64 each: ``centre +/- (||q|| err_j + slack)``."""
        QP, qa, qn, _, slack = self._queries(Q, np.zeros(Q.shape[0]), max_norm)[:5]
        upper, lower = np.empty((Q.shape[0], self.n)), np.empty((Q.shape[0], self.n))
        if self.n:
            for out, widen in ((upper, 1.0 + 4 * _EPS64), (lower, -(1.0 + 4 * _EPS64))):
                CK.code_bounds(QP, qa, qn, slack, self.codes, self.scale, self.err, self.n, widen, out)
        return upper, lower

    def topk(self, Q, k, lim, keys, alive, has_dead, max_norm, top_s, top_i, stats):
        """Exact top-k through the batch range search: a threshold no higher than each
        query's k-th best canonical score, then the k best of the keys that reach it.

        The threshold is the k-th best score over an evenly spaced sample of the visible
        live keys (summed in the working dtype, ``BK.sample_kth``), less a band covering
        the gap between any float summation and the canonical one (``2.2 gamma_d |q| max|k| + (d + 4) 2^-148``): at least k keys then
        have canonical scores at or above it, so the range search returns a superset of the
        top k, and sorting its canonical scores (ties: smaller id) picks them exactly. With
        fewer than k visible sample keys the threshold is -inf (every visible key). The
        sample size ``sqrt(10 k n)`` balances its products (cheap per key: vector lanes) against
        the ``k n / sample`` results it lets through (each verified in full)."""
        n = self.n
        m = Q.shape[0]
        d = self.dim
        n_s = int(min(n, max(4 * k, 256, np.sqrt(10.0 * k * n))))
        sid = (np.arange(n_s, dtype=np.int64) * n) // n_s
        kth = np.empty(m)
        KsT = np.empty((keys.shape[1], n_s), dtype=keys.dtype)
        BK.gather_transposed(keys, sid, KsT)
        BK.sample_kth(Q, KsT, sid, lim, alive, has_dead, min(k, n_s), kth)
        u = self._u
        gam = d * u / (1.0 - d * u)
        qn = np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64))
        band = 2.2 * gam * qn * max_norm + (d + 4) * 2.0 ** -148
        # below the float64 range of the band's arithmetic: every visible key
        tau = np.where(np.isfinite(kth), kth - band - 4.0 * _EPS64 * np.abs(kth), -np.inf)
        lims, ids, scores, coded, verified, _ = self.range_search(Q, tau, lim, keys, alive, has_dead, max_norm)
        BK.select_topk(lims, ids, scores, top_s, top_i)
        stats[:, 0] = coded
        stats[:, 1] = verified + n_s

    # ------------------------------------------------------------------ persistence
    def state(self):
        """``(meta, arrays)`` for saving; codes are recomputed from the keys on load."""
        meta = {"rotation": self.rotation, "seed": self.seed}
        arrays = {} if self.rot is None else {"code_rot": self.rot}
        return meta, arrays

    @classmethod
    def from_state(cls, dim, meta, arrays, canonical_eps):
        cs = cls(dim, meta["rotation"], meta["seed"], canonical_eps)
        rot = arrays.get("code_rot")
        if rot is not None:
            rot = np.ascontiguousarray(rot, dtype=np.float64)
            if rot.shape != (cs.dp, cs.dim) or not np.isfinite(rot).all():
                raise ValueError("hsr index file is inconsistent: code rotation has the wrong shape")
            cs.rot = rot
            cs.defect = _defect(rot)
        return cs


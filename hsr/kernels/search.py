"""The exact half-space filter on the GPU, and the fused HSR decode.

Index layout (``GPUBlockIndex``, one per (batch, kv head); all arrays on the keys' device)::

    kp, vp      (B, Hkv, Np, D)  keys / values, permuted so that blocks of C keys are tight;
                                 Np = nb * C, pad rows are zero
    pos         (B, Hkv, Np)     int32 absolute position of each stored key; pads hold PAD_POS
                                 (> any real position), so the causal test drops them
    centre      (B, Hkv, nb, D)  block centre (mean of the block's real keys), rounded to the
                                 keys' dtype; the radii below are measured from the ROUNDED
                                 centre, so the bounds hold for what is stored
    radius      (B, Hkv, nb)     float32 max_j ||k_j - c|| (ball bound); empty blocks
                                 EMPTY_RADIUS (-1e30)
    sub_radius  (B, Hkv, nb, S)  float32 max_j ||k_j[s] - c[s]|| over S equal slices of D
                                 (of R^T (k - c) when the index has a rotation R)
    kmax        (B, Hkv)         float32 max_j ||k_j|| (for the rounding slack)
    rot         (B, Hkv, D, D)   float32 orthonormal PCA basis, or None (rotate=False)

Upper bound of a block for a query q (both valid, the kernel takes the smaller)::

    ub_ball = <q, c> + ||q|| * radius
    ub_sub  = <q, c> + sum_s ||q[s]|| * sub_radius[s]

Filter: a block survives for query row r when ``ub >= tau_r - slack_r`` with
``slack_r = SLACK_REL * ||q_r|| * max_j ||k_j||`` (float32 rounding of the bound and of the
scores is far below this; SLACK_REL = 1e-3 by default), so no key with ``<q,k> >= tau`` is
ever dropped. Scores inside surviving blocks are exact (float32 accumulation of the stored
16-bit values); reported keys satisfy ``score >= tau`` (``>=``, like the CPU index).

Block order (``build_index``, in ``_block_order.py``): ``method="kmeans"`` (default: clusters
padded to whole blocks), ``"pca"`` (recursive median bisection), ``"none"`` (positional pages,
Quest-like), or a given ``perm`` (e.g. the CPU index's leaf order).

Plan / run:

- ``index.plan(q, tau)``     (plan) -> the union over each kv head's query rows of the
  surviving blocks, compacted in one kernel (ids into the permuted layout); with
  ``per_row=True`` also per-query-row BSR ``(kv_num_blocks, kv_indices)``.
- ``index.range_search(q, tau)`` -> CSR ``(lims, D, I)`` (FAISS order) of exactly the
  keys with ``score >= tau`` (indices are absolute positions into the ORIGINAL k/v).
- ``index.run(q, plan)``    (run) -> block-sparse decode over the union lists.
- A plan records the index state it was made for (which index, its ``version`` and length);
  ``run`` and ``range_search`` refuse a plan of another index or of an earlier state with a
  ``ValueError`` (plan again), rather than read blocks that no longer hold what the plan saw.
- ``hsr_decode(q, index, ..., mode="fused")``: one fused kernel (filter + attention, split
  over the block range, grouped query heads) and the split merge; ``mode="planned"`` is
  plan + run (faster on the GPU: see docs/kernels.md).

Softmax semantics: each query row attends to every real, causal key of every block that
survives for ANY query head of its kv-head group (a superset of {score >= tau}; more of the
softmax mass than the threshold set), unless ``exact_set=True``, which keeps only keys with
``score >= tau``. ReLU^alpha: weights ``relu(scale*s - bias)**alpha`` over keys with
``s >= tau``; with ``tau = bias/scale`` (the default) this is exact ReLU^alpha attention.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
import triton

from .._protocol import AttentionSpec
from ..index.results import RangeResult
from ._compat import interpreting, patch_interpreter
from ._softmax import LOG2E
from ._validate import (MAX_STACKED_ROWS, MIN_TILE, check_attention_inputs, check_alpha, check_kind,
                        check_triton_device)
from ._block_kernels import _block_filter_kernel, _hsr_decode_kernel
from .block_sparse import _num_sms, block_sparse_attention, merge_partials

patch_interpreter()

PAD_POS = 1 << 30
SLACK_REL = 1e-3
#: blocks whose bounds one filter program computes at a time (fewer for a small index)
FILTER_BLOCKS = 32


def _filter_tiles(rows: int, nb: int):
    """Tile sizes of the filter kernels: ``ROWS`` stacked query rows (the ``G * M`` rows of
    one kv head, rounded up to a power of two) and ``NB`` blocks per step, both at least
    ``tl.dot``'s minimum."""
    ROWS = max(MIN_TILE, triton.next_power_of_2(rows))
    NB = FILTER_BLOCKS if nb >= FILTER_BLOCKS else max(MIN_TILE, triton.next_power_of_2(nb))
    return ROWS, NB


#: a distinct token per GPUBlockIndex object, so a plan knows which index it was made for
_INDEX_TOKENS = itertools.count(1)
#: the GPUBlockIndex fields holding tensors: an in-place write to any of them changes the index
_TENSOR_FIELDS = ("kp", "vp", "pos", "centre", "radius", "sub_radius", "kmax", "rot")


class _IndexState(NamedTuple):
    """The index state a :class:`SearchPlan` was made for."""
    token: int
    version: int
    n_valid: int
    num_blocks: int

    def describe(self) -> str:
        return f"version {self.version} ({self.n_valid} keys in {self.num_blocks} blocks)"


@dataclass(frozen=True, eq=False)
class SearchPlan:
    """Plan returned by :meth:`GPUBlockIndex.plan`: the blocks that survive the filter.

    Block ids index the index's permuted layout (block ``j`` holds stored keys
    ``j * block .. (j + 1) * block - 1``). ``nb`` is ``index.num_blocks``.

    Attributes
    ----------
    union_num_blocks : torch.Tensor, int32, shape (B, Hkv, 1)
        For each kv head, how many blocks survive for ANY of its query rows.
    union_indices : torch.Tensor, int32, shape (B, Hkv, 1, nb)
        Those blocks in the first ``union_num_blocks`` entries, unordered (compacted with
        an atomic counter); the rest is not written. The BSR lists ``run`` attends over.
    kv_num_blocks : torch.Tensor or None, int32, shape (B, Hq, M)
        Per query row, the number of surviving blocks (``per_row=True`` only).
    kv_indices : torch.Tensor or None, int32, shape (B, Hq, M, nb)
        Per query row, the surviving blocks ascending in the first ``kv_num_blocks``
        entries (``per_row=True`` only).
    flags : torch.Tensor or None, int8, shape (B, Hq, M, nb)
        1 where a block survives for that query row (``per_row=True`` only).
    made_for : tuple or None
        The index state the plan was made for (which index, its :attr:`GPUBlockIndex.version`,
        ``n_valid`` and ``num_blocks``). ``run`` and ``range_search`` refuse the plan with a
        ``ValueError`` on any other index or once the index has changed. None for a plan built
        by hand, which is checked only against the number of blocks.
    """

    union_num_blocks: torch.Tensor
    union_indices: torch.Tensor
    kv_num_blocks: Optional[torch.Tensor] = None
    kv_indices: Optional[torch.Tensor] = None
    flags: Optional[torch.Tensor] = None
    made_for: Optional[_IndexState] = field(default=None, repr=False)

    @property
    def per_row(self) -> bool:
        """Whether the per-query-row lists are present."""
        return self.kv_indices is not None



@dataclass
class GPUBlockIndex:
    """Block index of a KV cache (see module docstring for every array).

    :attr:`version` counts the changes made to the index (a field assigned, or a tensor of
    it written in place); a :class:`SearchPlan` remembers the version it was made for.
    """
    kp: torch.Tensor
    vp: torch.Tensor
    pos: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor
    sub_radius: torch.Tensor
    block: int
    n_sub: int
    n_valid: int
    kmax: torch.Tensor  # (B, Hkv) float32 max ||k||
    rot: torch.Tensor | None = None  # (B, Hkv, D, D) float32 orthonormal, or None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_token", next(_INDEX_TOKENS))
        object.__setattr__(self, "_edits", 0)
        object.__setattr__(self, "_seen", self._tensor_versions())

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if not name.startswith("_") and "_edits" in self.__dict__:  # not while __init__ fills the fields
            object.__setattr__(self, "_edits", self._edits + 1)

    def _tensor_versions(self) -> tuple:
        """torch's in-place write counters of the index's tensors (views share their base's).
        Inference-mode tensors keep none (-1): only assigning a field is seen for them."""
        out = []
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            try:
                out.append(-1 if t is None else t._version)
            except RuntimeError:  # an inference tensor
                out.append(-1)
        return tuple(out)

    @property
    def version(self) -> int:
        """A counter of the changes made to the index since it was built: assigning any field
        (``n_valid``, ``kp``, ...) or writing one of its tensors in place raises it. Plans made
        at another version are refused (:class:`SearchPlan`)."""
        seen = self._tensor_versions()
        if seen != self._seen:  # a tensor was written in place since the last look
            object.__setattr__(self, "_seen", seen)
            object.__setattr__(self, "_edits", self._edits + 1)
        return self._edits

    def _state(self) -> _IndexState:
        return _IndexState(self._token, self.version, int(self.n_valid), self.num_blocks)

    def _check_plan(self, plan: SearchPlan) -> None:
        """Refuse a plan made for another index or for an earlier state of this one: its block
        lists name blocks that may now hold other keys, or miss the keys added since."""
        if not isinstance(plan, SearchPlan):
            raise TypeError(f"plan must be a SearchPlan (from index.plan), got {type(plan).__name__}")
        if plan.made_for is None:  # built by hand: no record, check what can be checked
            if plan.union_indices.shape[-1] != self.num_blocks:
                raise ValueError(f"this plan lists {plan.union_indices.shape[-1]} blocks; the index has "
                                 f"{self.num_blocks}: plan again with index.plan(q, tau)")
            return
        now = self._state()
        if plan.made_for.token != now.token:
            raise ValueError("this plan was made for another GPUBlockIndex: plan again with this "
                             "index (index.plan(q, tau))")
        if plan.made_for != now:
            raise ValueError(f"this plan was made for the index at {plan.made_for.describe()}; the index "
                             f"has changed since (now {now.describe()}): plan again with index.plan(q, tau)")

    def _rot_arg(self):
        return self.rot if self.rot is not None else self.kmax

    @property
    def num_blocks(self) -> int:
        return self.centre.shape[2]

    @property
    def block_size(self) -> int:
        """Keys per block (the library's one name; the field ``block`` is the same number)."""
        return self.block

    @property
    def shape(self) -> torch.Size:
        return self.kp.shape

    def summary_bytes(self) -> int:
        ts = (self.centre, self.radius, self.sub_radius) + ((self.rot,) if self.rot is not None
                                                            else ())
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------ plan
    def _tau_args(self, q, tau):
        """(tensor or None, scalar, strides) for the kernels' TAU / tau_scalar arguments."""
        B, Hq, M, D = q.shape
        if torch.is_tensor(tau):
            if not (tau.shape == (B, Hq, M) and tau.dtype == torch.float32
                    and tau.is_contiguous() and tau.device == q.device):
                tau = tau.to(device=q.device, dtype=torch.float32).expand(B, Hq, M).contiguous()
            return tau, 0.0, tau.stride(0), tau.stride(1)
        return None, float(tau), 0, 0

    def _filter(self, q, tau, write_flags):
        B, Hq, M, D, Hkv, _ = check_attention_inputs(q, self.kp, self.vp)
        check_triton_device("GPUBlockIndex", q=q, keys=self.kp)
        tau_t, tau_s, stb, sth = self._tau_args(q, tau)
        nb = self.num_blocks
        flags = (torch.empty(B, Hq, M, nb, device=q.device, dtype=torch.int8) if write_flags
                 else None)
        ucnt = torch.zeros(B, Hkv, 1, device=q.device, dtype=torch.int32)
        uidx = torch.empty(B, Hkv, 1, nb, device=q.device, dtype=torch.int32)
        ROWS, NB = _filter_tiles((Hq // Hkv) * M, nb)
        _block_filter_kernel[(triton.cdiv(nb, NB), B * Hkv)](
            q, tau_t if tau_t is not None else ucnt, tau_s, self.kmax, self._rot_arg(),
            self.centre, self.radius, self.sub_radius, flags if flags is not None else ucnt,
            ucnt, uidx,
            q.stride(0), q.stride(1), q.stride(2), stb, sth,
            Hkv, Hq, M, nb, SLACK_REL,
            ROWS=ROWS, NB=NB, HEAD_DIM=D, S=self.n_sub, TAU_TENSOR=tau_t is not None,
            ROTATE=self.rot is not None, WRITE_FLAGS=write_flags,
            UPCAST=interpreting() or q.dtype == torch.float32, num_warps=4)
        return flags, ucnt, uidx

    def block_flags(self, q: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
        """int8 ``(B, Hq, M, nb)``: 1 where the block's bound passes ``tau - slack``."""
        return self._filter(q, tau, True)[0]

    def plan(self, q: torch.Tensor, tau: float | torch.Tensor, per_row: bool = False) -> SearchPlan:
        """Plan: surviving blocks as BSR lists for ``run``/``block_sparse_attention``.

        Parameters
        ----------
        q : torch.Tensor, shape (B, Hq, M, D)
        tau : float or torch.Tensor, shape (B, Hq, M)
            Threshold on ``<q, k>``.
        per_row : bool
            Also build the per-query-row lists (sorted with ``torch.sort``; slower).

        Returns
        -------
        SearchPlan
            ``union_num_blocks`` int32 ``(B, Hkv, 1)`` and ``union_indices`` int32
            ``(B, Hkv, 1, nb)``: for each kv head, the blocks that survive for ANY of its
            query rows (one kernel, compacted with an atomic counter). With ``per_row=True``
            also ``kv_num_blocks (B, Hq, M)``, ``kv_indices (B, Hq, M, nb)`` and ``flags``.
            It records this index's :attr:`version`: once the index changes, ``run`` and
            ``range_search`` refuse it (plan again).
        """
        made_for = self._state()  # before the filter: a change while it runs makes the plan stale
        flags, ucnt, uidx = self._filter(q, tau, per_row)
        if not per_row:
            return SearchPlan(ucnt, uidx, made_for=made_for)
        return SearchPlan(
            ucnt, uidx, kv_num_blocks=flags.sum(-1, dtype=torch.int32),
            kv_indices=torch.sort(flags, dim=-1, descending=True, stable=True).indices.to(torch.int32),
            flags=flags, made_for=made_for)

    def range_search(self, q: torch.Tensor, tau: float | torch.Tensor,
                     plan: SearchPlan | None = None) -> RangeResult:
        """CSR of exactly the keys with ``<q, k> >= tau`` (float32 scores of the stored
        values), from ``plan`` when it has the per-row lists.

        Returns
        -------
        RangeResult ``(lims, D, I)``
            ``lims`` int64 ``(B*Hq*M + 1,)`` over query rows in (b, h, m) order; ``D`` float32
            ``(nnz,)`` scores; ``I`` int64 ``(nnz,)`` absolute key positions, ascending within
            a block.
        """
        B, Hq, M, D = q.shape
        Hkv = self.kp.shape[1]
        G = Hq // Hkv
        C = self.block
        if plan is not None:
            self._check_plan(plan)
        if plan is None or not plan.per_row:
            plan = self.plan(q, tau, per_row=True)
        tau_t, tau_s, _, _ = self._tau_args(q, tau)
        if tau_t is None:
            tau_t = torch.full((B, Hq, M), tau_s, device=q.device, dtype=torch.float32)
        num, idx = plan.kv_num_blocks, plan.kv_indices
        L = max(int(num.max().item()), 1)
        idx = idx[..., :L].long()  # (B,Hq,M,L)
        okb = torch.arange(L, device=q.device) < num[..., None]
        keyid = (idx[..., None] * C + torch.arange(C, device=q.device)).view(B, Hq, M, L * C)
        hk = torch.arange(Hq, device=q.device) // G
        grp = (torch.arange(B, device=q.device)[:, None] * Hkv + hk[None, :]).view(B, Hq, 1, 1)
        Np = self.kp.shape[2]
        flat_row = (grp * Np + keyid).view(-1)
        kk = self.kp.view(-1, D).index_select(0, flat_row).view(B, Hq, M, L * C, D)
        sc = (kk.float() @ q.float()[..., None])[..., 0]  # (B,Hq,M,L*C)
        pos = self.pos.view(-1).index_select(0, flat_row).view(B, Hq, M, L * C)
        keep = (okb[..., None].expand(B, Hq, M, L, C).reshape(B, Hq, M, L * C)
                & (pos < self.n_valid) & (sc >= tau_t[..., None]))
        counts = keep.sum(-1).view(-1)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=q.device)
        indptr[1:] = torch.cumsum(counts, 0)
        flat = keep.view(-1, L * C)
        indices = pos.view(-1, L * C)[flat].to(torch.int64)
        scores = sc.view(-1, L * C)[flat]
        return RangeResult(indptr, scores, indices)

    # ------------------------------------------------------------------ run
    def run(self, q: torch.Tensor, plan: SearchPlan, *, scale: float | None = None,
            return_lse: bool = False, **kw: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run (softmax): block-sparse decode over each kv head's union of surviving
        blocks (a :class:`SearchPlan`), on the permuted K/V with positions (causal).

        Raises ``ValueError`` when ``plan`` was made for another index or before the index
        last changed (see :attr:`version`): plan again."""
        self._check_plan(plan)
        return block_sparse_attention(
            q, self.kp, self.vp, plan.union_num_blocks, plan.union_indices,
            block_size=self.block, causal=True, scale=scale, return_lse=return_lse,
            positions=self.pos, n_valid=self.n_valid, **kw)

    supports = frozenset({"tau"})

    def attend(self, q: torch.Tensor, spec: AttentionSpec, *, with_info: bool = False
               ) -> tuple[torch.Tensor, None]:
        """The attention protocol's method (:func:`hsr.hsr_attention` calls it): the Triton
        filter + attention (:func:`hsr_decode`) for queries ``(B, Hq, M, D)`` on this device;
        ReLU^alpha exact, softmax over the blocks that may score ``>= spec.tau`` (required).
        M > 1 needs ``spec.causal``. No info (``supports`` has no ``"info"``)."""
        if with_info:
            raise ValueError("GPUBlockIndex returns no AttentionInfo")
        if not (torch.is_tensor(q) and q.device == self.kp.device):
            raise TypeError(f"a GPUBlockIndex on {self.kp.device} takes query tensors (B, Hq, M, D) on "
                            "the same device")
        if not spec.causal and q.dim() == 4 and q.shape[2] > 1:
            raise ValueError("the GPU path attends the last M positions causally: pass causal=True for M > 1")
        if torch.as_tensor(spec.bias).dim():
            raise ValueError("GPUBlockIndex takes one bias for every head: give a number")
        tau = spec.tau
        if tau is not None and not isinstance(tau, (int, float)) and not torch.is_tensor(tau):
            tau = torch.as_tensor(tau, dtype=torch.float32, device=q.device)
        return hsr_decode(q, self, tau=tau, kind=spec.kind, alpha=spec.alpha, bias=float(spec.bias),
                          scale=spec.scale), None

    def tau_for_fraction(self, q: torch.Tensor, fraction: float, sample: int = 4096, seed: int = 0) -> torch.Tensor:
        """Threshold per query row ``(B, Hq, M)`` that keeps about ``fraction`` of the keys,
        estimated from an evenly strided sample of ``sample`` stored keys."""
        B, Hq, M, D = q.shape
        Hkv = self.kp.shape[1]
        Np = self.kp.shape[2]
        step = max(1, Np // sample)
        ks = self.kp[:, :, ::step].float()
        ps = self.pos[:, :, ::step]
        ks = ks.repeat_interleave(Hq // Hkv, dim=1)
        ps = ps.repeat_interleave(Hq // Hkv, dim=1)
        sc = q.float() @ ks.transpose(-1, -2)  # (B,Hq,M,ns)
        sc = sc.masked_fill((ps >= self.n_valid)[:, :, None, :], float("nan"))
        return torch.nanquantile(sc, 1.0 - fraction, dim=-1).float()


def hsr_decode(q: torch.Tensor, index: GPUBlockIndex, *, tau: float | torch.Tensor | None = None,
               top_fraction: float | None = None, kind: str, alpha: int = 2, bias: float = 0.0,
               scale: float | None = None, exact_set: bool = False, return_lse: bool = False,
               num_splits: int | None = None, count_visited: bool = False, mode: str | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Fused filter + attention for a few new queries against an indexed KV cache.

    q : ``(B, Hq, M, D)`` (queries at the last M positions; M small, usually 1).
    tau : float or ``(B, Hq, M)`` threshold on ``<q, k>`` (unscaled). Default: for relu
        ``bias / scale`` (exact ReLU^alpha attention); for softmax from ``top_fraction``.
    top_fraction : keep about this fraction (sampled estimate, ``index.tau_for_fraction``).
    kind : ``"softmax"`` or ``"relu"`` (see module docstring for what is kept), required.
    count_visited : also return the number of blocks read per (B, Hkv) (int32).
    mode : ``"fused"`` (one kernel: filter + attention, then the split merge) or
        ``"planned"`` (``index.plan`` then ``index.run``: the filter kernel compacts the
        surviving blocks, and the split-KV decode kernel spreads them evenly over its
        programs; softmax without ``exact_set`` only; 1.3-2x faster on an H100). Default:
        ``"planned"`` where it applies, else ``"fused"``.

    Returns out ``(B, Hq, M, D)`` in q's dtype (and lse, and visited counts).

    Raises ``ValueError`` for q that does not match the index (shape, head dim, strides),
    an unknown ``kind`` or ``mode``, softmax without ``tau`` or ``top_fraction``, a planned
    mode with ReLU / ``exact_set`` / ``count_visited``, or more than 128 stacked query rows;
    ``TypeError`` when q's dtype is not the index's.

    Under ``torch.compile`` the call goes through the custom op ``torch.ops.hsr.hsr_decode``
    (``hsr.kernels.ops``), which takes the index as its tensors.
    """
    if torch.compiler.is_compiling():  # an opaque custom op: the compiler does not trace the launch
        from .ops import call_hsr_decode
        return call_hsr_decode(q, index, tau=tau, top_fraction=top_fraction, kind=kind, alpha=alpha,
                               bias=bias, scale=scale, exact_set=exact_set, return_lse=return_lse,
                               num_splits=num_splits, count_visited=count_visited, mode=mode)
    # a CPU query against a GPU index: the fix (move it, or the interpreter), not a device mismatch
    check_triton_device("hsr_decode", q=q, keys=index.kp)
    B, Hq, M, D, Hkv, _ = check_attention_inputs(q, index.kp, index.vp)
    kind_id = check_kind(kind)
    if kind_id == 1:
        check_alpha(int(alpha))
    if mode not in (None, "fused", "planned"):
        raise ValueError(f"mode must be 'fused', 'planned' or None, got {mode!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if tau is None:
        if kind == "relu" and top_fraction is None:
            tau = bias / scale
        else:
            if top_fraction is None:
                raise ValueError("softmax needs a threshold: give tau or top_fraction")
            tau = index.tau_for_fraction(q, top_fraction)
    if mode is None:
        mode = ("planned" if kind == "softmax" and not exact_set and not count_visited
                and num_splits is None else "fused")
    if mode == "planned":
        if kind != "softmax" or exact_set or count_visited:
            raise ValueError("mode='planned' is softmax over whole surviving blocks: it takes no "
                             "kind='relu', exact_set or count_visited (use mode='fused')")
        plan = index.plan(q, tau)
        return index.run(q, plan, scale=scale, return_lse=return_lse)
    tau_t, tau_s, stb, sth = index._tau_args(q, tau)
    G = Hq // Hkv
    nb = index.num_blocks
    ROWS, NB = _filter_tiles(G * M, nb)
    if ROWS > MAX_STACKED_ROWS:
        raise ValueError(f"hsr_decode stacks the G*M = {G * M} query rows of a kv head into one tile "
                         f"of at most {MAX_STACKED_ROWS} rows: use fewer queries per call")
    n_chunks = triton.cdiv(nb, NB)
    if num_splits is None:
        num_splits = max(1, min(n_chunks, -(-4 * _num_sms(q.device) // (B * Hkv))))
    chunks_per_split = -(-n_chunks // num_splits)
    num_splits = -(-n_chunks // chunks_per_split)
    BHM = B * Hq * M
    o_part = torch.empty(num_splits, BHM, D, device=q.device, dtype=torch.float32)
    l_part = torch.empty(num_splits, BHM, device=q.device, dtype=torch.float32)
    visited = (torch.zeros(B * Hkv, device=q.device, dtype=torch.int32) if count_visited
               else l_part)
    _hsr_decode_kernel[(num_splits, B * Hkv)](
        q, tau_t if tau_t is not None else l_part, tau_s, index.kmax, index._rot_arg(),
        index.centre,
        index.radius, index.sub_radius, index.kp, index.vp, index.pos, o_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), stb, sth,
        Hkv, Hq, M, nb, index.n_valid, chunks_per_split * NB, BHM,
        scale * LOG2E if kind_id == 0 else scale, float(bias), SLACK_REL, visited,
        TAU_TENSOR=tau_t is not None, ROTATE=index.rot is not None, C=index.block, ROWS=ROWS,
        NB=NB, HEAD_DIM=D, S=index.n_sub, KIND=kind_id,
        ALPHA=int(alpha), MASK_TAU=bool(exact_set or kind_id == 1), COUNT=count_visited,
        UPCAST=interpreting() or q.dtype == torch.float32, num_warps=4)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    merge_partials(o_part, l_part, out, lse, M)
    res = (out, lse) if return_lse else (out,)
    if count_visited:
        res = res + (visited.view(B, Hkv),)
    return res if len(res) > 1 else res[0]

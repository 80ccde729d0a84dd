"""The code filter on the GPU: a KV cache with per-key int8 codes, filter -> compact -> attend.

Layout (``CodeKVCache``; every tensor on the cache's device, capacity ``C >= n``)::

    k, v       (B, Hkv, C, D)   keys / values as given (bf16, fp16 or fp32), row = position
    codes      (B, Hkv, C, DP)  int8 codes of ``R k`` (R: one random rotation, (D, D)), DP = D
                                rounded up to a multiple of 32 (zero columns)
    scale      (B, Hkv, C)      fp32 step s_j:  R k_j ~= s_j c_j, |c| <= 127
    err        (B, Hkv, C)      fp32 upper bound of the error (the bound below)
    lengths    (B*Hkv,)         int32 keys held per (batch, kv head): the kernels read it
    max_norm, max_err (B*Hkv,)  fp32 upper bounds of the head's largest ||k_j|| and err_j
    status     (1,)             int32 bits of bad inputs seen by the kernels (``check()``)

The bound (as on the CPU, ``hsr/index/_code_kernels.py``): ``<q, k> <= s <R q, c> + ||q|| err``.
The query side is split into two int8 parts, ``R q = a1 qi1 + a2 qi2 + rq``, so the filter is
two exact int8 tensor-core products with int32 accumulation; ``||rq|| * max s||c||``, the
rounding of the fp32 bound arithmetic, and the gap between the kernel's fp32-accumulated
score and the real dot product make one per-row slack. A key *survives* when its bound
reaches ``tau - slack`` for any query row of its kv head's group (the GQA group shares one
read of the codes); each filter program writes its survivors to its own segment of the list.

A step (``hsr/kernels/_code_kernels.py`` has the kernels): ``add`` is one launch (codes
computed on the device in fp32, the length advanced there); ``plan`` two (rotate the query
rows, filter); ``run`` one plus the merge of the splits. Nothing
reads the length on the host, so :meth:`CodeKVCache.decode_step` captures add + plan + run
once and replays the graph at every length up to the capacity.

"Exact" on the GPU: the kept set is ``{j : s_j >= tau}``, ``s_j`` the kernels' fp32-accumulated
score, and the filter never drops a key of it (docs/codes.md).

Bad values never give a finite wrong answer: their rows are NaN and set a bit in ``status``
(bad keys poison the cache); ``check=True`` raises at the call (one synchronisation),
``check=False`` (a captured step) leaves it to :meth:`CodeKVCache.check` (docs/codes.md).
"""
from __future__ import annotations

import torch
import triton

from ._code_kernels import (BAD_FULL, BAD_KV, _certify_kernel, _code_add_kernel, _code_attend_kernel,
                            _code_filter_kernel, _prepare_kernel, _score_all_kernel, _topk_attend_kernel,
                            _topk_gather_kernel)
from ._code_plan import (CodePlan, as_float32, capturing as _capturing, hadamard_rotation, per_row_values, plan_info,
                         random_rotation, spec_thresholds, status_message)
from ._compat import interpreting, patch_interpreter, pdl_supported
from ._replay import Replays
from ._select import select_kth
from ._softmax import LOG2E
from ._validate import check_alpha, check_kind, check_topk, check_triton_device
from .._lock import RWLock, reads, writes
from .._protocol import AttentionInfo, AttentionSpec
from .block_sparse import _num_sms, merge_partials
from .decode import DecodeStep

patch_interpreter()

__all__ = ["CodeKVCache", "CodePlan"]


class CodeKVCache:
    """A ``(B, Hkv, n, D)`` KV cache with per-key int8 codes, on one device.

    Build it from keys and values (``CodeKVCache(k, v)``), from a CPU index
    (``hsr.KVCacheIndex.to("cuda")``), grow it with :meth:`add` (one launch: the new keys'
    codes are computed on the device, nothing is rebuilt), and attend with :meth:`attend`
    (filter, attend and merge, no host synchronisation with ``check=False``) or plan once
    with :meth:`plan` and run with :meth:`run`. For a generation loop,
    :meth:`decode_step` captures add + attend in one CUDA graph that serves every length
    up to :attr:`capacity`. Thread-safe like the CPU indexes: a readers-writer lock lets
    searches run together and makes ``add`` wait for them.

    Parameters
    ----------
    k, v : Tensor, (B, Hkv, n, D)
        Post-RoPE keys and values (bf16/fp16/fp32, on one device; D a power of two in
        [16, 256]). ``v=None`` keeps keys only (an index: :meth:`plan`, no attention).
    seed : int
        Seeds the random rotation.
    rotation : {"hadamard", "haar"}
        The codes' random rotation: a randomized Hadamard matrix ``H diag(signs) / sqrt(D)``
        (the default), which a filter that rotates the query itself applies as a fast
        Walsh-Hadamard transform (no matrix to read: the decode step of two launches, see
        :meth:`step_form`), or a Haar-random orthogonal matrix. The same quality of codes on
        real keys (survivors 4.21–4.24% against 4.21–4.25% of the keys at the top 1%,
        SmolLM2, 8K, three seeds) and the same step time where both run three launches (H100).
    capacity : int, optional
        Rows to reserve. Appending beyond it reallocates (and invalidates captured steps).

    Attributes
    ----------
    pdl : bool
        Launch a step's kernels (the first launch, the filter, the merge) as programmatic
        dependent launches: True on CUDA devices of compute capability 9 on (Hopper), where
        each kernel's programs are scheduled while the kernel before it finishes, then wait
        for it; False at d 256, where plain launches measured 11-17% faster (H100, B 1,
        16K-128K: 37.8 against 42.3 us, 53.6 against 62.4, 87.4 against 105.4;
        ``bench/results/step_variants_h100_2026-12-06_d256.json``). Set it before capturing.

    Examples
    --------
    >>> cache = CodeKVCache(k, v, capacity=n + 256)           # doctest: +SKIP
    >>> step = cache.decode_step(q, k1, v1, tau=tau, kind="softmax")  # doctest: +SKIP
    >>> out = step(q, k1, v1)   # add one token, attend; replays one graph at every length
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor | None, *, seed: int = 0, capacity: int | None = None,
                 rotation: str = "hadamard") -> None:
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
        if k.device != v.device:
            raise ValueError(f"k and v must be on one device, got {k.device} and {v.device}")
        check_triton_device("CodeKVCache", k=k)
        D = k.shape[-1]
        if D not in (16, 32, 64, 128, 256) or v.shape[-1] != D:
            raise ValueError(f"head dim must be a power of two in [16, 256] (and equal for k and v), got {D}")
        B, Hkv, n, _ = k.shape
        self.device = k.device
        self.dtype = k.dtype
        self.seed = int(seed)
        self.B, self.Hkv, self.D = B, Hkv, D
        self.DP = max(32, -(-D // 32) * 32)
        if rotation not in ("haar", "hadamard"):
            raise ValueError(f"rotation must be 'hadamard' or 'haar', got {rotation!r}")
        self.rotation = rotation
        # the fp32 rotation is the rotation: its defect from orthogonality is measured in fp64
        make = hadamard_rotation if rotation == "hadamard" else random_rotation
        self.rot32 = make(D, self.seed, self.device).float().contiguous()
        # a Hadamard's column signs, for the filter's transform (its entries are c * sign)
        self.signs = torch.sign(self.rot32[0]).contiguous() if rotation == "hadamard" else None
        r64 = self.rot32.double()
        g = r64.T @ r64 - torch.eye(D, dtype=torch.float64, device=self.device)
        self.defect = float(torch.sqrt((g * g).sum())) * (1 + 1e-6) + 4.0 * D * D * 2.0 ** -53
        self.n = 0  # the host's copy of the length (every add goes through this object)
        self._version = 0  # bumped by every add: plans record it
        self._storage = 0  # bumped by every reallocation: captured steps record it
        BH = B * Hkv
        self.lengths = torch.zeros(BH, dtype=torch.int32, device=self.device)
        self.max_norm = torch.zeros(BH, dtype=torch.float32, device=self.device)
        self.max_err = torch.zeros(BH, dtype=torch.float32, device=self.device)
        self.status = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.capacity = 0
        # eager add and attend calls replay per-shape CUDA graphs (host time, not GPU time,
        # bounded an eager step: _replay.py); replays.enabled = False launches every kernel
        self.replays = Replays(self.device)
        self._guard_counts = None  # count_guard(): the guard's work, counted on the device
        # a step's three kernels are programmatic dependent launches where the device has them:
        # each kernel's programs are scheduled while the one before finishes, then wait for it
        # (its launch latency hidden; docs/codes.md); not at d 256, where it measured slower
        self.pdl = pdl_supported(self.device) and self.D <= 128
        self._alloc(max(int(capacity or 0), n, 64))
        self.add(k, v if self.has_values else None)

    # ------------------------------------------------------------------ storage
    def _alloc(self, cap: int) -> None:
        B, H, D, dev = self.B, self.Hkv, self.D, self.device
        k = torch.zeros(B, H, cap, D, dtype=self.dtype, device=dev)
        v = torch.zeros(B, H, cap, D, dtype=self.dtype, device=dev) if self.has_values else None
        codes = torch.zeros(B, H, cap, self.DP, dtype=torch.int8, device=dev)
        scale = torch.zeros(B, H, cap, dtype=torch.float32, device=dev)
        err = torch.zeros(B, H, cap, dtype=torch.float32, device=dev)
        if self.capacity:
            n = self.n
            k[:, :, :n] = self.k[:, :, :n]
            if v is not None:
                v[:, :, :n] = self.v[:, :, :n]
            codes[:, :, :n] = self.codes[:, :, :n]
            scale[:, :, :n] = self.scale[:, :, :n]
            err[:, :, :n] = self.err[:, :, :n]
        self.k, self.v, self.codes, self.scale, self.err = k, v, codes, scale, err
        self.capacity = cap
        self._storage += 1

    @writes
    def reserve(self, capacity: int) -> None:
        """Grow the storage to ``capacity`` keys (steps captured before it then refuse to run)."""
        if int(capacity) > self.capacity:
            self._alloc(int(capacity))

    @writes
    def crop(self, n: int) -> None:
        """Keep the first ``n`` keys (roll back a speculative or beam step, as transformers'
        ``DynamicCache.crop``): the length drops on the device, nothing is copied. The heads'
        largest norm and error stay as they were (still upper bounds, perhaps looser)."""
        n = int(n)
        if not 0 <= n <= self.n:
            raise ValueError(f"crop keeps 0..{self.n} keys, got {n}")
        self.lengths.fill_(n)
        self.n = n
        self._version += 1

    def advanced(self, t: int) -> None:
        """Record ``t`` keys appended on the device (an add launch, or a replayed graph that
        holds one: the device advanced its lengths); the host's counters only."""
        self.n += int(t)
        self._version += 1

    def __len__(self) -> int:
        return self.n

    @property
    def version(self) -> int:
        """Bumped by every :meth:`add`: a :class:`CodePlan` is valid for one version."""
        return self._version

    def memory_bytes(self) -> dict:
        """Device bytes at the capacity: ``kv`` (K, V), ``index`` (codes, steps, errors, words), ratio."""
        kv = self.k.numel() * self.k.element_size() + (self.v.numel() * self.v.element_size() if self.has_values else 0)
        index = self.codes.numel() + 4 * (self.scale.numel() + self.err.numel() + 3 * self.lengths.numel() + 1)
        return {"kv": kv, "index": index, "index_over_kv": index / kv}

    # ------------------------------------------------------------------ status
    def check(self) -> None:
        """Raise what the kernels flagged since the last check (``ValueError`` naming each; one
        synchronisation). The poisoned-cache bit stays set."""
        bits = int(self.status.item())
        if not bits:
            return
        self.status.bitwise_and_(BAD_KV | BAD_FULL)
        raise ValueError(status_message(bits))

    # ------------------------------------------------------------------ add
    @writes
    def add(self, k: torch.Tensor, v: torch.Tensor | None, *, check: bool = True) -> None:
        """Add ``(B, Hkv, t, D)`` keys and values (``v=None`` for a keys-only cache) at the next
        positions: one launch writes them with their codes, steps and error bounds and
        advances the length on the device.

        ``check=True`` refuses NaN/Inf before writing (one synchronisation); with
        ``check=False`` nothing waits, and such values poison the cache instead (every answer
        NaN, :meth:`check` says why). Inputs of another dtype or device are converted (a
        copy); inside a CUDA-graph capture they must already match. A decode loop that adds
        and then attends saves a replay with ``attend(q, spec, add=(k, v))``.
        """
        k, v, t = self._new_tokens(k, v, check)
        if t == 0:
            return
        if t <= 64:  # a decode step's few tokens: replayed (a long append is one launch anyway)
            self.replays.run(("add", t), self._storage, (k, v), lambda b: self._launch_add(b[0], b[1], t) or ())
        else:
            self._launch_add(k, v, t)
        self.advanced(t)

    def _new_tokens(self, k, v, check):
        """``(k, v, t)``: tokens to add, checked (shapes; values with ``check``, one
        synchronisation), converted to the cache's dtype and device outside a capture, and
        room made for them (a reallocation past the capacity). Nothing is written."""
        if (v is None) == self.has_values:
            raise ValueError("this cache holds values: add keys and values" if self.has_values
                             else "this cache holds keys only: add keys with v=None")
        if not (torch.is_tensor(k) and (v is None or torch.is_tensor(v))):
            raise TypeError("k and v must be torch tensors")
        if k.dim() != 4 or k.shape[:2] != (self.B, self.Hkv) or k.shape[-1] != self.D or (
                v is not None and v.shape != k.shape):
            raise ValueError(f"add expects ({self.B}, {self.Hkv}, t, {self.D}) keys and values, got "
                             f"{tuple(k.shape)} and {None if v is None else tuple(v.shape)}")
        t = k.shape[2]
        if t == 0:
            return k, v, 0
        capturing = _capturing()
        if k.dtype != self.dtype or k.device != self.device or (v is not None and (
                v.dtype != self.dtype or v.device != self.device)):
            if capturing:
                raise ValueError(f"inside a capture, added k and v must be {self.dtype} on {self.device}")
            k = k.to(device=self.device, dtype=self.dtype)
            v = None if v is None else v.to(device=self.device, dtype=self.dtype)
        if k.stride(-1) != 1 or (v is not None and v.stride(-1) != 1):
            if capturing:
                raise ValueError("inside a capture, added k and v must have a contiguous last dimension")
            k = k.contiguous()
            v = None if v is None else v.contiguous()
        if check and not capturing:
            bad = ~torch.isfinite(k).all() if v is None else ~(torch.isfinite(k).all() & torch.isfinite(v).all())
            if bool(bad):
                raise ValueError("added k or v contains NaN or Inf")
        if self.n + t > self.capacity:
            if capturing:
                raise ValueError(f"the cache is full ({self.n} + {t} > capacity {self.capacity}): reserve() more "
                                 "before capturing")
            self._alloc(max(2 * self.capacity, self.n + t))
        return k, v, t

    def _add_args(self, k, v, t, per):
        """The arguments the add kernels share: new ``(B, Hkv, t, D)`` keys and values (``v``
        None for a keys-only cache), ``per`` tokens a program, the cache's arrays, strides."""
        v = v if v is not None else k
        vc = self.v if self.has_values else self.k
        return (k, v, self.k, vc, self.codes, self.scale, self.err, self.max_norm, self.max_err, self.lengths,
                self.status, self.rot32, t, per, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                v.stride(2), self.k.stride(0), self.k.stride(1), self.k.stride(2), vc.stride(0), vc.stride(1),
                vc.stride(2), self.codes.stride(0), self.codes.stride(1), self.codes.stride(2), self.scale.stride(0),
                self.scale.stride(1), self.Hkv, self.defect, self.capacity)

    def _launch_add(self, k, v, t, *, block_j=None, num_warps=None):
        # one program per (batch, kv head) for a decode step's few tokens (it also advances
        # the length); long appends spread over programs of up to 64 tokens each. block_j:
        # rotated columns per pass; default the whole rotation in one pass (8 warps from d 128),
        # measured fastest on an H100 (6.1 against 8.8 us at d 128, 5.0 against 5.6 at d 64)
        per = t if t <= 64 else 64
        progs = triton.cdiv(t, per)
        _code_add_kernel[(self.B * self.Hkv, progs)](
            *self._add_args(k, v, t, per), HEAD_DIM=self.D, DP=self.DP,
            BLOCK_J=min(block_j or self.DP, self.DP), HAS_V=self.has_values, UPDATE_LEN=progs == 1,
            num_warps=num_warps or (8 if self.DP >= 128 else 4))
        if progs > 1:  # several programs per head read the old length: advance it after them
            self.lengths.add_(t)

    def _launch_prepare(self, q, QR, rows, add, *, block_r=32, block_j=None, num_warps=4, apart=True, pdl=False):
        """Rotate the query rows into ``QR`` (grid (B*Hkv, DP / block_r (+ 1))); with
        ``add=(k, v)``, one more program per head adds its tokens (``t <= 64``; ``block_j``
        rotated key columns per pass, default all) and advances the length: one launch for
        both, as a decode step needs them. ``apart=False``: the first column program of each
        head adds instead, after its rotation. ``pdl``: a programmatic dependent launch.
        Defaults: the best of the step's variants on an H100 (d 128, 28/4 heads at 16K and
        128K and 32/8 at 128K, B 1: the first launch 6.2 against 9.5 us, the step 48.7 against
        51.7 us at 128K; ``bench/results/step_variants_h100_2026-12-06.json``): the add's chain
        (load, rotate, quantise, bound, four atomics) is the launch's longest, so it no longer
        waits on a rotation first."""
        B, Hq, M, D = q.shape
        k, v = add if add is not None else (self.k, self.k)  # without an add: unread
        t = k.shape[2] if add is not None else 0
        block_r = min(int(block_r), self.DP)
        if self.DP % block_r:  # the grid covers DP // block_r column blocks: all of them
            raise ValueError(f"block_r={block_r} must divide the padded head dim {self.DP}")
        apart = bool(apart) and add is not None
        _prepare_kernel[(self.B * self.Hkv, self.DP // block_r + apart)](
            *self._add_args(k, v, t, t), q, QR, q.stride(0), q.stride(1), q.stride(2), Hq // self.Hkv, M,
            HEAD_DIM=D, DP=self.DP, BLOCK_J=min(block_j or self.DP, self.DP), HAS_V=self.has_values,
            ADD=add is not None, ROWS=rows, BLOCK_R=block_r, APART=apart, PDL=bool(pdl), launch_pdl=bool(pdl),
            num_warps=num_warps)

    # ------------------------------------------------------------------ plan (filter)
    def _check_q(self, q, adding=0):
        """Shapes, device and dtype of ``q`` (host only: values are the kernels' business);
        ``adding``: keys added before it attends."""
        if not torch.is_tensor(q) or q.dim() != 4:
            raise ValueError(f"q must be a (B, Hq, M, D) tensor, got {type(q).__name__} "
                             f"{tuple(q.shape) if torch.is_tensor(q) else ''}")
        B, Hq, M, D = q.shape
        if B != self.B or D != self.D or Hq % self.Hkv:
            raise ValueError(f"q {tuple(q.shape)} does not fit the cache (B={self.B}, Hkv={self.Hkv}, D={self.D})")
        if q.device != self.device or q.dtype != self.dtype:
            raise ValueError(f"q must be {self.dtype} on {self.device} (the cache's), got {q.dtype} on {q.device}; "
                             f"convert it with q.to({self.dtype}) (scores are then those of the converted q)")
        if q.stride(-1) != 1:
            raise ValueError("q's last dimension must be contiguous")
        if M > self.n + adding:
            raise ValueError(f"{M} query positions but only {self.n + adding} keys: causal queries are the last "
                             "positions")

    def _per_row(self, x, q, name):
        """tau or bias as the kernels read them (:func:`per_row_values`)."""
        return per_row_values(x, q.shape, name, self.device)

    def _raise_if(self, check: bool) -> None:
        if check and not _capturing():
            self.check()

    @reads
    def plan(self, q: torch.Tensor, tau: float | torch.Tensor, *, bias: float | torch.Tensor = 0.0,
             certify: bool = False, scale: float | None = None, check: bool = True, block_n: int = 128,
             num_warps: int = 4, num_stages: int = 3, programs_per_sm: int | None = None) -> CodePlan:
        """Filter (plan): the keys whose bound reaches ``tau - slack`` for any row of their group.

        Parameters
        ----------
        q : Tensor, (B, Hq, M, D)
            In the cache's dtype, on its device.
        tau : float or Tensor of shape (), (Hq,) or (B, Hq, M)
            Raw-score thresholds (``<q, k> >= tau`` is kept). A tensor of another float dtype
            or device is converted (float32, rounded up: the same keys).
        bias : float or Tensor, same shapes
            ReLU bias, carried to :meth:`run`.
        certify : bool
            Also bound, per row, the softmax mass of the keys the filter drops (from their code
            bounds, with softmax scale ``scale``, default ``D ** -0.5``): :meth:`run` turns it
            into a certified bound on the dropped share (``return_bound=True``).
        check : bool
            Synchronise once and raise on bad values (the module docstring); False: never wait.
        block_n, num_warps, num_stages, programs_per_sm : tuning of the filter kernel (keys per
            tile, warps, pipelined tile loads, persistent programs per multiprocessor in all;
            default 8 for 16 or more (batch, kv head) pairs, else 2).
        """
        self._check_q(q)
        plan = self._plan(q, tau, bias=bias, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                          programs_per_sm=programs_per_sm, certify=certify, scale=scale)
        self._raise_if(check)
        return plan

    def _grid(self, block_n, programs_per_sm, extra=0):
        """Filter programs per (batch, kv head) and their segment length, from the capacity;
        ``extra`` programs per head of the same launch (an add's) come out of the same count."""
        BH = self.B * self.Hkv
        cap_tiles = triton.cdiv(self.capacity, block_n)
        pps = programs_per_sm if programs_per_sm is not None else (8 if BH >= 16 else 2)
        nprog = max(1, min(cap_tiles, -(-int(pps) * _num_sms(self.device) // BH) - extra))
        return nprog, triton.cdiv(cap_tiles, nprog) * block_n

    def _plan(self, q, tau, *, bias=0.0, block_n=128, num_warps=4, num_stages=3, programs_per_sm=None,
              rotate_inside=False, certify=False, scale=None, attend=None, add=None, prepare=None, block_a=64,
              pdl=None, add_in_filter=False):
        """:meth:`plan`'s body: ``q`` checked, the read lock held by the caller. ``rotate_inside``:
        the filter rotates the rows itself (one launch fewer; with the Haar rotation, a matrix
        product per filter program: measured slower on an H200 and an H100; with
        ``rotation="hadamard"``, a fast Walsh-Hadamard transform: see :meth:`step_form`).
        ``attend=(kind_id, alpha, group_union)``: the filter programs also attend their own survivors (one
        launch); returns ``(plan, o_part, l_part, t)``, the partials indexed by filter program
        and the tokens added in the filter's launch (``add_in_filter``; else 0), which the
        merge must add to the lengths.
        ``add=(k, v)``: first add these ``(B, Hkv, t <= 64, D)`` tokens (checked by the caller)
        in the launch that rotates the query rows (a decode step: one launch fewer).
        ``add_in_filter`` (with ``attend``): in the filter's launch instead, one more program
        per head that adds them and attends them from their exact scores, beside the filter
        programs (which scan the keys below the old length; the merge advances it): then no
        launch waits for the add's chain (:meth:`step_form` says where it is the default); its
        certificate is tighter (the new tokens' dropped terms are their exact mass).
        ``prepare``: the rotating launch's parameters (:meth:`_launch_prepare`), for tuning benches;
        ``block_a``: survivors a fused program attends at a time. ``pdl``: the first launch and
        the filter as programmatic dependent launches (default :attr:`pdl`)."""
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        rows = max(16, triton.next_power_of_2(G * M))
        tau_t, tau_s, ts = self._per_row(tau, q, "tau")
        bias_t, bias_s, bs = self._per_row(bias, q, "bias")
        BH = B * self.Hkv
        dev = self.device
        rotate = bool(rotate_inside)
        pdl = self.pdl if pdl is None else bool(pdl)
        s = float(scale) if scale is not None else D ** -0.5
        # allocated before the first launch: a fill kernel between it and the filter would
        # stand between two dependent launches
        rem = torch.zeros(B, Hq, M, dtype=torch.float32, device=dev) if certify else None
        QR = self.status
        ride = add is not None and attend is not None and add_in_filter and add[0].shape[2] <= 64
        if add is not None and not ride and (rotate or add[0].shape[2] > 64):  # no launch to ride in
            self._launch_add(add[0], add[1], add[0].shape[2])
            add = None
        if not rotate:
            QR = torch.empty(BH, rows, self.DP, dtype=torch.float32, device=dev)
            self._launch_prepare(q, QR, rows, None if ride else add, **{"pdl": pdl, **(prepare or {})})
        nprog, seg = self._grid(block_n, programs_per_sm, extra=int(ride))
        surv = torch.empty(BH, nprog * seg, dtype=torch.int32, device=dev)
        count = torch.empty(BH, nprog, dtype=torch.int32, device=dev)
        BHM = B * Hq * M
        kind_id, alpha, group = attend if attend is not None else (0, 1, False)
        if attend is not None:
            o_part = torch.empty(nprog + ride, BHM, D, dtype=torch.float32, device=dev)
            l_part = torch.empty(nprog + ride, BHM, dtype=torch.float32, device=dev)
            kv = (self.k, self.v)
        else:
            o_part = l_part = count
            kv = (self.k, self.k)  # unread
        kn, vn = add if ride else (kv[0], kv[1])  # without the add: unread
        t = kn.shape[2] if ride else 0
        hadamard = rotate and self.signs is not None and self.DP == D  # the transform, no matrix read
        _code_filter_kernel[(nprog + ride, BH)](
            q, self.rot32, self.signs if hadamard else self.rot32, QR, count if tau_t is None else tau_t, tau_s,
            self.max_norm, self.max_err, self.codes,
            self.scale, self.err, count, surv, self.lengths, self.status, count if rem is None else rem,
            kv[0], kv[1], count if bias_t is None else bias_t, bias_s, o_part, l_part, kn, vn,
            q.stride(0), q.stride(1), q.stride(2),
            ts[0], ts[1], ts[2], self.codes.stride(0), self.codes.stride(1), self.codes.stride(2),
            self.scale.stride(0), self.scale.stride(1),
            kv[0].stride(0), kv[0].stride(1), kv[0].stride(2), kv[1].stride(0), kv[1].stride(1), kv[1].stride(2),
            bs[0], bs[1], bs[2], kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
            G, M, self.Hkv, surv.stride(0), seg, self.defect, nprog, BHM, s * LOG2E, s, t, self.capacity,
            ROWS=rows, BLOCK_N=block_n, HEAD_DIM=D, DP=self.DP, TAU_TENSOR=tau_t is not None,
            UPCAST=interpreting() or (attend is not None and q.dtype == torch.float32), ROTATE=rotate,
            BLOCK_K=min(32, D), STAGES=num_stages, CERTIFY=certify, ATTEND=attend is not None, KIND=kind_id,
            ALPHA=alpha, BIAS_TENSOR=bias_t is not None, BLOCK_A=block_a, GROUP=group, PDL=pdl, launch_pdl=pdl,
            ADD=ride, HADAMARD=hadamard, LOG_D=D.bit_length() - 1, num_warps=num_warps)
        plan = CodePlan(surv, count, seg, (tau_t, tau_s), (bias_t, bias_s), rows, M, self._version,
                        remainder=rem, scale=s)
        return plan if attend is None else (plan, o_part, l_part, t)

    def _dense_plan(self, q, tau, *, bias=0.0, certify=False, scale=None):
        """A plan with no filter (nothing launched): ``run`` then scores every key."""
        B, Hq, M, D = q.shape
        tau_t, tau_s, _ = self._per_row(tau, q, "tau")
        bias_t, bias_s, _ = self._per_row(bias, q, "bias")
        dummy = self.status.view(1, 1)
        s = float(scale) if scale is not None else D ** -0.5
        rem = torch.zeros(B, Hq, M, dtype=torch.float32, device=self.device) if certify else None
        return CodePlan(dummy, dummy, 0, (tau_t, tau_s), (bias_t, bias_s),
                        max(16, triton.next_power_of_2(Hq // self.Hkv * M)), M, self._version, dense=True,
                        remainder=rem, scale=s)

    # ------------------------------------------------------------------ run (attend)
    @reads
    def run(self, q: torch.Tensor, plan: CodePlan, *, kind: str, alpha: int = 2, scale: float | None = None,
            num_splits: int | None = None, return_bound: bool = False, check: bool = True,
            group_union: bool = False) -> tuple:
        """Attention of ``q (B, Hq, M, D)`` over a plan's survivors (keys with ``score >= tau``,
        causal: query m of M sits at position ``n - M + m``; ``group_union=True``, softmax:
        each row keeps every key that any row of its GQA group keeps, within its own causal limit).

        ``kind="relu"``: weights ``relu(scale * score - bias) ** alpha`` (exact ReLU^alpha when
        ``tau = bias / scale``); ``kind="softmax"``: softmax over the kept keys. Returns
        ``(out (B, Hq, M, D) in q's dtype, lse (B, Hq, M) float32)``; rows with no kept key are
        zeros (lse -inf); rows with bad inputs are NaN (and ``check=True`` raises).
        A plan made before an :meth:`add` is refused (its survivors miss the new keys).

        ``return_bound=True`` (softmax, a plan made with ``certify=True``): also return
        ``bound (B, Hq, M)`` float32, a certified upper bound on the share of each row's softmax
        mass that the kept set leaves out (``|out - out_full|_inf <= 2 bound |V|_inf``).
        """
        self._check_q(q)
        out = self._run(q, plan, kind=kind, alpha=alpha, scale=scale, num_splits=num_splits,
                        return_bound=return_bound, group_union=group_union)
        self._raise_if(check)
        return out

    def _attention_kind(self, kind, alpha, group_union=False):
        """``(kind_id, alpha)`` checked, for a cache that holds values (``group_union``: softmax only)."""
        kind_id = check_kind(kind, group_union)
        if not self.has_values:
            raise ValueError("this cache holds keys only (v=None): no attention")
        return kind_id, check_alpha(alpha)

    def _run(self, q, plan: CodePlan, *, kind, alpha=2, scale=None, num_splits=None, return_bound=False,
             return_terms=False, out=None, lse=None, group_union=False, eps=None):
        """:meth:`run`'s body: ``q`` checked, the read lock held by the caller. ``return_terms``
        (with ``return_bound``): also the certificate's ``log_dropped, lse_low``
        (:func:`dropped_terms`), which add over disjoint key sets. ``out``, ``lse``: contiguous
        buffers of the result's shapes to write into (a captured step's own: no copies after).
        ``eps`` (with ``return_bound``): rows whose bound exceeds it attend every key (:meth:`_guard`)."""
        kind_id, alpha = self._attention_kind(kind, alpha, group_union)
        if not isinstance(plan, CodePlan):
            raise TypeError(f"plan must be a CodePlan (from CodeKVCache.plan), got {type(plan).__name__}")
        if plan.version != self._version:
            raise ValueError(f"this plan was made for version {plan.version} of the cache, which has changed since "
                             f"(now version {self._version}, {self.n} keys): plan again")
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        s = float(scale) if scale is not None else D ** -0.5
        BH = B * self.Hkv
        nprog = plan.count.shape[1]
        splits = int(num_splits or max(1, min(64, 2 * _num_sms(self.device) // BH)))
        if not plan.dense:
            splits = min(splits, nprog)
        BHM = B * Hq * M
        if plan.m != M or plan.rows != max(16, triton.next_power_of_2(G * M)):
            raise ValueError("the plan was made for other queries (different M or group size)")
        tau_t, tau_s = plan.tau
        bias_t, bias_s = plan.bias
        ts = tau_t.stride() if tau_t is not None else (0, 0, 0)
        bs = bias_t.stride() if bias_t is not None else (0, 0, 0)
        rem = None
        if eps is not None and not return_bound:
            raise ValueError("eps guards the certified bound: run with return_bound=True")
        if return_bound:
            if kind_id != 0 or plan.remainder is None:
                raise ValueError("return_bound needs kind='softmax' and a plan made with certify=True")
            if abs(plan.scale - s) > 1e-12 * s:
                raise ValueError(f"the plan certified scale {plan.scale}, run uses {s}: give the same scale")
            rem = plan.remainder.clone()  # run adds the survivors it drops (a plan may run again)
        o_part = torch.empty(splits, BHM, D, dtype=torch.float32, device=self.device)
        l_part = torch.empty(splits, BHM, dtype=torch.float32, device=self.device)
        _code_attend_kernel[(splits, BH)](
            q, self.k, self.v, tau_t if tau_t is not None else plan.count, tau_s,
            bias_t if bias_t is not None else plan.count, bias_s, plan.surv, plan.count, o_part, l_part,
            self.lengths, self.max_norm, self.status, plan.count if rem is None else rem,
            q.stride(0), q.stride(1), q.stride(2), self.k.stride(0), self.k.stride(1), self.k.stride(2),
            self.v.stride(0), self.v.stride(1), self.v.stride(2), *ts, *bs,
            M, G, self.Hkv, plan.surv.stride(0), plan.seg, nprog, splits, BHM, s * LOG2E, s,
            ROWS=plan.rows, BLOCK_N=64, HEAD_DIM=D, KIND=kind_id, ALPHA=alpha,
            UPCAST=interpreting() or q.dtype == torch.float32, TAU_TENSOR=tau_t is not None,
            BIAS_TENSOR=bias_t is not None, DENSE=plan.dense, CERTIFY=rem is not None, GROUP=bool(group_union),
            num_warps=4)
        return self._finish(q, o_part, l_part, rem, (tau_t, tau_s), s, out, lse, return_terms, eps)

    def _finish(self, q, o_part, l_part, rem, tau, s, out, lse, return_terms, eps=None, pdl=None, added=0):
        """Merge the partials into ``out``, ``lse`` (allocated if None); with ``rem`` (the
        dropped terms' sum) also the certificate: ``(out, lse, bound[, log_dropped, lse_low])``,
        guarded when ``eps`` is given (the one place every path applies :meth:`_guard`).
        ``pdl``: the merge as a programmatic dependent launch (default :attr:`pdl`).
        ``added``: tokens the launch before added without advancing the lengths: the merge
        advances them (before the certificate and the guard read them)."""
        B, Hq, M, D = q.shape
        if out is None:
            out = torch.empty(B, Hq, M, D, dtype=q.dtype, device=self.device)
        if lse is None:
            lse = torch.empty(B, Hq, M, dtype=torch.float32, device=self.device)
        merge_partials(o_part, l_part, out, lse, M, pdl=self.pdl if pdl is None else pdl,
                       advance=(self.lengths, added, self.capacity, Hq // self.Hkv) if added else None)
        if rem is None:
            return out, lse
        bound, log_dropped, lse_low = self._certificate(q, rem, lse, tau, s)
        res = (out, lse, bound, log_dropped, lse_low) if return_terms else (out, lse, bound)
        return res if eps is None else self._guard(q, res, eps, s)

    def _certificate(self, q, rem, lse, tau, s):
        """``bound, log_dropped, lse_low`` (B, Hq, M) float32 in one launch: the formula of
        :func:`~hsr.kernels.dropped_terms` and :func:`~hsr.kernels.certified_share` with this
        cache's fp32 score gap and device-side lengths (right at every replay of a capture)."""
        B, Hq, M, D = q.shape
        tau_t, tau_s = tau
        ts = tau_t.stride() if tau_t is not None else (0, 0, 0)
        bound = torch.empty(B, Hq, M, dtype=torch.float32, device=self.device)
        log_dropped = torch.empty_like(bound)
        lse_low = torch.empty_like(bound)
        BHM = B * Hq * M
        block = 32
        _certify_kernel[(triton.cdiv(BHM, block),)](
            rem, lse, rem if tau_t is None else tau_t, tau_s, q, self.max_norm, self.lengths, bound, log_dropped,
            lse_low, q.stride(0), q.stride(1), q.stride(2), *ts, Hq, M, Hq // self.Hkv, BHM, s,
            HEAD_DIM=D, BLOCK=block, TAU_TENSOR=tau_t is not None, num_warps=4)
        return bound, log_dropped, lse_low

    def _fused(self, q, tau, *, bias, kind, alpha, scale, certify, out=None, lse=None, return_terms=False,
               add=None, group_union=False, eps=None, launch=None):
        """Filter and attend in one launch (each filter program attends its own survivors),
        then the merge (and the certificate): what :meth:`attend` and a decode step run.
        ``add=(k, v)``: add these tokens in the same step (in the launch that rotates the
        query, or in the filter's: :meth:`step_form`).
        ``eps`` (with ``certify``): rows whose bound exceeds it attend every key (:meth:`_guard`).
        ``launch``: ``_plan`` options over :meth:`step_form`'s (``block_n``, ``num_warps``,
        ``num_stages``, ``programs_per_sm``; ``prepare``, a dict for the launch that rotates
        the query and adds; ``pdl``; ``rotate_inside``, ``add_in_filter``), for tuning benches
        and tests.
        Returns ``(plan, result)``, ``result`` as :meth:`_run`'s."""
        kind_id, alpha = self._attention_kind(kind, alpha, group_union)
        s = float(scale) if scale is not None else self.D ** -0.5
        launch = {**self.step_form(add is not None), **(launch or {})}
        plan, o_part, l_part, added = self._plan(q, tau, bias=bias, certify=certify, scale=s,
                                                 attend=(kind_id, alpha, bool(group_union)), add=add, **launch)
        return plan, self._finish(q, o_part, l_part, plan.remainder, plan.tau, s, out, lse, return_terms, eps,
                                  pdl=launch.get("pdl"), added=added)

    def _topk(self, q, k, *, scale, certify=False, out=None, lse=None, return_terms=False, add=None, splits=None,
              block=64):
        """Softmax over each row's ``k`` best keys and every key tied with the k-th (the top-k
        mode; ``k`` checked by the caller): every visible key scored in fp32 into a
        ``(B*Hq*M, capacity)`` buffer, the selection (:func:`~hsr.kernels._select.select_kth`:
        each row's k-th best and the positions that reach it, on the device), a softmax, and the
        merge. No filter: a top-k has no threshold to filter with before it is found
        (docs/codes.md, "A top-k mode"). ``add=(k, v)``: first add these tokens (one launch of
        its own).

        The softmax reads each row's list of positions and only the kept keys' values (the
        gather); with ``certify``, whose dropped terms need every score, it scans every score of
        the row against the k-th best instead and turns the exact dropped terms into the
        certificate with the row's k-th score as its tau. ``splits``, ``block``: tuning (the
        softmax's splits and tile). Returns :meth:`_finish`'s result."""
        if add is not None:
            self._launch_add(add[0], add[1], add[0].shape[2])
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        BH, BHM, C = B * self.Hkv, B * Hq * M, self.capacity
        dev = self.device
        s = float(scale)
        # (plain launches: the scoring, selection and gather as programmatic dependent launches
        # measured 19% slower at 128K B 1, 178 against 150 us, their waiting programs crowding the
        # kernel before; 6% faster at d 64 16K B 1; H100, topk_diag_h100_2026-12-06_select_pdl.json)
        sc = self._score_all(q, block)
        kk = min(int(k), C)
        sel = select_kth(sc, kk, self.lengths, (Hq, M, G, self.Hkv))
        # the gather splits a row's list (k and a few more); the certified scan a head's every score
        splits = splits or (max(1, min(64, 2 * _num_sms(dev) // BH)) if certify
                            else max(1, min(triton.cdiv(kk, block) + 1, triton.cdiv(4 * _num_sms(dev), BHM))))
        o_part = torch.empty(splits, BHM, D, dtype=torch.float32, device=dev)
        l_part = torch.empty(splits, BHM, dtype=torch.float32, device=dev)
        if not certify:
            _topk_gather_kernel[(splits, BHM)](
                q, self.v, sc, sel.threshold, sel.positions, sel.count, self.lengths, self.max_norm, self.status,
                o_part, l_part, q.stride(0), q.stride(1), q.stride(2), self.v.stride(0), self.v.stride(1),
                self.v.stride(2), sc.stride(0), sel.positions.stride(0), Hq, M, G, self.Hkv,
                splits, BHM, s * LOG2E, BLOCK=block, HEAD_DIM=D, num_warps=4)
            return self._finish(q, o_part, l_part, None, None, s, out, lse, return_terms)
        # the k-th best score of each row; -inf where a row sees fewer than k keys (it keeps them all)
        thr = sel.threshold
        rem = torch.zeros(BHM, dtype=torch.float32, device=dev)
        _topk_attend_kernel[(splits, BH)](
            q, self.v, sc, thr, self.lengths, self.max_norm, self.status, o_part, l_part, rem,
            q.stride(0), q.stride(1), q.stride(2),
            self.v.stride(0), self.v.stride(1), self.v.stride(2), sc.stride(0), M, G, self.Hkv, splits, BHM,
            s * LOG2E, ROWS=max(16, triton.next_power_of_2(G * M)), BLOCK_N=block, HEAD_DIM=D,
            UPCAST=interpreting() or q.dtype == torch.float32, CERTIFY=True, num_warps=4)
        tau = (thr.view(B, Hq, M), 0.0)
        return self._finish(q, o_part, l_part, rem.view(B, Hq, M), tau, s, out, lse, return_terms)

    def _score_all(self, q, block=64):
        """``(B*Hq*M, capacity)`` fp32: every visible key's score for each query row (rows
        ordered ``(b, hq, m)``), ``-inf`` past a row's causal limit; entries at or past the
        length are not written (no reader looks there): the top-k mode's first launch."""
        B, Hq, M, D = q.shape
        G = Hq // self.Hkv
        sc = torch.empty(B * Hq * M, self.capacity, dtype=torch.float32, device=self.device)
        _score_all_kernel[(triton.cdiv(self.capacity, block), B * self.Hkv)](
            q, self.k, sc, self.lengths, q.stride(0), q.stride(1), q.stride(2),
            self.k.stride(0), self.k.stride(1), self.k.stride(2), sc.stride(0), G, M, self.Hkv,
            ROWS=max(16, triton.next_power_of_2(G * M)), BLOCK_N=block, HEAD_DIM=D,
            UPCAST=interpreting() or q.dtype == torch.float32, num_warps=4)
        return sc

    def step_form(self, adding: bool = True) -> dict:
        """The launches of a fused step (:meth:`attend`, a decode step), as ``_plan`` options.

        Three launches by default: the query's rotation (and the add), the filter that
        attends its survivors, the merge. Two where measured faster (H100, 2026-12-06,
        ``bench/results/step_variants_h100_2026-12-06_{ride,form,tiles}.json``): a step that
        adds, with the Hadamard rotation, fewer than 16 (batch, kv head) pairs (the filter's
        2 programs an SM), and d <= 64, or d 128 with a capacity of at most 32K keys, drops its first
        launch, each filter program rotating the query by a fast Walsh-Hadamard transform and
        one more program per head adding the tokens and attending them. B 1: 13.1-13.3, 15.4,
        25.6-26.1 against 14.9-15.1, 17.2, 28.1 µs at d 64 (9/3 heads), 16K, 32K, 128K; 19.5-20.6
        and 22.8-23.3 against 20.8-20.9 and 24.4-24.8 at d 128 (28/4), 16K and 32K, but 50.3-50.5
        against 46.6-47.1 at 128K. With 8 programs an SM (B 8) it lost everywhere measured
        (+3 µs at d 64, +8 at d 128 16K, +42 at 128K), and at d 256, B 1 (14/2 heads: 59.0,
        99.6, 141.2 against 42.3, 62.4, 105.4 µs at 16K, 32K, 128K;
        ``bench/results/step_variants_h100_2026-12-06_d256.json``).
        Returns ``{"rotate_inside": bool, "add_in_filter": bool}``."""
        two = (bool(adding) and self.signs is not None and self.DP == self.D and self.B * self.Hkv < 16
               and (self.D <= 64 or (self.D == 128 and self.capacity <= 1 << 15)))  # d 256: three, measured
        return {"rotate_inside": two, "add_in_filter": two}

    def _guard(self, q, res, eps, scale):
        """``res = (out, lse, bound[, log_dropped, lse_low])`` of a certified softmax run, with
        every row whose bound exceeds ``eps`` replaced by full softmax over its visible keys
        (bound 0): one dense launch in which only the groups holding such a row read their
        keys (the others have ``tau = +inf``: nothing kept, no tile read), its merge and
        certificate, and a few elementwise selects. No synchronisation, so a captured step
        guarantees ``eps`` per row at every replay. ``out`` and ``lse`` are rewritten in place
        (a step's own buffers); the others are returned anew."""
        need = res[2] > eps
        if self._guard_counts is not None:  # three small launches, only when asked for
            self._guard_counts[0].add_(need.sum())
            self._guard_counts[1].add_(need.numel())
        every = torch.where(need, float("-inf"), float("inf"))  # -inf keeps every key, +inf none
        plan = self._dense_plan(q, every, certify=True, scale=scale)
        full = self._run(q, plan, kind="softmax", scale=scale, return_bound=True, return_terms=len(res) > 3)
        res[0].copy_(torch.where(need[..., None], full[0], res[0]))
        res[1].copy_(torch.where(need, full[1], res[1]))
        return tuple(res[:2]) + tuple(torch.where(need, f, r) for f, r in zip(full[2:], res[2:]))

    def count_guard(self) -> torch.Tensor:
        """Count the guard's work from now on (``tau`` with ``eps``): returns a ``(2,)`` int64
        tensor on this device, ``[rows that attended every key, rows guarded]``, to which every
        guarded call adds on the device (no synchronisation; a captured step adds at every
        replay). The same tensor at every call: zero it in place to start again. Steps
        captured before the first call count nothing (make them after it; the cache's own
        replays are recorded again). Costs three small launches per guarded call."""
        if self._guard_counts is None:
            self._guard_counts = torch.zeros(2, dtype=torch.int64, device=self.device)
            self.replays.clear()  # graphs recorded before would count nothing
        return self._guard_counts

    @property
    def counts_guard(self) -> bool:
        """Whether :meth:`count_guard` was called (guarded calls add to its counter)."""
        return self._guard_counts is not None

    supports = frozenset({"tau", "topk", "info", "group_union", "tau_eps"})

    def attend(self, q: torch.Tensor, spec: AttentionSpec, *, add: tuple | None = None, with_info: bool = False,
               num_splits: int | None = None, check: bool = True) -> tuple[torch.Tensor, AttentionInfo | None]:
        """Filter + attend ``q (B, Hq, M, D)`` (on this device, this dtype) as ``spec`` says: the
        attention protocol's method (:func:`hsr.hsr_attention` calls it).

        ReLU^alpha keeps ``tau = bias / scale`` (exact); softmax needs ``spec.tau`` (raw score).
        M > 1 needs ``spec.causal`` (the queries are the last M positions). Returns
        ``(out (B, Hq, M, D), info)``; ``with_info=True``: an :class:`AttentionInfo` of
        ``(B, Hq, M)`` tensors — ``keys_scored`` the filter's survivors of the row's head,
        ``keys_selected`` None (the kernel does not count), ``lse``, and for softmax
        ``dropped_bound`` the certified share of the mass below tau (see :meth:`run`; one
        more pass over the survivors). ``check=True``: one synchronisation, a ``ValueError``
        for bad values; ``check=False``: none (NaN rows, and :meth:`check` raises later).

        ``spec.eps`` with ``spec.tau`` (softmax): each row keeps ``score >= tau`` where its
        certified dropped share is at most ``eps``, and every key where it may be more (one
        more launch that reads only the keys of the groups holding such a row; no
        synchronisation): ``eps`` holds per row and step.

        ``add=(k, v)``: first add these ``(B, Hkv, t, D)`` keys and values, as :meth:`add` does,
        in the same call (a decode loop's step: for ``t <= 64`` the add rides in the launch
        that rotates the query, and an eager call replays one graph instead of two). Nothing
        is added when the call is refused (shapes, kind, options).
        """
        lock = self._lock  # plan and run under one read (an add cannot fall between them); a write to add
        acquire, release = ((lock.acquire_read, lock.release_read) if add is None
                            else (lock.acquire_write, lock.release_write))
        acquire()
        try:
            return self._attend(q, spec, add, with_info, num_splits, check)
        finally:
            release()

    def _attend(self, q, spec, add, with_info, num_splits, check):
        """:meth:`attend`'s body, under the lock it takes."""
        if not (torch.is_tensor(q) and q.device == self.device):
            raise TypeError(f"a CodeKVCache on {self.device} takes query tensors (B, Hq, M, D) on the same device")
        if not spec.causal and q.dim() == 4 and q.shape[2] > 1:
            raise ValueError("the code cache attends the last M positions causally: pass causal=True for M > 1")
        s = spec.scale_for(self.D)
        if spec.topk is not None:
            return self._attend_topk(q, spec, add, with_info, check)
        bias, tau = spec_thresholds(spec, s, self.device)
        eps = spec.guard_eps
        certify = (with_info and spec.kind == "softmax") or eps is not None
        _, alpha = self._attention_kind(spec.kind, spec.alpha, spec.group_union)  # refused before an add
        k, v, t = self._call_tokens(add, check)
        self._check_q(q, t)
        replayed = num_splits is None and not with_info  # the common call: replayed per shape
        if t and not (replayed and t <= 64):  # added first, on its own
            self._launch_add(k, v, t)
            self.advanced(t)
            t = 0
        if replayed:
            out = self._replayed_attend(q, tau, bias, spec.kind, alpha, s, spec.group_union, (k, v) if t else None,
                                        eps)
            if t:
                self.advanced(t)
            self._raise_if(check)
            return out, None
        if num_splits is None:
            plan, res = self._fused(q, tau, bias=bias, kind=spec.kind, alpha=spec.alpha, scale=s, certify=certify,
                                    group_union=spec.group_union, eps=eps)
        else:
            plan = self._plan(q, tau, bias=bias, certify=certify, scale=s)
            res = self._run(q, plan, kind=spec.kind, alpha=spec.alpha, scale=s, num_splits=num_splits,
                            return_bound=certify, group_union=spec.group_union, eps=eps)
        self._raise_if(check)
        return res[0], (plan_info(plan, q.shape, res, self.n) if with_info else None)

    def _call_tokens(self, add, check):
        """``(k, v, t)`` of an attend call's ``add=(k, v)`` (:meth:`_new_tokens`); ``(None, None, 0)``
        without one."""
        if add is None:
            return None, None, 0
        if not (isinstance(add, (tuple, list)) and len(add) == 2):
            raise TypeError(f"add must be a (k, v) pair of tensors, got {type(add).__name__}")
        return self._new_tokens(add[0], add[1], check)

    def _attend_topk(self, q, spec, add, with_info, check):
        """:meth:`_attend` for ``spec.topk`` (softmax; :meth:`_topk`): replayed per shape like the
        threshold's call; ``with_info`` runs eagerly and certifies."""
        self._attention_kind("softmax", 1)
        k_best = check_topk(spec.topk, spec.kind, group_union=spec.group_union)
        s = spec.scale_for(self.D)
        kn, vn, t = self._call_tokens(add, check)
        self._check_q(q, t)
        if with_info:
            if t:
                self._launch_add(kn, vn, t)
                self.advanced(t)
            res = self._topk(q, k_best, scale=s, certify=True)
            self._raise_if(check)
            B, Hq, M, _ = q.shape
            seen = torch.arange(self.n - M + 1, self.n + 1, device=self.device).clamp(min=0)
            scored = seen.view(1, 1, M).expand(B, Hq, M).contiguous()
            return res[0], AttentionInfo(scored, None, res[2], res[1], self.n)
        key = ("topk", tuple(q.shape), k_best, s, t)

        def body(b):
            return self._topk(b[0], k_best, scale=s, add=(b[1], b[2]) if t else None)[:1]

        out = self.replays.run(key, self._storage, (q, kn, vn) if t else (q,), body)[0]
        if t:
            self.advanced(t)
        self._raise_if(check)
        return out, None

    def _replayed_attend(self, q, tau, bias, kind, alpha, s, group_union, add=None, eps=None):
        """``out`` of the fused filter + attend + merge through :attr:`replays` (``kind``,
        ``alpha``: checked by the caller): numbers are part of the graph's key, tensors are
        copied into its buffers (float32 on this device, as the kernels read them in place).
        ``add=(k, v)``: ``t <= 64`` tokens added first, in the same graph (the caller advances
        the host's length). ``eps``: guarded (:meth:`_guard`)."""
        key = ["attend", tuple(q.shape), kind, alpha, s, bool(group_union), eps]
        inputs = [q]
        for x, name in ((tau, "tau"), (bias, "bias")):
            if torch.is_tensor(x):
                x = as_float32(x, name, self.device)
                key.append(tuple(x.shape))
                inputs.append(x)
            else:
                key.append(float(x))
                inputs.append(None)
        if add is not None:
            key.append(("add", add[0].shape[2]))
            inputs.extend(add)

        def body(b):
            t = b[1] if b[1] is not None else tau
            bs = b[2] if b[2] is not None else bias
            return self._fused(b[0], t, bias=bs, kind=kind, alpha=alpha, scale=s, certify=eps is not None,
                               group_union=group_union, add=None if add is None else (b[3], b[4]), eps=eps)[1][:1]

        return self.replays.run(tuple(key), self._storage, inputs, body)[0]

    def decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str,
                    tau: float | torch.Tensor | None = None, alpha: int = 2, bias: float | torch.Tensor = 0.0,
                    scale: float | None = None, graph: bool | None = None, dense: bool | None = None,
                    certify: bool = False, fuse: bool = True, group_union: bool = False,
                    eps: float | None = None, topk: int | None = None) -> DecodeStep:
        """A :class:`hsr.kernels.decode.DecodeStep` over this cache: add ``k, v`` then attend
        ``q``, captured once in a CUDA graph that replays at every length up to the capacity.
        The arguments are example inputs (shapes and dtypes) and the attention options."""
        return DecodeStep(self, q, k, v, kind=kind, tau=tau, alpha=alpha, bias=bias, scale=scale, graph=graph,
                          dense=dense, certify=certify, fuse=fuse, group_union=group_union, eps=eps, topk=topk)

    def keys_read_bytes(self) -> int:
        """Bytes one filter step reads: codes, steps and errors of every key of every head."""
        return self.B * self.Hkv * self.n * (self.DP + 8)

    def __repr__(self):
        return (f"CodeKVCache(B={self.B}, Hkv={self.Hkv}, n={self.n}, capacity={self.capacity}, D={self.D}, "
                f"dtype={self.dtype}, device={self.device})")

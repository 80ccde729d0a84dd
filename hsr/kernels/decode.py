"""A decode step a generation loop can use: add the new token, attend, one CUDA graph for every length.

A generation loop grows the cache by one token per step. :class:`DecodeStep` records the
step of a :class:`hsr.kernels.CodeKVCache` — ``add(k, v)`` then filter + attend + merge —
once, in a CUDA graph, and replays it. Every kernel reads the cache's length from the device
and sizes its grid from the capacity, so the same graph is right at every length up to the
capacity; the host only counts (``cache.n``) and refuses a step past the capacity, the one
point that needs a new capture (``cache.reserve(...)``, then a new step).

No synchronisation happens in a replay: bad values (NaN/Inf in q, k, v, tau, bias) give NaN
rows, never a finite wrong answer, and :meth:`hsr.kernels.CodeKVCache.check` raises them at
the caller's next synchronisation point (the module docstring of ``hsr.kernels.codes``).

Off CUDA (the Triton interpreter in tests) there is no graph: the step runs eagerly, with
the same results.
"""
from __future__ import annotations

from typing import Any

import torch

from .._protocol import check_share
from ._code_plan import default_tau
from ._validate import check_alpha, check_kind, check_topk, f32_at_least

__all__ = ["DecodeStep", "DENSE_BELOW"]

#: below this capacity a step skips the filter and scores every key (measured crossover on an
#: H200, bench/bench_decode_loop.py: see docs/codes.md)
DENSE_BELOW = 0


class DecodeStep:
    """Add ``t`` tokens to a :class:`~hsr.kernels.CodeKVCache` and attend, replayed from one graph.

    Parameters
    ----------
    cache : CodeKVCache
        The cache; its capacity bounds the lengths one capture serves.
    q : Tensor, (B, Hq, M, D)
        An example query (shape and dtype; the cache's dtype and device).
    k, v : Tensor, (B, Hkv, t, D), or both None
        Example new keys and values (usually ``t = M = 1``). None: the step attends only
        (a rank of a striped cache whose turn it is not to store the token).
    kind : {"softmax", "relu"}
    tau : float or float32 Tensor of shape (), (Hq,) or (B, Hq, M), optional
        Raw-score threshold (``score >= tau`` kept; ReLU defaults to ``bias / scale``). A
        tensor is copied into the step's own buffer, which :attr:`tau` exposes: write new
        thresholds into it in place between calls (``step.tau.copy_(...)``).
    alpha, bias, scale
        As in :meth:`~hsr.kernels.CodeKVCache.attend` (a tensor bias is copied like tau).
    graph : bool, optional
        Capture a CUDA graph (default: on CUDA). False runs every call eagerly (no sync).
    dense : bool, optional
        Skip the filter and score every key (same kept set): where the filter costs more
        than it saves. Default: dense when the capacity is below :data:`DENSE_BELOW` keys.
    certify : bool
        Softmax only: each call also writes :attr:`bound` ``(B, Hq, M)``, a certified upper
        bound on the share of each row's softmax mass below tau (read it at a sync point).
    eps : float in (0, 1), optional
        Softmax only (implies ``certify``): rows whose bound exceeds ``eps`` attend every key
        instead, in the same graph (one more launch that reads only the keys of the groups
        holding such a row), so every row's dropped share is at most ``eps`` at every replay.
    group_union : bool
        Softmax: each query row keeps every key that any row of its GQA group keeps (the
        union the filter reads anyway): less dropped mass for the same bytes.
    topk : int, optional
        Softmax only, instead of ``tau``: each row keeps its ``topk`` best keys and every key
        tied with the k-th (:meth:`~hsr.kernels.CodeKVCache.attend`'s top-k mode: every key
        scored, no filter; ``certify`` then bounds from the exact dropped terms).
    fuse : bool
        Filter and attend in one launch, each filter program attending its own survivors
        (the default); False: the filter's survivor lists, then the attention in a launch of its own
        (:meth:`~hsr.kernels.CodeKVCache.plan` and :meth:`~hsr.kernels.CodeKVCache.run`).

    Attributes
    ----------
    lse : Tensor (B, Hq, M) float32
        After a call: each row's log of its kept mass (softmax) or of its sum of weights
        (ReLU), what merging partial results needs (``hsr.distributed``).
    log_dropped, lse_low : Tensor (B, Hq, M) float32, or None
        With ``certify``: the certificate's terms, the log of an upper bound of the dropped
        mass and of a lower bound of the kept mass (``bound = sigmoid(log_dropped - lse_low)``).
        Unlike ``bound`` they add over disjoint key sets: a striped cache merges them.

    Notes
    -----
    The first call runs eagerly (it compiles the kernels and is the first real step) and
    then captures; later calls copy their inputs into the step's buffers and replay. The
    returned tensor is the step's output buffer: the next call overwrites it (clone to keep).
    """

    def __init__(self, cache: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str,
                 tau: float | torch.Tensor | None = None, alpha: int = 2, bias: float | torch.Tensor = 0.0,
                 scale: float | None = None, graph: bool | None = None, dense: bool | None = None,
                 certify: bool = False, fuse: bool = True, group_union: bool = False,
                 eps: float | None = None, topk: int | None = None) -> None:
        # cache: a CodeKVCache (codes.py imports this module)
        check_kind(kind, group_union)
        self.topk = None if topk is None else check_topk(topk, kind, tau, eps, group_union)
        self.alpha = check_alpha(alpha)
        if k is None and v is None:  # attend only: an empty token step keeps every check below
            k = v = torch.empty(cache.B, cache.Hkv, 0, cache.D, dtype=cache.dtype, device=cache.device)
        if not (torch.is_tensor(q) and torch.is_tensor(k) and torch.is_tensor(v)):
            raise TypeError("q, k and v must be torch tensors (k and v may both be None)")
        if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"q must be (B, Hq, M, D) and k, v (B, Hkv, t, D), got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape[:2] != (cache.B, cache.Hkv) or k.shape[-1] != cache.D:
            raise ValueError(f"k and v must be ({cache.B}, {cache.Hkv}, t, {cache.D}), got {tuple(k.shape)}")
        if k.shape[2] and q.shape[2] > k.shape[2] + cache.n:  # attend-only rows may see no key: zeros
            raise ValueError("more query positions than keys")
        self.cache = cache
        self.kind = kind
        self.scale = float(scale) if scale is not None else cache.D ** -0.5
        tau = default_tau(kind, tau, bias, self.scale) if self.topk is None else 0.0  # (unread)
        dev, dt = cache.device, cache.dtype
        self.q = torch.empty(q.shape, dtype=dt, device=dev)
        self.k = torch.empty(k.shape, dtype=dt, device=dev)
        self.v = torch.empty(v.shape, dtype=dt, device=dev)
        self.tau = self._own(tau, "tau")
        self.bias = self._own(bias, "bias")
        self.t = k.shape[2]
        self._graph = None
        self._storage = cache._storage
        self.use_graph = (dev.type == "cuda") if graph is None else bool(graph)
        self.dense = cache.capacity < DENSE_BELOW if dense is None else bool(dense)
        if (certify or eps is not None) and kind != "softmax":
            raise ValueError("certify=True and eps= bound the dropped softmax mass: kind='softmax'")
        self.eps = None if eps is None else check_share(eps, "eps")
        self.certify = bool(certify) or eps is not None
        self.group_union = bool(group_union)
        self.fuse = bool(fuse)
        self.bound = None
        self.log_dropped = None
        self.lse_low = None
        self.out = torch.empty(q.shape, dtype=dt, device=dev)
        self.lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
        if self.use_graph and dev.type != "cuda":
            raise ValueError("graph=True needs a CUDA cache")

    def _own(self, x, name):
        if not torch.is_tensor(x):
            return float(x)
        x = x.to(self.cache.device)
        return (f32_at_least(x) if name == "tau" else x.float()).clone()

    def _step(self):
        c = self.cache
        # the attention writes into the step's own out and lse (two copies fewer per step)
        if self.topk is not None:
            res = c._topk(self.q, self.topk, scale=self.scale, certify=self.certify, out=self.out, lse=self.lse,
                          return_terms=self.certify, add=(self.k, self.v) if self.t else None)
        elif self.fuse and not self.dense:  # the add rides in the step's first launch (CodeKVCache.step_form)
            _, res = c._fused(self.q, self.tau, bias=self.bias, kind=self.kind, alpha=self.alpha, scale=self.scale,
                              certify=self.certify, out=self.out, lse=self.lse, return_terms=self.certify,
                              add=(self.k, self.v) if self.t else None, group_union=self.group_union,
                              eps=self.eps)
        else:
            if self.t:
                c._launch_add(self.k, self.v, self.t)
            plan = (c._dense_plan if self.dense else c._plan)(self.q, self.tau, bias=self.bias,
                                                              certify=self.certify, scale=self.scale)
            res = c._run(self.q, plan, kind=self.kind, alpha=self.alpha, scale=self.scale,
                         return_bound=self.certify, return_terms=self.certify, out=self.out, lse=self.lse,
                         group_union=self.group_union, eps=self.eps)
        extra = res[2:] if self.certify else (None, None, None)
        for name, x in (("bound", extra[0]), ("log_dropped", extra[1]), ("lse_low", extra[2])):
            if x is not None and getattr(self, name) is None:
                setattr(self, name, x)
            elif x is not None:
                getattr(self, name).copy_(x)
        return res[0]

    def __call__(self, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> torch.Tensor:
        """Add ``k, v`` (``(B, Hkv, t, D)``) at the next positions and attend ``q``; returns
        ``out (B, Hq, M, D)`` (the step's buffer). No synchronisation. An input left out is
        read from the step's buffer as it is (:attr:`q`, :attr:`k`, :attr:`v`): a model that
        writes its projections there saves the copies."""
        c = self.cache
        if c._storage != self._storage:
            raise ValueError("the cache was reallocated since this step was made (it grew past its capacity): "
                             "make a new step")
        if c.n + self.t > c.capacity:
            raise ValueError(f"the cache is full ({c.n} keys, capacity {c.capacity}): cache.reserve(larger) "
                             "and make a new step (the one point that needs a new capture)")
        for x, buf, name in ((q, self.q, "q"), (k, self.k, "k"), (v, self.v, "v")):
            if x is not None and x.shape != buf.shape:
                raise ValueError(f"this step takes q {tuple(self.q.shape)}, k and v {tuple(self.k.shape)}; got "
                                 f"{name} {tuple(x.shape)}")
        with c._lock.write():  # the step adds: searches of other threads wait, as for add()
            pairs = [(buf, x) for x, buf in ((q, self.q), (k, self.k), (v, self.v)) if x is not None]
            if pairs:  # one launch copies them all (three copy_ calls cost ~10 us of host time at B 1)
                torch._foreach_copy_([b for b, _ in pairs], [x for _, x in pairs])
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
            c.advanced(self.t)
            if self.use_graph and self._graph is None:
                self._capture()
        return self.out

    def _capture(self):
        # the eager first call compiled every kernel; a capture only records (nothing runs),
        # so the cache is not advanced by it
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step()
        self._graph = g

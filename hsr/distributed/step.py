"""``StripedDecodeStep``: a decode step over a KV cache striped over ranks, with no host round trip.

Placement: position ``t`` lives on rank ``t % W`` (local position ``t // W``). Measured on
real keys (``bench/bench_placement.py``, ``bench/results/placement_cpu.json``), striping is
the placement whose slowest rank does the mean rank's work, for the keys held (the filter's
cost, the memory) and for the keys kept (the attention's): 1.00 at W = 2 and 4, where position
blocks that append to the last rank reach 1.75 / 3.25 at 32K (held) and even rebalanced blocks
leave the attention 1.36 / 1.78 × the mean (attention crowds the first and the latest
positions), and kv heads split 3 heads unevenly and their attention by 1.27-1.55.

One step, on every rank (SPMD), all on the device:

1. the rank whose turn it is stores the token (``CodeKVCache`` add), the others do not: each
   rank holds two :class:`hsr.kernels.decode.DecodeStep` s, add + attend and attend only,
   each captured once in a CUDA graph; the host picks one by its own position counter (it
   knows every length without asking the device);
2. every rank's partial ``[out | lse]`` (its kept keys' weighted mean and the log of their
   mass) goes into one buffer, one ``all_gather`` (NCCL: captured in a second graph with the
   merge) brings the W partials to every rank;
3. the exact log-space merge: ``out = sum_r e^{lse_r} out_r / sum_r e^{lse_r}``.

Bad values never stop the stream (as on one device): they give NaN rows and a status bit;
:meth:`StripedDecodeStep.check` gathers every rank's status word (one collective, one
synchronisation, where the caller chooses) and raises the same ``ValueError`` on every rank.
A rank that dies or stalls inside a collective is NCCL's to report: initialise the group with
a ``timeout`` (and ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``) so that the others raise instead of
waiting (docs/distributed.md, "Failures").
"""

from __future__ import annotations

from typing import Any

from .._typing import ProcessGroup
from ._comm import Comm

__all__ = ["StripedDecodeStep", "stripe"]


def stripe(k: Any, v: Any, world: int, rank: int) -> tuple[Any, Any]:
    """This rank's share of a prompt's keys and values ``(B, Hkv, n, D)``: positions
    ``rank, rank + world, ...`` (contiguous copies)."""
    return k[:, :, rank::world].contiguous(), v[:, :, rank::world].contiguous()


class StripedDecodeStep:
    """Add one token to a striped :class:`hsr.kernels.CodeKVCache` and attend over every rank.

    Parameters
    ----------
    local : hsr.kernels.CodeKVCache
        This rank's stripe: positions ``rank, rank + W, ...`` in order (:func:`stripe`). Every
        rank holds the same B, Hkv, D and dtype, on its own device (NCCL) or the CPU (gloo).
    n_global : int
        Positions in the whole cache now (the next token gets position ``n_global``).
    q : Tensor, (B, Hq, 1, D)
        Example query (shape and dtype).
    kind, tau, alpha, bias, scale
        As :meth:`hsr.kernels.CodeKVCache.decode_step`.
    certify : bool
        Softmax only: every call also writes :attr:`bound`, the certified share of each row's
        mass over the whole cache that the kept keys leave out. Each rank's step bounds its
        dropped mass ``U_r`` and its kept mass from below ``Z_r``; these add over the stripes,
        so the global bound is ``sum U_r / (sum Z_r + sum U_r)`` (one all-gather carries
        them with the partial outputs; no extra collective).
    group : torch.distributed.ProcessGroup, optional
    graph : bool, optional
        Capture CUDA graphs (default: on CUDA).

    Notes
    -----
    Construction is collective (it checks the stripes agree with ``n_global``). Each call is
    collective and returns the merged ``out (B, Hq, 1, D)`` on every rank (the step's buffer:
    clone to keep). Capacity: each rank's cache must hold its next token (``local.reserve``
    before making the step, as for one device).
    """

    def __init__(self, local: Any, n_global: int, q: Any, *, kind: str, tau: Any = None, alpha: int = 2,
                 bias: Any = 0.0, scale: float | None = None, group: ProcessGroup | None = None,
                 graph: bool | None = None, certify: bool = False) -> None:
        import numpy as np
        import torch

        self.comm = Comm(group)
        W, r = self.comm.world, self.comm.rank
        if q.dim() != 4 or q.shape[2] != 1:
            raise ValueError(f"q must be (B, Hq, 1, D): a striped step decodes one position, got {tuple(q.shape)}")
        want = (n_global - r + W - 1) // W if n_global > r else 0
        got = self.comm.gather_rows(np.array([len(local), want], dtype=np.float64), "StripedDecodeStep")
        if (got[:, 0] != got[:, 1]).any():
            raise ValueError(f"the stripes hold {got[:, 0].astype(int).tolist()} positions, a cache of {n_global} "
                             f"striped over {W} ranks holds {got[:, 1].astype(int).tolist()}")
        self.local, self.n = local, int(n_global)
        B, Hq, _, D = q.shape
        kv = torch.empty(B, local.Hkv, 1, D, dtype=local.dtype, device=local.device)
        opts = dict(kind=kind, tau=tau, alpha=alpha, bias=bias, scale=scale, graph=graph, certify=certify)
        self._steps = {True: local.decode_step(q, kv, kv, **opts), False: local.decode_step(q, None, None, **opts)}
        self.rows, self.D = B * Hq, D
        self.shape = (B, Hq, 1, D)
        self.certify = bool(certify)
        width = D + (3 if certify else 1)  # [out | lse] or [out | lse | log_dropped | lse_low]
        self.send = torch.zeros(self.rows, width, dtype=torch.float32, device=local.device)
        self.got = torch.zeros(W, self.rows, width, dtype=torch.float32, device=local.device)
        self.out = torch.zeros(self.shape, dtype=local.dtype, device=local.device)
        #: with ``certify``: (B, Hq, 1) float32, the certified share of each row's softmax mass
        #: (over every rank's keys) that the kept keys leave out; rewritten by every call
        self.bound = torch.zeros(self.shape[:3], dtype=torch.float32, device=local.device) if certify else None
        self.use_graph = self._steps[True].use_graph
        self._graph = None
        #: why the gather + merge could not be captured (then they run eagerly), or None
        self.capture_error: str | None = None

    @property
    def mine(self) -> bool:
        """Whether this rank stores the next token."""
        return self.n % self.comm.world == self.comm.rank

    def __call__(self, q: Any, k: Any, v: Any) -> Any:
        """Add ``k, v`` ``(B, Hkv, 1, D)`` at position ``n_global`` (on the rank whose turn it is)
        and attend ``q`` over every rank; returns the merged ``out (B, Hq, 1, D)``."""
        step = self._steps[self.mine]
        part = step(q, k, v) if self.mine else step(q)
        self.n += 1
        self.send[:, :self.D].copy_(part.reshape(self.rows, self.D))
        self.send[:, self.D].copy_(step.lse.reshape(self.rows))
        if self.certify:
            self.send[:, self.D + 1].copy_(step.log_dropped.reshape(self.rows))
            self.send[:, self.D + 2].copy_(step.lse_low.reshape(self.rows))
        if self._graph is not None:
            self._graph.replay()
            return self.out
        self._gather_merge()
        if self.use_graph and self.comm.backend == "nccl" and self.capture_error is None:
            import torch  # gloo collectives cannot be captured

            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    self._gather_merge()
                self._graph = g
            except RuntimeError as exc:  # an NCCL build that cannot be captured: stay eager, say why
                self.capture_error = f"{type(exc).__name__}: {exc}"
        return self.out

    def _gather_merge(self):
        import torch

        if self.comm.backend == "gloo":
            self.comm.dist.all_gather(list(self.got.unbind(0)), self.send, group=self.comm.group)
        else:
            self.comm.dist.all_gather_into_tensor(self.got, self.send, group=self.comm.group)
        O, L = self.got[:, :, :self.D], self.got[:, :, self.D]
        top = L.max(dim=0).values
        w = torch.exp(L - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # e^-inf = 0, NaN stays
        tot = w.sum(dim=0)
        merged = (w.unsqueeze(-1) * O).sum(dim=0) / torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
        self.out.copy_(merged.reshape(self.shape))
        if self.certify:  # the ranks' bounds on the dropped and the kept mass add (dropped_terms)
            from ..kernels import certified_share

            log_u = torch.logsumexp(self.got[:, :, self.D + 1], dim=0)
            low = torch.logsumexp(self.got[:, :, self.D + 2], dim=0)
            self.bound.copy_(certified_share(log_u, low).reshape(self.bound.shape))

    def check(self) -> None:
        """Raise on every rank if any rank's cache saw bad values (one collective, one sync):
        the failing rank raises its own ``ValueError`` (:meth:`hsr.kernels.CodeKVCache.check`),
        the others :class:`hsr.distributed.ShardError` naming it."""
        import numpy as np

        self.comm.attempt(self.local.check)
        self.comm.gather_rows(np.zeros(1), "StripedDecodeStep.check")

"""The plan of the GPU code filter and the small pieces around it (``hsr.kernels.codes``).

``CodePlan`` is what :meth:`hsr.kernels.CodeKVCache.plan` returns and ``run`` consumes;
:func:`status_message` turns the kernels' status bits into the error a checked call raises;
:func:`dropped_terms` and :func:`certified_share` turn the certificate's sums into the per-row
bound on the dropped softmax share (docs/codes.md, "A softmax certificate on the GPU").
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._protocol import AttentionInfo, AttentionSpec
from ._code_kernels import BAD_BIAS, BAD_FULL, BAD_KV, BAD_Q, BAD_RANGE, BAD_TAU
from ._validate import f32_at_least

__all__ = ["CodePlan", "as_float32", "certified_share", "default_tau", "dropped_terms", "per_row_values", "plan_info",
           "spec_thresholds", "status_message"]

#: what each status bit means, in the words of the error a checked call raises
STATUS_WORDS = ((BAD_Q, "q contains NaN or Inf"), (BAD_TAU, "tau contains NaN"),
                 (BAD_BIAS, "bias contains NaN or Inf"),
                 (BAD_RANGE, "|q|*|k| may reach 1e37: beyond the fp32 bounds of the code filter; rescale q or k"),
                 (BAD_KV, "keys or values added with NaN or Inf (check=False): the cache is poisoned, every "
                          "answer is NaN; rebuild it"),
                (BAD_FULL, "tokens added past the capacity (a replayed graph ran once too often; nothing was "
                           "written): the cache is poisoned, every answer is NaN; rebuild it with a larger capacity"))


def random_rotation(d: int, seed: int, device) -> torch.Tensor:
    """A seeded Haar-random orthogonal ``(d, d)`` float64 matrix (rows = the basis)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    qm, rm = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(rm))).T.contiguous().to(device)


def hadamard_rotation(d: int, seed: int, device) -> torch.Tensor:
    """A seeded randomized Hadamard ``(d, d)`` float64 matrix ``H diag(signs) / sqrt(d)`` (``d`` a
    power of two; ``H`` Sylvester's, natural order; rows = the basis). In float32 every entry
    is ``±fl(1/sqrt(d))``: the stored matrix is exactly ``c H diag(signs)`` with one ``c``, so a
    fast Walsh-Hadamard transform of ``signs * q`` times ``c`` computes it (up to rounding)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two dimension, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
    return (h * signs[None, :] / d ** 0.5).to(device)


@functools.lru_cache(maxsize=None)
def _has_cuda() -> bool:
    """``torch.cuda.is_available()``, asked once (it reads the environment: ~3 us a call)."""
    return torch.cuda.is_available()


def capturing() -> bool:
    """Inside CUDA-graph capture nothing may synchronise: checks are deferred there."""
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


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
    version : int
        The cache's version (bumped by every ``add``) the plan was made for: :meth:`CodeKVCache.run`
        refuses a plan of another version, whose survivors would miss the keys added since.
    dense : bool
        No filter ran: :meth:`CodeKVCache.run` reads every key below the length (the fallback
        where the filter costs more than it saves; same kept set).
    remainder : Tensor (B, Hq, M) float32 or None
        With ``certify=True``: an upper bound of ``sum exp(scale * (score - tau))`` over the keys
        the filter dropped for each row (from their code bounds); :meth:`CodeKVCache.run` adds
        the survivors it drops, exactly, and turns it into a bound on the dropped softmax mass.
    scale : float
        The softmax scale the remainder was made for.
    """

    surv: torch.Tensor
    count: torch.Tensor
    seg: int
    tau: tuple
    bias: tuple
    rows: int
    m: int
    version: int
    dense: bool = False
    remainder: torch.Tensor | None = None
    scale: float = 0.0

    def survivors(self, bh: int) -> torch.Tensor:
        """The surviving key positions of (batch, kv head) ``bh``, ascending (host sync)."""
        cnt = self.count[bh].tolist()
        parts = [self.surv[bh, p * self.seg:p * self.seg + c] for p, c in enumerate(cnt)]
        return torch.cat(parts) if parts else self.surv.new_zeros(0)

    def n_survivors(self) -> torch.Tensor:
        """Survivors per (batch, kv head), ``(B*Hkv,)`` int64 (on the device, no sync)."""
        return self.count.sum(1)



def status_message(bits: int) -> str:
    """The ``ValueError`` message for the kernels' status ``bits`` (every problem named)."""
    return "; ".join(w for b, w in STATUS_WORDS if bits & b)


def dropped_terms(rem: torch.Tensor, lse: torch.Tensor, tau: float | torch.Tensor, s: float, gap: torch.Tensor,
                  n: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The certificate's two sums per row, on the device (elementwise, capturable):
    ``log_dropped``, the log of an upper bound ``U`` of the dropped mass
    ``sum_dropped exp(s score)`` (from ``rem >= sum_dropped exp(s (score - tau))``), and
    ``lse_low``, the log of a lower bound ``Z_low`` of the kept mass ``Z`` (from ``lse``, the
    kernels' fp32 ``log Z``). ``lse_low`` is widened for what the fp32 sums may lose: the kept
    scores are within ``gap`` of the real ones, the sums within ``2 n 2^-24``; a dropped term
    that underflowed is below ``2^-126``. Both are masses in the same units, so the terms of
    disjoint key sets add (``hsr.distributed`` merges ranks this way).

    Parameters
    ----------
    rem, lse : Tensor (B, Hq, M) float32
    tau : float or Tensor broadcastable to (B, Hq, M)
    s : float
        Softmax scale.
    gap : Tensor (B, Hq, M)
        Bound of ``|fp32-accumulated score - score|`` per row.
    n : int or Tensor broadcastable to (B, Hq, M)
        Keys the sums cover (the cache's device-side lengths: right at every replay of a
        captured step).

    Returns
    -------
    log_dropped, lse_low : Tensor (B, Hq, M) float32
    """
    n = torch.as_tensor(n, dtype=torch.float32, device=rem.device).clamp(min=1.0)
    margin = s * gap + 1e-4 + 2.0 * n * 2.0 ** -24
    log_dropped = torch.log(rem + n * 2.0 ** -126) + s * torch.as_tensor(tau, dtype=torch.float32, device=rem.device)
    return log_dropped, lse - margin


def certified_share(log_dropped: torch.Tensor, lse_low: torch.Tensor) -> torch.Tensor:
    """``U / (Z_low + U)`` per row (:func:`dropped_terms`): a certified upper bound on the share
    of the softmax mass the kept set leaves out, since ``x / (Z + x)`` grows with ``x`` and
    falls with ``Z``. 1 where nothing is kept (``lse_low = -inf``, e.g. ``tau = +inf``)."""
    return torch.where(torch.isneginf(lse_low), torch.ones_like(lse_low), torch.sigmoid(log_dropped - lse_low))


def as_float32(x: torch.Tensor, name: str, device) -> torch.Tensor:
    """A tau or bias tensor as the kernels read it: float32 on ``device``, as given when it is
    (no copy, graph-safe), else converted — tau rounded up, which keeps the same keys."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != device or x.dtype != torch.float32:
        if capturing():
            raise ValueError(f"inside a capture, {name} must be a float32 tensor on {device}")
        x = f32_at_least(x.to(device)) if name == "tau" else x.to(device, torch.float32)
    return x


def per_row_values(x, shape, name: str, device) -> tuple:
    """``(tensor or None, scalar, strides)`` of tau or bias for queries of ``shape (B, Hq, M, D)``:
    a number, or a tensor of shape (), (Hq,) or (B, Hq, M), read in place through strides
    when it is float32 on ``device`` (no copy, graph-safe); otherwise converted — tau rounded
    up, which keeps the same keys."""
    B, Hq, M, _ = shape
    if not torch.is_tensor(x):
        x = float(x)
        if math.isnan(x) or (name == "bias" and math.isinf(x)):
            raise ValueError(f"{name} must be a number (not NaN{'/Inf' if name == 'bias' else ''}), got {x}")
        return None, x, (0, 0, 0)
    x = as_float32(x, name, device)
    if x.dim() == 0:
        t = x.reshape(1, 1, 1).expand(B, Hq, M)
    elif tuple(x.shape) == (Hq,):
        t = x[None, :, None].expand(B, Hq, M)
    elif tuple(x.shape) == (B, Hq, M):
        t = x
    else:
        raise ValueError(f"{name} must be a number or have shape (), ({Hq},) or {(B, Hq, M)}, got {tuple(x.shape)}")
    return t, 0.0, t.stride()


def default_tau(kind: str, tau, bias, scale: float):
    """The raw-score threshold of a call: ``tau`` as given; ReLU^alpha without one keeps what
    fires, ``bias / scale`` (exact); softmax must be given one."""
    if tau is not None:
        return tau
    if kind == "softmax":
        raise ValueError("softmax on the code cache keeps the keys with score >= tau: give tau=")
    return (bias / scale).float() if torch.is_tensor(bias) else float(bias) / scale


def spec_thresholds(spec: AttentionSpec, scale: float, device) -> tuple:
    """``(bias, tau)`` of an attention spec for the code filter: numbers and tensors as given,
    arrays as float32 tensors on ``device``; tau defaults as :func:`default_tau` says."""
    bias, tau = (x if x is None or isinstance(x, (int, float)) or torch.is_tensor(x)
                 else torch.as_tensor(x, dtype=torch.float32, device=device) for x in (spec.bias, spec.tau))
    return bias, default_tau(spec.kind, tau, bias, scale)


def plan_info(plan: CodePlan, shape: tuple, res: tuple, n: int) -> AttentionInfo:
    """The :class:`AttentionInfo` of a code-cache call of queries ``shape = (B, Hq, M, D)``:
    ``keys_scored`` the survivors of each row's kv head (every row of the group scores them),
    ``keys_selected`` None (the attention kernel does not count), ``lse`` and the certified
    bound from ``res = run(...)`` (zeros without one)."""
    B, Hq, M, _ = shape
    bh = plan.count.shape[0]
    scored = plan.count.sum(1, dtype=torch.int64).view(B, bh // B, 1, 1).expand(B, bh // B, Hq * B // bh, M)
    bound = res[2] if len(res) > 2 else torch.zeros_like(res[1])
    return AttentionInfo(scored.reshape(B, Hq, M), None, bound, res[1], n)

"""Input checks shared by the launch wrappers of the Triton kernels.

This module owns the checks that several wrappers (``block_sparse_attention``,
``selected_attention``, ``hsr_decode``, ``build_index``) make on their arguments before any
launch, and the limits they check against. A bad shape, head dimension or list raises
``ValueError``, a wrong type or dtype ``TypeError``, each with a message that names the
argument; nothing here is an ``assert`` (asserts vanish under ``python -O``, and a bad call
must not reach a kernel, where it reads out of bounds or fails to compile).

It imports torch only, not triton. :func:`check_triton_device` is the one check that every
public entry point which launches a kernel makes on its tensors: without the interpreter, a CPU
tensor would otherwise fail deep inside Triton ("0 active drivers").
"""
from __future__ import annotations

import math
import numbers

from typing import Tuple

import torch

from .._shapes import attention_shapes
from . import _compat

#: head dimensions the kernels compile for (powers of two: ``tl.arange`` needs them; >= 16:
#: ``tl.dot`` needs every side >= 16)
HEAD_DIMS = (16, 32, 64, 128, 256)
#: value dtypes of q, k, v
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the decode kernels stack the query rows of one kv head (query heads x queries) into one
#: tile; more rows than this would not fit the registers of a program
MAX_STACKED_ROWS = 128
#: smallest tile side of ``tl.dot``
MIN_TILE = 16
#: keys per block of a GPUBlockIndex
INDEX_BLOCKS = (16, 32, 64, 128)
#: largest ReLU power the kernels take: the power is unrolled at compile time and computed in
#: fp32, where relu(.)**alpha of ordinary scores overflows beyond a few dozen
MAX_ALPHA = 16


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_triton_device(where: str, **tensors) -> None:
    """The tensors a kernel launch reads must be on a GPU, unless the Triton interpreter runs.

    Parameters
    ----------
    where : str
        The public entry point, named in the message (``"block_sparse_attention"``).
    **tensors : torch.Tensor or None
        By argument name; ``None`` and non-tensors are skipped.

    Raises
    ------
    ValueError
        For the first CPU tensor when ``TRITON_INTERPRET=1`` is not set, naming the fix: move
        the tensors to CUDA, or set ``TRITON_INTERPRET=1`` before importing ``hsr.kernels``.
    """
    if _compat.interpreting():  # read at call time: the interpreter runs on CPU tensors
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            raise ValueError(
                f"{where}: {name} is on the CPU, and the Triton kernels run on a GPU. Move the tensors to "
                f"CUDA (e.g. {name}.cuda()), or set TRITON_INTERPRET=1 before importing hsr.kernels to run "
                f"the Triton interpreter on the CPU (slow: for tests and debugging)")


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    """``x`` must be a torch tensor with ``ndim`` dimensions (``layout`` names them)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def check_merge_inputs(o_part, lse_part, out, lse, M: int, advance) -> None:
    """:func:`~hsr.kernels.merge_partials`'s arguments, host-side only (no sync): what a wrong
    call would otherwise read or write out of bounds. Raises ``ValueError`` naming the argument."""
    if o_part.dim() != 3 or lse_part.shape != o_part.shape[:2]:
        raise ValueError(f"merge_partials: o_part must be (S, B*Hq*M, D) and lse_part (S, B*Hq*M), got "
                         f"{tuple(o_part.shape)} and {tuple(lse_part.shape)}")
    if o_part.dtype != torch.float32 or lse_part.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError("merge_partials: o_part, lse_part and lse must be float32")
    if out.dim() != 4 or tuple(lse.shape) != tuple(out.shape[:3]) or out.stride(3) != 1:
        raise ValueError(f"merge_partials: out must be (B, Hq, M, D) with unit last stride and lse (B, Hq, M), got "
                         f"{tuple(out.shape)} and {tuple(lse.shape)}")
    if not lse.is_contiguous() or not o_part.is_contiguous() or not lse_part.is_contiguous():
        raise ValueError("merge_partials: o_part, lse_part and lse must be contiguous")
    B, Hq, Mo, D = out.shape
    if Mo != M or B * Hq * M != o_part.shape[1] or D != o_part.shape[2] or not _is_pow2(D):
        raise ValueError(f"merge_partials: out {tuple(out.shape)} (M={M}) does not match partials "
                         f"{tuple(o_part.shape)} (or D is not a power of two)")
    if advance is not None:
        lens, t, cap, G = advance
        if (not isinstance(lens, torch.Tensor) or lens.dtype != torch.int32 or lens.device != out.device
                or G < 1 or Hq % G or lens.numel() != B * (Hq // G) or t < 0 or cap < 0):
            raise ValueError("merge_partials: advance must be (lengths, t, capacity, G): int32 lengths of "
                             "B*Hq/G entries on out's device, t >= 0, capacity >= 0, G dividing Hq")


def check_attention_inputs(q, k, v, *, check_dtypes: bool = True) -> Tuple[int, int, int, int, int, int]:
    """Check the q, k, v of a kernel wrapper.

    Parameters
    ----------
    q : torch.Tensor, shape (B, Hq, M, D)
    k, v : torch.Tensor, shape (B, Hkv, N, D)
        ``Hq % Hkv == 0``; ``D`` in :data:`HEAD_DIMS`; one device; last dimension contiguous.
    check_dtypes : bool
        Also require one dtype among :data:`FLOAT_DTYPES` for all three (the block kernels
        feed them to ``tl.dot`` together; the selected-entry kernel upcasts each one itself).

    Returns
    -------
    B, Hq, M, D, Hkv, N : int
    """
    check_tensor("q", q, 4, "(batch, heads, q_len, head_dim)")
    check_tensor("k", k, 4, "(batch, kv_heads, kv_len, head_dim)")
    check_tensor("v", v, 4, "(batch, kv_heads, kv_len, head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k, got v {tuple(v.shape)} and k {tuple(k.shape)}")
    B, Hq, M, D, Hkv, N = attention_shapes(q.shape, k.shape)
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    if check_dtypes:
        if not q.dtype == k.dtype == v.dtype:
            raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if q.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (head_dim), got strides {t.stride()}")
    return B, Hq, M, D, Hkv, N


def check_int32_offsets(N: int, k, v) -> None:
    """Offsets inside one (batch, head) are int32 in the kernels: ``N * row stride < 2**31``."""
    stride = max(k.stride(2), v.stride(2))
    if N * stride >= 2 ** 31:
        raise ValueError(f"k/v too long for the kernels' int32 offsets: kv_len {N} x row stride {stride} "
                         f">= 2**31 elements per (batch, head)")


def check_block_lists(kv_num_blocks, kv_indices, B: int, Hq: int, Hkv: int, device) -> Tuple[int, int, int, int]:
    """Check BSR block lists ``kv_num_blocks (Bl, Hl, R)``, ``kv_indices (Bl, Hl, R, max_blocks)``.

    ``Bl`` must be 1 or ``B`` and ``Hl`` one of 1, ``Hkv``, ``Hq`` (broadcast otherwise); both
    int32 on the device of q.

    Returns
    -------
    Bl, Hl, R : int
    list_group : int
        Query heads per list head: query head ``h`` reads list head ``h // list_group``.
    """
    check_tensor("kv_num_blocks", kv_num_blocks, 3, "(Bl, Hl, R)")
    check_tensor("kv_indices", kv_indices, 4, "(Bl, Hl, R, max_blocks)")
    Bl, Hl, R = kv_num_blocks.shape
    if kv_indices.shape[:3] != (Bl, Hl, R):
        raise ValueError(f"kv_indices {tuple(kv_indices.shape)} must start with the shape of "
                         f"kv_num_blocks {(Bl, Hl, R)}")
    if Bl not in (1, B):
        raise ValueError(f"block-list batch dim {Bl} must be 1 or {B}")
    if Hl not in (1, Hkv, Hq):
        raise ValueError(f"block-list head dim {Hl} must be 1, Hkv={Hkv} or Hq={Hq}")
    if kv_num_blocks.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise TypeError(f"kv_num_blocks and kv_indices must be int32, got {kv_num_blocks.dtype} and "
                        f"{kv_indices.dtype}")
    if kv_num_blocks.device != device or kv_indices.device != device:
        raise ValueError(f"block lists must be on the device of q ({device}), got {kv_num_blocks.device} "
                         f"and {kv_indices.device}")
    list_group = Hq // Hl if Hl > 1 else Hq  # h // list_group -> list head (0 when Hl == 1)
    return Bl, Hl, R, list_group


def check_positions(positions, B: int, Hkv: int, N: int, R: int, rows: int) -> None:
    """Positions of permuted keys (HSR index): int32 ``(B, Hkv, N)``, one list row, few queries."""
    if R != 1 or rows > MAX_STACKED_ROWS:
        raise ValueError(f"positions need a single list row (got {R}) and at most {MAX_STACKED_ROWS} "
                         f"stacked query rows (got {rows})")
    check_tensor("positions", positions, 3, f"({B}, {Hkv}, {N})")
    if tuple(positions.shape) != (B, Hkv, N):
        raise ValueError(f"positions must have shape {(B, Hkv, N)}, got {tuple(positions.shape)}")
    if positions.dtype != torch.int32:
        raise TypeError(f"positions must be int32, got {positions.dtype}")


def check_tile(name: str, value) -> None:
    """A tile size given by the caller (``block_m``, ``block_n``): ``None`` (the default) or a
    power of two >= :data:`MIN_TILE` (``tl.arange`` and ``tl.dot`` need both)."""
    if value is not None and (int(value) < MIN_TILE or not _is_pow2(int(value))):
        raise ValueError(f"{name} must be a power of two >= {MIN_TILE}, got {value!r}")


def check_kind(kind, group_union: bool = False) -> int:
    """``0`` for ``"softmax"``, ``1`` for ``"relu"`` (the kernels' KIND); ``group_union``
    (each row keeps its GQA group's union) is a softmax option."""
    if kind not in ("softmax", "relu"):
        raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
    if group_union and kind != "softmax":
        raise ValueError("group_union=True widens softmax's kept sets: kind='softmax'")
    return 0 if kind == "softmax" else 1


def check_topk(topk, kind: str, tau=None, eps=None, group_union: bool = False) -> int:
    """A decode step's ``topk``: a positive integer, for softmax, instead of ``tau``/``eps`` and
    without ``group_union`` (each row keeps its own k best)."""
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if kind != "softmax":
        raise ValueError("topk keeps each row's k best keys for softmax: kind='softmax'")
    if tau is not None or eps is not None:
        raise ValueError("give one of tau (with eps, a guarded threshold) and topk, not both")
    if group_union:
        raise ValueError("group_union applies to a threshold (tau): the top-k mode keeps each row's own k best")
    return int(topk)


def check_alpha(alpha) -> int:
    """ReLU power: an integer in ``[1, MAX_ALPHA]`` (the kernels unroll ``alpha - 1``
    products in fp32, where ``relu(.) ** alpha`` of ordinary scores overflows beyond a few
    dozen; the CPU path, ``hsr.hsr_attention`` on a ``KVIndex``, takes any alpha)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha != int(alpha):
        # the CPU refuses a non-integer power too: relu(.) ** 2.5 is not what the kernels unroll
        raise ValueError(f"alpha must be an integer >= 1, got {alpha!r}")
    a = int(alpha)
    if a < 1:
        raise ValueError(f"alpha must be an integer >= 1, got {alpha!r}")
    if a > MAX_ALPHA:
        raise ValueError(f"alpha must be at most {MAX_ALPHA} on the GPU (the power is unrolled and computed in "
                         f"fp32), got {alpha!r}; the CPU path (hsr.hsr_attention on a KVIndex) takes any alpha")
    return a


def check_index_build(k, v, block: int, n_sub: int) -> None:
    """Arguments of ``build_index``: k, v ``(B, Hkv, N, D)`` of one shape; ``block`` in
    :data:`INDEX_BLOCKS`; ``n_sub`` a power of two dividing ``D``."""
    check_tensor("k", k, 4, "(batch, kv_heads, kv_len, head_dim)")
    check_tensor("v", v, 4, "(batch, kv_heads, kv_len, head_dim)")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k, got v {tuple(v.shape)} and k {tuple(k.shape)}")
    if block not in INDEX_BLOCKS:
        raise ValueError(f"block must be one of {INDEX_BLOCKS}, got {block!r}")
    D = k.shape[-1]
    if not _is_pow2(int(n_sub)) or D % int(n_sub) != 0:
        raise ValueError(f"n_sub must be a power of two dividing the head dim {D}, got {n_sub!r}")



def check_block_values(kv_num_blocks, kv_indices, n_key_blocks: int, *, names=("kv_num_blocks", "kv_indices")) -> None:
    """The VALUES of BSR block lists (shapes and dtypes: :func:`check_block_lists`).

    Every count must lie in ``[0, max_blocks]`` (``max_blocks = kv_indices.shape[-1]``) and
    every id among the first ``count`` entries of a row in ``[0, n_key_blocks)``; the
    entries after the count are not read and may hold anything. A count above the width or
    an id out of range would make a kernel read past the list or past K/V.

    This reads the lists, so on a GPU it costs one device synchronisation (one fused
    reduction, one ``.item()``); the wrappers skip it for their internal lists and while a
    CUDA graph is being captured.

    Raises
    ------
    ValueError
        Naming the first bad row and its count or id.
    """
    n_name, i_name = names
    if kv_num_blocks.numel() == 0:
        return
    width = kv_indices.shape[-1]
    counts = kv_num_blocks
    used = torch.arange(width, device=kv_indices.device) < counts[..., None].clamp(max=width)
    bad_id = used & ((kv_indices < 0) | (kv_indices >= n_key_blocks))
    bad_count = (counts < 0) | (counts > width)
    # one reduction, one host read
    flags = torch.stack([bad_count.any(), bad_id.any()]).cpu()
    if bool(flags[0]):
        where = tuple(int(i) for i in bad_count.nonzero()[0].tolist())
        raise ValueError(f"{n_name}{list(where)} = {int(counts[where])} must lie in [0, {width}] "
                         f"(the width of {i_name}); counts may not be negative or exceed the list width")
    if bool(flags[1]):
        where = tuple(int(i) for i in bad_id.nonzero()[0].tolist())
        raise ValueError(f"{i_name}{list(where)} = {int(kv_indices[where])} is not a key-block id in "
                         f"[0, {n_key_blocks}) (ceil(kv_len / block_size)); only the first "
                         f"{n_name} entries of a row are read")


def check_block_size(block_size) -> int:
    """Block granularity of the block lists: a positive int (whether the kernel tiles divide
    it is checked where the tiles are chosen)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        try:
            import numpy as np  # numpy ints are fine
            ok = isinstance(block_size, np.integer)
        except Exception:  # pragma: no cover
            ok = False
        if not ok:
            raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    bs = int(block_size)
    if bs < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return bs


def f32_at_least(x: torch.Tensor) -> torch.Tensor:
    """A threshold tensor as float32, rounded up: for fp32 scores, ``score >= tau`` holds exactly
    when ``score >= the smallest float32 >= tau``, so the kept set does not change."""
    if x.dtype == torch.float32:
        return x
    x64 = x.double()
    y = x64.float()
    return torch.where(y.double() < x64, torch.nextafter(y, torch.full_like(y, math.inf)), y)

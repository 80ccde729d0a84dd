"""FlexAttention ``BlockMask`` -> the BSR block lists of ``block_sparse_attention``.

A ``BlockMask`` (``torch.nn.attention.flex_attention``) lists, per query block, two kinds of
key blocks: *partial* ones (``kv_num_blocks/kv_indices``), where FlexAttention evaluates the
``mask_mod`` per element, and *full* ones (``full_kv_num_blocks/full_kv_indices``), where
every element is kept. Our kernels know one list per query block and one rule inside a
listed block: keep everything, or keep the causal part (bottom-right aligned: query ``i`` of
``M`` sits at position ``N - M + i``). :func:`lists_from_block_mask` therefore

1. takes the union of the partial and the full blocks (each block once),
2. evaluates the ``mask_mod`` on every partial block (``torch.vmap``, as FlexAttention's own
   ``create_mask`` does, in chunks) and decides ``causal``: ``False`` when every partial
   block is all-kept, ``True`` when every partial block equals the causal rule and every full
   block lies wholly at or below the diagonal; partial blocks that keep nothing are dropped.
   Any other ``mask_mod`` (a sliding window whose edge cuts a block, a document mask, a
   prefix-LM mask, SDPA's top-left causal with ``M < N``, ...) raises ``ValueError``: the
   kernel would compute a different mask, and a wrong result is never returned silently.
3. re-expresses the lists at one granularity (our query and key blocks are one size): the
   largest power of two dividing both ``BLOCK_SIZE`` entries (and, when ``M < N``, keeping
   every one of our query blocks inside one of FlexAttention's), at least 16.

The ``mask_mod`` is evaluated with the ``BlockMask``'s own batch/head indices (0 where its
batch or head dimension is 1 and broadcasts, as ``create_block_mask(B=None, H=None)``
builds it); a few partial blocks are also evaluated at the other batch/head indices, and a
``mask_mod`` that differs there raises ``ValueError`` (build the mask with ``B=``/``H=``).

The conversion reads the lists and the mask (device synchronisations): do it once per mask,
outside ``torch.compile``; the lists it returns can be passed to ``block_sparse_attention``
(also inside a compiled function).

It imports torch only, not triton.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Tuple

import torch

from .._typing import lazy

from ._validate import (MIN_TILE, check_attention_inputs, check_block_lists, check_block_size,
                        check_block_values, check_tensor)

__all__ = ["is_block_mask", "lists_from_block_mask", "block_lists_from_block_mask", "block_sparse_intake"]

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask
else:  # not imported here (see is_block_mask): the name resolves when annotations are read
    BlockMask = lazy("torch.nn.attention.flex_attention", "BlockMask")

#: mask_mod evaluations per vmap call (bounds the memory of the index tensors)
_EVAL_CHUNK = 1 << 22
#: partial blocks re-evaluated at other batch/head indices when the BlockMask broadcasts
_PROBE_BLOCKS = 4


def is_block_mask(x) -> bool:
    """Whether ``x`` is a FlexAttention ``BlockMask`` (without importing flex_attention:
    a ``BlockMask`` exists only once its module is imported)."""
    mod = sys.modules.get("torch.nn.attention.flex_attention")
    cls = getattr(mod, "BlockMask", None) if mod is not None else None
    return cls is not None and isinstance(x, cls)


def _occupancy(num, idx, rows: int, cols: int) -> torch.Tensor:
    """Boolean ``(Bl, Hl, rows, cols)``: block ``c`` listed in row ``r`` (first ``num`` ids)."""
    num = num[..., :rows]
    idx = idx[..., :rows, :]
    width = idx.shape[-1]
    used = torch.arange(width, device=idx.device) < num[..., None]
    ids = torch.where(used, idx.long(), torch.full_like(idx, cols, dtype=torch.long))
    occ = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool, device=idx.device)
    occ.scatter_(-1, ids, True)  # unused slots land in the extra column
    return occ[..., :cols]


def _eval_mask_mod(mask_mod, b, h, qi, ki):
    """``mask_mod`` over flat index tensors (one element per call, as FlexAttention vmaps it)."""
    out = torch.vmap(mask_mod, in_dims=(0, 0, 0, 0))(b, h, qi, ki)
    return out.to(torch.bool)


def _block_masks(mask_mod, entries, Qb, KVb, M, N, b_of=None, h_of=None):
    """Evaluate ``mask_mod`` on the blocks ``entries`` ``(P, 4)`` = (list batch, list head,
    query block, key block). Returns ``(mm, valid, causal)`` each ``(P, Qb, KVb)``: the mask,
    the in-range elements, and our kernel's causal rule (``kv <= q + N - M``)."""
    dev = entries.device
    qa = torch.arange(Qb, device=dev)
    ka = torch.arange(KVb, device=dev)
    qi = entries[:, 2, None, None] * Qb + qa[None, :, None]  # (P, Qb, 1)
    ki = entries[:, 3, None, None] * KVb + ka[None, None, :]  # (P, 1, KVb)
    valid = (qi < M) & (ki < N)
    causal = ki <= qi + (N - M)
    P = entries.shape[0]
    shape = (P, Qb, KVb)
    bb = (entries[:, 0] if b_of is None else b_of)[:, None, None].expand(shape)
    hh = (entries[:, 1] if h_of is None else h_of)[:, None, None].expand(shape)
    # out-of-range elements are evaluated at a clamped index (a mask_mod may index a
    # per-position tensor) and ignored
    qc = qi.clamp(max=M - 1).expand(shape)
    kc = ki.clamp(max=N - 1).expand(shape)
    mm = _eval_mask_mod(mask_mod, bb.reshape(-1), hh.reshape(-1), qc.reshape(-1), kc.reshape(-1))
    return mm.view(shape), valid.expand(shape), causal.expand(shape)


def _classify_partial(mask_mod, entries, Qb, KVb, M, N):
    """Per partial block: (keeps anything, all-kept, equals the causal rule)."""
    P = entries.shape[0]
    step = max(1, _EVAL_CHUNK // (Qb * KVb))
    anyk, allk, eqc = [], [], []
    for s in range(0, P, step):
        mm, valid, causal = _block_masks(mask_mod, entries[s:s + step], Qb, KVb, M, N)
        anyk.append((mm & valid).flatten(1).any(1))
        allk.append((mm | ~valid).flatten(1).all(1))
        eqc.append(((mm == causal) | ~valid).flatten(1).all(1))
    cat = (lambda xs: torch.cat(xs)) if P else (lambda xs: torch.zeros(0, dtype=torch.bool))
    return cat(anyk), cat(allk), cat(eqc)


def _probe_broadcast(mask_mod, entries, Qb, KVb, M, N, Bl, Hl, B, Hq):
    """Re-evaluate a few partial blocks at other batch/head indices where the BlockMask
    broadcasts over batch or heads; raise when the mask_mod changes."""
    if entries.shape[0] == 0 or (not (Bl == 1 and B > 1) and not (Hl == 1 and Hq > 1)):
        return
    pick = torch.linspace(0, entries.shape[0] - 1, min(_PROBE_BLOCKS, entries.shape[0])).long()
    sel = entries[pick.to(entries.device)]
    base, valid, _ = _block_masks(mask_mod, sel, Qb, KVb, M, N)

    def spread(n):
        return sorted({0, 1, n // 2, n - 1} & set(range(n)))

    combos = [(b, None) for b in (spread(B) if (Bl == 1 and B > 1) else [])]
    combos += [(None, h) for h in (spread(Hq) if (Hl == 1 and Hq > 1) else [])]
    for b, h in combos:
        b_of = sel[:, 0] if b is None else torch.full_like(sel[:, 0], b)
        h_of = sel[:, 1] if h is None else torch.full_like(sel[:, 1], h)
        mm, _, _ = _block_masks(mask_mod, sel, Qb, KVb, M, N, b_of, h_of)
        if bool(((mm != base) & valid).any()):
            what = "batch" if b is not None else "head"
            raise ValueError(
                f"the BlockMask broadcasts over {what} (its lists have batch {Bl}, heads {Hl}) but its "
                f"mask_mod differs between {what} indices: build it with create_block_mask(mask_mod, "
                f"B={B}, H={Hq}, ...) so that every (batch, head) has its own lists")


def _granularity(Qb: int, KVb: int, M: int, N: int) -> int:
    """Largest power of two ``bs >= MIN_TILE`` dividing ``Qb`` and ``KVb`` whose query blocks
    (absolute positions ``N - M + i``) each fall inside one FlexAttention query block."""
    g = math.gcd(Qb, KVb)
    bs = g & -g  # largest power of two dividing both
    while bs >= MIN_TILE:
        first = torch.arange((N - M) // bs, (N - 1) // bs + 1) * bs
        lo = first.clamp(min=N - M) - (N - M)
        hi = (first + bs).clamp(max=N) - 1 - (N - M)
        if bool((lo // Qb == hi // Qb).all()):
            return bs
        bs //= 2
    raise ValueError(
        f"BlockMask BLOCK_SIZE {(Qb, KVb)} with q_len {M}, kv_len {N}: the kernel needs one block size, "
        f"a power of two >= {MIN_TILE} dividing both BLOCK_SIZE entries, and (its query blocks sit at "
        f"absolute positions kv_len - q_len + i) the first query at a multiple of it whenever a "
        f"FlexAttention query block would otherwise be split; here kv_len - q_len = {N - M}. Use "
        f"power-of-two block sizes >= {MIN_TILE} and q_len == kv_len or kv_len - q_len a multiple of "
        f"the block size")


def lists_from_block_mask(block_mask, q_len: int, kv_len: int, batch: int, q_heads: int,
                          device) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """BSR lists, block size and causal flag that compute what ``flex_attention`` computes.

    Parameters
    ----------
    block_mask : torch.nn.attention.flex_attention.BlockMask
        Made for ``seq_lengths == (q_len, kv_len)`` (as ``flex_attention`` requires); batch
        dimension 1 or ``batch``, head dimension 1 or ``q_heads``.
    q_len, kv_len : int
        ``M`` and ``N`` of the attention call (q ``(B, Hq, M, D)``, k ``(B, Hkv, N, D)``).
    batch, q_heads : int
        ``B`` and ``Hq`` of q.
    device : torch.device
        q's device (the BlockMask must be on it).

    Returns
    -------
    kv_num_blocks : torch.Tensor, int32, shape (Bl, Hl, R)
    kv_indices : torch.Tensor, int32, shape (Bl, Hl, R, max_blocks)
        Partial and full blocks together, each once, ascending; rows indexed as
        ``block_sparse_attention`` expects (absolute query blocks, or relative to the first
        query's block when ``M < N``).
    block_size : int
        A power of two >= 16 dividing both entries of the mask's ``BLOCK_SIZE``.
    causal : bool
        Whether the kernel must apply its (bottom-right) causal rule inside listed blocks.

    Raises
    ------
    TypeError
        Not a BlockMask, lists not int32 tensors.
    ValueError
        Sequence lengths, batch/head dims or device that do not match q/k; malformed lists
        (counts outside ``[0, width]``, ids outside the key blocks); a sliced BlockMask; a
        ``mask_mod`` that is neither all-kept nor the bottom-right causal rule on its partial
        blocks (the message names the supported masks); a ``mask_mod`` that depends on a
        batch/head index the BlockMask broadcasts over.
    """
    if not is_block_mask(block_mask):
        raise TypeError(f"expected a torch.nn.attention.flex_attention.BlockMask, got {type(block_mask).__name__}")
    M, N = int(q_len), int(kv_len)
    seq = tuple(int(x) for x in block_mask.seq_lengths)
    if seq != (M, N):
        raise ValueError(f"the BlockMask was made for (q_len, kv_len) = {seq} but q has {M} queries and k "
                         f"{N} keys; make it for these lengths (as flex_attention requires)")
    Qb, KVb = (int(x) for x in block_mask.BLOCK_SIZE)
    mask_mod = block_mask.mask_mod
    if mask_mod is None:
        from torch.nn.attention.flex_attention import noop_mask as mask_mod
    if getattr(mask_mod, "__name__", "") == "_sliced_mask_mod_error":
        raise ValueError("a sliced BlockMask (block_mask[b, h]) has no usable mask_mod: slice q/k/v "
                         "instead, or build the mask for the sliced shape")

    kvn, kvi = block_mask.kv_num_blocks, block_mask.kv_indices
    fkn, fki = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    check_tensor("block_mask.kv_num_blocks", kvn, 3, "(B, H, q_blocks)")
    check_tensor("block_mask.kv_indices", kvi, 4, "(B, H, q_blocks, width)")
    lists = [("kv_num_blocks", "kv_indices", kvn, kvi)]
    if (fkn is None) != (fki is None):
        raise ValueError("block_mask has only one of full_kv_num_blocks / full_kv_indices")
    if fkn is not None:
        check_tensor("block_mask.full_kv_num_blocks", fkn, 3, "(B, H, q_blocks)")
        check_tensor("block_mask.full_kv_indices", fki, 4, "(B, H, q_blocks, width)")
        lists.append(("full_kv_num_blocks", "full_kv_indices", fkn, fki))
    nq = -(-M // Qb)
    nk = -(-N // KVb)
    Bl, Hl = kvn.shape[:2]
    for n_name, i_name, num, idx in lists:
        if num.dtype != torch.int32 or idx.dtype != torch.int32:
            raise TypeError(f"block_mask.{n_name} and .{i_name} must be int32, got {num.dtype} and {idx.dtype}")
        if tuple(num.shape[:2]) != (Bl, Hl) or tuple(idx.shape[:3]) != tuple(num.shape):
            raise ValueError(f"block_mask.{n_name} {tuple(num.shape)} and .{i_name} {tuple(idx.shape)} do not "
                             f"match kv_num_blocks {tuple(kvn.shape)}")
        if num.shape[2] < nq:
            raise ValueError(f"block_mask.{n_name} has {num.shape[2]} query-block rows; q_len {M} with "
                             f"Q_BLOCK_SIZE {Qb} needs {nq}")
        if num.device != torch.device(device):
            raise ValueError(f"the BlockMask is on {num.device} but q is on {device}")
        check_block_values(num[..., :nq], idx[..., :nq, :], nk,
                           names=(f"block_mask.{n_name}", f"block_mask.{i_name}"))
    if Bl not in (1, batch):
        raise ValueError(f"BlockMask batch dim {Bl} must be 1 or the batch of q ({batch})")
    if Hl not in (1, q_heads):
        raise ValueError(f"BlockMask head dim {Hl} must be 1 or the query heads of q ({q_heads})")

    part = _occupancy(kvn, kvi, nq, nk)
    full = _occupancy(fkn, fki, nq, nk) if fkn is not None else torch.zeros_like(part)

    # ---- the mask_mod on the partial blocks decides the kernel's rule
    entries = part.nonzero()  # (P, 4): list batch, list head, query block, key block
    anyk, allk, eqc = _classify_partial(mask_mod, entries, Qb, KVb, M, N)
    _probe_broadcast(mask_mod, entries, Qb, KVb, M, N, Bl, Hl, batch, q_heads)
    if entries.shape[0]:
        part[tuple(entries[~anyk].T)] = False  # partial blocks that keep nothing
    kept = anyk
    if bool((allk | ~kept).all()):
        causal = False
    else:
        # every full block must be wholly at or below the diagonal (the kernel masks it)
        fe = full.nonzero()
        k_last = ((fe[:, 3] + 1) * KVb).clamp(max=N) - 1
        q_first = fe[:, 2] * Qb + (N - M)
        full_ok = bool((k_last <= q_first).all())
        if bool((eqc | ~kept).all()) and full_ok:
            causal = True
        else:
            name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
            raise ValueError(
                f"block_sparse_attention cannot compute this BlockMask's mask_mod ({name}): inside a listed "
                f"block its kernel keeps either every key or the causal part (key <= query + kv_len - "
                f"q_len, bottom-right aligned), so every partial block of the mask must be one of those "
                f"(causal masks, block-aligned sliding windows, block-sparse patterns with a causal or no "
                f"mask_mod). Use flex_attention for this mask, or make its partial blocks match")

    # ---- one granularity for queries and keys
    bs = _granularity(Qb, KVb, M, N)
    occ = part | full
    off = (N - M) // bs
    nkb = -(-N // bs)
    a = torch.arange(off, (N - 1) // bs + 1, device=occ.device)  # our absolute query blocks
    fr = (a * bs).clamp(min=N - M) - (N - M)
    occ = occ[:, :, fr // Qb]
    occ = occ[..., torch.arange(nkb, device=occ.device) * bs // KVb]
    counts = occ.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~occ).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    kv_num_blocks = counts.to(device=device).contiguous()
    kv_indices = order.to(device=device, dtype=torch.int32).contiguous()
    return kv_num_blocks, kv_indices, bs, causal


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def block_sparse_intake(q, k, v, kv_num_blocks, kv_indices, block_mask, block_size, causal, positions,
                        n_valid, check_values: bool = True) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Argument intake of ``block_sparse_attention``: lists, block size and causal flag.

    A ``BlockMask`` (as ``block_mask=`` or in the ``kv_num_blocks`` position) is converted by
    :func:`lists_from_block_mask`; ``block_size`` and ``causal`` then come from it and must be
    left ``None``. Plain lists get the defaults ``block_size=128``, ``causal=True`` and, in
    eager mode, the value checks of :func:`check_block_values` (skipped for the internal
    lists that come with ``positions``, under ``torch.compile`` (the op's eager run checks
    them) and during CUDA graph capture).
    """
    if block_mask is None and is_block_mask(kv_num_blocks):
        block_mask, kv_num_blocks = kv_num_blocks, None
    if block_mask is not None:
        if kv_num_blocks is not None or kv_indices is not None:
            raise TypeError("pass either a BlockMask or kv_num_blocks and kv_indices, not both")
        if block_size is not None or causal is not None:
            raise TypeError("with a BlockMask, block_size and causal come from the mask (its BLOCK_SIZE and "
                            "mask_mod): leave them unset")
        if positions is not None or n_valid is not None:
            raise TypeError("positions and n_valid are internal to the HSR index and take no BlockMask")
        if torch.compiler.is_compiling():
            raise TypeError("a BlockMask is converted by reading its lists and evaluating its mask_mod, "
                            "which torch.compile cannot trace: convert it once outside the compiled "
                            "function with hsr.kernels.block_lists_from_block_mask(block_mask, q, k) and "
                            "pass the lists, block_size and causal it returns")
        B, Hq, M, _, _, N = check_attention_inputs(q, k, v)
        return lists_from_block_mask(block_mask, M, N, B, Hq, q.device)
    if kv_num_blocks is None or kv_indices is None:
        raise TypeError("block_sparse_attention needs kv_num_blocks and kv_indices, or a FlexAttention "
                        "BlockMask (block_mask=)")
    block_size = 128 if block_size is None else check_block_size(block_size)
    causal = True if causal is None else bool(causal)
    if positions is None and not torch.compiler.is_compiling():
        B, Hq, _, _, Hkv, N = check_attention_inputs(q, k, v)
        check_block_lists(kv_num_blocks, kv_indices, B, Hq, Hkv, q.device)
        if check_values and not _capturing(q.device):
            check_block_values(kv_num_blocks, kv_indices, -(-N // block_size))
    return kv_num_blocks, kv_indices, block_size, causal


def block_lists_from_block_mask(block_mask: BlockMask, q: torch.Tensor, k: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """BSR lists of a FlexAttention ``BlockMask`` for ``block_sparse_attention``.

    Parameters
    ----------
    block_mask : torch.nn.attention.flex_attention.BlockMask
    q : torch.Tensor, shape (B, Hq, M, D)
    k : torch.Tensor, shape (B, Hkv, N, D)

    Returns
    -------
    kv_num_blocks, kv_indices, block_size, causal
        Pass them as ``block_sparse_attention(q, k, v, kv_num_blocks, kv_indices,
        block_size=block_size, causal=causal)``, e.g. inside a ``torch.compile``d function
        (the conversion itself cannot be compiled). See :func:`lists_from_block_mask`.
    """
    B, Hq, M, _ = q.shape
    return lists_from_block_mask(block_mask, M, k.shape[2], B, Hq, q.device)

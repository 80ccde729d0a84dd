"""The tensor layout of an attention call, shared by the attention, the Triton kernels and
the test oracles.

- q ``(B, Hq, M, D)``, k ``(B, Hkv, N, D)``, ``Hq % Hkv == 0``: query head ``h`` reads kv
  head ``h // (Hq // Hkv)`` (grouped-query attention).
- Queries are the last ``M`` of the ``N`` key positions: query row ``i`` has absolute
  position ``N - M + i``.
- A block list (FlexAttention's ``BlockMask`` convention, one granularity ``block_size`` for
  queries and keys) has ``R`` query-block rows. Query row ``i`` reads list row
  ``(N - M + i) // block_size - row_offset``, where ``row_offset = 0`` when
  ``R == ceil(N / block_size)`` (rows indexed by absolute query block) and
  ``(N - M) // block_size`` otherwise (rows relative to the block of the first query; for
  ``M == N`` both agree, for decode ``M == 1`` one row).

Plain integer arithmetic on shapes: importing this module imports neither numpy nor torch.
"""

from __future__ import annotations

from typing import Sequence, Tuple

__all__ = ["attention_shapes", "list_row_offset"]


def attention_shapes(q_shape: Sequence[int], k_shape: Sequence[int]) -> Tuple[int, int, int, int, int, int]:
    """``B, Hq, M, D, Hkv, N`` of 4-D q and k shapes that fit together.

    Raises
    ------
    ValueError
        A batch or head dimension that differs, or query heads that are not a multiple of the
        kv heads.
    """
    B, Hq, M, D = q_shape
    Bk, Hkv, N, Dk = k_shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k has {Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has {D}, k has {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    return B, Hq, M, D, Hkv, N


def list_row_offset(R: int, M: int, N: int, block_size: int) -> int:
    """Row offset of a block list with ``R`` query-block rows (see the module docstring).

    Raises
    ------
    ValueError
        ``R`` neither ``ceil(N / block_size)`` nor enough rows relative to the first query's
        block.
    """
    n_abs = -(-N // block_size)
    if R == n_abs:
        return 0
    off = (N - M) // block_size
    need = (N - 1) // block_size - off + 1
    if R < need:
        raise ValueError(
            f"block list has {R} query-block rows; need ceil(N/bs)={n_abs} (absolute rows) "
            f"or at least {need} (rows relative to query block {off})")
    return off

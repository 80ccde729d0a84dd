"""Baselines of PowerAttention at its token budget.

This module owns :func:`matched_baselines`: for each baseline pattern of
:mod:`hsr.attention.patterns` it picks the one free integer parameter that brings its mean
number of kept key blocks per query block closest to PowerAttention's, so that quality
comparisons are made at equal cost.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from .patterns import (Pattern, dilated_pattern, full_pattern, longnet_pattern, power_pattern,
                       sliding_window_pattern, stride_slash_pattern)

__all__ = ["matched_baselines"]


def _mean_kept(p: Pattern, seq_len: int) -> float:
    return float(p.kept_blocks_per_row(seq_len).mean())


def matched_baselines(
    seq_len: int,
    block_size: int = 256,
    window: int = 5,
    sink: int = 1,
    *,
    dilation: int = 2,
    longnet_levels: Optional[int] = None,
) -> Dict[str, Pattern]:
    """Baselines at the token budget of PowerAttention at ``seq_len``.

    Each baseline has one free integer parameter, chosen so that its mean number of kept key
    blocks per query block (prefill of ``seq_len``) is closest to PowerAttention's:
    sliding window: ``window``; stride slash: ``stride`` (same window and sink as power);
    dilated: ``span`` (``dilation`` fixed, window 1, no sink); LongNet: the first segment length
    (dilation 1, ratio 2, enough levels to cover the sequence).

    Returns
    -------
    dict
        ``{"power", "sliding_window", "stride_slash", "dilated", "longnet", "full"}`` to patterns.
    """
    bs = block_size
    nb = -(-seq_len // bs)
    pw = power_pattern(bs, window, sink)
    target = _mean_kept(pw, seq_len)

    def closest(make, lo, hi):
        # mean kept blocks is monotone in the free parameter (up or down): bisect for the
        # crossing of the target, then take the closer neighbour
        f = lambda v: _mean_kept(make(v), seq_len) - target
        up = f(hi) >= f(lo)
        a, b = lo, hi
        while b - a > 1:
            mid = (a + b) // 2
            if (f(mid) < 0) == up:
                a = mid
            else:
                b = mid
        return make(min((abs(f(v)), v) for v in {a, b})[1])

    out: Dict[str, Pattern] = {"power": pw}
    out["sliding_window"] = closest(lambda w: sliding_window_pattern(bs, w, sink), 1, max(nb, 1))
    out["stride_slash"] = closest(lambda s: stride_slash_pattern(bs, window, sink, s), 1, max(nb, 1))
    out["dilated"] = closest(lambda s: dilated_pattern(bs, dilation, s, 1, 0), 1, max(dilation * nb, 1))
    levels = longnet_levels

    def ln(seg):
        lv = levels if levels is not None else max(1, math.ceil(math.log2(max(nb / seg, 1))) + 1)
        return longnet_pattern(bs, seg, 1, 2, lv)

    segs = [1 << k for k in range(0, max(nb, 1).bit_length() + 1)]
    out["longnet"] = ln(min((abs(_mean_kept(ln(s), seq_len) - target), s) for s in segs)[1])
    out["full"] = full_pattern(bs)
    return out

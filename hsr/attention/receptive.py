"""Receptive fields of static block-sparse attention patterns across layers.

A pattern defines a DAG on blocks: block ``i`` has an edge to every kept key block ``j <= i``.
With residual connections, what block ``i`` can see after ``L`` layers is the set of blocks
reachable from ``i`` in at most ``L`` hops (the diagonal is always kept, so "at most" and
"exactly with self-loops" agree).

Two tools, both ``O(nb * C)`` per step with ``C`` the kept blocks per row:

* :func:`hop_distances` -- shortest hop counts from one block (dynamic programming in reverse
  topological order, since every edge goes to a lower or equal block);
* :func:`hops_to_full_coverage` -- for every block, the first layer at which it reaches all
  earlier blocks, by iterating packed bitsets ``R_{L+1}[i] = OR_{j in kept(i)} R_L[j]``.

The paper's theorem, in the form tested in ``tests/attention/test_receptive.py``: in the DAG
on ``0..n-1`` with edges ``i -> i - 2**k`` (``2**k <= i``), the shortest path from ``i`` to
``j <= i`` has exactly ``popcount(i - j)`` edges, and the out-degree of ``i >= 1`` is
``floor(log2 i) + 1``. So block ``i`` reaches all earlier blocks in
``max_{1<=d<=i} popcount(d) = floor(log2(i + 1))`` hops.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from .baselines import matched_baselines
from .patterns import Pattern

__all__ = [
    "hop_distances",
    "coverage_by_layer",
    "hops_to_full_coverage",
    "reach_bitsets",
    "receptive_summary",
    "plot_receptive",
    "receptive_main",
]

_NEVER = -1


def _edges(pattern: Pattern, seq_len: int):
    """``(counts int32 (nb,), indices int32 (nb, C))`` of the prefill block lists."""
    bl = pattern.block_lists(seq_len)
    return bl.kv_num_blocks, bl.kv_indices


def hop_distances(pattern: Pattern, seq_len: int, source: Optional[int] = None) -> np.ndarray:
    """Fewest layers (hops) for block ``source`` to see each block.

    Parameters
    ----------
    pattern : Pattern
    seq_len : int
        Context length in tokens; ``nb = ceil(seq_len / block_size)`` blocks.
    source : int, optional
        Query block, default the last one (``nb - 1``).

    Returns
    -------
    np.ndarray, int64, shape (nb,)
        ``dist[j]`` hops from ``source`` to ``j``; ``dist[source] == 0``; ``-1`` where ``j`` is
        never reached (always for ``j > source``).
    """
    counts, idx = _edges(pattern, seq_len)
    nb = counts.shape[0]
    source = nb - 1 if source is None else int(source)
    if not 0 <= source < nb:
        raise ValueError(f"source must be in [0, {nb}), got {source}")
    inf = np.iinfo(np.int64).max
    dist = np.full(nb, inf, dtype=np.int64)
    dist[source] = 0
    # edges only go down, so visiting blocks in decreasing order is a topological order
    for i in range(source, -1, -1):
        if dist[i] == inf:
            continue
        nbrs = idx[i, : counts[i]]
        np.minimum.at(dist, nbrs, dist[i] + 1)
    dist[dist == inf] = _NEVER
    return dist


def coverage_by_layer(pattern: Pattern, seq_len: int, layers: int, source: Optional[int] = None) -> np.ndarray:
    """Fraction of blocks ``0..source`` seen by ``source`` after ``0..layers`` layers.

    Returns
    -------
    np.ndarray, float64, shape (layers + 1,)
        Entry ``L`` is ``#{j <= source : dist(source, j) <= L} / (source + 1)``.
    """
    dist = hop_distances(pattern, seq_len, source)
    src = dist.shape[0] - 1 if source is None else int(source)
    d = dist[: src + 1]
    d = np.where(d < 0, np.iinfo(np.int64).max, d)
    return np.array([(d <= L).mean() for L in range(layers + 1)], dtype=np.float64)


def reach_bitsets(pattern: Pattern, seq_len: int, layers: int, *, chunk_bytes: int = 1 << 26) -> List[np.ndarray]:
    """Packed reach sets ``R_0 .. R_layers``.

    Returns
    -------
    list of np.ndarray, uint8, shape (nb, ceil(nb / 8))
        ``np.unpackbits(R[L], axis=1, count=nb)[i, j]`` is whether block ``i`` sees block ``j``
        within ``L`` layers (bit order big-endian, numpy's default).
    """
    counts, idx = _edges(pattern, seq_len)
    nb = counts.shape[0]
    # pad each row with its own index: OR-ing a row into itself changes nothing
    col = np.arange(idx.shape[1])[None, :]
    own = np.arange(nb, dtype=np.int64)[:, None]
    pidx = np.where(col < counts[:, None], idx, own)
    R = np.packbits(np.eye(nb, dtype=bool), axis=1)
    out = [R]
    rows = max(1, chunk_bytes // max(1, pidx.shape[1] * R.shape[1]))
    for _ in range(layers):
        nxt = np.empty_like(R)
        for s in range(0, nb, rows):
            nxt[s : s + rows] = np.bitwise_or.reduce(R[pidx[s : s + rows]], axis=1)
        R = nxt
        out.append(R)
    return out


def hops_to_full_coverage(pattern: Pattern, seq_len: int, max_layers: Optional[int] = None) -> np.ndarray:
    """For every block, the fewest layers after which it sees all blocks ``0..i``.

    Iterates packed bitsets until every block is complete or nothing changes (a fixpoint: the
    blocks still incomplete never complete).

    Returns
    -------
    np.ndarray, int64, shape (nb,)
        Hops to full coverage of each block; ``-1`` for never.
    """
    counts, idx = _edges(pattern, seq_len)
    nb = counts.shape[0]
    max_layers = nb if max_layers is None else int(max_layers)
    col = np.arange(idx.shape[1])[None, :]
    own = np.arange(nb, dtype=np.int64)[:, None]
    pidx = np.where(col < counts[:, None], idx, own)
    target = np.packbits(np.tril(np.ones((nb, nb), dtype=bool)), axis=1)
    R = np.packbits(np.eye(nb, dtype=bool), axis=1)
    hops = np.full(nb, _NEVER, dtype=np.int64)
    done = (R == target).all(axis=1)
    hops[done] = 0
    rows = max(1, (1 << 26) // max(1, pidx.shape[1] * R.shape[1]))
    for L in range(1, max_layers + 1):
        if done.all():
            break
        nxt = np.empty_like(R)
        for s in range(0, nb, rows):
            nxt[s : s + rows] = np.bitwise_or.reduce(R[pidx[s : s + rows]], axis=1)
        if np.array_equal(nxt, R):
            break
        R = nxt
        now = (R == target).all(axis=1)
        hops[now & ~done] = L
        done = now
    return hops


def receptive_summary(patterns: Dict[str, Pattern], seq_len: int, layers: int) -> Dict[str, dict]:
    """Per pattern: mean kept blocks per row, tile density, hops for the last block to see
    everything (``-1`` never), max over blocks of the same, and last-block coverage by layer."""
    out = {}
    for name, p in patterns.items():
        dist = hop_distances(p, seq_len)
        last_hops = -1 if (dist < 0).any() else int(dist.max())
        allh = hops_to_full_coverage(p, seq_len)
        out[name] = {
            "pattern": p.describe(),
            "mean_kept_blocks": float(p.kept_blocks_per_row(seq_len).mean()),
            "tile_density": p.density(seq_len),
            "last_block_hops_to_full": last_hops,
            "max_hops_to_full_any_block": -1 if (allh < 0).any() else int(allh.max()),
            "blocks_never_complete": int((allh < 0).sum()),
            "last_block_coverage": coverage_by_layer(p, seq_len, layers).tolist(),
        }
    return out


def plot_receptive(patterns: Dict[str, Pattern], seq_len: int, layers: int, out: str, *, title: Optional[str] = None) -> str:
    """Coverage vs layer for the last block, and its reachability map (layer x block) per pattern.

    Saves a PNG to ``out`` and returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(patterns)
    n = len(names)
    fig = plt.figure(figsize=(12, 3.2 + 1.3 * n))
    gs = fig.add_gridspec(1 + n, 2, height_ratios=[3.2] + [1.0] * n, width_ratios=[1, 0.02], hspace=0.6)
    ax = fig.add_subplot(gs[0, 0])
    Ls = np.arange(layers + 1)
    dists = {}
    for name in names:
        p = patterns[name]
        dists[name] = hop_distances(p, seq_len)
        cov = coverage_by_layer(p, seq_len, layers)
        ax.plot(Ls, 100 * cov, marker="o", ms=3, label=f"{name}  ({p.kept_blocks_per_row(seq_len).mean():.1f} blk/row)")
    bs = next(iter(patterns.values())).block_size
    nb = -(-seq_len // bs)
    ax.set_xlabel("layers")
    ax.set_ylabel("last block's receptive field (% of blocks)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or f"Receptive field of the last block, {seq_len} tokens, {nb} blocks of {bs}, equal budget")
    cmap = matplotlib.colors.ListedColormap(["#f2f2f2", "#2b6cb0"])
    for r, name in enumerate(names):
        axm = fig.add_subplot(gs[1 + r, 0])
        d = dists[name]
        reach = np.array([(d >= 0) & (d <= L) for L in Ls])  # (layers+1, nb)
        axm.imshow(reach, aspect="auto", cmap=cmap, interpolation="nearest", origin="lower", vmin=0, vmax=1)
        axm.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
        axm.set_yticks([0, layers])
        axm.tick_params(labelsize=7)
        if r == n - 1:
            axm.set_xlabel("key block (blue: seen by the last block within L layers; rows L = 0..%d)" % layers)
        else:
            axm.set_xticklabels([])
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def add_receptive_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``hsr receptive``."""
    ap.add_argument("--seq-len", type=int, default=32768, help="sequence length (default: 32768)")
    ap.add_argument("--block-size", type=int, default=256, help="tokens per block (default: 256)")
    ap.add_argument("--layers", type=int, default=12, help="layers to propagate over (default: 12)")
    ap.add_argument("--window", type=int, default=5, help="PowerAttention local window, blocks (default: 5)")
    ap.add_argument("--sink", type=int, default=1, help="sink blocks (default: 1)")
    ap.add_argument("--no-full", action="store_true", help="leave full attention out")
    ap.add_argument("--plot", default="", metavar="PNG",
                    help="also draw the receptive fields into this PNG (needs matplotlib; default: no plot)")
    ap.add_argument("--json", default="", metavar="PATH", help="also write the summary as JSON here")
    return ap


def run_receptive(a) -> int:
    """Print the receptive-field table for parsed ``hsr receptive`` options (and draw/save)."""
    if a.seq_len < 1 or a.block_size < 1 or a.layers < 0:
        print("hsr receptive: --seq-len and --block-size must be >= 1, --layers >= 0", file=sys.stderr)
        return 2
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("hsr receptive: --plot needs matplotlib (pip install 'hsr-attention[plot]')", file=sys.stderr)
            return 2
    pats = matched_baselines(a.seq_len, a.block_size, a.window, a.sink)
    if a.no_full:
        pats.pop("full")
    summ = receptive_summary(pats, a.seq_len, a.layers)
    print(f"seq_len={a.seq_len} block_size={a.block_size} blocks={-(-a.seq_len // a.block_size)}")
    print(f"{'pattern':16s} {'blk/row':>8s} {'density':>8s} {'last->all':>9s} {'any->all':>9s}  params")
    for name, s in summ.items():
        fmt = lambda h: "never" if h < 0 else str(h)  # noqa: E731
        print(f"{name:16s} {s['mean_kept_blocks']:8.2f} {s['tile_density']:8.4f} {fmt(s['last_block_hops_to_full']):>9s} "
              f"{fmt(s['max_hops_to_full_any_block']):>9s}  {s['pattern']}")
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump({"seq_len": a.seq_len, "block_size": a.block_size, "layers": a.layers, "patterns": summ}, f, indent=1)
    if a.plot:
        plot_receptive(pats, a.seq_len, a.layers, a.plot)
        print(f"wrote {a.plot}")
    return 0


def receptive_main(argv: Optional[Sequence[str]] = None) -> int:
    """``hsr receptive``: print receptive-field numbers (and, with ``--plot``, draw them)."""
    ap = add_receptive_arguments(argparse.ArgumentParser(
        prog="hsr receptive", description="Receptive fields of PowerAttention and baselines at equal budget"))
    return run_receptive(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(receptive_main())

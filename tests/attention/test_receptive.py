"""Receptive-field analyser and the PowerAttention theorem."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hsr.attention import (
    dilated_pattern,
    full_pattern,
    longnet_pattern,
    matched_baselines,
    power_pattern,
    sliding_window_pattern,
    stride_slash_pattern,
)
from hsr.attention.receptive import (
    coverage_by_layer,
    hop_distances,
    hops_to_full_coverage,
    reach_bitsets,
    receptive_main,
    receptive_summary,
)

# The pure power-of-two DAG: window 1 keeps only the diagonal (a self-loop), no sink, so the
# edges are exactly i -> i - 2**k for 2**k <= i.
PURE = power_pattern(block_size=1, window=1, sink=0)


def popcount(x: int) -> int:
    return bin(x).count("1")


def bfs_oracle(p, seq_len, source):
    """Hop distances by matrix reachability on the dense block rule (independent of the builder)."""
    nb = -(-seq_len // p.block_size)
    i, j = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    adj = np.asarray(p.block_rule(i, j), dtype=bool)
    dist = np.full(nb, -1)
    frontier = np.zeros(nb, bool)
    frontier[source] = True
    seen = frontier.copy()
    dist[source] = 0
    h = 0
    while frontier.any():
        h += 1
        nxt = adj[frontier].any(axis=0) & ~seen
        dist[nxt] = h
        seen |= nxt
        frontier = nxt
    return dist


@settings(max_examples=200, deadline=None)
@given(i=st.integers(0, 4095), data=st.data())
def test_theorem_shortest_path_is_popcount(i, data):
    """For every j <= i: dist(i, j) == popcount(i - j) in the pure power-of-two DAG."""
    j = data.draw(st.integers(0, i))
    dist = hop_distances(PURE, i + 1, source=i)
    assert dist[j] == popcount(i - j)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100, 513])
def test_theorem_all_pairs_and_degree(n):
    for i in range(n):
        dist = hop_distances(PURE, n, source=i)
        np.testing.assert_array_equal(dist[: i + 1], [popcount(i - j) for j in range(i + 1)])
        assert (dist[i + 1 :] == -1).all()
    counts = PURE.block_lists(n).kv_num_blocks - 1  # drop the self-loop
    for i in range(1, n):
        assert counts[i] == int(np.floor(np.log2(i))) + 1 <= np.log2(n) + 1
    # block i reaches everything in max_{d<=i} popcount(d) = floor(log2(i + 1)) hops
    np.testing.assert_array_equal(
        hops_to_full_coverage(PURE, n), [int(np.floor(np.log2(i + 1))) for i in range(n)])


PATTERNS = [
    power_pattern(1, 5, 1), power_pattern(2, 3, 0), sliding_window_pattern(1, 4, 1),
    stride_slash_pattern(1, 2, 1, 5), dilated_pattern(1, 3, 20), longnet_pattern(1, 2, 1, 2, 4),
    full_pattern(1),
]


@pytest.mark.parametrize("p", PATTERNS, ids=lambda p: p.describe())
def test_hop_distances_match_oracle(p):
    n = 75 * p.block_size - (p.block_size > 1)
    nb = -(-n // p.block_size)
    for s in (0, 1, nb // 2, nb - 1):
        np.testing.assert_array_equal(hop_distances(p, n, s), bfs_oracle(p, n, s))


@pytest.mark.parametrize("p", PATTERNS, ids=lambda p: p.describe())
def test_bitsets_match_distances(p):
    n = 70 * p.block_size
    nb = 70
    R = reach_bitsets(p, n, 6)
    allh = hops_to_full_coverage(p, n)
    for s in range(nb):
        d = hop_distances(p, n, s)
        for L, bits in enumerate(R):
            row = np.unpackbits(bits[s], count=nb).astype(bool)
            np.testing.assert_array_equal(row, (d >= 0) & (d <= L))
        expect = -1 if (d[: s + 1] < 0).any() else int(d.max())
        assert allh[s] == expect


def test_coverage_by_layer():
    p = sliding_window_pattern(1, 3, 0)
    cov = coverage_by_layer(p, 10, 5)
    # block 9 steps back by at most 2 per layer: 1, 3, 5, 7, 9, 10 of 10 blocks
    np.testing.assert_allclose(cov, [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    assert np.all(np.diff(coverage_by_layer(power_pattern(1), 100, 8)) >= 0)


def test_paper_claim_32k():
    """32K tokens, 256-token blocks: 128 blocks. The real numbers (see docs/power.md)."""
    n = 32768
    assert hop_distances(power_pattern(256, 5, 1), n).max() == 6
    assert hop_distances(power_pattern(256, 1, 0), n).max() == 7  # popcount(127)
    # sliding window keeping delta < 8 (8 blocks incl. the diagonal) + sink: 126 / 7 -> 18 hops;
    # "16" holds for a window that steps 8 blocks per layer (delta <= 8)
    assert hop_distances(sliding_window_pattern(256, 8, 1), n).max() == 18
    assert hop_distances(sliding_window_pattern(256, 9, 1), n).max() == 16
    assert (hop_distances(dilated_pattern(256, 2, 19), n) == -1).any()
    assert (hops_to_full_coverage(power_pattern(256), n) <= 6).all()


def test_summary_and_cli(tmp_path):
    pats = matched_baselines(8192, 256)
    s = receptive_summary(pats, 8192, 6)
    assert s["full"]["last_block_hops_to_full"] == 1
    assert s["dilated"]["last_block_hops_to_full"] == -1
    assert s["power"]["last_block_coverage"][-1] == 1.0
    out = tmp_path / "r.png"
    js = tmp_path / "r.json"
    assert receptive_main(["--seq-len", "4096", "--block-size", "128", "--layers", "5",
                           "--plot", str(out), "--json", str(js)]) == 0
    assert out.stat().st_size > 1000
    assert json.loads(js.read_text())["patterns"]["power"]["last_block_hops_to_full"] >= 1
    with pytest.raises(ValueError):
        hop_distances(PURE, 10, source=10)

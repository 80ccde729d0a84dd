"""numba kernels of general numerics every room shares: the canonical score and a max-heap.

The canonical score
-------------------
The library defines ``score(q, k)`` as the dot product summed **in dimension order** in the
working dtype (float32 unless float64 is asked for), each product rounded, no fused
multiply-add::

    acc = q[0] * k[0];  for j in range(1, d): acc = acc + q[j] * k[j]

Every path that reports keys (tree leaves, the brute-force scan's verification, the code
filter's candidates, the certified softmax, the oracle :func:`hsr.index.canonical_scores`)
computes exactly this, so "exact" has one meaning and every backend returns the same set for
``score >= tau``, even for thresholds that tie a score to the last bit. numba compiles without
``fastmath`` so LLVM neither reorders the sum nor contracts it into FMAs.

The heap
--------
A max-heap over three parallel arrays, keyed by ``hk`` with two int64 payloads (``ht``, ``hv``:
a tree and a node for the best-first searches of the index and the certified softmax); the
caller owns the arrays (capacity: the most entries it will push) and the size.
"""

from __future__ import annotations

from numba import njit

__all__ = ["dot_canonical", "dot_canonical4", "heap_push", "heap_pop"]


@njit(cache=True, nogil=True)
def dot_canonical(q, keys, i):
    """Canonical score of ``q`` and key row ``keys[i]``."""
    acc = q[0] * keys[i, 0]
    for j in range(1, q.shape[0]):
        acc = acc + q[j] * keys[i, j]
    return acc


@njit(cache=True, nogil=True, inline="always")
def dot_canonical4(q, keys, i0, i1, i2, i3, out):
    """Canonical scores of four keys at once: four independent dimension-order chains, so the
    adds of one key wait on each other but not on the other keys' (a single chain is bound by
    the add latency)."""
    a0 = q[0] * keys[i0, 0]
    a1 = q[0] * keys[i1, 0]
    a2 = q[0] * keys[i2, 0]
    a3 = q[0] * keys[i3, 0]
    for j in range(1, q.shape[0]):
        qj = q[j]
        a0 = a0 + qj * keys[i0, j]
        a1 = a1 + qj * keys[i1, j]
        a2 = a2 + qj * keys[i2, j]
        a3 = a3 + qj * keys[i3, j]
    out[0] = a0
    out[1] = a1
    out[2] = a2
    out[3] = a3


@njit(cache=True, nogil=True)
def heap_push(hk, ht, hv, size, key, t, v):
    """Max-heap on ``hk`` with payloads ``ht`` (tree) and ``hv`` (node); returns the new size."""
    i = size
    hk[i] = key
    ht[i] = t
    hv[i] = v
    while i > 0:
        p = (i - 1) // 2
        if hk[p] >= hk[i]:
            break
        hk[p], hk[i] = hk[i], hk[p]
        ht[p], ht[i] = ht[i], ht[p]
        hv[p], hv[i] = hv[i], hv[p]
        i = p
    return size + 1


@njit(cache=True, nogil=True)
def heap_pop(hk, ht, hv, size):
    """Remove the top of the max-heap (read it first); returns the new size."""
    size -= 1
    hk[0] = hk[size]
    ht[0] = ht[size]
    hv[0] = hv[size]
    i = 0
    while True:
        l = 2 * i + 1
        r = l + 1
        b = i
        if l < size and hk[l] > hk[b]:
            b = l
        if r < size and hk[r] > hk[b]:
            b = r
        if b == i:
            break
        hk[b], hk[i] = hk[i], hk[b]
        ht[b], ht[i] = ht[i], ht[b]
        hv[b], hv[i] = hv[i], hv[b]
        i = b
    return size

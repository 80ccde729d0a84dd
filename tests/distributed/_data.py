"""Seeded inputs shared by the distributed tests' workers and their single-index references."""

import numpy as np

# one GQA cache: B=2, Hkv=2, Hq=4, d=16 (code filter); shards of ~600 keys on 2 ranks
B, HKV, HQ, D = 2, 2, 4, 16
N = 1300
M_DECODE = 1
M_PREFILL = 700  # more queries than the last shard holds: causal rows cross shard boundaries
# one head, d=8, the tree backend
N1, D1 = 1500, 8


def kv_cache(seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, HKV, N, D)).astype(np.float32)
    k[:, :, ::7] *= 2.5  # a few strong keys
    v = rng.standard_normal((B, HKV, N, D)).astype(np.float32)
    return k, v


def queries(m, seed=1):
    rng = np.random.default_rng(seed)
    return (1.5 * rng.standard_normal((B, HQ, m, D))).astype(np.float32)


def new_tokens(t=3, seed=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, HKV, t, D)).astype(np.float32),
            rng.standard_normal((B, HKV, t, D)).astype(np.float32))


def one_head(seed=3):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((N1, D1)).astype(np.float32)
    v = rng.standard_normal((N1, D1)).astype(np.float32)
    q = (1.5 * rng.standard_normal((5, D1))).astype(np.float32)
    return k, v, q


def search_keys(seed=4):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((2000, 12)).astype(np.float32)
    q = rng.standard_normal((6, 12)).astype(np.float32)
    return k, q


# (name, kind, options) of the attention cases each world checks
CASES = [
    ("relu", "relu", dict(alpha=2, bias=0.3)),
    ("relu_a3_heads", "relu", dict(alpha=3, bias=np.array([0.1, 0.3, 0.5, 0.7]))),
    ("soft_tau", "softmax", dict(tau=2.0)),
    ("soft_tau_heads", "softmax", dict(tau=np.array([1.0, 2.0, 3.0, 4.0]))),
    ("soft_topk", "softmax", dict(topk=20)),
    ("soft_eps", "softmax", dict(eps=1e-3)),
]

"""Test data shared by the test rooms (index, attention): key families and the error measure."""
import numpy as np


def fixture_keys(rng, n, d, kind):
    """``(n, d)`` float32 keys of a family: ``"gauss"``, ``"clustered"`` or ``"lattice"`` (small
    integers: many exact ties and duplicates). From 4 keys on, key 0 is zero and key 1
    duplicates key 2, on purpose."""
    if kind == "gauss":
        K = rng.standard_normal((n, d))
    elif kind == "clustered":
        c = rng.standard_normal((max(n // 50, 1), d)) * 3
        K = c[rng.integers(0, len(c), n)] + 0.2 * rng.standard_normal((n, d))
    elif kind == "lattice":
        K = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    else:
        raise ValueError(f"unknown key family {kind!r}")
    K = K.astype(np.float32)
    if n >= 4:
        K[0] = 0
        K[1] = K[2]
    return K


def clustered(rng, n, d, spread=0.3):
    """``(n, d)`` float32 keys around ``max(n // 100, 1)`` centres (a Gaussian mixture)."""
    c = rng.standard_normal((max(n // 100, 1), d)) * 2
    return (c[rng.integers(0, len(c), n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of ``b`` (float64)."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))

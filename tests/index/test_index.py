"""The index against the brute-force oracle: ``np.nonzero(canonical_scores(Q, K) >= tau)``."""

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsr

from .._data import fixture_keys
from hsr.index import canonical_scores


def as_sets(lims, ids):
    return [set(ids[lims[i]:lims[i + 1]].tolist()) for i in range(len(lims) - 1)]


def oracle(Q, K, tau, alive=None):
    S = canonical_scores(Q, K)
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), (Q.shape[0],))
    out = []
    for i in range(Q.shape[0]):
        hit = np.flatnonzero(S[i].astype(np.float64) >= tau[i])
        if alive is not None:
            hit = hit[alive[hit]]
        out.append(set(hit.tolist()))
    return out, S


def check(index, Q, K, tau, alive=None):
    lims, scores, ids = index.range_search(Q, tau)
    want, S = oracle(Q, K, tau, alive)
    assert as_sets(lims, ids) == want
    for i in range(Q.shape[0]):
        sl = slice(lims[i], lims[i + 1])
        np.testing.assert_array_equal(scores[sl], S[i, ids[sl]])
    assert np.array_equal(index.count(Q, tau), np.array([len(w) for w in want]))
    return lims, ids


METHODS = ["tree", "code", "brute", "auto"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["gauss", "clustered", "lattice"])
@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (100, 2), (1000, 8), (3000, 64), (517, 256)])
def test_range_matches_oracle(method, kind, n, d):
    rng = np.random.default_rng(n * 1000 + d)
    K = fixture_keys(rng, n, d, kind)
    Q = fixture_keys(rng, 9, d, kind)
    Q[3] = 0  # zero query: every key scores 0
    index = hsr.HSRIndex(K, method=method, leaf_size=8)
    S = canonical_scores(Q, K)
    # thresholds at exact scores (ties), between, above and below everything
    for q_tau in [S[:, 0], np.quantile(S, 0.9, axis=1), S.max(axis=1), S.max(axis=1) + 1, S.min(axis=1) - 1,
                  np.zeros(len(Q))]:
        check(index, Q, K, q_tau.astype(np.float64))
    check(index, Q, K, float(S[0, n // 2]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), d=st.integers(1, 40), leaf=st.integers(1, 40),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e6, 1e15]), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["gauss", "lattice"]), split=st.sampled_from(["pca", "axis"]),
       rotate=st.booleans(), copy=st.booleans())
def test_property_exact(n, d, leaf, scale, seed, kind, split, rotate, copy):
    rng = np.random.default_rng(seed)
    K = fixture_keys(rng, n, d, kind) * np.float32(scale)
    Q = fixture_keys(rng, 5, d, kind)
    index = hsr.HSRIndex(K, dim=d, method="tree", leaf_size=leaf, split=split, rotate=rotate, copy=copy)
    if n == 0:
        lims, scores, ids = index.range_search(Q, 0.0)
        assert lims.tolist() == [0] * 6 and len(ids) == 0
        return
    S = canonical_scores(Q, K)
    pick = rng.integers(0, n, size=5)
    tau = S[np.arange(5), pick].astype(np.float64)  # each query's threshold ties one of its scores
    check(index, Q, K, tau)
    check(index, Q, K, np.nextafter(tau, np.inf))


@pytest.mark.parametrize("method,d", [("tree", 6), ("code", 20)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), ops=st.lists(st.tuples(st.sampled_from(["add", "remove"]),
                                                             st.integers(1, 300)), min_size=1, max_size=12),
       start=st.integers(0, 200), copy=st.booleans())
def test_property_add_remove(method, d, seed, ops, start, copy):
    """Sequences of adds and removals, from an empty index or from one built over ``start``
    keys (read in place with ``copy=False``), against the oracle after every step."""
    rng = np.random.default_rng(seed)
    all_keys = fixture_keys(rng, start, d, "lattice") if start else np.zeros((0, d), dtype=np.float32)
    initial, given_keys = all_keys, all_keys.copy()  # the array handed over, and its values
    index = hsr.HSRIndex(initial if start else None, dim=d, method=method, leaf_size=4, buffer_size=64, copy=copy)
    alive = np.ones(start, dtype=bool)
    for op, k in ops:
        if op == "add":
            new = fixture_keys(rng, k, d, "lattice")
            ids = index.add(new)
            assert ids.tolist() == list(range(len(all_keys), len(all_keys) + k))
            all_keys = np.concatenate([all_keys, new])
            alive = np.concatenate([alive, np.ones(k, dtype=bool)])
        else:
            live = np.flatnonzero(alive)
            if len(live) == 0:
                continue
            gone = rng.choice(live, size=min(k, len(live)), replace=False)
            index.remove(gone)
            alive[gone] = False
        assert len(index) == alive.sum()
        Q = fixture_keys(rng, 4, d, "lattice")
        if len(all_keys):
            S = canonical_scores(Q, all_keys)
            tau = S[:, rng.integers(0, len(all_keys))].astype(np.float64)
            check(index, Q, all_keys, tau, alive)
    np.testing.assert_array_equal(initial, given_keys)  # the caller's keys are never written


def test_decode_appends_match_fresh_build():
    rng = np.random.default_rng(1)
    K = fixture_keys(rng, 5000, 16, "clustered")
    grown = hsr.HSRIndex(K[:1000], method="tree", buffer_size=128)
    for s in range(1000, 5000, 1):
        grown.add(K[s])
    fresh = hsr.HSRIndex(K, method="tree")
    Q = fixture_keys(rng, 20, 16, "clustered")
    tau = np.quantile(canonical_scores(Q, K), 0.99, axis=1)
    a = as_sets(*grown.range_search(Q, tau)[::2])
    b = as_sets(*fresh.range_search(Q, tau)[::2])
    assert a == b
    assert grown.n_trees <= 12  # logarithmic merging keeps the forest small


def test_float64_and_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    K = rng.standard_normal((700, 12))
    Q = rng.standard_normal((5, 12))
    idx64 = hsr.HSRIndex(K, dtype="float64", method="tree", leaf_size=8)
    S = canonical_scores(Q, K, dtype="float64")
    tau = S[:, 3]
    lims, sc, ids = idx64.range_search(Q, tau)
    assert sc.dtype == np.float64
    assert as_sets(lims, ids) == [set(np.flatnonzero(S[i] >= tau[i]).tolist()) for i in range(5)]
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        Kt = torch.from_numpy(K).to(dt)
        idx = hsr.HSRIndex(Kt, method="tree", leaf_size=8)
        Kn = Kt.float().numpy()
        Qn = torch.from_numpy(Q).to(dt).float().numpy()
        check(idx, Qn, Kn, canonical_scores(Qn, Kn)[:, 5].astype(np.float64))


def test_topk_matches_sorted_scores():
    rng = np.random.default_rng(3)
    K = fixture_keys(rng, 3000, 10, "lattice")  # many ties: smaller id wins
    Q = fixture_keys(rng, 7, 10, "lattice")
    S = canonical_scores(Q, K).astype(np.float64)
    for method in ("tree", "code", "brute"):
        idx = hsr.HSRIndex(K, method=method, leaf_size=16)
        sc, ids = idx.topk(Q, 25)
        for i in range(len(Q)):
            order = np.lexsort((np.arange(len(K)), -S[i]))[:25]
            assert ids[i].tolist() == order.tolist()
            np.testing.assert_array_equal(sc[i], S[i, order].astype(np.float32))
    small = hsr.HSRIndex(K[:3], method="tree")
    sc, ids = small.topk(Q[:1], 5)
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(sc[0, 3:]).all()


def test_stats_and_single_query():
    rng = np.random.default_rng(4)
    K = fixture_keys(rng, 20000, 4, "gauss")
    idx = hsr.HSRIndex(K, method="tree")
    q = K[5]
    S = canonical_scores(q[None], K)[0]
    tau = float(np.sort(S)[-50])
    scores, ids = idx.query(q, tau)
    assert set(ids.tolist()) == set(np.flatnonzero(S >= tau).tolist())
    *_, stats = idx.range_search(q[None], tau, return_stats=True)
    assert stats.method == "tree" and stats.keys_selected[0] == len(ids)
    assert stats.scan_fraction < 0.2  # d=4: the tree prunes most of the keys
    assert stats.nodes_visited[0] > 0


def test_whole_node_reporting_without_scores():
    rng = np.random.default_rng(5)
    K = rng.standard_normal((4000, 3)).astype(np.float32) + 10.0  # all keys far along +1
    idx = hsr.HSRIndex(K, method="tree", leaf_size=8)
    q = np.ones((1, 3), dtype=np.float32)
    lims, _, ids, stats = idx.range_search(q, 0.0, return_scores=False, return_stats=True)
    assert len(ids) == 4000
    assert stats.keys_scored[0] == 0  # reported as whole nodes, no dot products
    lims, scores, ids = idx.range_search(q, 0.0)
    np.testing.assert_array_equal(scores, canonical_scores(q, K)[0, ids])


def test_save_load_and_pickle(tmp_path):
    rng = np.random.default_rng(6)
    K = fixture_keys(rng, 3000, 8, "clustered")
    idx = hsr.HSRIndex(K[:2500], method="tree", buffer_size=100)
    idx.add(K[2500:2550])
    idx.remove([3, 4, 2501])
    Q = fixture_keys(rng, 6, 8, "clustered")
    tau = np.quantile(canonical_scores(Q, K), 0.95, axis=1)
    want = as_sets(*idx.range_search(Q, tau)[::2])
    path = tmp_path / "idx.hsr"
    idx.save(path)
    back = hsr.HSRIndex.load(path)
    assert as_sets(*back.range_search(Q, tau)[::2]) == want
    assert len(back) == len(idx)
    again = pickle.loads(pickle.dumps(idx))
    assert as_sets(*again.range_search(Q, tau)[::2]) == want
    back.add(K[2550:])  # a loaded index keeps growing
    assert len(back) == len(idx) + 450

    raw = path.read_bytes()
    (tmp_path / "trunc.hsr").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        hsr.HSRIndex.load(tmp_path / "trunc.hsr")
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tmp_path / "flip.hsr").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        hsr.HSRIndex.load(tmp_path / "flip.hsr")
    (tmp_path / "junk.hsr").write_bytes(b"not an index")
    with pytest.raises(ValueError):
        hsr.HSRIndex.load(tmp_path / "junk.hsr")


def test_same_seed_same_tree():
    rng = np.random.default_rng(7)
    K = fixture_keys(rng, 5000, 16, "clustered")
    a = hsr.HSRIndex(K, method="tree", seed=3)
    b = hsr.HSRIndex(K, method="tree", seed=3)
    for x, y in zip(a._state()[1].values(), b._state()[1].values()):
        np.testing.assert_array_equal(x, y)


def test_bad_inputs():
    K = np.ones((10, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hsr.HSRIndex(np.full((3, 4), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match="floating"):
        hsr.HSRIndex(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="floating"):
        hsr.HSRIndex(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="2-D"):
        hsr.HSRIndex(np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dim"):
        hsr.HSRIndex()
    idx = hsr.HSRIndex(K)
    with pytest.raises(ValueError, match="dimension 3"):
        idx.range_search(np.ones((2, 3), dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        idx.range_search(np.full((1, 4), np.inf, dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="tau contains NaN"):
        idx.range_search(np.ones((1, 4), dtype=np.float32), np.nan)
    with pytest.raises(ValueError, match="shape"):
        idx.range_search(np.ones((2, 4), dtype=np.float32), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="out of range"):
        idx.remove([10])
    with pytest.raises(ValueError, match="out of range"):
        idx.remove([-1])
    idx.remove([2])
    with pytest.raises(ValueError, match="already removed"):
        idx.remove([2])
    with pytest.raises(TypeError, match="integers"):
        idx.remove([1.5])
    with pytest.raises(ValueError, match="overflow"):
        hsr.HSRIndex(np.full((4, 4), 1e30, dtype=np.float32)).range_search(np.full((1, 4), 1e30, dtype=np.float32), 0)
    with pytest.raises(ValueError, match="k must be"):
        idx.topk(np.ones((1, 4), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="method"):
        hsr.HSRIndex(K, method="fast")


def test_empty_index_and_empty_results():
    idx = hsr.HSRIndex(dim=5)
    lims, scores, ids = idx.range_search(np.ones((3, 5), dtype=np.float32), 0.0)
    assert lims.tolist() == [0, 0, 0, 0] and len(ids) == 0
    assert idx.count(np.ones((2, 5), dtype=np.float32), 0.0).tolist() == [0, 0]
    idx.add(np.ones((2, 5), dtype=np.float32))
    lims, _, ids = idx.range_search(np.ones((1, 5), dtype=np.float32), 1e9)
    assert len(ids) == 0
    lims, _, ids = idx.range_search(np.zeros((0, 5), dtype=np.float32), 0.0)
    assert lims.tolist() == [0]


def test_canonical_scores_are_the_defined_sum():
    rng = np.random.default_rng(8)
    Q = rng.standard_normal((3, 37)).astype(np.float32)
    K = rng.standard_normal((5, 37)).astype(np.float32)
    S = canonical_scores(Q, K)
    for i in range(3):
        for j in range(5):
            acc = np.float32(Q[i, 0] * K[j, 0])
            for t in range(1, 37):
                acc = np.float32(acc + np.float32(Q[i, t] * K[j, t]))
            assert S[i, j] == acc
    np.testing.assert_allclose(S, Q.astype(np.float64) @ K.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tree", "code", "brute"])
def test_max_id_limits_results(method):
    rng = np.random.default_rng(9)
    K = fixture_keys(rng, 2000, 6, "lattice")
    idx = hsr.HSRIndex(K[:1500], method=method, leaf_size=8, buffer_size=300)
    idx.add(K[1500:])  # some keys in the buffer
    Q = fixture_keys(rng, 40, 6, "lattice")
    lim = rng.integers(-1, 2100, size=40)
    S = canonical_scores(Q, K).astype(np.float64)
    tau = S[:, 7]
    lims, _, ids = idx.range_search(Q, tau, max_id=lim)
    want = [set(np.flatnonzero((S[i] >= tau[i]) & (np.arange(2000) <= lim[i])).tolist()) for i in range(40)]
    assert as_sets(lims, ids) == want
    ts, tid = idx.topk(Q, 5, max_id=lim)
    for i in range(40):
        ok = np.flatnonzero(np.arange(2000) <= lim[i])
        order = ok[np.lexsort((ok, -S[i, ok]))][:5]
        assert tid[i, :len(order)].tolist() == order.tolist()
        assert (tid[i, len(order):] == -1).all()


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous file as it was, and no temporary file."""
    rng = np.random.default_rng(12)
    K = fixture_keys(rng, 500, 8, "gauss")
    path = tmp_path / "idx.hsr"
    hsr.HSRIndex(K[:100]).save(path)
    before = path.read_bytes()
    big = hsr.HSRIndex(K)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        big.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx.hsr"]
    assert len(hsr.HSRIndex.load(path)) == 100


def test_sizes_and_shapes_validated():
    K = np.ones((10, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="1-D"):
        hsr.HSRIndex(np.ones(8, dtype=np.float32))
    assert len(hsr.HSRIndex(np.ones(8, dtype=np.float32), dim=8)) == 1  # dim says it is one key
    for bad in (0, 2 ** 40, True, 2.5):
        with pytest.raises(ValueError, match="leaf_size"):
            hsr.HSRIndex(K, leaf_size=bad)
        with pytest.raises(ValueError, match="buffer_size"):
            hsr.HSRIndex(K, buffer_size=bad)
    with pytest.raises(ValueError, match="k must be"):
        hsr.HSRIndex(K).topk(K[:1], 2 ** 40)


def _rewrite(path, out, meta_fn=None, arrays_fn=None, raw=None):
    """Copy an index file, editing its header / arrays and recomputing the checksum (which
    anyone can do: it authenticates nothing)."""
    import io
    import json
    import zipfile

    from hsr.index._files import _digest

    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("meta.json"))
        arrays = {n[:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.endswith(".npy")}
    if arrays_fn:
        arrays_fn(arrays)
    meta["sha256"] = _digest(arrays)
    if meta_fn:
        meta = meta_fn(meta)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("meta.json", raw if raw is not None else json.dumps(meta))
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a)
            zf.writestr(name + ".npy", buf.getvalue())


@pytest.mark.parametrize("method", ["tree", "code"])
def test_crafted_files_are_rejected_or_rebuilt(tmp_path, method):
    rng = np.random.default_rng(14)
    K = fixture_keys(rng, 2000, 8 if method == "tree" else 32, "clustered")
    idx = hsr.HSRIndex(K[:1900], method=method, buffer_size=64)
    idx.add(K[1900:1930])
    src = tmp_path / "ok.hsr"
    idx.save(src)
    Q = fixture_keys(rng, 5, K.shape[1], "clustered")
    tau = np.quantile(canonical_scores(Q, K[:1930]), 0.9, axis=1)
    want = as_sets(*idx.range_search(Q, tau)[::2])
    bad = tmp_path / "bad.hsr"
    if method == "tree":
        # wrong bounds and node ranges with a valid checksum: the trees are rebuilt from their ids
        def scramble(a):
            a["t0_radius"][:] = 0.0
            a["t0_lo"][:] = 0.0
            a["t0_hi"][:] = 0.0
            a["t0_node_start"][:] = 10 ** 9
        _rewrite(src, bad, arrays_fn=scramble)
        assert as_sets(*hsr.HSRIndex.load(bad).range_search(Q, tau)[::2]) == want
        _rewrite(src, bad, arrays_fn=lambda a: a["t0_ids"].__setitem__(0, 10 ** 9))
        with pytest.raises(ValueError, match="outside"):
            hsr.HSRIndex.load(bad)
        _rewrite(src, bad, arrays_fn=lambda a: a["t0_ids"].__setitem__(1, a["t0_ids"][0]))
        with pytest.raises(ValueError):
            hsr.HSRIndex.load(bad)
    for meta_fn, match in ((lambda m: [1, 2], "header"), (lambda m: 3, "header"),
                           (lambda m: {**m, "dtype": "float16"}, "dtype"),
                           (lambda m: {**m, "leaf_size": 2 ** 40}, "leaf_size"),
                           (lambda m: {**m, "n_total": "many"}, "n_total")):
        _rewrite(src, bad, meta_fn=meta_fn)
        with pytest.raises(ValueError, match=match):
            hsr.HSRIndex.load(bad)
    _rewrite(src, bad, raw="[" * 100000 + "]" * 100000)  # deeply nested JSON
    with pytest.raises(ValueError):
        hsr.HSRIndex.load(bad)
    _rewrite(src, bad, arrays_fn=lambda a: a.__setitem__("keys", np.full_like(a["keys"], np.nan)))
    with pytest.raises(ValueError, match="NaN"):
        hsr.HSRIndex.load(bad)


def test_npy_header_claiming_huge_shape_is_rejected(tmp_path):
    import zipfile

    rng = np.random.default_rng(15)
    idx = hsr.HSRIndex(fixture_keys(rng, 300, 8, "gauss"))
    src = tmp_path / "ok.hsr"
    idx.save(src)
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    raw = bytearray(members["keys.npy"])
    hdr = raw[:128].decode("latin1")
    fake = hdr.replace("(300, 8)", "(10**12, 8)".replace("10**12", "1000000000000"))
    members["keys.npy"] = fake.encode("latin1")[:len(hdr)].ljust(len(hdr), b" ") + bytes(raw[len(hdr):])
    bad = tmp_path / "bad.hsr"
    with zipfile.ZipFile(bad, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    with pytest.raises(ValueError, match="claims"):
        hsr.HSRIndex.load(bad)


@pytest.mark.parametrize("method", ["tree", "code"])
def test_byte_flips_end_in_valueerror_or_an_equal_index(tmp_path, method):
    """Fuzz: any single flipped byte of a saved index is either caught (ValueError) or harmless
    (the loaded index answers exactly like the original)."""
    rng = np.random.default_rng(16)
    K = fixture_keys(rng, 200, 16, "gauss")
    idx = hsr.HSRIndex(K, method=method, leaf_size=8)
    path = tmp_path / "ok.hsr"
    idx.save(path)
    raw = path.read_bytes()
    Q = fixture_keys(rng, 4, 16, "gauss")
    tau = np.quantile(canonical_scores(Q, K), 0.8, axis=1)
    want = as_sets(*idx.range_search(Q, tau)[::2])
    bad = tmp_path / "flip.hsr"
    for pos in rng.choice(len(raw), size=150, replace=False):
        flipped = bytearray(raw)
        flipped[pos] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            back = hsr.HSRIndex.load(bad)
        except ValueError:
            continue
        assert as_sets(*back.range_search(Q, tau)[::2]) == want, pos

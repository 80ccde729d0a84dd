"""Eager calls of a CodeKVCache replayed from per-shape CUDA graphs (``hsr/kernels/_replay.py``).

The graphs exist on CUDA only: there every test compares a cache whose eager calls replay
with one that launches every kernel, step by step, while the cache grows; on the CPU (the
interpreter in CI) the replays are off and the first test checks that they stay off.
"""
import pytest
import torch

from hsr import AttentionSpec
from hsr.kernels._replay import Replays
from hsr.kernels.codes import CodeKVCache

from .test_codes import _inputs
from .test_decode_step import _dense

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_replays_off_the_gpu_run_the_body(device):
    r = Replays(torch.device("cpu"))
    assert not r.enabled
    calls = []
    for _ in range(3):
        assert r.run("k", 1, (torch.ones(2),), lambda b: calls.append(1) or (b[0] * 2,))[0].tolist() == [2.0, 2.0]
    assert len(calls) == 3 and len(r) == 0
    if device == "cpu":
        q, k, v = _inputs(1, 1, 2, 1, 20, 16, torch.float32, device, True, seed=1)
        cache = CodeKVCache(k, v)
        cache.attend(q, AttentionSpec(kind="softmax", tau=0.0, causal=True))
        assert len(cache.replays) == 0


def _pair(B, Hkv, G, D, n0, steps, dtype, seed, keys_only=False):
    q, k, v = _inputs(B, Hkv, G, 1, n0 + steps, D, dtype, "cuda", True, seed=seed)
    vv = None if keys_only else v[:, :, :n0]
    fast = CodeKVCache(k[:, :, :n0], vv, capacity=n0 + 4)
    slow = CodeKVCache(k[:, :, :n0], vv, capacity=n0 + 4)
    slow.replays.enabled = False
    return q, k, v, fast, slow


@cuda
@pytest.mark.parametrize("tau_kind", ["number", "per_head", "per_row", "rewritten"])
def test_replayed_loop_equals_launched_loop(tau_kind):
    B, Hkv, G, D, n0, steps = 2, 2, 3, 32, 60, 10  # grows past the capacity (n0 + 4) once
    q, k, v, fast, slow = _pair(B, Hkv, G, D, n0, steps, torch.float16, seed=3)
    scale = D ** -0.5
    outs = []
    held = torch.zeros(Hkv * G, device="cuda")
    for i in range(steps):
        n = n0 + i + 1
        if tau_kind == "number":
            tau = 2.0
        elif tau_kind == "rewritten":  # one tensor, rewritten in place: a replay must copy it again
            tau = held
            if i % 2:
                tau.fill_(1.0 + i)
        elif tau_kind == "per_head":
            tau = torch.linspace(-1.0, 4.0, B * Hkv * G // B, device="cuda") + i  # new values every step
        else:
            tau = torch.full((B, Hkv * G, 1), 1.0 + i % 3, device="cuda", dtype=torch.bfloat16)  # converted
        qi = q.roll(i, dims=-1)  # a new, strided query every step
        spec = AttentionSpec(kind="softmax", tau=tau, scale=scale, causal=True)
        for c in (fast, slow):
            c.add(k[:, :, n - 1:n], v[:, :, n - 1:n], check=False)
        out, _ = fast.attend(qi, spec, check=False)
        ref, _ = slow.attend(qi, spec, check=False)
        assert torch.equal(out, ref), f"step {i}"
        t = tau if torch.is_tensor(tau) else torch.tensor(tau)
        t = t.float().to("cuda").expand(B, Hkv * G) if t.dim() < 3 else t.float()[..., 0]
        dense = _dense(qi, k[:, :, :n], v[:, :, :n], "softmax", t[..., None].double(), 0.0, scale)
        torch.testing.assert_close(out.double(), dense, atol=2e-3, rtol=2e-3)
        outs.append(out)
    for i, out in enumerate(outs):  # each call returned its own tensor: later replays left it alone
        assert not any(out.data_ptr() == o.data_ptr() for o in outs[:i])
    assert len(fast.replays) >= 1 and len(slow.replays) == 0
    fast.check()
    assert fast.lengths.tolist() == slow.lengths.tolist() == [n0 + steps] * (B * Hkv)


@cuda
def test_replayed_relu_and_keys_only_add():
    B, Hkv, G, D, n0, steps = 1, 2, 2, 64, 70, 6
    q, k, v, fast, slow = _pair(B, Hkv, G, D, n0, steps, torch.bfloat16, seed=5)
    spec = AttentionSpec(kind="relu", alpha=2, bias=0.25, scale=D ** -0.5, causal=True)
    for i in range(steps):
        n = n0 + i + 1
        for c in (fast, slow):
            c.add(k[:, :, n - 1:n], v[:, :, n - 1:n])
        assert torch.equal(fast.attend(q, spec)[0], slow.attend(q, spec)[0])
    kf = CodeKVCache(k[:, :, :n0], None)
    ks = CodeKVCache(k[:, :, :n0], None)
    ks.replays.enabled = False
    for i in range(steps):
        for c in (kf, ks):
            c.add(k[:, :, n0 + i:n0 + i + 1], None)
    for name in ("codes", "scale", "err", "lengths", "max_norm", "max_err"):
        assert torch.equal(getattr(kf, name), getattr(ks, name)), name


@cuda
def test_bad_values_still_raise_after_replays():
    q, k, v, fast, _ = _pair(1, 1, 2, 16, 40, 4, torch.float32, seed=7)
    spec = AttentionSpec(kind="softmax", tau=0.0, causal=True)
    for _ in range(3):  # captured by now
        fast.attend(q, spec, check=False)
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    out, _ = fast.attend(bad, spec, check=False)
    assert torch.isnan(out[0, 0]).all()
    with pytest.raises(ValueError, match="q contains NaN"):
        fast.check()
    with pytest.raises(ValueError, match="q contains NaN"):
        fast.attend(bad, spec)


@cuda
def test_replays_keep_at_most_their_limit():
    q, k, v, fast, slow = _pair(1, 1, 2, 16, 40, 4, torch.float32, seed=9)
    fast.replays.limit = 2
    for tau in (0.0, 1.0, 2.0, 3.0):  # a number is part of the key: four shapes
        spec = AttentionSpec(kind="softmax", tau=tau, causal=True)
        for _ in range(3):
            out = fast.attend(q, spec)[0]
        slow.replays.enabled = False
        assert torch.equal(out, slow.attend(q, spec)[0])
    assert len(fast.replays) == 2


@cuda
def test_replays_under_inference_mode():
    """Inference tensors have no version counter: every replay copies them, and answers agree."""
    with torch.inference_mode():
        q, k, v, fast, slow = _pair(1, 2, 2, 32, 50, 5, torch.bfloat16, seed=13)
        tau = torch.zeros(4, device="cuda")
        spec = AttentionSpec(kind="softmax", tau=tau, causal=True)
        for i in range(5):
            for c in (fast, slow):
                c.add(k[:, :, 50 + i:51 + i], v[:, :, 50 + i:51 + i], check=False)
            tau.fill_(float(i % 2))  # written in place, with no version to tell
            assert torch.equal(fast.attend(q, spec, check=False)[0], slow.attend(q, spec, check=False)[0])
        assert len(fast.replays) >= 1


class _Recorded:
    """A stand-in for a CUDA graph on the CPU: replay() runs the recorded body again."""

    def __init__(self, body, bufs, outputs):
        self.body, self.bufs, self.outputs = body, bufs, outputs

    def replay(self):
        for o, x in zip(self.outputs, self.body(self.bufs)):
            o.copy_(x)


class _CpuReplays(Replays):
    """Replays' bookkeeping on the CPU: the same code, a recorded function for a graph.

    A capture records without running: ``state`` are tensors the body writes that are put back
    after the stand-in's recording run (a cache's ``lengths``: the add's rows past the length
    are then unread)."""

    def __init__(self, limit=16, state=()):
        super().__init__(torch.device("cpu"), limit)
        self.enabled = True
        self.stream = 0
        self.state = tuple(state)

    def _stream(self):
        return self.stream

    def _record(self, body, bufs):
        saved = [x.clone() for x in self.state]
        outputs = tuple(o.clone() for o in body(bufs))
        for x, old in zip(self.state, saved):
            x.copy_(old)
        return _Recorded(body, bufs, outputs), outputs


def test_replay_bookkeeping_on_the_cpu():
    """When a shape runs eagerly, captures and replays; what a replay copies; what drops the
    graphs (a new storage, the limit); another stream runs eagerly."""
    r = _CpuReplays(limit=2)
    ran = []

    def body(b):
        ran.append(b[0].data_ptr())
        return (b[0] * 2 + (0 if b[1] is None else b[1]),)

    x = torch.arange(4.0)
    assert r.run("a", 1, (x, None), body)[0].tolist() == [0, 2, 4, 6]  # first sighting: eager, on x
    assert ran[-1] == x.data_ptr() and len(r) == 0
    assert r.run("a", 1, (x, None), body)[0].tolist() == [0, 2, 4, 6]  # second: eager on the buffers, recorded
    assert ran[-1] != x.data_ptr() and len(r) == 1
    calls = len(ran)
    y = torch.full((4,), 5.0)
    out = r.run("a", 1, (y, None), body)[0]  # replayed: y copied in
    assert out.tolist() == [10.0] * 4 and len(ran) == calls + 1
    out2 = r.run("a", 1, (y, None), body)[0]
    assert out2.data_ptr() != out.data_ptr() and out.tolist() == [10.0] * 4  # each call its own copy
    buf = r._entries["a"].inputs[0]
    buf.zero_()  # behind its back: the same y, unwritten, is not copied again
    assert r.run("a", 1, (y, None), body)[0].tolist() == [0.0] * 4
    y.add_(1)  # written in place: copied again
    assert r.run("a", 1, (y, None), body)[0].tolist() == [12.0] * 4
    r.stream = 1  # another stream: eager, the graph kept
    before = len(ran)
    assert r.run("a", 1, (x, None), body)[0].tolist() == [0, 2, 4, 6] and ran[-1] == x.data_ptr()
    assert len(ran) == before + 1 and len(r) == 1
    r.stream = 0
    for key in ("b", "c"):  # two more shapes captured: the limit (2) drops the oldest, "a"
        for _ in range(2):
            r.run(key, 1, (x, torch.ones(4)), body)
    assert len(r) == 2 and "a" not in r._entries
    assert r.run("c", 1, (x, torch.ones(4)), body)[0].tolist() == [1, 3, 5, 7]
    r.run("c", 2, (x, torch.ones(4)), body)  # a new storage: every graph dropped
    assert len(r) == 0
    r.clear()
    assert len(r) == 0
    r.record_first = True  # a generation loop's shapes repeat: the first call records
    assert r.run("d", 3, (y, None), body)[0].tolist() == [12.0] * 4 and len(r) == 1
    assert r.run("d", 3, (x, None), body)[0].tolist() == [0, 2, 4, 6]  # replayed, x copied in


def test_an_integer_threshold_is_refused_on_every_call(device):
    """The replayed path converts tau as the launched one does, and refuses what it refuses."""
    q, k, v = _inputs(1, 1, 2, 1, 40, 16, torch.float32, device, True, seed=3)
    cache = CodeKVCache(k, v)
    spec = AttentionSpec(kind="softmax", tau=torch.zeros(2, device=device), causal=True)
    for _ in range(3):  # on a GPU: eager, captured, replayed
        cache.attend(q, spec)
    bad = AttentionSpec(kind="softmax", tau=torch.zeros(2, dtype=torch.int32, device=device), causal=True)
    for _ in range(3):
        with pytest.raises(ValueError, match="floating-point"):
            cache.attend(q, bad)


@pytest.mark.parametrize("path", ["replayed", "info", "splits"])
@pytest.mark.parametrize("t", [1, 3, 70])
def test_attend_with_add_equals_add_then_attend(device, path, t):
    """``attend(q, spec, add=(k, v))`` adds then attends in one call (one replay where the
    tokens ride in the query's launch): the same cache state as ``add`` then ``attend``, the
    same outputs, across a reallocation; on the CPU the replays run through the recorded
    stand-in, so the graph's bookkeeping of the add is exercised in CI."""
    B, Hkv, G, D, n0, steps = 1, 2, 2, 32, 50, 3
    q, k, v = _inputs(B, Hkv, G, 1, n0 + steps * t, D, torch.float32, device, False, seed=11)
    scale = D ** -0.5
    one = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + t + 1)  # grows once
    two = CodeKVCache(k[:, :, :n0], v[:, :, :n0], capacity=n0 + t + 1)
    if device == "cpu":
        one.replays = _CpuReplays(state=(one.lengths,))
    tau = torch.linspace(-1.0, 1.0, Hkv * G, device=device)
    spec = AttentionSpec(kind="softmax", tau=tau, scale=scale, causal=True)
    kw = {"replayed": {}, "info": {"with_info": True}, "splits": {"num_splits": 2}}[path]
    for i in range(steps):
        lo, hi = n0 + i * t, n0 + (i + 1) * t
        qi = q.roll(i, dims=-1).contiguous()
        a, info = one.attend(qi, spec, add=(k[:, :, lo:hi], v[:, :, lo:hi]), **kw)
        two.add(k[:, :, lo:hi], v[:, :, lo:hi])
        b, _ = two.attend(qi, spec, **kw)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert len(one) == len(two) == hi and one.version == two.version
        if path == "info":
            assert int(info.keys_scored.max()) <= hi
        ref = _dense(qi, k[:, :, :hi], v[:, :, :hi], "softmax", tau.double().expand(B, Hkv * G)[..., None], 0.0,
                     scale)
        torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)
    for name in ("scale", "err"):  # the fused add computes the codes as the add kernel does
        torch.testing.assert_close(getattr(one, name)[..., :hi], getattr(two, name)[..., :hi], atol=0, rtol=0)
    assert torch.equal(one.lengths, two.lengths) and one.lengths.tolist() == [n0 + steps * t] * (B * Hkv)
    torch.testing.assert_close(one.k[:, :, :hi], two.k[:, :, :hi], atol=0, rtol=0)
    torch.testing.assert_close(one.v[:, :, :hi], two.v[:, :, :hi], atol=0, rtol=0)
    if path == "replayed" and t <= 64:
        assert len(one.replays) == 1  # add + attend: one graph (a first sighting, then captured)


def test_attend_with_add_refuses_before_adding(device):
    """A refused call adds nothing: bad tokens, a kind the cache cannot run, too many rows."""
    q, k, v = _inputs(1, 1, 2, 1, 30, 16, torch.float32, device, False, seed=2)
    cache = CodeKVCache(k[:, :, :20], v[:, :, :20])
    spec = AttentionSpec(kind="softmax", tau=0.0, causal=True)
    k1, v1 = k[:, :, 20:21], v[:, :, 20:21]
    with pytest.raises(ValueError, match="add expects"):
        cache.attend(q, spec, add=(k[:, :, 20:21, :8], v1))
    with pytest.raises(TypeError, match="pair"):
        cache.attend(q, spec, add=k1)
    with pytest.raises(ValueError, match="group_union"):
        cache.attend(q, AttentionSpec(kind="relu", group_union=True, causal=True), add=(k1, v1))
    bad = k1.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.attend(q, spec, add=(bad, v1))
    q30 = torch.zeros(1, 2, 30, 16, device=device)
    with pytest.raises(ValueError, match="query positions"):
        cache.attend(q30, spec, add=(k1, v1))
    assert len(cache) == 20 and cache.lengths.tolist() == [20]
    keys = CodeKVCache(k[:, :, :20], None)
    with pytest.raises(ValueError, match="holds keys only"):
        keys.attend(q, spec, add=(k1, None))
    assert len(keys) == 20

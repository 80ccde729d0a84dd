"""torch.compile(fullgraph=True) over the public kernels: they are torch.library custom ops
(hsr.kernels.ops) with fake implementations, so the compiler traces around the Triton launch.

On a machine without CUDA the kernels run under the Triton interpreter and the compiled
functions use ``backend="aot_eager"`` (dynamo + AOTAutograd + the fake implementations, no
code generation; one test also runs inductor's CPU backend); on a GPU the default inductor
backend is used throughout.
"""
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import (block_lists_from_block_mask, block_sparse_attention,  # noqa: E402
                         build_index, hsr_decode, selected_attention)
from hsr.kernels import ops  # noqa: E402,F401  (registers torch.ops.hsr.*)
from ._util import qkv  # noqa: E402

BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"

# importing inductor makes torch itself warn (torch.utils.mkldnn uses torch.jit.script_method)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class Recorder:
    """A dynamo backend that keeps the graphs it is given (then runs them through BACKEND)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if BACKEND == "aot_eager":
            from torch._dynamo.backends.common import aot_autograd
            from functorch.compile import make_boxed_func

            return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    def ops(self):
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}


def _lists(R, nkb, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num = torch.randint(1, nkb + 1, (1, 1, R), generator=gen, dtype=torch.int32)
    idx = torch.stack([torch.randperm(nkb, generator=gen) for _ in range(R)]).int()[None, None]
    return num.to(device), idx.contiguous().to(device)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("M,dtype", [(48, torch.float16), (1, torch.bfloat16)])  # prefill, decode
def test_block_sparse_fullgraph(M, dtype, device):
    N, bs = 48, 16
    q, k, v = qkv(1, 4, 2, M, N, 32, dtype, device)
    num, idx = _lists(-(-N // bs) if M == N else 1, -(-N // bs), device)

    def f(q, k, v, num, idx):
        out, lse = block_sparse_attention(q, k, v, num, idx, block_size=bs, scale=0.3, return_lse=True)
        return out.float() * 2, lse + 1

    rec = Recorder()
    got = torch.compile(f, fullgraph=True, backend=rec)(q, k, v, num, idx)
    want = f(q, k, v, num, idx)
    assert "hsr.block_sparse_attention" in rec.ops()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_block_sparse_inductor_cpu(device):
    """The default backend (inductor) around the op; on the CPU this builds C++ (slow-ish)."""
    q, k, v = qkv(1, 2, 1, 32, 32, 16, torch.float32, device)
    num, idx = _lists(2, 2, device)

    def f(q, k, v):
        return block_sparse_attention(q, k, v, num, idx, block_size=16).sum(-1)

    got = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, f(q, k, v))


def test_block_mask_lists_inside_compile(device):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(1, 2, 2, 64, 64, 16, torch.float32, device)
    bm = flex.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, 64, 64, device=device,
                                BLOCK_SIZE=16)
    kvn, kvi, bs, causal = block_lists_from_block_mask(bm, q, k)  # outside: reads the mask

    def f(q, k, v, kvn, kvi):
        return block_sparse_attention(q, k, v, kvn, kvi, block_size=bs, causal=causal)

    got = torch.compile(f, fullgraph=True, backend=BACKEND)(q, k, v, kvn, kvi)
    torch.testing.assert_close(got, block_sparse_attention(q, k, v, block_mask=bm))

    def g(q, k, v):
        return block_sparse_attention(q, k, v, block_mask=bm)

    with pytest.raises(Exception, match="convert it once outside the compiled"):
        torch.compile(g, fullgraph=True, backend=BACKEND)(q, k, v)


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_selected_fullgraph(kind, device):
    B, Hq, Hkv, M, N, D = 1, 2, 1, 3, 40, 16
    q, k, v = qkv(B, Hq, Hkv, M, N, D, torch.float16, device)
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(0, 12, (B * Hq * M,), generator=gen)
    indptr = torch.zeros(B * Hq * M + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lens, 0)
    indices = torch.randint(0, N, (int(indptr[-1]),), generator=gen, dtype=torch.int32)
    indptr, indices = indptr.to(device), indices.to(device)

    def f(q, k, v, indptr, indices):
        return selected_attention(q, k, v, indptr, indices, kind=kind, alpha=2, bias=0.1,
                                  return_lse=True)

    rec = Recorder()
    got = torch.compile(f, fullgraph=True, backend=rec)(q, k, v, indptr, indices)
    want = f(q, k, v, indptr, indices)
    assert "hsr.selected_attention" in rec.ops()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("mode,kind", [("fused", "relu"), ("planned", "softmax")])
def test_hsr_decode_fullgraph(mode, kind, device):
    B, Hq, Hkv, N, D = 1, 4, 2, 96, 32
    q, k, v = qkv(B, Hq, Hkv, 1, N, D, torch.float16, device, seed=3)
    index = build_index(k, v, block_size=16, n_sub=4, method="none")
    tau = torch.full((B, Hq, 1), 0.5, device=device)

    def f(q, tau):
        return hsr_decode(q, index, tau=tau, kind=kind, mode=mode, return_lse=True,
                          count_visited=(mode == "fused"))

    rec = Recorder()
    got = torch.compile(f, fullgraph=True, backend=rec)(q, tau)
    want = f(q, tau)
    assert "hsr.hsr_decode" in rec.ops()
    assert len(got) == len(want) == (3 if mode == "fused" else 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- opcheck

def _opcheck(op, args):
    # the schema, fake (meta) and dispatch tests; autograd: the ops are forward-only
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_opcheck_block_sparse(device):
    q, k, v = qkv(1, 2, 1, 32, 32, 16, torch.float16, device)
    num, idx = _lists(2, 2, device)
    _opcheck(torch.ops.hsr.block_sparse_attention.default,
             (q, k, v, num, idx, 16, True, None, None, None, None, None, None, None, None,
              True, False, True))


def test_opcheck_selected(device):
    q, k, v = qkv(1, 2, 1, 2, 20, 16, torch.float32, device)
    indptr = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int64, device=device)
    indices = torch.tensor([0, 5, 19, 2, 3, 4, 5, 1, 1], dtype=torch.int32, device=device)
    _opcheck(torch.ops.hsr.selected_attention.default,
             (q, k, v, indptr, indices, "relu", 2, 0.0, None, None, None, None))


def test_opcheck_hsr_decode(device):
    q, k, v = qkv(1, 2, 1, 1, 64, 32, torch.float16, device, seed=5)
    ix = build_index(k, v, block_size=16, n_sub=4, method="none")
    _opcheck(torch.ops.hsr.hsr_decode.default,
             (q, ix.kp, ix.vp, ix.pos, ix.centre, ix.radius, ix.sub_radius, ix.kmax, ix.rot,
              ix.block, ix.n_sub, ix.n_valid, None, None, None, "relu", 2, 0.0, None, False, None,
              True, "fused"))


@pytest.mark.parametrize("bias_per_head", [False, True])
def test_relu_prefill_fullgraph(bias_per_head, device):
    from hsr.kernels import relu_prefill

    q, k, v = qkv(1, 4, 2, 40, 72, 32, torch.float16, device, seed=3)
    bias = torch.tensor([0.1, 0.2, 0.0, 0.3], device=device) if bias_per_head else 0.15

    def f(q, k, v):
        out, lse = relu_prefill(q, k, v, alpha=2, bias=bias, return_lse=True)
        return out.float() + 1, lse

    rec = Recorder()
    got = torch.compile(f, fullgraph=True, backend=rec)(q, k, v)
    want = f(q, k, v)
    assert "hsr.relu_prefill" in rec.ops()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_opcheck_relu_prefill(device):
    q, k, v = qkv(1, 2, 1, 24, 40, 16, torch.float16, device, seed=4)
    _opcheck(torch.ops.hsr.relu_prefill.default,
             (q, k, v, 2, 0.1, None, None, True, True, 1e-3, None, None, None, None))


def test_fake_impl_checks_shapes():
    """The fake implementation rejects what the launcher would (under compile, before any run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 8, 12)  # head dim 12: not a power of two
        k = torch.empty(1, 1, 8, 12)
        num = torch.empty(1, 1, 1, dtype=torch.int32)
        idx = torch.empty(1, 1, 1, 1, dtype=torch.int32)
        with pytest.raises(ValueError, match="power of two"):
            torch.ops.hsr.block_sparse_attention(q, k, k, num, idx, 16, True, None, None, None, None,
                                                 None, None, None, None, True, False, True)

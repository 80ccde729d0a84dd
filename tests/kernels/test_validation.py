"""Bad arguments to the kernel wrappers raise ValueError / TypeError with a message that names
the problem, before any launch (so these run on CPU tensors); the search plan is a frozen
dataclass."""
import pytest
import torch

pytest.importorskip("triton")

from hsr.kernels import block_sparse_attention, build_index, hsr_decode, selected_attention  # noqa: E402
from hsr.kernels._validate import check_alpha, check_kind  # noqa: E402
from hsr.kernels.search import SearchPlan  # noqa: E402

from ._util import full_lists  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_tensors_pass_the_device_check(monkeypatch, request):
    # these tests give CPU tensors to reach the argument checks; on a GPU machine the device
    # check (which names the fix for CPU tensors) would answer first, so it is told the
    # interpreter runs -- except in the test of that check itself and in tests on the device
    if (torch.cuda.is_available() and "device" not in request.fixturenames
            and "without_the_interpreter" not in request.node.name):
        import hsr.kernels._compat as compat

        monkeypatch.setattr(compat, "interpreting", lambda: True)


def _qkv(B=1, Hq=2, Hkv=1, M=4, N=32, D=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, M, D, generator=g).to(dtype), torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hkv, N, D, generator=g).to(dtype))


def _lists(R=2, nkb=2):
    return full_lists(1, 1, R, nkb)


# ------------------------------------------------------------------ block_sparse_attention
@pytest.mark.parametrize("change,exc,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have shape"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, "v must have the shape of k"),
    (lambda q, k, v: (q, k[:, :, :, :8].contiguous(), v[:, :, :, :8].contiguous()), ValueError, "head dim mismatch"),
    (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), ValueError, "batch mismatch"),
    (lambda q, k, v: (q[:, :1].expand(1, 3, -1, -1), torch.cat([k, k], 1), torch.cat([v, v], 1)),
     ValueError, "multiple of kv heads"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), ValueError, "power of two in"),
    (lambda q, k, v: (q.float(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float16, bfloat16 or float32"),
    (lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), ValueError, "contiguous"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "torch.Tensor"),
])
def test_block_sparse_bad_qkv(change, exc, match):
    q, k, v = _qkv()
    num, idx = _lists()
    q2, k2, v2 = change(q, k, v)
    with pytest.raises(exc, match=match):
        block_sparse_attention(q2, k2, v2, num, idx, block_size=16)


def test_block_sparse_bad_lists():
    q, k, v = _qkv()
    num, idx = _lists()
    with pytest.raises(ValueError, match="kv_num_blocks must have shape"):
        block_sparse_attention(q, k, v, num[0], idx, block_size=16)
    with pytest.raises(ValueError, match="must start with the shape of"):
        block_sparse_attention(q, k, v, num, idx[:, :, :1], block_size=16)
    with pytest.raises(ValueError, match="batch dim 3 must be 1 or 1"):
        block_sparse_attention(q, k, v, num.expand(3, -1, -1), idx.expand(3, -1, -1, -1), block_size=16)
    with pytest.raises(ValueError, match="head dim 5"):
        block_sparse_attention(q, k, v, num.expand(-1, 5, -1), idx.expand(-1, 5, -1, -1), block_size=16)
    with pytest.raises(TypeError, match="int32"):
        block_sparse_attention(q, k, v, num.long(), idx, block_size=16)


def test_block_sparse_bad_tiles_and_positions():
    q, k, v = _qkv(M=32)
    num, idx = _lists()
    with pytest.raises(ValueError, match="multiple of the kernel tiles"):
        block_sparse_attention(q, k, v, num, idx, block_size=24, block_m=16, block_n=16)
    qd = q[:, :, -1:]
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        block_sparse_attention(qd, k, v, num[:, :, :1], idx[:, :, :1], block_size=16, block_n=48)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        block_sparse_attention(q, k, v, num, idx, block_size=16, block_m=8)
    with pytest.raises(ValueError, match="gather unit"):
        block_sparse_attention(qd, k, v, *full_lists(1, 1, 1, 1), block_size=48, block_n=32)
    with pytest.raises(ValueError, match="single list row"):
        block_sparse_attention(qd, k, v, num, idx, block_size=16,
                               positions=torch.zeros(1, 1, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"positions must have shape \(1, 1, 32\)"):
        block_sparse_attention(qd, k, v, num[:, :, :1], idx[:, :, :1], block_size=16,
                               positions=torch.zeros(1, 1, 31, dtype=torch.int32))
    with pytest.raises(TypeError, match="positions must be int32"):
        block_sparse_attention(qd, k, v, num[:, :, :1], idx[:, :, :1], block_size=16,
                               positions=torch.zeros(1, 1, 32, dtype=torch.int64))


# ------------------------------------------------------------------ selected_attention
def test_selected_bad_arguments():
    q, k, v = _qkv()
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indices = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"indptr must have B\\*Hq\\*M \\+ 1 = {rows + 1} entries"):
        selected_attention(q, k, v, indptr[:-1], indices, kind="softmax")
    with pytest.raises(ValueError, match="indptr must have shape"):
        selected_attention(q, k, v, indptr[None], indices, kind="softmax")
    with pytest.raises(ValueError, match="indices must have shape"):
        selected_attention(q, k, v, indptr, indices[None], kind="softmax")
    with pytest.raises(ValueError, match="kind must be 'softmax' or 'relu'"):
        selected_attention(q, k, v, indptr, indices, kind="sparsemax")
    with pytest.raises(ValueError, match="alpha must be an integer >= 1"):
        selected_attention(q, k, v, indptr, indices, kind="relu", alpha=0)
    with pytest.raises(ValueError, match="head dim mismatch"):
        selected_attention(q, k[..., :8], v[..., :8], indptr, indices, kind="softmax")


def test_selected_still_accepts_mixed_dtypes(device):
    # the selected-entry kernel upcasts q, k and v itself: no shared dtype is required
    q, k, v = _qkv(M=1, N=20)
    rows = q.shape[1]
    indptr = torch.tensor([0, 3, 5], dtype=torch.int64)
    indices = torch.tensor([0, 4, 9, 1, 19], dtype=torch.int32)
    out = selected_attention(q.float().to(device), k.to(device), v.to(device), indptr.to(device),
                             indices.to(device), kind="softmax")
    assert out.shape == (1, rows, 1, 16) and out.dtype == torch.float32


def test_check_helpers():
    assert check_kind("softmax") == 0 and check_kind("relu") == 1
    assert check_alpha(3) == 3 and check_alpha(2.0) == 2
    with pytest.raises(ValueError, match="kind"):
        check_kind(None)
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(-1)


# ------------------------------------------------------------------ build_index / hsr_decode
def test_build_index_bad_arguments():
    _, k, v = _qkv(N=40, D=32)
    with pytest.raises(ValueError, match="block must be one of"):
        build_index(k, v, block_size=24)
    with pytest.raises(ValueError, match="n_sub must be a power of two dividing the head dim 32"):
        build_index(k, v, block_size=16, n_sub=3)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        build_index(k, v[:, :, :10], block_size=16, n_sub=4)
    with pytest.raises(ValueError, match="k must have shape"):
        build_index(k[0], v, block_size=16, n_sub=4)
    with pytest.raises(ValueError, match="method must be 'kmeans', 'pca' or 'none'"):
        build_index(k, v, block_size=16, n_sub=4, method="lsh")


def test_hsr_decode_bad_arguments():
    q, k, v = _qkv(Hq=2, Hkv=1, M=1, N=40, D=32)
    index = build_index(k, v, block_size=16, n_sub=4, method="none")
    with pytest.raises(ValueError, match="kind must be"):
        hsr_decode(q, index, tau=0.0, kind="relu2")
    with pytest.raises(ValueError, match="give tau or top_fraction"):
        hsr_decode(q, index, kind="softmax")
    with pytest.raises(ValueError, match="mode must be"):
        hsr_decode(q, index, tau=0.0, mode="eager", kind="softmax")
    with pytest.raises(ValueError, match="mode='planned'"):
        hsr_decode(q, index, tau=0.0, mode="planned", exact_set=True, kind="softmax")
    with pytest.raises(TypeError, match="share a dtype"):
        hsr_decode(q.float(), index, tau=0.0, kind="softmax")
    with pytest.raises(ValueError, match="head dim mismatch"):
        hsr_decode(q[..., :16], index, tau=0.0, kind="softmax")
    big = torch.zeros(1, 2, 65, 32, dtype=q.dtype)  # G * M = 130 rows > 128
    with pytest.raises(ValueError, match="at most 128 rows"):
        hsr_decode(big, index, tau=0.0, mode="fused", kind="softmax")
    with pytest.raises(ValueError, match="batch mismatch"):
        index.plan(torch.zeros(2, 2, 1, 32, dtype=q.dtype), 0.0)


# ------------------------------------------------------------------ SearchPlan
def test_search_plan_is_a_frozen_dataclass(device):
    q, k, v = _qkv(Hq=2, Hkv=1, M=1, N=40, D=32)
    index = build_index(k.to(device), v.to(device), block_size=16, n_sub=4, method="none")
    plan = index.plan(q.to(device), 0.0)
    assert isinstance(plan, SearchPlan) and not plan.per_row
    assert plan.union_num_blocks.shape == (1, 1, 1) and plan.union_num_blocks.dtype == torch.int32
    assert plan.union_indices.shape == (1, 1, 1, index.num_blocks)
    assert plan.kv_indices is None and plan.flags is None
    with pytest.raises(Exception):
        plan.union_indices = None  # frozen
    full = index.plan(q.to(device), 0.0, per_row=True)
    assert full.per_row and full.kv_num_blocks.shape == (1, 2, 1)
    assert full.kv_indices.shape == full.flags.shape == (1, 2, 1, index.num_blocks)
    # a plan is a SearchPlan, not a dict or a list
    as_dict = {"union_num_blocks": plan.union_num_blocks, "union_indices": plan.union_indices}
    for bad in (as_dict, [plan.union_num_blocks, plan.union_indices]):
        with pytest.raises(TypeError, match="SearchPlan"):
            index.run(q.to(device), bad)
        with pytest.raises(TypeError, match="SearchPlan"):
            index.range_search(q.to(device), 0.0, plan=bad)


def test_kind_must_be_given_to_the_kernels(device):
    # one default kind in the library (hsr_attention's "relu"): the Triton functions take kind
    # explicitly
    q, k, v = _qkv()
    indptr = torch.tensor([0] + [3] * (q.shape[0] * q.shape[1] * q.shape[2]), dtype=torch.int64).cumsum(0)
    indices = torch.arange(3, dtype=torch.int32).repeat(q.shape[0] * q.shape[1] * q.shape[2])
    args = (q.to(device), k.to(device), v.to(device), indptr.to(device), indices.to(device))
    with pytest.raises(TypeError, match="kind"):
        selected_attention(*args)
    index = build_index(k.to(device), v.to(device), block_size=16, n_sub=4, method="none")
    with pytest.raises(TypeError, match="kind"):
        hsr_decode(q[:, :, :1].to(device), index, tau=0.0)


# ------------------------------------------------------------------ CPU tensors, no interpreter
def test_cpu_tensors_without_the_interpreter_name_the_fix(monkeypatch):
    # the tests run with TRITON_INTERPRET=1 (no GPU): switch the interpreter check off so every
    # public entry point sees what a CPU user without it sees, and must say how to fix it
    from hsr.kernels import GPUCodeIndex, merge_partials, relu_prefill
    from hsr.kernels import _compat

    q, k, v = _qkv(Hq=2, Hkv=1, M=1, N=40, D=32)
    # the index itself is built where kernels can run (the GPU, or the interpreter on the CPU)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    index = build_index(k.to(dev), v.to(dev), block_size=16, n_sub=4, method="none")
    monkeypatch.setattr(_compat, "interpreting", lambda: False)
    fix = r"on the CPU.*Move the tensors to CUDA.*set TRITON_INTERPRET=1 before importing hsr.kernels"
    nkv, idx = full_lists(1, 1, 1, 3)
    indptr = torch.zeros(3, dtype=torch.int32)
    calls = {
        "block_sparse_attention": lambda: block_sparse_attention(q, k, v, nkv, idx, block_size=16),
        "selected_attention": lambda: selected_attention(q, k, v, indptr, torch.zeros(0, dtype=torch.int32),
                                                         kind="softmax"),
        "relu_prefill": lambda: relu_prefill(q, k, v, alpha=2, bias=0.0),
        "build_index": lambda: build_index(k, v, block_size=16, n_sub=4, method="none"),
        "hsr_decode": lambda: hsr_decode(q, index, tau=0.0, kind="softmax"),
        "GPUBlockIndex": lambda: index.plan(q, 0.0),
        "GPUCodeIndex": lambda: GPUCodeIndex(k[0, 0].float()),
        "merge_partials": lambda: merge_partials(torch.zeros(2, 2, 32), torch.zeros(2, 2),
                                                 torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1), 1),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match=where.replace(".", r"\.") + ": .*" + fix):
            call()


def test_merge_partials_refuses_what_it_would_read_or_write_out_of_bounds():
    from hsr.kernels import merge_partials

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
    ok = dict(o_part=z(3, 4, 32), lse_part=z(3, 4), out=z(1, 2, 2, 32), lse=z(1, 2, 2), M=2)
    lens = torch.zeros(2, dtype=torch.int32, device=dev)
    merge_partials(**ok, advance=(lens, 1, 8, 1))  # (1, 2 heads, 2 rows) and 2 kv heads: fine
    assert lens.tolist() == [1, 1]
    bad = [(dict(lse_part=z(3, 5)), "o_part must be"), (dict(o_part=z(3, 4, 32, dt=torch.float16)), "float32"),
           (dict(out=z(1, 2, 3, 32)), "out must be"), (dict(M=1), "does not match"),
           (dict(out=z(1, 2, 2, 64)), "does not match"), (dict(out=z(1, 2, 2, 64)[..., ::2]), "unit last stride"),
           (dict(o_part=z(3, 4, 24), out=z(1, 2, 2, 24)), "power of two"),
           (dict(lse_part=z(4, 3).t()), "contiguous")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            merge_partials(**{**ok, **change})
    for advance in ((lens.long(), 1, 8, 1), (lens, -1, 8, 1), (lens, 1, 8, 3), (lens[:1], 1, 8, 1)):
        with pytest.raises(ValueError, match="advance must be"):
            merge_partials(**ok, advance=advance)

"""Kernels fuzzed against the dense references (hypothesis): odd sizes that are not multiples
of the tiles, empty selections and all-masked rows, duplicates, GQA, fp16/bf16/fp32 inputs at
extreme magnitudes. Runs under the Triton interpreter on the CPU (few, small examples) and
compiled on a GPU."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from hsr.kernels import block_sparse_attention, selected_attention  # noqa: E402
from hsr.testing.references import block_sparse_reference, rel_err, selected_reference  # noqa: E402

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-4}
DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
SETTINGS = dict(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _qkv(B, Hq, Hkv, M, N, D, dtype, magnitude, gen, device):
    q = torch.randn(B, Hq, M, D, generator=gen) * magnitude
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen) * magnitude
    return (x.to(dtype).to(device) for x in (q, k, v))


def _finite_ref(ref):
    return torch.isfinite(ref).all()


@settings(**SETTINGS)
@given(B=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), Hkv=st.integers(1, 2), M=st.integers(1, 5),
       N=st.integers(1, 90), D=st.sampled_from([16, 32, 64]), dtype=DTYPES, kind=st.sampled_from(["softmax", "relu"]),
       magnitude=st.sampled_from([1e-3, 1.0, 30.0]), dup=st.booleans(), seed=st.integers(0, 2**16))
def test_selected_fuzz(device, B, G, Hkv, M, N, D, dtype, kind, magnitude, dup, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq = G * Hkv
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, dtype, magnitude, gen, device)
    rows = B * Hq * M
    lens = torch.randint(0, N + 1, (rows,), generator=gen)
    lens[torch.randint(0, rows, (1,), generator=gen)] = 0  # at least one empty selection
    parts = [torch.randint(0, N, (n,), generator=gen) if dup else torch.randperm(N, generator=gen)[:n]
             for n in lens.tolist()]
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = lens.cumsum(0)
    indices = torch.cat(parts).to(torch.int32)
    bias = 0.1 * magnitude
    out, lse = selected_attention(q, k, v, indptr.to(device), indices.to(device), kind=kind, bias=bias,
                                  return_lse=True)
    ref, ref_lse = selected_reference(q, k, v, indptr, indices, kind=kind, bias=bias)
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) <= TOL[dtype] * (10 if kind == "relu" else 1)
    empty = lens.view(B, Hq, M) == 0
    assert (out[empty.to(out.device)] == 0).all()
    assert torch.isneginf(lse[empty.to(lse.device)]).all()


@settings(**SETTINGS)
@given(B=st.integers(1, 2), G=st.sampled_from([1, 2]), Hkv=st.integers(1, 2), M=st.integers(1, 40),
       extra=st.integers(0, 60), block=st.sampled_from([16, 32]), D=st.sampled_from([16, 32]), dtype=DTYPES,
       causal=st.booleans(), magnitude=st.sampled_from([1e-2, 1.0, 20.0]), seed=st.integers(0, 2**16))
def test_block_sparse_fuzz(device, B, G, Hkv, M, extra, block, D, dtype, causal, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    N = M + extra  # queries are the last M positions
    Hq = G * Hkv
    q, k, v = _qkv(B, Hq, Hkv, M, N, D, dtype, magnitude, gen, device)
    nkb = -(-N // block)
    R = nkb  # one list row per query block of the whole sequence
    num = torch.randint(0, nkb + 1, (B, Hq, R), generator=gen, dtype=torch.int32)
    num[0, 0, -1] = 0  # an empty list: all-masked rows
    idx = torch.stack([torch.randperm(nkb, generator=gen) for _ in range(B * Hq * R)]).view(B, Hq, R, nkb)
    idx = idx.to(torch.int32)
    out = block_sparse_attention(q, k, v, num.to(device), idx.to(device), block_size=block, causal=causal,
                                 block_m=16, block_n=16)
    ref, _ = block_sparse_reference(q, k, v, num, idx, block_size=block, causal=causal)
    assert torch.isfinite(out).all()
    ref = torch.nan_to_num(ref.float())  # the reference's all-masked rows are NaN; the kernel's zeros
    assert rel_err(out.float(), ref) <= TOL[dtype]

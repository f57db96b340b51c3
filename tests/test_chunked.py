import pytest
import torch

from mamba2 import ssd_chunked, ssd_scan
from oracle import naive_ssd, random_inputs, rel_err

Q = 8
LENGTHS = [1, 7, Q - 1, Q, Q + 1, 3 * Q + 5]


@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("chunk_size", [Q, 3])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_oracle(l, chunk_size, h, g, init):
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=init)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_chunked(X, A, B, C, chunk_size, s0)
    assert Y.dtype == s.dtype == torch.float64
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    f32 = lambda t: None if t is None else t.float()
    Y, s = ssd_chunked(*map(f32, (X, A, B, C)), chunk_size, f32(s0))
    assert Y.dtype == s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    X, A, B, C, s0 = random_inputs(l=37, initial_states=True)
    Y_ref, s_ref = ssd_scan(X, A, B, C, s0)
    Y, s = ssd_chunked(X, A, B, C, chunk_size, s0)
    assert rel_err(Y, Y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_half_precision_inputs_keep_float32_state():
    X, A, B, C, s0 = random_inputs(l=45, initial_states=True)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    for dt in (torch.bfloat16, torch.float16):
        Y, s = ssd_chunked(X.to(dt), A.float(), B.to(dt), C.to(dt), 16, s0.float())
        assert Y.dtype == dt and s.dtype == torch.float32
        assert rel_err(Y, Y_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2


@pytest.mark.parametrize("split", [1, 8, 13, 40])
def test_split_anywhere_carries_state(split):
    X, A, B, C, s0 = random_inputs(l=41, initial_states=True)
    Y, s = ssd_chunked(X, A, B, C, 8, s0)
    Y1, m = ssd_chunked(X[:, :split], A[:, :split], B[:, :split], C[:, :split], 8, s0)
    Y2, s2 = ssd_chunked(X[:, split:], A[:, split:], B[:, split:], C[:, split:], 8, m)
    assert rel_err(torch.cat([Y1, Y2], 1), Y) < 1e-12 and rel_err(s2, s) < 1e-12


def test_length_zero_returns_initial_state():
    X, A, B, C, s0 = random_inputs(l=0, initial_states=True)
    Y, s = ssd_chunked(X, A, B, C, 4, s0)
    assert Y.shape == (2, 0, 4, 8) and torch.equal(s, s0)


def test_float32_long_sequence_is_stable():
    "65,536 steps with Mamba-2-like decays: float32 stays finite and within 1e-4 of float64."
    X, A, B, C, s0 = random_inputs(b=1, l=65536, h=2, p=4, g=1, n=8, initial_states=True, seed=1)
    Y64, s64 = ssd_chunked(X, A, B, C, 64, s0)
    Y32, s32 = ssd_chunked(X.float(), A.float(), B.float(), C.float(), 64, s0.float())
    assert torch.isfinite(Y32).all() and torch.isfinite(s32).all()
    assert rel_err(Y32, Y64) < 1e-4 and rel_err(s32, s64) < 1e-4
    assert rel_err(Y64[:, :2000], naive_ssd(*(t[:, :2000] for t in (X, A, B, C)), s0)[0]) < 1e-10


def test_segment_sums_as_precise_as_the_masked_cumsum():
    "chunk_decays: exp(segsum) below the diagonal; from float64 sums, in float32 as precise as chapter 2's segsum, from float32 sums far worse."
    from mamba2 import segsum
    from mamba2.chunked import chunk_decays, chunk_cumsum
    A = random_inputs(b=1, l=256, h=4, p=1, g=1, n=1, seed=3)[1].transpose(1, 2) * 8   # (b, h, l), strong decays
    exact, S = torch.exp(segsum(A)), chunk_cumsum(A)
    assert torch.allclose(chunk_decays(S, torch.float64).tril(), exact, rtol=1e-12, atol=1e-300)
    err = lambda L: (L.double().tril() - exact).abs().max().item()
    stable, ours, cheap = err(torch.exp(segsum(A.float()))), err(chunk_decays(S, torch.float32)), err(chunk_decays(S.float(), torch.float32))
    assert ours < 2 * stable and cheap > 5 * ours


def test_no_subnormal_decays():
    "On a CPU exponents are floored at log(tiny / eps): L holds no subnormal number, and the floor changes nothing visible."
    from mamba2.chunked import chunk_decays, chunk_cumsum
    A = -torch.rand(1, 3, 128) * 4                                       # segment sums down to about -500
    for dtype in (torch.float32, torch.float64):
        L = chunk_decays(chunk_cumsum(A.to(dtype)), dtype)
        assert not ((L > 0) & (L < torch.finfo(dtype).tiny)).any() and torch.isfinite(L).all()
    X, A, B, C, s0 = random_inputs(l=300, h=4, g=2, initial_states=True, seed=2)
    A = A * 40                                                           # most decays far below the floor
    Y, s = ssd_chunked(X, A, B, C, 64, s0)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_inference_mode_gives_the_same_result():
    "Without autograd the scores are written in one pass (into L's memory when the dtypes match): bit for bit the autograd path's result."
    X, A, B, C, s0 = random_inputs(l=300, h=4, g=2, initial_states=True, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype).requires_grad_() for t in (X, B, C)]
        Y, s = ssd_chunked(args[0], A.float(), args[1], args[2], 128, s0.float())
        with torch.no_grad():
            Y2, s2 = ssd_chunked(args[0], A.float(), args[1], args[2], 128, s0.float())
        # bit for bit on any machine: the two paths differ only in where elementwise products are
        # written (in place, or into an out= tensor), not in what is computed or summed
        assert Y.requires_grad and torch.equal(Y.detach(), Y2) and torch.equal(s.detach(), s2)


@pytest.mark.parametrize("l", [1, 7, 23, 49])
@pytest.mark.parametrize("chunk_size, block", [(8, 4), (8, 2), (12, 3), (12, 12)])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4)])
def test_blocks_inside_chunks_match_oracle(l, chunk_size, block, h, g, monkeypatch):
    "Chunks cut into diagonal blocks and the blocks below them: the oracle's result, float64 and float32."
    import mamba2.chunked
    monkeypatch.setattr(mamba2.chunked, "SUB_BLOCK", block)
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=True, seed=l + block)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_chunked(X, A, B, C, chunk_size, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    Y, s = ssd_chunked(X.float(), A.float(), B.float(), C.float(), chunk_size, s0.float())
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_scores_budget_changes_nothing(monkeypatch):
    "Diagonal blocks built a chunk at a time (a tiny budget) or all at once: the same numbers."
    import mamba2.chunked
    monkeypatch.setattr(mamba2.chunked, "SUB_BLOCK", 4)
    X, A, B, C, s0 = random_inputs(l=100, h=4, g=2, initial_states=True, seed=8)
    Y, s = ssd_chunked(X, A, B, C, 16, s0)
    monkeypatch.setattr(mamba2.chunked, "SCORES_MEMORY", 1)
    Y1, s1 = ssd_chunked(X, A, B, C, 16, s0)
    # one batched product over all chunks vs one per chunk: another batch count, which a library
    # may sum in another order; float64, so the two agree to ~1e-16 of the result's size
    assert rel_err(Y1, Y) < 1e-13 and rel_err(s1, s) < 1e-13


def test_gradcheck_blocks_inside_chunks(monkeypatch):
    import mamba2.chunked
    monkeypatch.setattr(mamba2.chunked, "SUB_BLOCK", 2)
    X, A, B, C, s0 = random_inputs(b=1, l=7, h=2, g=1, p=2, n=2, initial_states=True, seed=9)
    args = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
    assert torch.autograd.gradcheck(lambda X, A, B, C, s0: ssd_chunked(X, A, B, C, 6, s0), args)


@pytest.mark.parametrize("l, chunk_size", [(1300, 64), (1025, 256), (700, 600), (513, 1)])
def test_cpu_segments_change_nothing(l, chunk_size, monkeypatch):
    "On a CPU long sequences run in segments of about 512 tokens: the same result as one piece, and as the oracle."
    import mamba2.chunked
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=4, g=2, p=3, n=5, initial_states=True, seed=l)
    Y, s = ssd_chunked(X, A, B, C, chunk_size, s0)
    monkeypatch.setattr(mamba2.chunked, "CPU_SEGMENT_TOKENS", 1 << 20)
    Y1, s1 = ssd_chunked(X, A, B, C, chunk_size, s0)
    assert rel_err(Y, Y1) < 1e-12 and rel_err(s, s1) < 1e-12
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


@pytest.mark.parametrize("l, chunk_size, h, g, sub_block", [(37, 8, 4, 2, 2), (49, 12, 4, 4, 2), (300, 256, 4, 1, 64)])
def test_compiled_path_matches_oracle(l, chunk_size, h, g, sub_block, monkeypatch):
    "Under torch.compile (one graph): blocks of 2 * SUB_BLOCK, the earlier ones added as padded terms; the oracle's result."
    import mamba2.chunked
    monkeypatch.setattr(mamba2.chunked, "SUB_BLOCK", sub_block)   # compiled: 2, 3 and 2 blocks per chunk
    torch._dynamo.reset()
    compiled = torch.compile(ssd_chunked, fullgraph=True, dynamic=False)
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=True, seed=l)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = compiled(X, A, B, C, chunk_size, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    half = (X.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), chunk_size, s0.float())
    (Y, s), (Y_eager, s_eager) = compiled(*half), ssd_chunked(*half)
    assert Y.dtype == torch.bfloat16 and rel_err(Y, Y_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2
    assert rel_err(Y, Y_eager) < 1e-2 and rel_err(s, s_eager) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on one by benchmarks/run_gpu.sh)")
@pytest.mark.parametrize("chunk_size, g, strong", [(64, 2, False), (256, 1, False), (256, 2, True)])
def test_gpu_path_matches_oracle(chunk_size, g, strong):
    "On a GPU: -inf above the diagonal and no floor, the whole sequence at once; eager and compiled, the oracle's result."
    X, A, B, C, s0 = random_inputs(b=2, l=701, h=4, g=g, p=8, n=16, initial_states=True, seed=chunk_size + g)
    A = A * 40 if strong else A                                          # most decays below float32's floor
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    torch._dynamo.reset()
    compiled = torch.compile(ssd_chunked, fullgraph=True, dynamic=False)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        args = [t.cuda() for t in (X.to(dtype), A.to(torch.promote_types(dtype, torch.float32)), B.to(dtype), C.to(dtype))]
        for ssd in (ssd_chunked, compiled):
            Y, s = ssd(*args, chunk_size, s0.cuda().to(args[1].dtype))
            assert Y.dtype == dtype and rel_err(Y.cpu(), Y_ref) < tol and rel_err(s.cpu(), s_ref) < tol, (dtype, ssd)


def test_gradcheck_with_initial_states():
    X, A, B, C, s0 = random_inputs(b=1, l=5, h=2, g=1, p=2, n=2, initial_states=True)
    args = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
    assert torch.autograd.gradcheck(lambda X, A, B, C, s0: ssd_chunked(X, A, B, C, 2, s0), args)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                               (True, TypeError), (None, TypeError), ("8", TypeError)])
def test_bad_chunk_size(chunk_size, error):
    X, A, B, C, _ = random_inputs(l=9)
    with pytest.raises(error, match=f"chunk_size must be a positive integer, got {chunk_size!r}"):
        ssd_chunked(X, A, B, C, chunk_size)


def test_mixed_devices():
    X, A, B, C, _ = random_inputs(l=9)
    with pytest.raises(ValueError, match="device"):
        ssd_chunked(X, A.to("meta"), B, C, 4)

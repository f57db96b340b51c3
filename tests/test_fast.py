"""What only chapter 8's tuned `ssd_fast` has: its segment sums, the floor on its exponents, blocks
inside chunks, scores built a bounded amount at a time, CPU segments, the path without autograd and
the compiled path. Each is checked against the float64 oracle or against the plain path."""

import pytest
import torch
from oracle import naive_ssd, random_inputs, rel_err

from mamba2 import segsum, ssd_chunked
from mamba2.decays import chunk_cumsum, chunk_decays
from mamba2.fast import ssd_fast


def test_segment_sums_as_precise_as_the_masked_cumsum():
    "From float64 sums, float32 decays as precise as chapter 2's segsum; from float32 sums, far worse."
    A = (
        random_inputs(b=1, l=256, h=4, p=1, g=1, n=1, seed=3)[1].transpose(1, 2) * 8
    )  # strong decays
    exact, S = torch.exp(segsum(A)), chunk_cumsum(A)
    assert torch.allclose(
        chunk_decays(S, torch.float64).tril(), exact, rtol=1e-12, atol=1e-300
    )
    err = lambda L: (L.double().tril() - exact).abs().max().item()
    stable, ours = (
        err(torch.exp(segsum(A.float()))),
        err(chunk_decays(S, torch.float32)),
    )
    cheap = err(chunk_decays(S.float(), torch.float32))
    assert ours < 2 * stable and cheap > 5 * ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_subnormal_decays(dtype):
    "With the floor (a CPU's path), L holds no subnormal number and nothing that is not finite."
    A = -torch.rand(1, 3, 128) * 4  # segment sums down to about -500
    L = chunk_decays(chunk_cumsum(A.to(dtype)), dtype)
    assert (
        not ((L > 0) & (L < torch.finfo(dtype).tiny)).any() and torch.isfinite(L).all()
    )
    L = chunk_decays(
        chunk_cumsum(A.to(dtype)), dtype, floor=False
    )  # a GPU's: exact zeros above
    assert (L.triu(1) == 0).all() and torch.isfinite(L).all()


@pytest.mark.parametrize("l", [1, 7, 23, 49])
@pytest.mark.parametrize(
    "chunk_size, block", [(8, 4), (8, 2), (12, 3), (12, 12), (12, 5)]
)
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4)])
def test_blocks_inside_chunks_match_oracle(l, chunk_size, block, h, g):
    X, A, B, C, s0 = random_inputs(
        b=2, l=l, h=h, g=g, p=3, n=5, initial_states=True, seed=l + block
    )
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_fast(X, A, B, C, chunk_size, s0, block=block)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    Y, s = ssd_fast(
        X.float(), A.float(), B.float(), C.float(), chunk_size, s0.float(), block=block
    )
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_scores_budget_changes_nothing():
    "Diagonal blocks built a chunk at a time (a tiny budget) or all at once: the same numbers."
    X, A, B, C, s0 = random_inputs(l=100, h=4, g=2, initial_states=True, seed=8)
    Y, s = ssd_fast(X, A, B, C, 16, s0, block=4)
    Y1, s1 = ssd_fast(X, A, B, C, 16, s0, block=4, scores_memory=1)
    # one batched product over all chunks vs one per chunk: another batch count, which a library
    # may sum in another order; float64, so the two agree to ~1e-16 of the result's size
    assert rel_err(Y1, Y) < 1e-13 and rel_err(s1, s) < 1e-13


@pytest.mark.parametrize(
    "l, chunk_size", [(1300, 64), (1025, 256), (700, 600), (513, 1)]
)
def test_cpu_segments_change_nothing(l, chunk_size):
    "On a CPU long sequences run in segments: the result of one piece, and the oracle's."
    X, A, B, C, s0 = random_inputs(
        b=2, l=l, h=4, g=2, p=3, n=5, initial_states=True, seed=l
    )
    Y, s = ssd_fast(X, A, B, C, chunk_size, s0)
    Y1, s1 = ssd_fast(X, A, B, C, chunk_size, s0, cpu_segment=1 << 20)
    assert rel_err(Y, Y1) < 1e-12 and rel_err(s, s1) < 1e-12
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_without_autograd_the_same_result():
    "Without autograd the scores are written in one pass, in place: the autograd path's numbers."
    X, A, B, C, s0 = random_inputs(l=300, h=4, g=2, initial_states=True, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype).requires_grad_() for t in (X, B, C)]
        Y, s = ssd_fast(args[0], A.float(), args[1], args[2], 128, s0.float())
        with torch.no_grad():
            Y2, s2 = ssd_fast(args[0], A.float(), args[1], args[2], 128, s0.float())
        # bit for bit on any machine: the two paths differ only in where elementwise products are
        # written (in place, or into an out= tensor), not in what is computed or summed
        assert (
            Y.requires_grad
            and torch.equal(Y.detach(), Y2)
            and torch.equal(s.detach(), s2)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_against_plain(dtype):
    "ssd_fast against chapter 4's ssd_chunked on the same inputs, at a size with several blocks."
    X, A, B, C, s0 = random_inputs(
        b=2, l=700, h=4, g=2, p=8, n=16, initial_states=True, seed=11
    )
    args = (X.to(dtype), A.float(), B.to(dtype), C.to(dtype), 256, s0.float())
    (Y, s), (Y_plain, s_plain) = ssd_fast(*args), ssd_chunked(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16 products round to 8 bits
    assert rel_err(Y, Y_plain) < tol and rel_err(s, s_plain) < tol


def test_gradcheck_blocks_inside_chunks():
    X, A, B, C, s0 = random_inputs(
        b=1, l=7, h=2, g=1, p=2, n=2, initial_states=True, seed=9
    )
    args = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
    assert torch.autograd.gradcheck(
        lambda X, A, B, C, s0: ssd_fast(X, A, B, C, 6, s0, block=2), args
    )


@pytest.mark.parametrize(
    "l, chunk_size, h, g, block",
    [(49, 12, 4, 4, 2), (300, 256, 4, 1, 64)],
)
def test_compiled_path_matches_oracle(l, chunk_size, h, g, block):
    "Under torch.compile (one graph): blocks of 2 * block, the earlier ones added as padded terms."
    torch._dynamo.reset()
    compiled = torch.compile(ssd_fast, fullgraph=True, dynamic=False)
    X, A, B, C, s0 = random_inputs(
        b=2, l=l, h=h, g=g, p=3, n=5, initial_states=True, seed=l
    )
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = compiled(X, A, B, C, chunk_size, s0, block=block)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    half = (X.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), chunk_size, s0.float())
    (Y, s), (Y_eager, s_eager) = (
        compiled(*half, block=block),
        ssd_fast(*half, block=block),
    )
    assert (
        Y.dtype == torch.bfloat16
        and rel_err(Y, Y_ref) < 3e-2
        and rel_err(s, s_ref) < 3e-2
    )
    assert rel_err(Y, Y_eager) < 1e-2 and rel_err(s, s_eager) < 1e-2

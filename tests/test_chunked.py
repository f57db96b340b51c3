"""The SSD contract, for every implementation behind the front door `ssd(..., impl=...)`: chapter 4's
plain `ssd_chunked` and chapter 8's tuned `ssd_fast`, each against the float64 oracle."""

import re

import pytest
import torch
from isolated import INTERPRETED, KERNELS_DEVICE
from oracle import naive_ssd, random_inputs, rel_err

from mamba2 import IMPLEMENTATIONS, ssd_scan
from mamba2 import ssd as front_door

Q = 8
LENGTHS = [1, 7, Q - 1, Q, Q + 1, 3 * Q + 5]
IMPLS = sorted(IMPLEMENTATIONS) + ["auto"]


def ssd(X, A, B, C, chunk_size, initial_states=None, impl="auto"):
    """The front door. Chapter 9's kernels run CPU tensors only in Triton's interpreter,
    which conftest.py switches on where there is no GPU: with a GPU, the kernels get the
    CPU inputs on the GPU, and the results come back."""
    inputs = (X, A, B, C, initial_states)
    cpu = all(t is None or t.device.type == "cpu" for t in inputs)
    if impl != "triton" or INTERPRETED or not cpu:
        return front_door(X, A, B, C, chunk_size, initial_states, impl)
    X, A, B, C, s0 = (None if t is None else t.to(KERNELS_DEVICE) for t in inputs)
    Y, final = front_door(X, A, B, C, chunk_size, s0, impl)
    return Y.cpu(), final.cpu()


def f32(t):
    return None if t is None else t.float()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("chunk_size", [Q, 3])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("init", [False, True])
def test_matches_oracle(impl, l, chunk_size, h, g, init):
    if impl == "triton" and INTERPRETED and chunk_size == 3:
        if (l, g, init) != (3 * Q + 5, 2, True):  # one case of many tiny chunks
            pytest.skip("interpreted, many tiny chunks are slow: one such case is kept")
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=init)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd(X, A, B, C, chunk_size, s0, impl)
    assert Y.dtype == s.dtype == torch.float64
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    Y, s = ssd(*map(f32, (X, A, B, C)), chunk_size, f32(s0), impl)
    assert Y.dtype == s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64, 8192])
def test_chunk_size_does_not_change_the_result(impl, chunk_size):
    X, A, B, C, s0 = random_inputs(l=37, initial_states=True)
    Y_ref, s_ref = ssd_scan(X, A, B, C, s0)
    Y, s = ssd(X, A, B, C, chunk_size, s0, impl)
    assert rel_err(Y, Y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_float32_state(impl, dtype):
    X, A, B, C, s0 = random_inputs(l=45, initial_states=True)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd(X.to(dtype), A.float(), B.to(dtype), C.to(dtype), 16, s0.float(), impl)
    assert Y.dtype == dtype and s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, 8, 13, 40])
def test_split_anywhere_carries_state(impl, split):
    X, A, B, C, s0 = random_inputs(l=41, initial_states=True)
    Y, s = ssd(X, A, B, C, 8, s0, impl)
    Y1, m = ssd(X[:, :split], A[:, :split], B[:, :split], C[:, :split], 8, s0, impl)
    Y2, s2 = ssd(X[:, split:], A[:, split:], B[:, split:], C[:, split:], 8, m, impl)
    assert rel_err(torch.cat([Y1, Y2], 1), Y) < 1e-12 and rel_err(s2, s) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_length_zero_returns_initial_state(impl):
    X, A, B, C, s0 = random_inputs(l=0, initial_states=True)
    Y, s = ssd(X, A, B, C, 4, s0, impl)
    assert Y.shape == (2, 0, 4, 8) and torch.equal(
        s, s0
    )  # the state handed back, unchanged


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_long_sequence_is_stable(impl):
    "65,536 steps with Mamba-2-like decays: float32 stays finite and within 1e-4 of float64."
    # Triton's interpreter runs one program at a time: 4,096 steps there (minutes saved)
    interpreted = impl == "triton" and INTERPRETED
    X, A, B, C, s0 = random_inputs(
        b=1,
        l=4096 if interpreted else 65536,
        h=2,
        p=4,
        g=1,
        n=8,
        initial_states=True,
        seed=1,
    )
    Y64, s64 = ssd(X, A, B, C, 64, s0, impl)
    Y32, s32 = ssd(X.float(), A.float(), B.float(), C.float(), 64, s0.float(), impl)
    assert torch.isfinite(Y32).all() and torch.isfinite(s32).all()
    assert rel_err(Y32, Y64) < 1e-4 and rel_err(s32, s64) < 1e-4
    assert (
        rel_err(Y64[:, :2000], naive_ssd(*(t[:, :2000] for t in (X, A, B, C)), s0)[0])
        < 1e-10
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_strong_decays(impl):
    "Most decays far below float32's smallest normal number: still the oracle's result."
    X, A, B, C, s0 = random_inputs(l=300, h=4, g=2, initial_states=True, seed=2)
    A = A * 40
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd(X, A, B, C, 64, s0, impl)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    Y, s = ssd(*map(f32, (X, A, B, C)), 64, f32(s0), impl)
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("l", [5, 6])  # a part chunk at the end; whole chunks only
def test_gradcheck_with_initial_states(impl, l):
    X, A, B, C, s0 = random_inputs(b=1, l=l, h=2, g=1, p=2, n=2, initial_states=True)
    args = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
    # the kernels' backward is four interpreted forward runs: one random direction for them
    assert torch.autograd.gradcheck(
        lambda X, A, B, C, s0: ssd(X, A, B, C, 2, s0, impl),
        args,
        fast_mode=impl == "triton",
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "chunk_size, error",
    [
        (0, ValueError),
        (-3, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        (None, TypeError),
        ("8", TypeError),
    ],
)
def test_bad_chunk_size(impl, chunk_size, error):
    X, A, B, C, _ = random_inputs(l=9)
    with pytest.raises(
        error, match=f"chunk_size must be a positive integer, got {chunk_size!r}"
    ):
        ssd(X, A, B, C, chunk_size, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_devices(impl):
    X, A, B, C, _ = random_inputs(l=9)
    with pytest.raises(ValueError, match="device"):
        ssd(X, A.to("meta"), B, C, 4, impl=impl)


@pytest.mark.parametrize("impl", ["", "triton?", None, "Fast"])
def test_unknown_implementation(impl):
    X, A, B, C, _ = random_inputs(l=9)
    with pytest.raises(
        ValueError, match=f"impl must be 'auto' or one of .*got {re.escape(repr(impl))}"
    ):
        ssd(X, A, B, C, 4, impl=impl)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (run on one by benchmarks/run_gpu.sh)",
)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "chunk_size, g, strong", [(64, 2, False), (256, 1, False), (256, 2, True)]
)
def test_gpu_matches_oracle(impl, chunk_size, g, strong):
    "On a GPU (for ssd_fast: -inf above the diagonal and no floor, the whole sequence at once)."
    X, A, B, C, s0 = random_inputs(
        b=2, l=701, h=4, g=g, p=8, n=16, initial_states=True, seed=chunk_size + g
    )
    A = A * 40 if strong else A
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    for dtype, tol in (
        (torch.float64, 1e-10),
        (torch.float32, 1e-5),
        (torch.bfloat16, 3e-2),
    ):
        wide = torch.promote_types(dtype, torch.float32)
        args = [t.cuda() for t in (X.to(dtype), A.to(wide), B.to(dtype), C.to(dtype))]
        Y, s = ssd(*args, chunk_size, s0.cuda().to(wide), impl)
        assert (
            Y.dtype == dtype
            and rel_err(Y.cpu(), Y_ref) < tol
            and rel_err(s.cpu(), s_ref) < tol
        ), dtype

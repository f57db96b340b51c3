"""Chapter 9's kernels behind the front door: what the SSD contract tests (tests/test_chunked.py, run
for every implementation) do not cover. Without a GPU the kernels run in Triton's interpreter, on CPU
tensors; with one, on the GPU (the oracle too, in float64)."""

import pytest
import torch
from isolated import KERNELS_DEVICE, KERNELS_RUN, NO_KERNELS, run_without_triton
from oracle import naive_ssd

from mamba2 import IMPLEMENTATIONS, Mamba2, Mamba2Config, ssd
from mamba2.scan import random_ssd_inputs, rel_err

pytestmark = [
    pytest.mark.skipif("triton" not in IMPLEMENTATIONS, reason="needs Triton (Linux)"),
    pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS),
]


def on_kernels_device(**kwargs):
    "random_ssd_inputs on the kernels' device."
    return [
        t if t is None else t.to(KERNELS_DEVICE) for t in random_ssd_inputs(**kwargs)
    ]


def test_the_package_imports_and_runs_without_triton():
    out = run_without_triton(
        "import torch, mamba2\n"
        "assert 'triton' not in mamba2.IMPLEMENTATIONS\n"
        "X, A, B, C, s0 = mamba2.random_ssd_inputs(l=9)\n"
        "print(mamba2.ssd(X, A, B, C, 4)[0].shape)\n"
    )
    assert "torch.Size([2, 9, 4, 8])" in out


def test_dt_folded_in_is_x_times_dt():
    "dt given: the kernels multiply it in, in float32; the oracle gets x dt in float64."
    from mamba2.triton_ssd import ssd_triton

    X, A, B, C, s0 = on_kernels_device(l=30, initial_states=True)
    dt = torch.rand(X.shape[:3], dtype=X.dtype, device=X.device)
    Y, s = ssd_triton(X, A, B, C, 8, s0, dt=dt)
    Y_ref, s_ref = naive_ssd(X * dt[..., None], A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("l", [50, 64])
def test_gradients_with_dt_of_zeros_and_negative_values(l):
    """The backward pass divides `x . dx` by `dt` for `dt`'s gradient (its run scales rows by
    `dt`) and keeps `dt` off zero there: float64, against autograd through `ssd_chunked`.
    At 64 tokens, whole chunks: dA is summed chunk by chunk (`d_log_decays`)."""
    from mamba2 import ssd_chunked
    from mamba2.triton_ssd import ssd_triton

    X, A, B, C, s0 = on_kernels_device(l=l, g=2, initial_states=True)
    dt = torch.randn(
        X.shape[:3], dtype=X.dtype, generator=torch.Generator().manual_seed(1)
    ).to(X.device)
    dt[0, 3], dt[1, 10:12] = 0, 0
    grads = []
    for run in (ssd_triton, None):
        leaves = [t.clone().requires_grad_() for t in (X, A, B, C, s0, dt)]
        x, a, b, c, s, d = leaves
        if run is None:
            Y, S = ssd_chunked(x * d[..., None], a, b, c, 16, s)
        else:
            Y, S = run(x, a, b, c, 16, s, dt=d)
        (Y.square().sum() + S.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, mine, theirs in zip("X A B C s0 dt".split(), *grads):
        assert rel_err(mine, theirs) < 1e-12, (
            name
        )  # float64, one function differentiated


@pytest.mark.parametrize(
    "dt, error, match",
    [
        ("0.5", TypeError, "dt must be None or a floating-point tensor"),
        (torch.ones(2, 9, 4, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(2, 9, 3), ValueError, r"dt must have shape \(b, l, h\)"),
    ],
)
def test_bad_dt(dt, error, match):
    from mamba2.triton_ssd import ssd_triton

    X, A, B, C, _ = on_kernels_device(l=9)
    dt = dt.to(X.device) if isinstance(dt, torch.Tensor) else dt
    with pytest.raises(error, match=match):
        ssd_triton(X, A, B, C, 4, dt=dt)


def test_float64_with_a_triton_before_3_5_is_refused_by_name(monkeypatch):
    "Triton before 3.5 has no float64 matrix products: a clear error, not its assertion."
    from mamba2 import triton_ssd

    monkeypatch.setattr(triton_ssd, "FLOAT64_DOTS", False)
    X, A, B, C, _ = on_kernels_device(l=9)
    with pytest.raises(TypeError, match=r"float64 with Triton 3.5 or later.*installed"):
        triton_ssd.ssd_triton(X, A, B, C, 4)
    Y, _ = triton_ssd.ssd_triton(X.float(), A, B.float(), C.float(), 4)  # others run
    assert Y.dtype == torch.float32


def test_under_torch_compile_auto_on_a_cpu_runs_ssd_fast(monkeypatch):
    "On a CPU the kernels are interpreted: 'auto' picks the tuned PyTorch path, compiled too."
    calls = []
    fast = IMPLEMENTATIONS["fast"]
    spy = lambda *args: calls.append("fast") or fast(*args)
    monkeypatch.setitem(IMPLEMENTATIONS, "fast", spy)
    X, A, B, C, s0 = random_ssd_inputs(l=20, initial_states=True)
    Y_ref, _ = naive_ssd(X, A, B, C, s0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: ssd(*t, 8, s0)[0], backend="eager")
    assert rel_err(compiled(X, A, B, C), Y_ref) < 1e-12
    assert calls == ["fast"]  # traced once, through ssd_fast
    torch._dynamo.reset()


def test_under_torch_compile_the_kernels_are_one_node_of_one_graph():
    """fullgraph=True: no graph break at the kernels (they are custom operators). Dynamic
    lengths: a second length compiles nothing new. Against the float64 oracle, and the
    gradients against autograd through ssd_chunked (AOTAutograd traces the backward
    operator)."""
    X, A, B, C, s0 = on_kernels_device(l=40, g=2, initial_states=True)

    def run(X, A, B, C, s0):
        Y, final = ssd(X, A, B, C, 16, s0, impl="triton")
        return Y.square().sum() + final.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    for l in (40, 27):
        inputs = [t[:, :l].clone().requires_grad_() for t in (X, A, B, C)]
        inputs.append(s0.clone().requires_grad_())
        with torch.compiler.set_stance("fail_on_recompile" if l == 27 else "default"):
            out = compiled(*inputs)
        grads = torch.autograd.grad(out, inputs)
        Y_ref, final_ref = naive_ssd(*[t.detach() for t in inputs])
        ref = Y_ref.square().sum() + final_ref.square().sum()
        assert rel_err(out, ref) < 1e-12
        leaves = [t.detach().requires_grad_() for t in inputs]
        Y, final = ssd(*leaves[:4], 16, leaves[4], impl="chunked")
        grads_ref = torch.autograd.grad(Y.square().sum() + final.square().sum(), leaves)
        for name, g, g_ref in zip("X A B C s0".split(), grads, grads_ref):
            assert rel_err(g, g_ref) < 1e-10, (l, name)
    torch._dynamo.reset()


@pytest.mark.parametrize("with_dt", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_the_custom_operators_fake_results_match_the_real_ones(with_dt, initial):
    "torch.library.opcheck: schema, fake shapes, types and strides, autograd registration."
    from mamba2.triton_ssd import ssd_backward_op, ssd_forward_op

    X, A, B, C, s0 = on_kernels_device(
        l=19, g=2, initial_states=initial, dtype=torch.float32
    )
    dt = torch.rand(X.shape[:3], device=X.device) if with_dt else None
    args = (X, A, B, C, 8, s0, dt)
    torch.library.opcheck(ssd_forward_op, args, test_utils="test_faketensor")
    torch.library.opcheck(ssd_forward_op, args, test_utils="test_schema")
    dY, dfinal = torch.randn_like(X), torch.randn(2, 4, 8, 16, device=X.device)
    for test in ("test_faketensor", "test_schema"):
        torch.library.opcheck(ssd_backward_op, (*args, dY, dfinal), test_utils=test)


def suite_like_inputs(b=1, l=512, h=2, p=32, n=32):
    """bfloat16 `x, B, C, dY` and float32 `dt, a, s0` on the kernels' device, drawn as the GPU
    suite draws them: `dt` about 0.02, `a` from -1 to -16, so decays within a few chunks
    of 128."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, h, p, generator=gen).bfloat16()
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 4)
    a = -torch.empty(h).uniform_(1, 16, generator=gen)
    B, C = (torch.randn(b, l, 1, n, generator=gen).bfloat16() for _ in "BC")
    dY = torch.randn(b, l, h, p, generator=gen).bfloat16()
    s0 = torch.randn(b, h, p, n, generator=gen)
    return [t.to(KERNELS_DEVICE) for t in (x, dt, a, B, C, s0, dY)]


def test_bfloat16_gradients_with_dt_folded_in_are_as_close_as_with_x_dt_rounded_first():
    """The gradient of A (so of dt) is a difference of two sums whose largest terms (s = t)
    must cancel: the backward recomputes Y from x dt rounded as the run for dX rounds it.
    Baseline: the same kernels on x dt rounded to bfloat16 first (the front door's way)."""
    from mamba2.triton_ssd import ssd_triton

    Q = 128
    x, dt, a, B, C, s0, dY = suite_like_inputs()

    def dt_grad(run, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, B, C)]
        d = dt.to(torch.promote_types(dtype, torch.float32), copy=True).requires_grad_()
        Y, S = run(leaves[0], d, d * a.to(d.dtype), *leaves[1:])
        torch.autograd.backward((Y, S), (dY.to(Y.dtype), torch.zeros_like(S)))
        return d.grad

    exact = dt_grad(
        lambda x, d, A, B, C: ssd(x * d[..., None], A, B, C, Q), torch.float64
    )
    folded = dt_grad(
        lambda x, d, A, B, C: ssd_triton(x, A, B, C, Q, dt=d), torch.bfloat16
    )
    rounded = dt_grad(
        lambda x, d, A, B, C: ssd_triton(x * d[..., None].to(x.dtype), A, B, C, Q),
        torch.bfloat16,
    )
    assert rel_err(folded, exact) < 1.5 * rel_err(rounded, exact)


def test_bfloat16_final_state_and_its_gradient_are_near_float32_with_fast_decays():
    """Kernel 1 splits the last chunk's decayed inputs in two bfloat16 parts, and the
    backward pass's run (backward in time) the first chunk's: with the decays of the GPU
    suite's inputs, the final state and the initial state's gradient are mostly those
    chunks', so they come out near float32 (2.6e-6 and 3.2e-6 here) instead of
    bfloat16's rounding (3.6e-3 and 2.0e-3 with the split switched off)."""
    from mamba2.triton_ssd import ssd_triton

    Q = 128
    x, dt, a, B, C, s0, dY = suite_like_inputs()

    def final_and_grad(run, dtype):
        s = s0.to(torch.promote_types(dtype, torch.float32), copy=True)
        s.requires_grad_()
        d = dt.to(s.dtype)
        Y, S = run(*(t.to(dtype) for t in (x, B, C)), d, s)
        Y.backward(dY.to(Y.dtype))
        return S.detach(), s.grad

    exact = final_and_grad(
        lambda x, B, C, d, s: ssd(x * d[..., None], d * a.double(), B, C, Q, s),
        torch.float64,
    )
    kernels = final_and_grad(
        lambda x, B, C, d, s: ssd_triton(x, d * a, B, C, Q, s, dt=d), torch.bfloat16
    )
    assert rel_err(kernels[0], exact[0]) < 1e-4  # bfloat16 alone: about 2e-3
    assert rel_err(kernels[1], exact[1]) < 1e-4


def test_a_compiled_bfloat16_block_asking_for_the_kernels_matches_the_eager_block():
    """The case that went wrong with the kernels behind a graph break: bfloat16, the block
    compiled (Inductor), impl 'triton'. Now the kernels are one node of the compiled graph.
    Tolerance: bfloat16 outputs of two computations, a few units of 2^-8."""
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, d_state=16, headdim=16, chunk_size=32, impl="triton")
    block = Mamba2(cfg, dtype=torch.bfloat16).to(KERNELS_DEVICE)
    u = torch.randn(2, 100, 64, dtype=torch.bfloat16, device=KERNELS_DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(block, dynamic=True, fullgraph=True)
        assert rel_err(compiled(u), block(u)) < 2e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_sums_against_float64(reverse):
    """Kernel 1's first launch: heads in blocks (5 heads, blocks of 2: the last one cut),
    the last chunk short, `dt` read backward in time with `reverse` (`A` as given). The
    sums, totals and decays against float64 cumulative sums within each chunk."""
    from mamba2.triton_ssd import chunk_sums

    gen = torch.Generator().manual_seed(0)
    b, l, h, Q = 2, 37, 5, 16
    A = -torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 8
    dt = torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    A, dt = A.float().to(KERNELS_DEVICE), dt.float().to(KERNELS_DEVICE)
    sums, totals, to_end = chunk_sums(A, Q, dt, reverse, block=16, heads=2)
    a = torch.nn.functional.pad(A.double(), (0, 0, 0, 48 - l)).unflatten(1, (3, Q))
    running = a.cumsum(2)  # (b, c, Q, h), from each chunk's start
    tail = a.sum(2, keepdim=True) - running  # A_{s+1} + ... + A_end
    d = (dt.flip(1) if reverse else dt).double()
    expected = (tail.exp().flatten(1, 2)[:, :l] * d).mT  # (b, h, l)
    hi_lo = (sums[0] + sums[1].double())[..., :l]
    assert torch.allclose(hi_lo, running.flatten(1, 2)[:, :l].mT, rtol=0, atol=1e-12)
    assert torch.allclose(totals.double(), a.sum(2).mT, rtol=1e-6)
    assert rel_err(to_end[..., :l], expected) < 1e-6  # float32 exp of float64 sums


def test_a_batch_past_32_bit_offsets_runs_in_slices(monkeypatch):
    """The kernels' offsets are 32-bit: past the limit (made small here) ssd_triton runs
    the batch in slices, with the same outputs and gradients as one launch; a single
    sequence past it gets a ValueError that names the limit."""
    from mamba2 import triton_ssd

    X, A, B, C, s0 = on_kernels_device(b=3, l=30, g=2, initial_states=True)

    def run():
        xs = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
        Y, S = triton_ssd.ssd_triton(*xs[:4], 8, xs[4])
        (Y.square().sum() + S.square().sum()).backward()
        return [Y, S] + [t.grad for t in xs]

    whole = run()
    made = 4 * 4 * 8 * 16  # a sequence's 4 chunk states (h 4, p 8, n 16): the largest
    monkeypatch.setattr(triton_ssd, "OFFSETS", 2 * made + 100)  # two sequences a launch
    assert triton_ssd.sequences_per_launch([X], 32, 4, 8, 2, 16, 8) == 2
    for got, want in zip(run(), whole):
        assert rel_err(got, want) < 1e-12
    monkeypatch.setattr(triton_ssd, "OFFSETS", made - 1)
    with pytest.raises(ValueError, match="32-bit limit"):
        triton_ssd.ssd_triton(X, A, B, C, 8, s0)

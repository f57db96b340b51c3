"""Chapter 10's one-token step in Triton kernels against chapter 6's plain `Mamba2.step` and chapter 7's
`next_logits`. Without a GPU the kernels run in Triton's interpreter (tests/conftest.py switches it on).

Tolerances. Both steps compute in float32 from the same inputs and round to the model's type at the same
places; they differ in float32 rounding only (some products fused, sums in another order): in float32 a few
parts in ten million, checked at 1e-5. In float16 and bfloat16 a float32 difference can tip a rounding to the
model's type by one unit in the last place (eps of the type, relative to the value), which out_proj then
rounds again: 2 eps. The caches' float32 states differ by float32 rounding only, whatever the model's type;
the convolution windows hold in_proj outputs, copied, and are equal bitwise."""

import pytest
import torch
from block_oracle import randomize_
from isolated import (
    INTERPRETED,
    INTERPRETER_ONLY,
    KERNELS_DEVICE,
    KERNELS_RUN,
    NO_KERNELS,
    run_without_triton,
)
from oracle import agree_until_near_tie, rel_err
from test_step import SMALL, VARIANTS

from mamba2 import Mamba2, Mamba2Config, Mamba2LMHeadModel
from mamba2.ssd import has_triton

pytestmark = [
    pytest.mark.skipif(not has_triton(), reason="needs Triton (Linux)"),
    pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS),
]
# the checks of a CPU model's behaviour: where the kernels run on CPU tensors only
cpu_only = pytest.mark.skipif(not INTERPRETED, reason=INTERPRETER_ONLY)

# chapter 6's tests' variants (groups, dt_limit, learned start; norm_before_gate, D per channel, biases;
# d_conv 2), and more
CONFIGS = {
    **VARIANTS,
    "d_conv=2, no conv bias": dict(d_conv=2, conv_bias=False),
    "n=12, p=16, d_conv=3": dict(d_model=24, d_state=12, headdim=16, d_conv=3),
    "one group of 16 heads": dict(d_model=64, headdim=8),  # 16 heads read B's window
}
EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}
TOL = {torch.float32: 1e-5, **{d: 2 * e for d, e in EPS.items()}}


def block_of(options, dtype, seed=0):
    cfg = Mamba2Config(**{**SMALL, **options})
    block = randomize_(Mamba2(cfg), seed=seed)
    if cfg.learnable_init_states:  # a learned start that is not zero
        assert block.init_states.abs().sum() > 0
    return block.to(KERNELS_DEVICE, dtype).eval()


def run_both(block, dtype, b=2, prompt=3, tokens=3, block_p=None):
    "The plain and the kernels' steps from the same prefilled cache: outputs and caches."
    from mamba2 import triton_step

    gen = torch.Generator().manual_seed(7)
    u = torch.randn(b, prompt + tokens, block.config.d_model, generator=gen)
    u = u.to(KERNELS_DEVICE, dtype)
    with torch.no_grad():
        plain, mine = block.allocate_cache(b), block.allocate_cache(b)
        if prompt:
            block(u[:, :prompt], cache=plain), block(u[:, :prompt], cache=mine)
        ys_plain, ys_mine = [], []
        for t in range(prompt, prompt + tokens):
            ys_plain.append(block.step(u[:, t : t + 1], plain))
            if block_p is None:
                ys_mine.append(triton_step.step_kernels(block, u[:, t : t + 1], mine))
            else:
                zxbcdt = block.in_proj(u[:, t])
                y = triton_step.ssm_step(block, zxbcdt, mine, block_p=block_p)
                normed = triton_step.gated_norm(block, y, zxbcdt, mine)
                ys_mine.append(block.out_proj(normed)[:, None])
    return torch.cat(ys_plain, 1), torch.cat(ys_mine, 1), plain, mine


@pytest.mark.parametrize("name", CONFIGS)
def test_block_step_matches_the_plain_step_in_float32(name):
    block = block_of(CONFIGS[name], torch.float32)
    y_plain, y_mine, plain, mine = run_both(block, torch.float32)
    assert y_mine.shape == y_plain.shape and y_mine.dtype == torch.float32
    assert rel_err(y_mine, y_plain) < TOL[torch.float32]
    assert rel_err(mine.ssm_state, plain.ssm_state) < 1e-5
    assert torch.equal(mine.conv_state, plain.conv_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "name", ["groups+dt_limit+init", "norm_before_gate+D_has_hdim"]
)
def test_block_step_matches_the_plain_step_in_half_precision(name, dtype):
    block = block_of(CONFIGS[name], dtype)
    y_plain, y_mine, plain, mine = run_both(block, dtype)
    assert y_mine.dtype == dtype
    assert rel_err(y_mine, y_plain) < TOL[dtype]
    assert mine.ssm_state.dtype == torch.float32
    assert rel_err(mine.ssm_state, plain.ssm_state) < 1e-5
    assert torch.equal(mine.conv_state, plain.conv_state)


def test_from_an_empty_cache_and_any_tile_height():
    "No prompt (the windows start at zeros), and p tiles of 2 rows: 4 programs a head."
    block = block_of(CONFIGS["groups+dt_limit+init"], torch.float32)
    for block_p in (2,):
        y_plain, y_mine, plain, mine = run_both(block, torch.float32, 1, 0, 2, block_p)
        assert rel_err(y_mine, y_plain) < 1e-5
        assert torch.equal(mine.conv_state, plain.conv_state)


def tiny_model(dtype=torch.float32, seed=0, **options):
    torch.manual_seed(seed)
    config = Mamba2Config(
        **{**SMALL, "n_layer": 2, "vocab_size": 40, "pad_vocab_size_multiple": 8},
        **options,
    )
    return Mamba2LMHeadModel(config).to(KERNELS_DEVICE, dtype).eval()


@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.float32, dict(ngroups=2)),
        (torch.bfloat16, {}),
        (torch.float16, dict(residual_in_fp32=False)),
    ],
)
def test_model_step_matches_next_logits(dtype, options):
    from mamba2 import triton_step

    model = tiny_model(dtype, **options)
    ids = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(2))
    ids = ids.to(KERNELS_DEVICE)
    with torch.no_grad():
        plain, mine = model.allocate_cache(2), model.allocate_cache(2)
        model(ids, plain), model(ids, mine)
        token = ids[:, -1]
        for _ in range(2):
            expected = model.next_logits(token, plain)
            got = triton_step.step(model, token, mine)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            # 2 layers, each a few roundings to the model's type: 4 eps in half precision
            assert rel_err(got, expected) < (
                1e-5 if dtype == torch.float32 else 4 * EPS[dtype]
            )
            token = expected[:, :40].argmax(-1)


@cpu_only
def test_greedy_tokens_are_generate_s_at_float32():
    "generate on a CPU runs the plain step; greedy decoding with the kernels gives its tokens."
    from mamba2 import triton_step

    model = tiny_model(ngroups=2)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, 6, temperature=0)
    with torch.no_grad():
        cache = model.allocate_cache(2)
        tokens = [model(ids, cache)[:, -1, :40].argmax(-1)]
        for _ in range(5):
            tokens.append(triton_step.step(model, tokens[-1], cache)[:, :40].argmax(-1))
    assert torch.equal(torch.cat([ids, torch.stack(tokens, 1)], 1), expected)


def test_an_empty_batch():
    from mamba2 import triton_step

    model = tiny_model()
    cache = model.allocate_cache(0)
    none = torch.zeros(0, dtype=torch.long, device=KERNELS_DEVICE)
    logits = triton_step.step(model, none, cache)
    assert logits.shape == (0, model.lm_head.weight.shape[0])
    block = model.backbone.layers[0].mixer
    u = torch.zeros(0, 1, 32, device=KERNELS_DEVICE)
    y = triton_step.step_kernels(block, u, block.allocate_cache(0))
    assert y.shape == (0, 1, 32)


# ---- bad input: clear errors ----------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    from mamba2 import triton_step

    block = block_of({}, torch.float32)
    cache = block.allocate_cache(2)
    u = torch.randn(2, 1, 32, device=KERNELS_DEVICE)
    with pytest.raises(
        ValueError, match=r"step takes one token u: \(b, 1, d_model = 32\)"
    ):
        triton_step.step_kernels(block, u.expand(2, 3, 32), cache)
    with pytest.raises(ValueError, match=r"u must have shape \(b, l, d_model = 32\)"):
        triton_step.step_kernels(block, u[..., :31], cache)
    with pytest.raises(ValueError, match=r"cache.conv_state must have shape"):
        triton_step.step_kernels(block, u, block.allocate_cache(3))
    with pytest.raises(
        TypeError, match=r"cache.ssm_state must be torch.float32 .*got torch.float64"
    ):
        cache.ssm_state = cache.ssm_state.double()
        triton_step.step_kernels(block, u, cache)
    block64 = block_of({}, torch.float64)
    with pytest.raises(
        TypeError,
        match=r"runs float32, float16 and bfloat16 .*got torch.float64.*plain step",
    ):
        triton_step.step_kernels(block64, u.double(), block64.allocate_cache(2))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token must be token ids in \[0, 40\)"):
        triton_step.step(model, u.new_tensor([1, 40]).long(), model.allocate_cache(2))
    with pytest.raises(TypeError, match=r"token must be an integer tensor \(b,\)"):
        triton_step.step(model, u.new_tensor([1.0, 2.0]), model.allocate_cache(2))


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    from mamba2 import triton_step

    if torch.cuda.is_available():
        pytest.skip("the interpreter is off on a GPU machine")
    monkeypatch.setattr(triton_step, "INTERPRETED", False)
    block = block_of({}, torch.float32)
    with pytest.raises(
        ValueError, match=r"CUDA tensors, or CPU tensors under Triton's interpreter"
    ):
        triton_step.step_kernels(block, torch.randn(1, 1, 32), block.allocate_cache(1))


@cpu_only
def test_graphs_pick_the_kernels_only_where_they_run():
    from mamba2.graphs import _use_kernels

    model = tiny_model()
    assert _use_kernels(model) is False  # a CPU model: the plain step
    assert _use_kernels(model, False) is False and _use_kernels(model, True) is True
    with pytest.raises(TypeError, match=r"kernels must be None or a bool, got 'yes'"):
        _use_kernels(model, "yes")


def test_the_package_imports_without_triton():
    out = run_without_triton(
        "import torch, mamba2\n"
        "from mamba2.graphs import _use_kernels\n"
        "c = mamba2.Mamba2Config(d_model=16, n_layer=1, d_state=8, headdim=8, vocab_size=20)\n"
        "m = mamba2.Mamba2LMHeadModel(c)\n"
        "assert _use_kernels(m) is False\n"
        "try:\n"
        "    _use_kernels(m, kernels=True)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print(m.generate(torch.tensor([[1, 2]]), 3, temperature=0).shape)\n"
        "try:\n"
        "    import mamba2.triton_step\n"
        "except ImportError:\n"
        "    print('no kernels')\n"
    )
    assert "torch.Size([1, 5])" in out and "no kernels" in out
    assert "kernels=True needs Triton" in out  # asked for, and not there: said so


# ---- on a GPU: the graph captures the kernels ------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_kernels_give_the_plain_graph_s_logits(dtype):
    from mamba2.graphs import GraphedStep

    model = tiny_model(dtype, ngroups=2).cuda()
    ids = torch.randint(0, 40, (4, 6), device="cuda")
    steps = {k: GraphedStep(model, 4, kernels=k) for k in (False, True)}
    assert steps[True].kernels and not steps[False].kernels
    with torch.inference_mode():
        cache = model.allocate_cache(4)
        model(ids, cache)
        for s in steps.values():
            s.load(cache)
        token = ids[:, -1]
        for _ in range(5):
            plain, mine = steps[False](token).clone(), steps[True](token).clone()
            tol = (
                1e-4 if dtype == torch.float32 else 4 * EPS[dtype]
            )  # TF32 matmuls aside
            assert rel_err(mine, plain) < tol
            token = plain[:, :40].argmax(-1)
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        a = model.generate(ids, 12, temperature=0, cuda_graph=False)
        b = model.generate(
            ids, 12, temperature=0, cuda_graph=True
        )  # the kernels' graph: another computation, the same tokens but at near-ties
        assert agree_until_near_tie(model, ids, a, b, 40)

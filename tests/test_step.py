import pytest
import torch
from block_oracle import randomize_, reference_block
from oracle import rel_err

from mamba2 import InferenceCache, Mamba2, Mamba2Config

SMALL = dict(d_model=32, d_state=8, headdim=8, chunk_size=8)
Q, K = 8, 5
VARIANTS = {
    "base": {},
    "groups+dt_limit+init": dict(
        ngroups=2, dt_limit=(0.05, 0.5), learnable_init_states=True
    ),
    "norm_before_gate+D_has_hdim": dict(
        ngroups=4, norm_before_gate=True, D_has_hdim=True, bias=True
    ),
    "d_conv=2": dict(d_conv=2),
}


def fresh(block, b):
    return block.allocate_cache(b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("L", [1, 3, 4, Q - 1, Q, Q + 1, 2 * Q + 3])
def test_prefill_then_steps_equals_parallel_forward(variant, L):
    cfg = Mamba2Config(**SMALL, **VARIANTS[variant])
    block = randomize_(Mamba2(cfg), seed=L)
    u = torch.randn(2, L + K, cfg.d_model, generator=torch.Generator().manual_seed(L))
    with torch.no_grad():
        whole = fresh(block, 2)
        y_all = block(u, cache=whole)
        cache = fresh(block, 2)
        ys = [block(u[:, :L], cache=cache)] + [
            block.step(u[:, t : t + 1], cache) for t in range(L, L + K)
        ]
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-5
    # conv_state holds in_proj outputs: the prefill's last rows come from one matmul over many rows,
    # the steps' from one-row matmuls, which some CPUs sum in another order (AVX2 MKL: ~2e-7 apart).
    # A d_model = 32 term float32 dot product rounds to within ~32 * 6e-8 of its size: 1e-6 holds.
    assert rel_err(cache.ssm_state, whole.ssm_state) < 1e-5
    assert rel_err(cache.conv_state, whole.conv_state) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_from_the_start_match_float64_reference(variant):
    "Decoding from an empty cache, token by token, against the independent float64 reference."
    cfg = Mamba2Config(**SMALL, **VARIANTS[variant])
    block = randomize_(Mamba2(cfg), seed=3)
    u = torch.randn(2, 12, cfg.d_model)
    y_ref, s_ref = reference_block(block, u)
    with torch.no_grad():
        cache = fresh(block, 2)
        y = torch.cat([block.step(u[:, t : t + 1], cache) for t in range(12)], 1)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(cache.ssm_state, s_ref) < 1e-5


@pytest.mark.parametrize("split", [1, 2, 3, 8, 13])
def test_split_prefill_equals_one_prefill(split):
    cfg = Mamba2Config(**SMALL, ngroups=2)
    block = randomize_(Mamba2(cfg))
    u = torch.randn(2, 21, cfg.d_model)
    with torch.no_grad():
        one, two = fresh(block, 2), fresh(block, 2)
        y_one = block(u, cache=one)
        y_two = torch.cat(
            [block(u[:, :split], cache=two), block(u[:, split:], cache=two)], 1
        )
    assert rel_err(y_two, y_one) < 1e-5 and rel_err(two.ssm_state, one.ssm_state) < 1e-5
    assert (
        rel_err(two.conv_state, one.conv_state) < 1e-6
    )  # in_proj over other row counts, as above


def test_cache_layout_and_alloc():
    cfg = Mamba2Config(**SMALL, ngroups=2)
    cache = InferenceCache.alloc(3, cfg, dtype=torch.bfloat16)
    assert (
        cache.conv_state.shape == (3, cfg.d_inner + 2 * 2 * 8, cfg.d_conv)
        and cache.conv_state.dtype == torch.bfloat16
    )
    assert (
        cache.ssm_state.shape == (3, cfg.nheads, cfg.headdim, cfg.d_state)
        and cache.ssm_state.dtype == torch.float32
    )
    block = randomize_(Mamba2(cfg))
    u = torch.randn(3, 2, cfg.d_model)  # shorter than d_conv = 4
    cache = fresh(block, 3)
    with torch.no_grad():
        block(u, cache=cache)
        pre = block.in_proj(u)[
            ..., cfg.d_inner : cfg.d_inner + block.conv_dim
        ]  # pre-activation x, B, C
    assert torch.equal(cache.conv_state[..., :2], torch.zeros(3, block.conv_dim, 2))
    # the same in_proj call on the same (3, 2, d_model) input: a copy of its output, bit for bit
    assert torch.equal(cache.conv_state[..., 2:], pre.transpose(1, 2))


def test_step_is_in_place_and_constant_size():
    cfg = Mamba2Config(**SMALL)
    block = Mamba2(cfg)
    cache = fresh(block, 2)
    ptrs = (cache.conv_state.data_ptr(), cache.ssm_state.data_ptr())
    with torch.no_grad():
        for _ in range(30):
            block.step(torch.randn(2, 1, cfg.d_model), cache)
    assert (cache.conv_state.data_ptr(), cache.ssm_state.data_ptr()) == ptrs


def test_bfloat16_steps_track_float32():
    cfg = Mamba2Config(**SMALL, ngroups=2)
    block = Mamba2(cfg)
    u = torch.randn(2, 15, cfg.d_model)
    with torch.no_grad():
        y32 = block(u)
        b16 = Mamba2(cfg).to(torch.bfloat16)
        b16.load_state_dict(block.state_dict())
        cache = b16.allocate_cache(2)
        ys = [b16(u[:, :6].bfloat16(), cache=cache)] + [
            b16.step(u[:, t : t + 1].bfloat16(), cache) for t in range(6, 15)
        ]
    y16 = torch.cat(ys, 1)
    assert cache.ssm_state.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.isfinite(y16).all() and rel_err(y16, y32) < 0.03


def test_step_follows_the_device():
    cfg = Mamba2Config(**SMALL, ngroups=2)
    block = Mamba2(cfg, device="meta")
    cache = InferenceCache.alloc(2, cfg, device="meta")
    y = block.step(torch.empty(2, 1, cfg.d_model, device="meta"), cache)
    assert y.device.type == "meta" and y.shape == (2, 1, cfg.d_model)


def test_step_bad_input_raises():
    cfg = Mamba2Config(**SMALL)
    block = Mamba2(cfg)
    cache = fresh(block, 2)
    with pytest.raises(ValueError, match="one token"):
        block.step(torch.randn(2, 3, cfg.d_model), cache)
    with pytest.raises(ValueError, match="cache.ssm_state"):
        block.step(
            torch.randn(2, 1, cfg.d_model),
            InferenceCache(cache.conv_state, torch.zeros(2, 8, 8, 4)),
        )
    with pytest.raises(ValueError, match="cache.conv_state"):
        block.step(torch.randn(3, 1, cfg.d_model), cache)


def test_cache_holds_values_not_graphs_under_autograd():
    cfg = Mamba2Config(**SMALL, ngroups=2)
    block = Mamba2(cfg)
    u = torch.randn(2, 9, cfg.d_model, requires_grad=True)
    cache = fresh(block, 2)
    ys = [block(u[:, :6], cache=cache)] + [
        block.step(u[:, t : t + 1], cache) for t in range(6, 9)
    ]
    assert not cache.conv_state.requires_grad and not cache.ssm_state.requires_grad
    torch.cat(ys, 1).sum().backward()  # gradients flow through every call
    assert u.grad[:, -1].abs().sum() > 0 and block.in_proj.weight.grad is not None
    grad_steps = u.grad.clone()
    u.grad = None
    block(u).sum().backward()  # the last token's input reaches only the last
    assert (
        rel_err(grad_steps[:, -1], u.grad[:, -1]) < 1e-4
    )  # output, so the cut cache does not matter there

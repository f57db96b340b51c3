import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from block_oracle import randomize_, reference_block
from oracle import rel_err

from mamba2 import Mamba2, Mamba2Config, RMSNormGated

SMALL = dict(
    d_model=32, d_state=8, headdim=8, chunk_size=8
)  # 8 heads of 8, state 8, Q = 8


def hf_mixer(c):
    "transformers' Mamba2Mixer with the sizes of our config `c`."
    from transformers import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    hf = HFConfig(
        hidden_size=c.d_model,
        expand=c.expand,
        num_heads=c.nheads,
        head_dim=c.headdim,
        state_size=c.d_state,
        n_groups=c.ngroups,
        conv_kernel=c.d_conv,
        chunk_size=c.chunk_size,
        use_bias=c.bias,
        use_conv_bias=c.conv_bias,
        layer_norm_epsilon=1e-5,
        time_step_limit=c.dt_limit,
        num_hidden_layers=1,
        vocab_size=16,
    )
    return Mamba2Mixer(hf, layer_idx=0).eval()


@pytest.mark.parametrize("l", [1, 3, 7, 9, 21, 43])  # none a multiple of Q = 8
@pytest.mark.parametrize("extra", [{}, dict(bias=True), dict(dt_limit=(0.05, 0.5))])
def test_matches_transformers_mixer_float32(l, extra):
    cfg = Mamba2Config(**SMALL, **extra)
    theirs = randomize_(hf_mixer(cfg))
    ours = Mamba2(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # and the other way round
    u = torch.randn(2, l, cfg.d_model, generator=torch.Generator().manual_seed(l))
    with torch.no_grad():
        assert rel_err(ours(u), theirs(u)) < 1e-5


VARIANTS = {
    "base": {},
    "ngroups=2": dict(ngroups=2),
    "ngroups=h": dict(ngroups=8),
    "dt_limit": dict(dt_limit=(0.05, 0.5)),
    "norm_before_gate": dict(norm_before_gate=True, ngroups=2),
    "D_has_hdim": dict(D_has_hdim=True),
    "biases": dict(bias=True, conv_bias=False),
    "learnable_init_states": dict(learnable_init_states=True, ngroups=4),
    "d_conv=2": dict(d_conv=2, expand=1),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("l", [1, 13, 29])
def test_matches_float64_token_by_token_reference(variant, l):
    cfg = Mamba2Config(**SMALL, **VARIANTS[variant])
    block = randomize_(Mamba2(cfg), seed=l)
    u = torch.randn(2, l, cfg.d_model, generator=torch.Generator().manual_seed(1))
    y_ref, _ = reference_block(block, u)
    with torch.no_grad():
        assert rel_err(block(u), y_ref) < 1e-5  # float32
        assert (
            rel_err(block.double()(u.double()), y_ref) < 1e-10
        )  # float64: the same function, exactly


def test_dt_limit_is_active_in_the_comparison():
    cfg = Mamba2Config(**SMALL, dt_limit=(0.05, 0.5))
    block = randomize_(Mamba2(cfg))
    u = torch.randn(2, 13, cfg.d_model)
    with torch.no_grad():
        dt = F.softplus(block.in_proj(u)[..., -cfg.nheads :] + block.dt_bias)
        assert (dt < 0.05).any() and (dt > 0.5).any()  # both ends of the clamp are hit
        unclamped = Mamba2(Mamba2Config(**SMALL))
        unclamped.load_state_dict(block.state_dict())
        assert rel_err(unclamped(u), block(u)) > 1e-3


@pytest.mark.parametrize("impl", ["auto", "chunked", "fast"])
def test_initial_states_and_segments_match_reference(impl):
    cfg = Mamba2Config(**SMALL, ngroups=2, impl=impl)
    block = randomize_(Mamba2(cfg))
    u = torch.randn(3, 45, cfg.d_model)
    s0 = torch.randn(3, cfg.nheads, cfg.headdim, cfg.d_state)
    y_ref, _ = reference_block(block, u, s0)
    with torch.no_grad():
        for seg in (8, 16, 10**6):  # tokens per segment on a CPU
            block.cpu_segment = seg
            assert rel_err(block(u, initial_states=s0), y_ref) < 1e-5


def test_grouped_norm_differs_from_ungrouped():
    norm = RMSNormGated(16, group_size=8)
    y, z = torch.randn(4, 16), torch.randn(4, 16)
    assert rel_err(RMSNormGated(16)(y, z), norm(y, z)) > 0.05
    y2 = y.clone()
    y2[:, :8] *= 100
    assert torch.equal(
        norm(y2, z)[:, 8:], norm(y, z)[:, 8:]
    )  # same call, same values in group 1


def test_init_statistics_and_no_weight_decay():
    torch.manual_seed(0)
    cfg = Mamba2Config(
        d_model=64,
        expand=32,
        headdim=1,
        d_state=1,
        dt_min=1e-5,
        dt_max=1e-1,
        dt_init_floor=1e-4,
        A_init_range=(2, 5),
        learnable_init_states=True,
    )  # 2048 heads
    block = Mamba2(cfg)
    dt = F.softplus(block.dt_bias.detach().double())
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert (
        (dt - 1e-4).abs() < 1e-9
    ).float().mean() > 0.15  # log-uniform on [1e-5, 1e-1]: 1/4 floored
    A = block.A_log.detach().exp()
    assert A.min() >= 2 and A.max() <= 5 and abs(A.mean().item() - 3.5) < 0.1
    assert torch.equal(block.D.detach(), torch.ones(cfg.nheads))
    flagged = {
        n for n, p in block.named_parameters() if getattr(p, "_no_weight_decay", False)
    }
    assert flagged == {"dt_bias", "A_log", "D", "init_states"}


def test_learnable_initial_states_get_gradients_and_matter():
    cfg = Mamba2Config(**SMALL, learnable_init_states=True)
    block = Mamba2(cfg)
    u = torch.randn(2, 11, cfg.d_model)
    block(u).sum().backward()
    assert block.init_states.grad.abs().sum() > 0
    y0 = block(u).detach()
    with torch.no_grad():
        block.init_states.normal_()
    assert rel_err(block(u).detach(), y0) > 1e-3


def test_gradients_float64():
    cfg = Mamba2Config(d_model=8, d_state=4, headdim=4, chunk_size=4, ngroups=2)
    block = randomize_(Mamba2(cfg)).double()
    u = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(1, cfg.nheads, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, s0: block(u, initial_states=s0), (u, s0))


def test_bfloat16_close_to_float32():
    cfg = Mamba2Config(**SMALL)
    block = Mamba2(cfg)
    u = torch.randn(2, 37, cfg.d_model)
    with torch.no_grad():
        y32 = block(u)
        y16 = block.to(torch.bfloat16)(u.bfloat16())
    assert (
        y16.dtype == torch.bfloat16
        and torch.isfinite(y16).all()
        and rel_err(y16, y32) < 0.03
    )


def test_follows_the_input_device():
    "On the meta device, any tensor made on the CPU inside the block would raise."
    cfg = Mamba2Config(**SMALL, learnable_init_states=True)
    block = Mamba2(cfg, device="meta")
    y = block(torch.empty(2, 19, cfg.d_model, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 19, cfg.d_model)


BAD_CONFIGS = {
    "d_model": dict(d_model=0),
    "n_layer": dict(n_layer=-1),
    "d_conv": dict(d_conv=0),
    "headdim": dict(headdim=7),
    "ngroups": dict(ngroups=3),
    "chunk_size": dict(chunk_size=0),
    "vocab_size": dict(vocab_size=0),
    "A_init_range": dict(A_init_range=(5, 2)),
    "dt_min": dict(dt_min=0.2),
    "dt_init_floor": dict(dt_init_floor=-1.0),
    "dt_limit": dict(dt_limit=(0.5, 0.1)),
    "dt_max": dict(dt_max=float("inf")),
    "dt_limit ": dict(dt_limit=(0.0, float("nan"))),
}
BAD_CONFIG_TYPES = {
    "d_state": dict(d_state=2.5),
    "expand": dict(expand=True),
    "d_model": dict(d_model="32"),
    "A_init_range": dict(A_init_range=1),
    "dt_limit": dict(dt_limit=(0.0, 1.0, 2.0)),
    "dt_min": dict(dt_min="0.001"),
    "norm_before_gate": dict(norm_before_gate="no"),
    "bias": dict(bias=1),
    "headdim": dict(headdim=None),
    "impl": dict(impl="triton?"),
}


@pytest.mark.parametrize("field", BAD_CONFIGS)
def test_bad_config_names_the_field(field):
    with pytest.raises(ValueError, match=f"Mamba2Config.{field.strip()}"):
        Mamba2Config(**{**SMALL, **BAD_CONFIGS[field]})


@pytest.mark.parametrize("field", BAD_CONFIG_TYPES)
def test_config_of_the_wrong_type_names_the_field(field):
    with pytest.raises(TypeError, match=f"Mamba2Config.{field} must be"):
        Mamba2Config(**{**SMALL, **BAD_CONFIG_TYPES[field]})


def test_config_round_trips_through_json():
    cfg = Mamba2Config(**SMALL, dt_limit=(0.0, 0.3))
    again = Mamba2Config(**json.loads(json.dumps(asdict(cfg))))
    assert again == cfg and (again.d_inner, again.nheads) == (64, 8)


def test_bad_input_raises():
    block = Mamba2(Mamba2Config(**SMALL))
    for u in (torch.randn(2, 5, 31), torch.randn(5, 32)):
        with pytest.raises(ValueError, match="u must have shape"):
            block(u)
    for u in (torch.ones(2, 5, 32, dtype=torch.long), [[0.0] * 32]):
        with pytest.raises(TypeError, match="u must be a floating-point tensor"):
            block(u)
    cache = type("Cache", (), {})()
    cache.conv_state, cache.ssm_state = (
        torch.zeros(2, block.conv_dim, 4),
        torch.zeros(2, 8, 8, 8),
    )
    with pytest.raises(ValueError, match="not both"):
        block(
            torch.randn(2, 5, 32), initial_states=torch.zeros(2, 8, 8, 8), cache=cache
        )

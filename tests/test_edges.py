"""Edge cases of the SSD, the block and the step: each gives a correct answer or a named error of
the right type, and a failed call changes nothing."""

import pytest
import torch
from block_oracle import randomize_, reference_block
from oracle import naive_ssd, random_inputs, rel_err
from torch.utils.flop_counter import FlopCounterMode

from mamba2 import (
    InferenceCache,
    Mamba2,
    Mamba2Config,
    ssd,
    ssd_chunked,
    ssd_quadratic,
    ssd_scan,
)

SMALL = dict(d_model=32, d_state=8, headdim=8, chunk_size=8)
SSDS = {
    "scan": ssd_scan,
    "quadratic": ssd_quadratic,
    "chunked": lambda X, A, B, C, s0=None: ssd_chunked(X, A, B, C, 4, s0),
}


@pytest.mark.parametrize("ssd", SSDS)
@pytest.mark.parametrize("l", [0, 1, 9])
def test_empty_batch_in_empty_batch_out(ssd, l):
    X, A, B, C, s0 = random_inputs(b=0, l=l, initial_states=True)
    Y, s = SSDS[ssd](X, A, B, C, s0)
    assert Y.shape == X.shape and s.shape == s0.shape


@pytest.mark.parametrize("l", [0, 5, 19])
def test_block_and_step_with_an_empty_batch(l):
    block = randomize_(Mamba2(Mamba2Config(**SMALL, ngroups=2)))
    cache = block.allocate_cache(0)
    with torch.no_grad():
        assert block(torch.randn(0, l, 32), cache=cache).shape == (0, l, 32)
        assert block.step(torch.randn(0, 1, 32), cache).shape == (0, 1, 32)


@pytest.mark.parametrize("l", [1, 10, 37])
def test_a_chunk_is_never_longer_than_the_sequence(l):
    "A chunk size far beyond the length gives the oracle's result with the work of one chunk of l."
    X, A, B, C, s0 = random_inputs(l=l, initial_states=True)
    Y, s = ssd_chunked(X, A, B, C, 8192, s0)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    flops = []
    for chunk_size in (8192, l):
        with FlopCounterMode(display=False) as counter:
            ssd_chunked(X, A, B, C, chunk_size, s0)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]


def test_forward_with_a_cache_of_another_batch_size_names_it_and_changes_nothing():
    block = randomize_(Mamba2(Mamba2Config(**SMALL)))
    cache = block.allocate_cache(3)
    cache.ssm_state.normal_()
    before = (cache.conv_state.clone(), cache.ssm_state.clone())
    with pytest.raises(
        ValueError, match=r"cache.conv_state must have shape \(2, 80, 4\).*batch of 2"
    ):
        block(torch.randn(2, 5, 32), cache=cache)
    with pytest.raises(ValueError, match=r"cache.ssm_state must have shape"):
        block(
            torch.randn(3, 5, 32),
            cache=InferenceCache(cache.conv_state, cache.ssm_state[:, :4]),
        )
    assert torch.equal(cache.conv_state, before[0]) and torch.equal(
        cache.ssm_state, before[1]
    )


@pytest.mark.parametrize("cache", [None, "cache", object()])
def test_step_and_forward_with_no_cache_object(cache):
    block = Mamba2(Mamba2Config(**SMALL))
    with pytest.raises(
        TypeError, match="cache must hold a floating-point tensor conv_state"
    ):
        block.step(torch.randn(2, 1, 32), cache)
    if cache is not None:
        with pytest.raises(TypeError, match="cache must hold"):
            block(torch.randn(2, 3, 32), cache=cache)


def test_no_tokens_with_a_cache_leave_it_as_it_was():
    block = randomize_(Mamba2(Mamba2Config(**SMALL)))
    cache = block.allocate_cache(2)
    with torch.no_grad():
        block(torch.randn(2, 6, 32), cache=cache)
        before = (cache.conv_state.clone(), cache.ssm_state.clone())
        assert block(torch.randn(2, 0, 32), cache=cache).shape == (2, 0, 32)
    assert torch.equal(cache.conv_state, before[0]) and torch.equal(
        cache.ssm_state, before[1]
    )


def test_input_of_another_dtype_or_device_than_the_block():
    block = Mamba2(Mamba2Config(**SMALL))
    with pytest.raises(
        TypeError, match="u is torch.float64 and the block's weights torch.float32"
    ):
        block(torch.randn(2, 5, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="u is on meta and the block on cpu"):
        block(torch.randn(2, 5, 32, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision stays allowed
        assert block(torch.randn(2, 5, 32, dtype=torch.bfloat16)).shape == (2, 5, 32)


@pytest.mark.parametrize(
    "batch_size, error",
    [
        (-1, ValueError),
        (2.5, TypeError),
        (None, TypeError),
        (True, TypeError),
        ("2", TypeError),
    ],
)
def test_allocating_a_cache_checks_the_batch_size(batch_size, error):
    with pytest.raises(
        error, match=f"batch_size must be a non-negative integer, got {batch_size!r}"
    ):
        InferenceCache.alloc(batch_size, Mamba2Config(**SMALL))


def test_step_rejects_more_than_one_token_and_changes_nothing():
    block = randomize_(Mamba2(Mamba2Config(**SMALL)))
    cache = block.allocate_cache(2)
    cache.conv_state.normal_()
    before = cache.conv_state.clone()
    with pytest.raises(ValueError, match="step takes one token"):
        block.step(torch.randn(2, 2, 32), cache)
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        block.step(torch.ones(2, 1, 32, dtype=torch.int32), cache)
    assert torch.equal(cache.conv_state, before)


@pytest.mark.parametrize("impl", ["chunked", "fast"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["X", "A", "B", "C"])
def test_a_non_finite_input_spoils_its_chunk_and_what_follows_not_what_came_before(
    impl, bad, where
):
    "The promise of chapter 4: earlier chunks unchanged; from the bad token's chunk on, not finite."
    inputs = dict(zip("XABC", random_inputs(b=1, l=40, h=2, g=1, p=2, n=3)[:4]))
    Y_clean, _ = ssd(*inputs.values(), 16, impl=impl)
    inputs[where] = inputs[where].clone()
    inputs[where][0, 21] = bad  # token 21, in chunk 1 (16..31)
    Y, s = ssd(*inputs.values(), 16, impl=impl)
    assert rel_err(Y[:, :16], Y_clean[:, :16]) < 1e-15 and not Y[0, 21].isfinite().all()
    if where != "C":  # C_t only reads the state at t
        assert not Y[0, 21:].isfinite().all(-1).all(-1).any() and not s.isfinite().all()


def test_a_decay_of_zero_resets_the_state_in_the_plain_path():
    "A = -inf (a decay of exactly 0): chapter 4's masked sums handle it as the scan does."
    X, A, B, C, _ = random_inputs(b=1, l=40, h=2, g=1, p=2, n=3)
    A = A.clone()
    A[0, 21] = -float("inf")
    Y, s = ssd_chunked(X, A, B, C, 16)
    Y_ref, s_ref = ssd_scan(X, A, B, C)
    assert rel_err(Y, Y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_a_non_finite_input_in_the_block():
    "The block keeps the SSD's promise: outputs of chunks before the bad token's are those of the oracle."
    block = randomize_(Mamba2(Mamba2Config(**SMALL)))
    u = torch.randn(1, 30, 32)
    y_ref, _ = reference_block(block, u)
    u[0, 20, 3] = float("nan")  # chunk 2 (16..23)
    with torch.no_grad():
        y = block(u)
    assert (
        rel_err(y[:, :16], y_ref[:, :16]) < 1e-5
        and not y[0, 20:].isfinite().all(-1).any()
    )

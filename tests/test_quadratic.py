import pytest
import torch
from oracle import naive_ssd, random_inputs, rel_err

from mamba2 import ssd_quadratic


@pytest.mark.parametrize("l", [1, 7, 15, 16, 17, 53])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("init", [False, True])
def test_quadratic_matches_oracle(l, h, g, init):
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=init)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_quadratic(X, A, B, C, s0)
    assert Y.dtype == s.dtype == torch.float64
    assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    f32 = lambda t: None if t is None else t.float()
    Y, s = ssd_quadratic(*map(f32, (X, A, B, C)), f32(s0))
    assert Y.dtype == s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_half_precision_inputs_keep_float32_state():
    X, A, B, C, s0 = random_inputs(l=45, initial_states=True)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_quadratic(
        X.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), s0.float()
    )
    assert Y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 3e-2 and rel_err(s, s_ref) < 3e-2


@pytest.mark.parametrize("split", [1, 20, 40])
def test_split_anywhere_carries_state(split):
    X, A, B, C, s0 = random_inputs(l=41, initial_states=True)
    Y, s = ssd_quadratic(X, A, B, C, s0)
    Y1, m = ssd_quadratic(X[:, :split], A[:, :split], B[:, :split], C[:, :split], s0)
    Y2, s2 = ssd_quadratic(X[:, split:], A[:, split:], B[:, split:], C[:, split:], m)
    assert rel_err(torch.cat([Y1, Y2], 1), Y) < 1e-12 and rel_err(s2, s) < 1e-12


def test_length_zero_returns_initial_state():
    X, A, B, C, s0 = random_inputs(l=0, initial_states=True)
    Y, s = ssd_quadratic(X, A, B, C, s0)
    assert Y.shape == (2, 0, 4, 8) and torch.equal(s, s0)


def test_gradcheck_with_initial_states():
    X, A, B, C, s0 = random_inputs(b=1, l=5, h=2, g=1, p=2, n=2, initial_states=True)
    args = [t.clone().requires_grad_() for t in (X, A, B, C, s0)]
    assert torch.autograd.gradcheck(ssd_quadratic, args)

import pytest
import torch
from oracle import naive_ssd, random_inputs, rel_err

from mamba2 import ssd_chunked, ssd_quadratic, ssd_scan


@pytest.mark.parametrize("l", [1, 2, 7, 33])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (4, 4), (6, 3)])
@pytest.mark.parametrize("init", [False, True])
def test_scan_matches_oracle_float64(l, h, g, init):
    X, A, B, C, s0 = random_inputs(b=2, l=l, h=h, g=g, p=3, n=5, initial_states=init)
    Y, s = ssd_scan(X, A, B, C, initial_states=s0)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    assert rel_err(Y, Y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_scan_float32_and_bfloat16_keep_float32_state():
    X, A, B, C, s0 = random_inputs(l=64, initial_states=True)
    Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
    Y, s = ssd_scan(*(t.float() for t in (X, A, B, C)), initial_states=s0.float())
    assert Y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(Y, Y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    Yb, sb = ssd_scan(
        X.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), initial_states=s0.float()
    )
    assert Yb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert rel_err(Yb, Y_ref) < 3e-2  # bf16 inputs carry ~3 significant digits


def test_scan_split_carries_state():
    X, A, B, C, s0 = random_inputs(l=41, initial_states=True)
    Y, s = ssd_scan(X, A, B, C, s0)
    Y1, m = ssd_scan(X[:, :13], A[:, :13], B[:, :13], C[:, :13], s0)
    Y2, s2 = ssd_scan(X[:, 13:], A[:, 13:], B[:, 13:], C[:, 13:], m)
    assert rel_err(torch.cat([Y1, Y2], 1), Y) < 1e-13 and rel_err(s2, s) < 1e-13


def test_scan_length_zero_returns_initial_state():
    X, A, B, C, s0 = random_inputs(l=0, initial_states=True)
    Y, s = ssd_scan(X, A, B, C, s0)
    assert Y.shape == (2, 0, 4, 8) and torch.equal(s, s0)


V, T = ValueError, TypeError
BAD = {
    "X rank": (lambda X, A, B, C, s: (X[0], A, B, C, s), V, "X must have shape"),
    "A shape": (
        lambda X, A, B, C, s: (X, A[:, :, :2], B, C, s),
        V,
        "A must have shape",
    ),
    "B vs C": (lambda X, A, B, C, s: (X, A, B, C[..., :3], s), V, "B and C"),
    "B length": (lambda X, A, B, C, s: (X, A, B[:, :5], C[:, :5], s), V, "B and C"),
    "groups": (
        lambda X, A, B, C, s: (
            X,
            A,
            torch.cat([B, B[:, :, :1]], 2),
            torch.cat([C, C[:, :, :1]], 2),
            s,
        ),
        V,
        "divisible",
    ),
    "state shape": (
        lambda X, A, B, C, s: (X, A, B, C, s[:, :, :2]),
        V,
        "initial_states must have shape",
    ),
    "dtype mix": (lambda X, A, B, C, s: (X.float(), A, B, C, s), V, "share a dtype"),
    "integer": (
        lambda X, A, B, C, s: (X, A, B.long(), C, s),
        T,
        "B must be a floating-point",
    ),
    "not a tensor": (
        lambda X, A, B, C, s: (X.tolist(), A, B, C, s),
        T,
        "X must be a floating-point",
    ),
    "complex": (
        lambda X, A, B, C, s: (X, A.cfloat(), B, C, s),
        T,
        "A must be a floating-point",
    ),
    "state not a tensor": (
        lambda X, A, B, C, s: (X, A, B, C, s.tolist()),
        T,
        "initial_states must be None",
    ),
    "integer state": (
        lambda X, A, B, C, s: (X, A, B, C, s.long()),
        T,
        "initial_states must be None",
    ),
}


# every SSD function of the book checks its inputs through the same contract
ALGORITHMS = {
    "scan": ssd_scan,
    "quadratic": ssd_quadratic,
    "chunked": lambda X, A, B, C, **kw: ssd_chunked(X, A, B, C, 4, **kw),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_problem(case, algorithm):
    "Wrong kinds of input raise a TypeError, wrong shapes a ValueError, each naming the argument."
    make, error, message = BAD[case]
    args = make(*random_inputs(l=9, initial_states=True))
    with pytest.raises(error, match=message):
        ALGORITHMS[algorithm](*args[:4], initial_states=args[4])

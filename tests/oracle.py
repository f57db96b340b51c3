"""The book's independent oracle: the SSM recurrence written as plain float64 loops.

It shares no code with `mamba2`: every head, channel and group index is spelled out, so a bug in
the package's einsums or group handling cannot hide in the oracle too.
"""

import torch

# re-exported for the tests: the inputs and the error measure, not the oracle
from mamba2.scan import random_ssd_inputs as random_inputs  # noqa: F401
from mamba2.scan import rel_err  # noqa: F401


def naive_ssd(X, A, B, C, initial_states=None):
    """Per-token, per-head float64 recurrence. Shapes as in the SSD contract; returns (Y, final_state).
    Runs on the CPU; the results go back to the inputs' device."""
    device = X.device
    X, A, B, C = (t.detach().double().cpu() for t in (X, A, B, C))
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    state = (
        torch.zeros(b, h, p, n, dtype=torch.float64)
        if initial_states is None
        else initial_states.detach().double().cpu().clone()
    )
    Y = torch.zeros(b, l, h, p, dtype=torch.float64)
    for t in range(l):
        for i in range(h):
            grp = i // (h // g)
            state[:, i] = (
                torch.exp(A[:, t, i])[:, None, None] * state[:, i]
                + X[:, t, i, :, None] * B[:, t, grp, None, :]
            )
            Y[:, t, i] = (state[:, i] * C[:, t, grp, None, :]).sum(-1)
    return Y.to(device), state.to(device)


def agree_until_near_tie(model, ids, a, b, vocab, tol=1e-3):
    """Whether the greedy continuations `a` and `b` of `ids`, made by two computations of
    `model` (the plain step and the kernels', say), agree at every step before the first
    where `a`'s two largest logits are within `tol` of each other, relative to the
    largest: there a rounding may tip the argmax either way, and after it the two
    sequences may differ by right."""
    start = ids.shape[1]
    with torch.no_grad():
        logits = model(a)[:, start - 1 : -1, :vocab].float()
    top = logits.topk(2, dim=-1).values
    near = top[..., 0] - top[..., 1] <= tol * logits.abs().amax(-1)
    before = (~near).long().cumprod(1).bool()  # the steps before the first near-tie
    return bool(((a[:, start:] == b[:, start:]) | ~before).all())

"""The book's independent oracle: the SSM recurrence written as plain float64 loops.

It shares no code with `mamba2`: every head, channel and group index is spelled out, so a bug in
the package's einsums or group handling cannot hide in the oracle too.
"""
import torch


def naive_ssd(X, A, B, C, initial_states=None):
    "Per-token, per-head float64 recurrence. Shapes as in the SSD contract; returns (Y, final_state)."
    X, A, B, C = (t.detach().double() for t in (X, A, B, C))
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_states is None else initial_states.detach().double().clone()
    Y = torch.zeros(b, l, h, p, dtype=torch.float64)
    for t in range(l):
        for i in range(h):
            grp = i // (h // g)
            state[:, i] = torch.exp(A[:, t, i])[:, None, None] * state[:, i] + X[:, t, i, :, None] * B[:, t, grp, None, :]
            Y[:, t, i] = (state[:, i] * C[:, t, grp, None, :]).sum(-1)
    return Y, state


def random_inputs(b=2, l=37, h=4, p=8, g=2, n=16, dtype=torch.float64, seed=0, initial_states=False):
    "Random SSD inputs with Mamba-2-like decays: dt = softplus(randn - 4), A = -U(1, 16)."
    gen = torch.Generator().manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=torch.float64) - 4)
    a = -torch.empty(h, dtype=torch.float64).uniform_(1, 16, generator=gen)
    X = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64) * dt[..., None]
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64) if initial_states else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(X), cast(dt * a), cast(B), cast(C), cast(s0)


def rel_err(a, b):
    "Max-norm error of `a` relative to the size of reference `b`."
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()

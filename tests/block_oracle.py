"""An independent float64 reference of the Mamba-2 block: one token at a time, from the parameters only.

It shares no code with `mamba2`: the projection split, the convolution window, the step sizes, the
per-head recurrence and the per-group gated RMSNorm are all spelled out with plain indexing.
"""

import torch


def reference_block(block, u, initial_state=None):
    "Float64 outputs `(b, l, d_model)` and final SSM state of `block` (a mamba2.Mamba2) on `u`, token by token."
    c, P = block.config, {k: v.detach().double() for k, v in block.state_dict().items()}
    u = u.detach().double()
    bsz, L, _ = u.shape
    h, p, n, g, k, d_in = c.nheads, c.headdim, c.d_state, c.ngroups, c.d_conv, c.d_inner
    conv_dim = d_in + 2 * g * n
    A, Dh = (
        -torch.exp(P["A_log"]),
        P["D"].reshape(h, -1),
    )  # D per head (h, 1) or per channel (h, p)
    if initial_state is not None:
        state = initial_state.detach().double().clone()
    elif c.learnable_init_states:
        state = P["init_states"].expand(bsz, h, p, n).clone()
    else:
        state = torch.zeros(bsz, h, p, n, dtype=torch.float64)
    window = torch.zeros(
        bsz, conv_dim, k, dtype=torch.float64
    )  # the last k conv inputs, oldest first
    outputs = []
    for t in range(L):
        proj = u[:, t] @ P["in_proj.weight"].T + P.get("in_proj.bias", 0)
        z, xBC, dt_raw = (
            proj[:, :d_in],
            proj[:, d_in : d_in + conv_dim],
            proj[:, d_in + conv_dim :],
        )
        window = torch.cat([window[:, :, 1:], xBC[:, :, None]], dim=2)
        pre = (window * P["conv1d.weight"][:, 0, :]).sum(-1) + P.get("conv1d.bias", 0)
        act = pre * torch.sigmoid(pre)
        x = act[:, :d_in].reshape(bsz, h, p)
        B, C = (
            act[:, d_in : d_in + g * n].reshape(bsz, g, n),
            act[:, d_in + g * n :].reshape(bsz, g, n),
        )
        dt = torch.log1p(torch.exp(dt_raw + P["dt_bias"])).clamp(
            *c.dt_limit
        )  # (bsz, h)
        y = torch.zeros(bsz, h, p, dtype=torch.float64)
        for i in range(h):
            grp = i // (h // g)
            state[:, i] = (
                torch.exp(dt[:, i] * A[i])[:, None, None] * state[:, i]
                + (dt[:, i, None] * x[:, i])[:, :, None] * B[:, grp, None, :]
            )
            y[:, i] = (state[:, i] * C[:, grp, None, :]).sum(-1) + Dh[i] * x[:, i]
        y, gate = y.reshape(bsz, d_in), z * torch.sigmoid(z)
        if not c.norm_before_gate:
            y = y * gate
        normed, size = torch.empty_like(y), d_in // g
        for j in range(g):  # RMS over each group's channels
            part = y[:, j * size : (j + 1) * size]
            normed[:, j * size : (j + 1) * size] = part / torch.sqrt(
                part.square().mean(-1, keepdim=True) + 1e-5
            )
        normed = normed * P["norm.weight"]
        if c.norm_before_gate:
            normed = normed * gate
        outputs.append(normed @ P["out_proj.weight"].T + P.get("out_proj.bias", 0))
    return torch.stack(outputs, dim=1), state


def randomize_(module, scale=0.3, seed=0):
    "Overwrite every parameter with seeded noise, so that no weight sits at a special initial value."
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(
                torch.randn(prm.shape, generator=gen, dtype=torch.float64) * scale
            )
    return module

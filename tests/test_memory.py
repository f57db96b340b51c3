"""Training memory: the bytes autograd keeps for the backward of one block forward.

`saved_bytes` sums the tensors autograd saves (through `saved_tensors_hooks`), each storage
once. `Mamba2.recompute = True` keeps only each segment's inputs (`torch.utils.checkpoint`) and
recomputes the convolution, the SSD with its decays and scores, and the norm in the backward.
The gradients must be those of the plain path, in float64.
"""

import pytest
import torch
from oracle import rel_err

from mamba2 import Mamba2, Mamba2Config


def saved_bytes(fn) -> int:
    "Bytes of the tensors autograd saves while `fn()` runs, each storage counted once."
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr(), t.device] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def block_130m_shaped(impl: str, recompute: bool, dtype=torch.float32) -> Mamba2:
    "mamba2-130m's head, state and chunk sizes, 8 heads instead of 24."
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=256, d_state=128, headdim=64, chunk_size=256, impl=impl)
    block = Mamba2(cfg, dtype=dtype)
    block.recompute = recompute
    block.cpu_segment = 1 << 30  # one pass, as on a GPU
    return block


def test_recompute_keeps_only_the_inputs():
    "At (2, 1024): the plain and fast paths keep many times the input; recompute keeps it."
    u = torch.randn(2, 1024, 256)
    kept = {}
    for impl, recompute in (("chunked", False), ("fast", False), ("fast", True)):
        block = block_130m_shaped(impl, recompute)
        kept[impl, recompute] = saved_bytes(lambda: block(u.requires_grad_()))
    print({k: round(v / 2**20, 1) for k, v in kept.items()})
    # recompute: u and the parameters only (a few MiB), counted, not timed
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    assert kept["fast", True] <= u.numel() * 4 + params
    assert kept["fast", False] > 10 * kept["fast", True]


@pytest.mark.parametrize("segment", [1 << 30, 256])
def test_recompute_gradients_match_the_plain_path(segment):
    """float64: the same gradients as the plain path (chapter 4's ssd_chunked, nothing
    recomputed). Both are the same sums to float64 rounding, a few 1e-16 relative per
    operation, over a few hundred terms: 1e-10 leaves a wide margin."""
    u = torch.randn(2, 600, 256, dtype=torch.float64)
    grads = {}
    for impl, recompute in (("chunked", False), ("fast", True)):
        block = block_130m_shaped(impl, recompute, torch.float64)
        block.cpu_segment = segment
        x = u.clone().requires_grad_()
        y = block(x)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        grads[impl] = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(grads["fast"], grads["chunked"]):
        assert rel_err(a, b) < 1e-10

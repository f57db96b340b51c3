"""Compile once: `torch.compile` of the block and of the SSD serves every sequence length.

The first call compiles; every later call, at other lengths (odd ones, one past a CPU segment),
runs under `torch.compiler.set_stance("fail_on_recompile")`, which raises instead of compiling
again. Lengths are of more than one chunk: a length of at most one chunk (one chunk of the
padded sequence, a size of 1 that Dynamo always specialises) is a second graph, shared by all
such lengths (`test_short_lengths_share_a_second_graph`).
Tiny sizes: Inductor compiles C++ on a CPU, several seconds per graph.
"""

import pytest
import torch
from oracle import naive_ssd, random_inputs, rel_err
from torch._dynamo.utils import counters

from mamba2 import Mamba2, Mamba2Config, ssd
from mamba2.fast import ssd_fast


@pytest.fixture(autouse=True)
def fresh_compilation():
    """No compiled graph reused from an earlier process: a cached graph carries the guards
    of the code that made it, which may have been other code than this."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        with torch._inductor.config.patch(fx_graph_cache=False):
            yield


# float32, compiled against eager: Inductor fuses and reorders the same operations (and takes
# the decay matrix for the state passing, chapter 4), so the two differ by float32 rounding,
# a few 1e-7 relative, summed over at most a few hundred terms: 1e-5 leaves a margin of 10.
F32_TOL = 1e-5


def tiny_block(impl: str) -> Mamba2:
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=32, d_state=8, headdim=16, chunk_size=16, impl=impl)
    block = Mamba2(cfg)
    block.cpu_segment = 32  # eager: lengths over 32 run in segments; compiled: one pass
    return block


@pytest.mark.parametrize("impl", ["auto"])
def test_block_compiles_once(impl):
    """`torch.compile(block, dynamic=True)`: one graph for 3 to 44 chunks, as eager.
    (Chapter 4's plain `ssd_chunked` is not shaped for this: its loop over chunks is unrolled
    into one graph per count of chunks; on a CPU, compiled or not, the front door runs
    `ssd_fast` for 'auto': tests/test_triton.py checks that routing.)"""
    counters.clear()
    block = tiny_block(impl)
    compiled = torch.compile(block, dynamic=True)
    with torch.no_grad():
        for i, l in enumerate((37, 100, 64, 701)):
            u = torch.randn(2, l, 32, generator=torch.Generator().manual_seed(l))
            with torch.compiler.set_stance(
                "default" if i == 0 else "fail_on_recompile"
            ):
                y = compiled(u)
            assert rel_err(y, block(u)) < F32_TOL, l
    assert counters["stats"]["unique_graphs"] == 1


def test_ssd_compiles_once_with_the_length_marked_dynamic():
    """`torch._dynamo.mark_dynamic` on the length of the inputs (other sizes stay static):
    the front door to `ssd_fast` with an initial state, float64 against the oracle."""
    compiled = torch.compile(ssd, fullgraph=True)
    for i, l in enumerate((41, 96, 203)):
        X, A, B, C, s0 = random_inputs(
            b=2, l=l, h=4, g=2, p=3, n=5, initial_states=True, seed=l
        )
        for t in (X, A, B, C):
            torch._dynamo.mark_dynamic(t, 1)
        with torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            Y, s = compiled(X, A, B, C, 16, s0, "fast")
        Y_ref, s_ref = naive_ssd(X, A, B, C, s0)
        # float64: both are the oracle's sums up to float64 rounding
        assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10, l


def test_short_lengths_share_a_second_graph():
    "Lengths up to one chunk (here 16) pad to one chunk: one more graph serves all of them."
    compiled = torch.compile(ssd_fast, dynamic=True)
    for i, l in enumerate((5, 16, 11)):
        X, A, B, C, _ = random_inputs(b=2, l=l, h=2, g=1, p=3, n=4, seed=l)
        with torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            Y, s = compiled(X, A, B, C, 16)
        Y_ref, s_ref = naive_ssd(X, A, B, C)
        assert rel_err(Y, Y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10, l

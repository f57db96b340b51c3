"""Decoding without waiting for the device (chapter 7): `generate` looks at the device's results (are the
logits distributions? are all sequences finished?) every `LOOK_EVERY` tokens on a GPU instead of every token,
and must return exactly the tokens of a look at every token. On a CPU it looks at every token; the tests
here make it look less often on the CPU too (by patching `_look_every`), so that the host-side logic is
checked on any machine. The GPU tests (skipped without one) check the kept CUDA graphs."""

import pytest
import torch
from oracle import agree_until_near_tie

from mamba2 import generation
from mamba2.block import Mamba2Config
from mamba2.generation import stream
from mamba2.lm import Mamba2LMHeadModel

VOCAB = 40


def tiny(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = Mamba2Config(
        d_model=32,
        n_layer=2,
        d_state=8,
        headdim=8,
        chunk_size=8,
        vocab_size=VOCAB,
        pad_vocab_size_multiple=8,
    )
    return Mamba2LMHeadModel(config, device=device, dtype=dtype).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


PROMPT = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))


def generate_looking_every(monkeypatch, every, model, ids, n, **kwargs):
    monkeypatch.setattr(generation, "_look_every", lambda input_ids, streamer: every)
    return model.generate(ids, n, **kwargs)


def sampling_cases(model, ids, n):
    "Greedy and sampled, with an EOS that some sequences produce early and others late or never."
    greedy = model.generate(ids, n, temperature=0)
    seen = [set(row.tolist()) for row in greedy[:, ids.shape[1] :]]
    eos_some = next(
        t for t in range(VOCAB) if 0 < sum(t in s for s in seen) < len(seen)
    )
    first = greedy[:, ids.shape[1]]  # every sequence's first token: all finish at once
    for kwargs in (
        dict(temperature=0),
        dict(temperature=0, eos_token_id=eos_some),
        dict(temperature=1.0, top_k=8, top_p=0.9, eos_token_id=eos_some),
        dict(temperature=0.7, eos_token_id=3),
    ):
        yield kwargs
    if (first == first[0]).all():
        yield dict(temperature=0, eos_token_id=int(first[0]))


@pytest.mark.parametrize("every", [2, 3, 5, 64])
def test_looking_every_few_tokens_gives_the_tokens_of_looking_at_each(
    model, monkeypatch, every
):
    "The same computation on the same machine: the same tokens, the same length, bitwise."
    for kwargs in sampling_cases(model, PROMPT, 25):
        seeded = lambda: torch.Generator().manual_seed(4)  # noqa: E731
        each = model.generate(PROMPT, 25, generator=seeded(), **kwargs)
        fewer = generate_looking_every(
            monkeypatch, every, model, PROMPT, 25, generator=seeded(), **kwargs
        )
        assert torch.equal(each, fewer), (every, kwargs)


@pytest.mark.parametrize("every", [2, 3, 64])
def test_all_finished_cuts_where_looking_at_each_token_stops(model, monkeypatch, every):
    "Every sequence stops at its first token: one token, whenever the next look comes."
    one = PROMPT[:1]
    first = model.generate(one, 1, temperature=0)[0, -1].item()
    each = model.generate(one, 30, temperature=0, eos_token_id=first)
    fewer = generate_looking_every(
        monkeypatch, every, model, one, 30, temperature=0, eos_token_id=first
    )
    assert each.shape == (1, 8) and torch.equal(each, fewer)
    # an empty batch is finished at once, as before; no new tokens is the prompt
    empty = PROMPT[:0]
    assert generate_looking_every(
        monkeypatch, every, model, empty, 9, eos_token_id=1
    ).shape == (0, 8)
    assert torch.equal(
        generate_looking_every(monkeypatch, every, model, PROMPT, 0, eos_token_id=1),
        PROMPT,
    )


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_that_are_no_distribution_raise_whenever_looked_at(
    model, monkeypatch, every, temperature
):
    "NaN weights: a ValueError naming the problem, not a token (nor multinomial's error)."
    broken = tiny()
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = torch.nan
    for ids in (PROMPT, PROMPT[:1]):
        with pytest.raises(ValueError, match="logits hold NaN, \\+inf or rows of -inf"):
            generate_looking_every(
                monkeypatch, every, broken, ids, 6, temperature=temperature
            )


def test_stream_and_streamer_still_see_each_token(model):
    "A reader of each token stops with the last one needed: no steps past all finished."
    first = model.generate(PROMPT[:1], 1, temperature=0)[0, -1].item()
    assert len(list(stream(model, PROMPT[:1], 20, 0, eos_token_id=first))) == 1
    seen = []
    model.generate(PROMPT[:1], 20, 0, eos_token_id=first, streamer=seen.append)
    assert len(seen) == 1
    assert generation._look_every(PROMPT, None) == 1  # on the CPU
    assert generation._look_every(PROMPT, seen.append) == 1


def test_valid_rows_is_the_old_check():
    "amax(-1).isfinite(): no NaN, no +inf, a finite logit; as the per-element check said."
    inf, nan = torch.inf, torch.nan
    rows = torch.tensor(
        [[1.0, 2, 3], [1, nan, 3], [1, inf, 2], [-inf, -inf, -inf], [-inf, 0, -inf]]
    )
    finite = rows.isfinite()
    old = (finite | rows.isneginf()).all(-1) & finite.any(-1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(generation._valid_rows(rows.to(dtype)), old)


def test_agree_until_near_tie_finds_a_difference_before_any_tie(model):
    "The GPU tests' check of two computations' greedy tokens, checked itself here."
    a = model.generate(PROMPT, 6, temperature=0)
    assert agree_until_near_tie(model, PROMPT, a, a.clone(), VOCAB)
    b = a.clone()
    b[:, PROMPT.shape[1]] = (b[:, PROMPT.shape[1]] + 1) % VOCAB  # the first new token
    assert not agree_until_near_tie(model, PROMPT, a, b, VOCAB)
    assert agree_until_near_tie(model, PROMPT, a, b, VOCAB, tol=2.0)  # all near-ties


def test_greedy_draw_notes_bad_rows_and_finished_ones_without_waiting():
    "The argmax; NaN, +inf or all -inf noted in `ok`; finished rows give EOS and stay so."
    inf, nan = torch.inf, torch.nan
    logits = torch.tensor(
        [[0.0, 2.0, 1.0], [nan, 0.0, 5.0], [-inf, -inf, -inf], [3.0, 0.0, 0.0]]
    )
    ok, finished = torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 0, 1]).bool()
    token = generation.greedy_draw(logits, ok, finished, 1)
    assert ok.tolist() == [True, False, False, True]
    assert token[0] == 1 and token[3] == 1  # the argmax, and EOS for a finished row
    assert ((0 <= token) & (token < 3)).all()  # a bad row's token is still an id
    assert finished.tolist() == [True, False, False, True]  # row 0 gave EOS
    token = generation.greedy_draw(logits, ok, torch.zeros(4).bool(), -1)  # no EOS
    assert token[3] == 0 and ok.tolist() == [True, False, False, True]


# ---- on a GPU: the kept graphs --------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_a_kept_graph_is_replayed_by_the_next_call_and_sees_new_weights():
    from mamba2.graphs import _KEPT

    model = tiny("cuda")
    ids = PROMPT.cuda()
    a = model.generate(ids, 20, temperature=0)
    kept = _KEPT[model]
    assert torch.equal(model.generate(ids, 20, temperature=0), a)
    assert _KEPT[model] is kept  # no second capture for the same batch
    with (
        torch.no_grad()
    ):  # weights changed in place: the graph reads them where they are
        model.lm_head.weight.mul_(-1)
    # the plain step: the graph's step (chapter 10's where Triton runs) may round
    # otherwise, so the tokens are the same but at a near-tie of two logits
    plain = model.generate(ids, 20, temperature=0, cuda_graph=False)
    changed = model.generate(ids, 20, temperature=0)
    assert agree_until_near_tie(model, ids, plain, changed, VOCAB)
    assert not torch.equal(changed, a) and _KEPT[model] is kept
    model.half()  # new tensors elsewhere: captured again
    half = model.generate(ids, 20, temperature=0)
    assert _KEPT[model] is not kept and half.shape == a.shape
    plain = model.generate(ids, 20, temperature=0, cuda_graph=False)
    assert agree_until_near_tie(model, ids, plain, half, VOCAB, tol=1e-2)


@gpu
@pytest.mark.parametrize("length", [5, 8, 21])
@torch.inference_mode()
def test_a_prompt_through_graphs_gives_the_forward_pass_logits_and_cache(length):
    """`GraphedStep.prefill`: whole pieces from a graph of the forward pass, the rest a
    replayed step each (pieces of 8 and 2 here: 2 2 1, 8, and 8 8 2 2 1). In
    float32 both ways sum the same terms in other orders: a few float32 roundings,
    grown through two layers, well under 1e-4."""
    from mamba2.graphs import GraphedStep

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    model = tiny("cuda")
    ids = torch.randint(
        0, VOCAB, (3, length), generator=torch.Generator().manual_seed(2)
    )
    ids = ids.cuda()
    graphed = GraphedStep(model, 3, pieces=(8, 2))
    for _ in range(2):  # the second prompt starts from the empty state again
        got = graphed.prefill(model, ids).clone()
        cache = model.allocate_cache(3)
        want = model.lm_head(model.hidden_states(ids, cache)[:, -1])
        assert rel(got, want) < 1e-4
        for mine, theirs in zip(graphed.cache, cache):
            assert rel(mine.ssm_state, theirs.ssm_state) < 1e-4
            assert rel(mine.conv_state, theirs.conv_state) < 1e-4


@gpu
@torch.inference_mode()
def test_the_greedy_graph_is_the_step_s_graph_then_greedy_draw():
    """`GraphedStep.greedy` replays the step and its greedy draw as one graph: the same
    kernels on the same tensors as the step's graph followed by `greedy_draw` launched
    from Python, in the same order. The same computation, so the same tokens and the
    same bookkeeping, bit for bit; with a token it did not return, it starts from it."""
    from mamba2.generation import greedy_draw
    from mamba2.graphs import GraphedStep

    model, ids = tiny("cuda"), PROMPT.cuda()
    runs = []
    for replayed in (False, True):
        graphed = GraphedStep(model, len(ids))
        logits = graphed.prefill(model, ids)
        ok, finished, eos = graphed.start(eos_token_id=5)
        tokens = [greedy_draw(logits[:, :VOCAB], ok, finished, eos)]
        for i in range(20):
            token = tokens[-1] if i != 10 else tokens[-1].flip(0)  # a token of our own
            if replayed:
                tokens.append(graphed.greedy(model, token))
            else:
                tokens.append(greedy_draw(graphed(token)[:, :VOCAB], ok, finished, eos))
        runs.append((torch.stack(tokens, 1), ok.clone(), finished.clone()))
    for plain, replayed in zip(*runs):
        assert torch.equal(plain, replayed)


@gpu
def test_two_streams_of_one_batch_size_at_once_do_not_share_a_graph():
    model = tiny("cuda")
    ids = PROMPT.cuda()
    want = [  # one at a time, from the same kind of graph: the same computation
        model.generate(x, 15, temperature=0, cuda_graph=True)
        for x in (ids, ids.flip(0))
    ]
    first = stream(model, ids, 15, 0, cuda_graph=True)
    second = stream(model, ids.flip(0), 15, 0, cuda_graph=True)
    got = [[], []]
    for a, b in zip(first, second):  # interleaved, a token of each in turn
        got[0].append(a)
        got[1].append(b)
    for x, w, g in zip((ids, ids.flip(0)), want, got):
        assert torch.equal(torch.cat([x, torch.stack(g, 1)], 1), w)


@gpu
def test_bad_logits_on_a_gpu_raise_a_value_error_not_a_device_assert():
    "Last here: a device-side assert would spoil the CUDA context for the tests after it."
    broken = tiny("cuda")
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = torch.nan
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_p=0.9)):
        with pytest.raises(ValueError, match="logits hold NaN"):
            broken.generate(PROMPT.cuda(), 40, **kwargs)
    torch.cuda.synchronize()  # and the device is still well
    assert tiny("cuda").generate(PROMPT[:1].cuda(), 3, temperature=0).shape == (1, 10)

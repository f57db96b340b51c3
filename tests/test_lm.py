"""The language model (chapter 7): both checkpoint formats against transformers, strict loading, cached decoding,
sampling, generation and the command line. Everything is built here: nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from oracle import rel_err
from safetensors.torch import load_file, save_file
from transformers import Mamba2Config as HFConfig
from transformers import Mamba2ForCausalLM

from mamba2.block import Mamba2Config
from mamba2.cli import main
from mamba2.formats import read_config
from mamba2.generation import filter_logits, sample, stream
from mamba2.lm import Mamba2LMHeadModel

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def random_hf_model(
    seed=0, tie=True, vocab=96, hidden=64, layers=2, state=16, head_dim=16, chunk=16
):
    "A transformers Mamba2ForCausalLM with every parameter random (its init leaves norms, D and biases constant)."
    torch.manual_seed(seed)
    config = HFConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        state_size=state,
        head_dim=head_dim,
        num_heads=2 * hidden // head_dim,
        n_groups=1,
        expand=2,
        chunk_size=chunk,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = Mamba2ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
            p.uniform_(0.5, 1.5)
        if name.endswith(
            "out_proj.weight"
        ):  # large mixer outputs: greedy decoding then does not just repeat tokens
            p.normal_(0, 0.3)
    if not tie:
        model.lm_head.weight.normal_(0, 0.1)
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model, ids, n):
    return model.generate(
        ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)
    )


def greedy_margin(logits, vocab_size):
    "The smallest lead of the top logit among the first `vocab_size` over every other logit."
    best = logits[..., :vocab_size].max(-1, keepdim=True)
    others = logits.scatter(-1, best.indices, -torch.inf)
    return (best.values[..., 0] - others.max(-1).values).min().item()


def assert_same_greedy(ours, hf, ids, n):
    """Our greedy tokens equal transformers'. Tokens are discrete: equality holds on any machine only
    when, at every step of the path, the top logit leads every other (padding included) by far more
    than the two implementations differ. Both are measured on the path, on the machine that runs the
    test; the factor 100 (2 would do for the forward passes) leaves room for the cached steps'
    rounding, a few float32 ulps from the forward pass (test_cached_decoding_equals_recomputation)."""
    mine, theirs = ours.generate(ids, n, temperature=0), hf_greedy(hf, ids, n)
    with torch.no_grad():
        a, b = (
            ours(mine[:, :-1])[:, ids.shape[1] - 1 :],
            hf(mine[:, :-1]).logits[:, ids.shape[1] - 1 :],
        )
    assert greedy_margin(a, ours.config.vocab_size) > 100 * (a - b).abs().max().item()
    assert torch.equal(mine, theirs)


def write_mamba_ssm(folder, hf_model, config_json):
    "Write `hf_model`'s weights as mamba_ssm does: pytorch_model.bin (with the tied head copied) and its config.json."
    folder.mkdir(exist_ok=True)
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in hf_model.state_dict().items()
    }
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config_json))
    return folder


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    model = random_hf_model()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    assert "lm_head.weight" not in load_file(
        folder / "model.safetensors"
    )  # tied head left out, as transformers does
    return model, folder


PROMPT = torch.randint(1, 96, (3, 13), generator=torch.Generator().manual_seed(1))


def test_transformers_checkpoint_same_logits_and_greedy_tokens(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = Mamba2LMHeadModel.from_pretrained(folder)
    assert ours.lm_head.weight is ours.backbone.embedding.weight
    ids = torch.randint(
        0, 96, (2, 41)
    )  # longer than two chunks, not a multiple of the chunk size
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-4
    want = hf_greedy(hf, PROMPT, 25)
    assert (
        len(set(want[:, 13:].flatten().tolist())) > 5
    )  # a real sequence, not one token repeated
    assert_same_greedy(ours, hf, PROMPT, 25)


def test_untied_transformers_checkpoint(tmp_path):
    hf = random_hf_model(seed=3, tie=False)
    hf.save_pretrained(tmp_path)
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert (
        not ours.config.tie_embeddings
        and ours.lm_head.weight is not ours.backbone.embedding.weight
    )
    with torch.no_grad():
        assert rel_err(ours(PROMPT), hf(PROMPT).logits) < 1e-4


def test_mamba_ssm_format_same_result(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint
    config = {
        "d_model": 64,
        "d_intermediate": 0,
        "n_layer": 2,
        "vocab_size": 90,
        "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "tie_embeddings": True,
    }
    ours = Mamba2LMHeadModel.from_pretrained(
        write_mamba_ssm(tmp_path / "ssm", hf, config)
    )
    assert ours.lm_head.weight.shape == (96, 64)  # 90 padded to 96
    ids = PROMPT % 90  # 90..95 are padding: not tokens
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-4
    assert_same_greedy(
        ours, hf, ids, 25
    )  # ours never picks padding; transformers' does not here


def test_mamba_ssm_default_ssm_cfg(tmp_path):
    "The published configs say only {'layer': 'Mamba2'}: every mixer field takes mamba_ssm's default."
    hf = random_hf_model(seed=4, vocab=80, hidden=64, state=128, head_dim=64, chunk=256)
    config = {
        "d_model": 64,
        "n_layer": 2,
        "vocab_size": 80,
        "ssm_cfg": {"layer": "Mamba2"},
        "pad_vocab_size_multiple": 16,
    }
    ours = Mamba2LMHeadModel.from_pretrained(
        write_mamba_ssm(tmp_path / "ssm", hf, config)
    )
    c = ours.config
    assert (
        c.d_state,
        c.headdim,
        c.ngroups,
        c.d_conv,
        c.expand,
        c.chunk_size,
        c.tie_embeddings,
    ) == (128, 64, 1, 4, 2, 256, True)
    ids = PROMPT % 80
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-4
    assert_same_greedy(ours, hf, ids, 20)


def test_mamba_ssm_top_level_sizes_required_the_rest_defaulted(tmp_path):
    "The fields that fix tensor shapes must be given (mamba_ssm writes them all); the others take its defaults."
    path = tmp_path / "config.json"
    sizes = {
        "d_model": 64,
        "n_layer": 2,
        "vocab_size": 90,
        "pad_vocab_size_multiple": 8,
    }
    path.write_text(
        json.dumps({**sizes, "ssm_cfg": {"layer": "Mamba2", "headdim": 16}})
    )
    c = read_config(path)
    assert (
        c.n_layer,
        c.vocab_size,
        c.pad_vocab_size_multiple,
        c.tie_embeddings,
        c.residual_in_fp32,
    ) == (2, 90, 8, True, True)
    for field in sizes:
        path.write_text(
            json.dumps(
                {
                    **{k: v for k, v in sizes.items() if k != field},
                    "ssm_cfg": {"layer": "Mamba2"},
                }
            )
        )
        with pytest.raises(ValueError, match=f"{path}.*{field} missing"):
            read_config(path)


def test_save_pretrained_round_trip(hf_checkpoint, tmp_path):
    ours = Mamba2LMHeadModel.from_pretrained(hf_checkpoint[1])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved["ssm_cfg"]["layer"] == "Mamba2"
        and saved["d_model"] == 64
        and saved["d_intermediate"] == 0
    )
    assert set(load_file(tmp_path / "model.safetensors")) == set(ours.state_dict()) - {
        "lm_head.weight"
    }
    again = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    with (
        torch.no_grad()
    ):  # the same weights through the same computation on the same shapes: bitwise
        assert torch.equal(again(PROMPT), ours(PROMPT))


def test_save_pretrained_round_trip_nondefault_fields(tmp_path):
    config = Mamba2Config(
        d_model=32,
        n_layer=1,
        d_state=8,
        headdim=8,
        ngroups=2,
        chunk_size=8,
        vocab_size=50,
        dt_limit=(0.01, 0.5),
        norm_before_gate=True,
        D_has_hdim=True,
        tie_embeddings=False,
    )
    model = Mamba2LMHeadModel(config)
    model.save_pretrained(tmp_path)
    again = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert again.config == config
    ids = torch.randint(0, 50, (2, 19))
    with (
        torch.no_grad()
    ):  # the same weights, the same computation, the same shapes: bitwise
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 15, 17])
def test_cached_decoding_equals_recomputation(prompt_len):
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(
        Mamba2Config(
            d_model=32,
            n_layer=2,
            d_state=8,
            headdim=8,
            ngroups=2,
            chunk_size=8,
            vocab_size=40,
        )
    )
    seq = torch.randint(0, 40, (2, prompt_len + 12))
    with torch.no_grad():
        cache = model.allocate_cache(2)
        logits = model(seq[:, :prompt_len], cache=cache)[:, -1]
        for t in range(prompt_len, seq.shape[1]):
            assert rel_err(logits, model(seq[:, :t])[:, -1]) < 1e-4, t
            logits = model.step(seq[:, t], cache)


def damage(src, dst, change):
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    change(state)
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize(
    "name,change",
    [
        (
            "backbone.layers.1.mixer.A_log",
            lambda s: s.pop("backbone.layers.1.mixer.A_log"),
        ),
        ("backbone.embedding.weight", lambda s: s.pop("backbone.embeddings.weight")),
        (
            "backbone.layers.0.mixer.in_proj.weight",
            lambda s: s.update(
                {"backbone.layers.0.mixer.in_proj.weight": torch.zeros(3, 64)}
            ),
        ),
        (
            "backbone.layers.0.mixer.bogus",
            lambda s: s.update({"backbone.layers.0.mixer.bogus": torch.zeros(2)}),
        ),
        (
            "lm_head.weight",
            lambda s: s.update({"lm_head.weight": torch.zeros(96, 64)}),
        ),  # a tied head that differs
    ],
)
def test_damaged_checkpoints_name_the_tensor(hf_checkpoint, tmp_path, name, change):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        Mamba2LMHeadModel.from_pretrained(
            damage(hf_checkpoint[1], tmp_path / "bad", change)
        )


@pytest.mark.parametrize(
    "change,words",
    [
        ({"d_intermediate": 256}, "d_intermediate"),
        ({"attn_layer_idx": [1], "attn_cfg": {"num_heads": 4}}, "attn_layer_idx"),
        ({"ssm_cfg": {}}, "Mamba1"),
        ({"ssm_cfg": {"layer": "Mamba1"}}, "Mamba1"),
        ({"rms_norm": False}, "rms_norm"),
        ({"ssm_cfg": {"layer": "Mamba2", "rmsnorm": False}}, "gated norm"),
        ({"ssm_cfg": {"layer": "Mamba2", "mystery": 1}}, "mystery"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 48}}, "headdim"),
    ],
)
def test_unsupported_mamba_ssm_configs_are_refused(tmp_path, change, words):
    path = tmp_path / "config.json"
    sizes = {
        "d_model": 64,
        "n_layer": 2,
        "vocab_size": 90,
        "pad_vocab_size_multiple": 8,
    }
    path.write_text(json.dumps({**sizes, "ssm_cfg": {"layer": "Mamba2"}, **change}))
    with pytest.raises(ValueError, match=words):
        read_config(path)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_heads": 3}, "num_heads"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"model_type": "mamba"}, "model_type"),
    ],
)
def test_unsupported_transformers_configs_are_refused(
    hf_checkpoint, tmp_path, change, words
):
    config = {**json.loads((hf_checkpoint[1] / "config.json").read_text()), **change}
    if change.get("model_type"):
        config.pop("hidden_size")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words):
        read_config(tmp_path / "config.json")


TRANSFORMERS_SIZES = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "vocab_size": 96,
    "state_size": 16,
    "head_dim": 64,
    "num_heads": 8,
    "n_groups": 2,
    "expand": 2,
    "conv_kernel": 4,
}


def test_transformers_config_infinity_and_defaults(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mamba2", **TRANSFORMERS_SIZES})[:-1]
        + ', "time_step_limit": [0.0, {"__float__": "Infinity"}]}'
    )
    c = read_config(tmp_path / "config.json")
    assert (
        c.dt_limit == (0.0, float("inf"))
        and c.ngroups == 2
        and not c.tie_embeddings
        and c.n_layer == 2
    )
    assert (c.chunk_size, c.bias, c.conv_bias, c.residual_in_fp32) == (
        256,
        False,
        True,
        True,
    )


@pytest.mark.parametrize("field", sorted(TRANSFORMERS_SIZES))
def test_transformers_config_sizes_required(tmp_path, field):
    "transformers writes every field of its config class; the ones that fix tensor shapes must be there."
    config = {
        "model_type": "mamba2",
        **{k: v for k, v in TRANSFORMERS_SIZES.items() if k != field},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: {field} missing"):
        read_config(tmp_path / "config.json")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(
        '{"d_model": 64, "n_layer": 2, "vocab_size": 90, '
        '"pad_vocab_size_multiple": 8, "ssm_cfg": {"layer": "Mamba2"}}'
    )
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "empty")


def test_hub_id_local_files_only_and_uncached(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="nobody/no-such-model.*Hugging Face Hub"
    ):
        Mamba2LMHeadModel.from_pretrained("nobody/no-such-model", local_files_only=True)


def test_cli_missing_model_exits_nonzero(tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "Hi"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no-such-model" in err


def test_cli_hub_id_offline_and_uncached(tmp_path):
    "A Hub id while offline with an empty cache: a clear message and exit status 1, quickly, no traceback."
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mamba2",
            "generate",
            "--model",
            "state-spaces/mamba2-130m",
            "--prompt",
            "Hi",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert (
        "state-spaces/mamba2-130m" in run.stderr
        and "Hugging Face Hub" in run.stderr
        and "Traceback" not in run.stderr
    )


def brute_force_nucleus(probs, p):
    "The smallest set of most likely tokens whose total probability reaches p, by walking down the sorted list."
    keep, total = torch.zeros_like(probs, dtype=torch.bool), 0.0
    for i in probs.argsort(descending=True).tolist():
        keep[i], total = True, total + probs[i].item()
        if total >= p:
            break
    return keep


def assert_nucleus(mask, probs, p, slack=1e-5):
    """`mask` is the nucleus of `probs` for `p`, up to rounding: filter_logits sums float32 probabilities in
    sorted order, the brute force sums them in Python floats, so where a partial sum lies within rounding
    of p the two may rightly disagree on the token that crosses it (and do, on some CPUs). So: at least
    the nucleus for p - slack and at most the one for p + slack; float32 sums of 300 terms are good
    to about 1e-6."""
    assert (brute_force_nucleus(probs, p - slack) <= mask).all() and (
        mask <= brute_force_nucleus(probs, p + slack)
    ).all()


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.75, 0.95, 1.0])
def test_top_p_is_the_smallest_set_reaching_p(p):
    z = torch.randn(300, 10, generator=torch.Generator().manual_seed(0)) * 2
    kept = filter_logits(z, top_p=p).isfinite()
    for row, mask in zip(z.softmax(-1), kept):
        assert_nucleus(mask, row, p)


def test_top_k_then_top_p():
    z = torch.randn(50, 30, generator=torch.Generator().manual_seed(1))
    assert filter_logits(z, top_k=4).isfinite().sum(-1).eq(4).all()
    both = filter_logits(z, top_k=6, top_p=0.6).isfinite()
    for row, mask in zip(filter_logits(z, top_k=6).softmax(-1), both):
        assert_nucleus(mask, row, 0.6)


def test_sample_frequencies_temperature_and_greedy():
    z = torch.randn(12, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    draws = sample(z.expand(40000, 12), temperature=1.5, top_k=8, generator=g)
    target = filter_logits(z[None] / 1.5, top_k=8)[0].softmax(-1)
    freq = torch.bincount(draws, minlength=12) / 40000
    assert freq[target == 0].sum() == 0 and (freq - target).abs().max() < 0.01
    assert torch.equal(sample(z.expand(2, 12), temperature=0), z.argmax().expand(2))


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        sample(torch.randn(2, 5), **{"temperature": 1.0, **kwargs})


def test_generate_batch_eos_stream_and_shapes(hf_checkpoint):
    ours = Mamba2LMHeadModel.from_pretrained(hf_checkpoint[1])
    greedy = ours.generate(PROMPT, 20, temperature=0)
    assert greedy.shape == (3, 33) and torch.equal(greedy[:, :13], PROMPT)
    # per-sequence stop: sequence 0 stops at a token it produces; sequences that never produce it run on unchanged
    # (bitwise: the same shapes as without EOS, and each row of every product depends on its own sequence only)
    eos = next(t for t in greedy[0, 13:].tolist() if t not in greedy[1, 13:].tolist())
    stopped = ours.generate(PROMPT, 20, temperature=0, eos_token_id=eos)
    k = greedy[0, 13:].tolist().index(eos)
    assert (
        torch.equal(stopped[0, : 14 + k], greedy[0, : 14 + k])
        and (stopped[0, 14 + k :] == eos).all()
    )
    assert torch.equal(stopped[1], greedy[1])
    # all sequences finished: generation stops early (its first token from the same call, batch 1: the
    # same logits bitwise, where batch 3 could differ in the last bits and so in a near tie)
    first = ours.generate(PROMPT[:1], 1, temperature=0)[0, -1].item()
    one = ours.generate(PROMPT[:1], 20, temperature=0, eos_token_id=first)
    assert one.shape == (1, 14)
    # streaming yields the same tokens, one (b,) tensor per step; seeded sampling is reproducible (the same call)
    steps = list(
        stream(
            ours,
            PROMPT,
            7,
            temperature=0.9,
            top_p=0.9,
            generator=torch.Generator().manual_seed(3),
        )
    )
    again = ours.generate(
        PROMPT,
        7,
        temperature=0.9,
        top_p=0.9,
        generator=torch.Generator().manual_seed(3),
    )
    assert len(steps) == 7 and torch.equal(torch.stack(steps, 1), again[:, 13:])
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(PROMPT[0], 5)


def test_bfloat16_model_is_close(hf_checkpoint):
    ours32 = Mamba2LMHeadModel.from_pretrained(hf_checkpoint[1])
    ours16 = Mamba2LMHeadModel.from_pretrained(hf_checkpoint[1], dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = ours32(PROMPT), ours16(PROMPT)
    assert b.dtype == torch.bfloat16 and b.isfinite().all() and rel_err(b, a) < 0.05
    assert ours16.generate(PROMPT, 5, temperature=0).shape == (3, 18)


def test_cli_main_module_is_three_lines():
    assert len((ROOT / "mamba2" / "__main__.py").read_text().strip().splitlines()) <= 3

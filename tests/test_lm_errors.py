"""Bad input and edge cases of the language model and its command line (chapter 7): every case ends with a
correct answer or an exception of the right type whose message names the argument, the value and what was
expected (for files, the path), and nothing is changed on failure. Everything is built here: nothing is
downloaded."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba2.block import Mamba2Config
from mamba2.checkpoints import check_device_dtype
from mamba2.formats import read_config
from mamba2.generation import filter_logits, sample, stream
from mamba2.lm import Mamba2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 50  # padded to 56: ids 50..55 are rows of the embedding, not tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Mamba2Config(
        d_model=32,
        n_layer=2,
        d_state=8,
        headdim=8,
        chunk_size=8,
        vocab_size=VOCAB,
        pad_vocab_size_multiple=8,
    )
    return Mamba2LMHeadModel(config).eval()


IDS = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))


# ---- padding: never generated --------------------------------------------------------------------------------


def test_generation_never_returns_padding(model):
    padded = Mamba2LMHeadModel(model.config)
    with torch.no_grad():  # make the padding rows by far the most likely next tokens
        padded.load_state_dict(model.state_dict())
        h = (
            padded.hidden_states(torch.randint(0, VOCAB, (8, 20)))
            .reshape(-1, 32)
            .mean(0)
        )
        padded.lm_head.weight[VOCAB:] = h / h.norm() * 1e3
        assert (
            padded(IDS)[:, -1].argmax(-1).ge(VOCAB).all()
            and padded.lm_head.weight.shape[0] == 56
        )
    for kwargs in (
        dict(temperature=0),
        dict(temperature=1.0),
        dict(temperature=5.0, top_k=56),
        dict(top_p=1.0),
    ):
        out = padded.generate(
            IDS, 30, generator=torch.Generator().manual_seed(0), **kwargs
        )
        assert out.max() < VOCAB, kwargs
    assert (
        padded(IDS).shape[-1] == 56
    )  # forward keeps the padded logits, as transformers and mamba_ssm do


# ---- generate / stream arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (
            dict(max_new_tokens=-1),
            ValueError,
            "max_new_tokens must be a non-negative integer, got -1",
        ),
        (
            dict(max_new_tokens=2.5),
            TypeError,
            "max_new_tokens must be a non-negative integer, got 2.5",
        ),
        (
            dict(max_new_tokens=None),
            TypeError,
            "max_new_tokens must be a non-negative integer, got None",
        ),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens .* got True"),
        (
            dict(temperature=0, top_p=1.5),
            ValueError,
            r"top_p must be None or a number in \(0, 1\], got 1.5",
        ),
        (dict(temperature=0, top_p=0.0), ValueError, "top_p .* got 0.0"),
        (
            dict(temperature=0, top_k=0),
            ValueError,
            "top_k must be None or an integer >= 1, got 0",
        ),
        (
            dict(max_new_tokens=0, temperature=-1),
            ValueError,
            "temperature must be a finite number >= 0.*got -1",
        ),
        (dict(temperature=math.nan), ValueError, "temperature .* got nan"),
        (dict(temperature=math.inf), ValueError, "temperature .* got inf"),
        (dict(temperature="1"), TypeError, "temperature .* got '1'"),
        (dict(temperature=None), TypeError, "temperature .* got None"),
        (dict(top_k=0), ValueError, "top_k .* got 0"),
        (dict(top_k=-3), ValueError, "top_k .* got -3"),
        (dict(top_k=2.0), TypeError, "top_k .* got 2.0"),
        (dict(top_k=True), TypeError, "top_k .* got True"),
        (dict(top_p=math.nan), ValueError, "top_p .* got nan"),
        (dict(top_p="0.9"), TypeError, "top_p .* got '0.9'"),
        (
            dict(eos_token_id=VOCAB),
            ValueError,
            r"eos_token_id must be None or a token id in \[0, 50\), got 50",
        ),
        (dict(eos_token_id=-1), ValueError, "eos_token_id .* got -1"),
        (dict(eos_token_id=[1, 2]), TypeError, r"eos_token_id .* got \[1, 2\]"),
        (dict(eos_token_id=1.0), TypeError, "eos_token_id .* got 1.0"),
        (
            dict(generator=5),
            TypeError,
            "generator must be None or a torch.Generator, got 5",
        ),
        (dict(streamer=5), TypeError, "streamer must be None or a function, got 5"),
    ],
)
def test_bad_generate_arguments(model, kwargs, error, words):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=words):
        model.generate(IDS, **kwargs)
    if "streamer" not in kwargs:  # stream checks when called, before the first token
        with pytest.raises(error, match=words):
            stream(model, IDS, **kwargs)


@pytest.mark.parametrize(
    "ids,error,words",
    [
        (
            IDS.float(),
            TypeError,
            "input_ids must be an integer tensor .* got torch.float32",
        ),
        (IDS.bool(), TypeError, "input_ids .* got torch.bool"),
        (IDS.tolist(), TypeError, "input_ids .* got list"),
        (IDS[0], ValueError, r"input_ids must have shape \(b, l\), got \(5,\)"),
        (
            IDS.clone().index_put_(
                (torch.tensor(1), torch.tensor(2)), torch.tensor(55)
            ),
            ValueError,
            r"input_ids must be token ids in \[0, 50\) .* got 55 at position \(1, 2\)",
        ),
        (IDS - 1 - IDS, ValueError, "got -1 at position"),
        (IDS[:, :0], ValueError, "at least one token"),
    ],
)
def test_bad_input_ids(model, ids, error, words):
    with pytest.raises(error, match=words):
        model.generate(ids, 3)
    if not (
        torch.is_tensor(ids) and ids.numel() == 0
    ):  # forward answers an empty sequence
        with pytest.raises(error, match=words):
            model(ids)


def test_other_integer_dtypes_and_edge_shapes(model):
    with torch.no_grad():
        assert torch.equal(model(IDS.int()), model(IDS)) and torch.equal(
            model(IDS.to(torch.int16)), model(IDS)
        )
        assert model(IDS[:, :0]).shape == (2, 0, 56) and model(IDS[:0]).shape == (
            0,
            5,
            56,
        )
    assert torch.equal(model.generate(IDS, 0), IDS)  # nothing asked: the prompt
    assert model.generate(IDS[:0], 4, temperature=0).shape == (
        0,
        9,
    )  # an empty batch: an empty answer
    assert model.generate(IDS, 3, temperature=1e-30).shape == (
        2,
        8,
    )  # tiny temperatures do not overflow


def test_sample_and_filter_logits_arguments():
    z = torch.randn(3, 10)
    for bad, error in (
        (dict(top_k=1.5), TypeError),
        (dict(top_p=2), ValueError),
        (dict(top_k=False), TypeError),
    ):
        with pytest.raises(error):
            filter_logits(z, **bad)
    for logits in (z[0], z.long(), z.tolist()):
        with pytest.raises(ValueError, match="logits must be"):
            sample(logits)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="NaN"):
            sample(
                z.index_put((torch.tensor(1), torch.tensor(3)), torch.tensor(bad)),
                temperature=0,
            )
    with pytest.raises(ValueError, match="NaN"):
        sample(torch.full((2, 4), -math.inf))
    masked = z.masked_fill(z < 0, -math.inf)  # -inf for excluded tokens is fine
    masked[:, 0] = 1.0
    assert (
        masked[
            torch.arange(3), sample(masked, generator=torch.Generator().manual_seed(0))
        ]
        .isfinite()
        .all()
    )


# ---- the cache and step ----------------------------------------------------------------------------------------


def test_step_and_cache_checks(model):
    with pytest.raises(
        ValueError,
        match=r"cache must hold 2 InferenceCache .* batch size 2, got 2 for batch sizes \[3\]",
    ):
        model.step(IDS[:, 0], model.allocate_cache(3))
    with pytest.raises(ValueError, match="got 1 for batch sizes"):
        model.step(IDS[:, 0], model.allocate_cache(2)[:1])
    with pytest.raises(ValueError, match="got 4 for batch sizes"):
        model.step(IDS[:, 0], model.allocate_cache(2) * 2)
    with pytest.raises(ValueError, match="cache must hold"):
        model(IDS, cache=model.allocate_cache(3))
    with pytest.raises(
        TypeError, match="cache must be allocate_cache's list .* got NoneType"
    ):
        model.step(IDS[:, 0], None)
    with pytest.raises(TypeError, match="got str"):
        model(IDS, cache="cache")
    with pytest.raises(ValueError, match=r"token must have shape \(b,\), got \(\)"):
        model.step(IDS[0, 0], model.allocate_cache(2))
    with pytest.raises(ValueError, match=r"token must have shape \(b,\), got \(2, 5\)"):
        model.step(IDS, model.allocate_cache(2))
    with pytest.raises(ValueError, match="token must be token ids .* got 50"):
        model.step(torch.tensor([1, 50]), model.allocate_cache(2))
    for bad, error in ((-1, ValueError), (2.0, TypeError), (None, TypeError)):
        with pytest.raises(error, match="batch_size"):
            model.allocate_cache(bad)


# ---- loading ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def saved(model, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_corrupted_weights_name_the_file(model, saved, kind, damage):
    if kind == "bin":
        os.remove(saved / "model.safetensors")
        torch.save(model.state_dict(), saved / "pytorch_model.bin")
    file = saved / (
        "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    )
    {
        "truncated": cut_short,
        "garbage": lambda f: f.write_bytes(b"not weights " * 50),
        "empty": lambda f: f.write_bytes(b""),
    }[damage](file)
    with pytest.raises(ValueError, match=f"{file} cannot be read") as e:
        Mamba2LMHeadModel.from_pretrained(saved)
    assert "weights_only=False" not in str(e.value)


def test_pickle_of_more_than_tensors_is_refused(model, saved):
    os.remove(saved / "model.safetensors")
    torch.save({"model": model.state_dict(), "step": 3}, saved / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match="pytorch_model.bin does not hold a state dict"
    ):
        Mamba2LMHeadModel.from_pretrained(saved)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_named(saved, bad):
    state = load_file(saved / "model.safetensors")
    state["backbone.layers.1.mixer.D"][0] = bad
    save_file(state, saved / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: backbone\.layers\.1\.mixer\.D hold NaN or infinite",
    ):
        Mamba2LMHeadModel.from_pretrained(saved)


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"d_model": 32, "n_layer": 2', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"model_type": "llama"}', "neither mamba_ssm's format"),
        (
            '{"ssm_cfg": {"layer": "Mamba2"}}',
            "d_model, n_layer, vocab_size, pad_vocab_size_multiple missing",
        ),
    ],
)
def test_bad_config_json_names_the_file(saved, text, words):
    (saved / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{saved / 'config.json'}.*{words}"):
        Mamba2LMHeadModel.from_pretrained(saved)


@pytest.mark.parametrize(
    "field", ["d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"]
)
def test_mamba_ssm_config_without_a_size(saved, field):
    config = json.loads((saved / "config.json").read_text())
    del config[field]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: {field} missing"):
        Mamba2LMHeadModel.from_pretrained(saved)


def test_config_json_missing_or_not_utf8(saved):
    (saved / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_config(saved / "config.json")
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{saved / 'config.json'} not found"):
        Mamba2LMHeadModel.from_pretrained(saved)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(device="nonsense"), ValueError, "device 'nonsense' cannot be used here"),
        (dict(device="cuda:99"), ValueError, "device 'cuda:99' cannot be used here"),
        (
            dict(dtype=torch.int64),
            ValueError,
            "dtype must be None or one of .* got torch.int64",
        ),
        (dict(dtype="float32"), TypeError, "dtype must be .* got 'float32'"),
    ],
)
def test_from_pretrained_bad_device_or_dtype(saved, kwargs, error, words):
    with pytest.raises(error, match=words):
        Mamba2LMHeadModel.from_pretrained(saved, **kwargs)


@pytest.mark.parametrize(
    "name,error", [(None, TypeError), (3, TypeError), ("", ValueError)]
)
def test_from_pretrained_bad_name(name, error):
    with pytest.raises(
        error, match="name_or_path must be a folder or a Hugging Face Hub id"
    ):
        Mamba2LMHeadModel.from_pretrained(name)


def test_check_device_dtype_accepts_what_works():
    check_device_dtype("cpu", torch.float64)
    check_device_dtype(torch.device("cpu"), None)


# ---- saving ----------------------------------------------------------------------------------------------------


def test_save_pretrained_to_a_file_or_under_one_changes_nothing(model, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=f"{file} is a file"):
        model.save_pretrained(file)
    with pytest.raises(OSError, match=str(file)):
        model.save_pretrained(file / "sub")
    assert file.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["a-file"]


def test_save_pretrained_refuses_a_folder_with_other_weights(model, tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(FileExistsError, match="model-00001-of-00002.safetensors"):
        model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00002.safetensors"]


def test_failed_save_leaves_the_old_checkpoint(model, saved, monkeypatch):
    before = {f: (saved / f).read_bytes() for f in os.listdir(saved)}
    other = Mamba2LMHeadModel(
        Mamba2Config(d_model=32, n_layer=1, d_state=8, headdim=8, vocab_size=VOCAB)
    )
    import safetensors.torch

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(saved)
    assert {
        f: (saved / f).read_bytes() for f in os.listdir(saved)
    } == before  # no temporary folder left either


# ---- the command line, in a subprocess ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(model, tmp_path_factory):
    "The tiny model, saved with a tokenizer of its own: one id per character of a small alphabet."
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(folder)
    alphabet = (
        " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVW"  # 50 characters: ids 0..49
    )
    tok = Tokenizer(
        models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token=" ")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="W").save_pretrained(folder)
    # a tokenizer with more ids than the model has tokens
    big = folder.parent / "big-tokenizer"
    tok_big = Tokenizer(
        models.WordLevel({c: i for i, c in enumerate(alphabet + "XYZ")}, unk_token=" ")
    )
    tok_big.pre_tokenizer, tok_big.decoder = tok.pre_tokenizer, tok.decoder
    PreTrainedTokenizerFast(tokenizer_object=tok_big).save_pretrained(big)
    # a checkpoint whose weights are cut short
    broken = folder.parent / "broken"
    broken.mkdir()
    for f in os.listdir(folder):
        (broken / f).write_bytes((folder / f).read_bytes())
    cut_short(broken / "model.safetensors")
    return folder


def run_cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mamba2", "generate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def cli_cases(folder):
    "Each mistake: the arguments after `generate`, and a word the one error line must contain."
    m = ["--model", str(folder), "--prompt", "hello"]
    return [
        (
            m + ["--device", "cuda:99" if torch.cuda.is_available() else "cuda"],
            "device 'cuda",
        ),
        (m + ["--device", "nonsense"], "device 'nonsense'"),
        (m + ["--cuda-graph"], "--cuda-graph needs a CUDA --device, got 'cpu'"),
        (m + ["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (m + ["--temperature", "nan"], "temperature"),
        (m + ["--top-p", "1.5"], "top_p must be None or a number in (0, 1], got 1.5"),
        (m + ["--top-p", "1.5", "--temperature", "0"], "top_p"),
        (m + ["--top-k", "0"], "top_k"),
        (m + ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (m + ["--seed", "-1"], "--seed"),
        (m + ["--tokenizer", "/nonexistent"], "'/nonexistent': no such folder"),
        (
            [
                "--model",
                str(folder),
                "--prompt",
                "XYZ",
                "--tokenizer",
                str(folder.parent / "big-tokenizer"),
            ],
            "the tokenizer does not fit",
        ),
        (["--model", str(folder), "--prompt", ""], "gives no tokens"),
        (
            ["--model", str(folder.parent / "broken"), "--prompt", "hi"],
            "model.safetensors cannot be read",
        ),
        (
            ["--model", str(folder.parent / "no-such-model"), "--prompt", "hi"],
            "no-such-model",
        ),
        (["--model", str(folder.parent), "--prompt", "hi"], "config.json not found"),
    ]


def test_cli_mistakes_end_in_one_error_line(cli_model):
    for args, words in cli_cases(cli_model):
        run = run_cli(*args)
        assert run.returncode == 1, (args, run.stdout, run.stderr)
        assert run.stdout == "", (args, run.stdout)
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, (
            args,
            run.stderr,
        )
        assert "Traceback" not in run.stderr and words in run.stderr, (args, run.stderr)


def test_cli_argparse_usage_errors_exit_2(cli_model):
    run = run_cli("--model", str(cli_model), "--prompt", "hi", "--top-k", "2.5")
    assert (
        run.returncode == 2
        and run.stdout == ""
        and "Traceback" not in run.stderr
        and "--top-k" in run.stderr
    )


def test_cli_zero_new_tokens_and_a_normal_run(cli_model):
    run = run_cli(
        "--model", str(cli_model), "--prompt", "hello", "--max-new-tokens", "0"
    )
    assert run.returncode == 0 and run.stdout == "hello", run.stderr
    assert "no new tokens" in run.stderr and "-1" not in run.stderr
    run = run_cli(
        "--model",
        str(cli_model),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "12",
        "--seed",
        "0",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--no-cuda-graph",
    )
    assert (
        run.returncode == 0
        and run.stdout.startswith("hello")
        and "tokens/s" in run.stderr
    ), run.stderr


def test_cuda_graph_needs_a_gpu_and_a_bool():
    model = Mamba2LMHeadModel(
        Mamba2Config(
            d_model=32, d_state=8, headdim=8, chunk_size=8, n_layer=1, vocab_size=50
        )
    )
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(
        ValueError, match="cuda_graph=True needs input_ids on a CUDA device"
    ):
        model.generate(ids, 3, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool, got 'yes'"):
        model.generate(ids, 3, cuda_graph="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decoding_gives_the_plain_steps_tokens(dtype, batch, monkeypatch):
    """The captured step replays the same kernels on the same tensors: the same tokens.
    The graph captures the plain step here (kernels=False), not chapter 10's."""
    from functools import partial

    from mamba2 import generation, graphs

    plain = partial(graphs.graphed_step, kernels=False)
    monkeypatch.setattr(generation, "graphed_step", plain)
    torch.manual_seed(0)
    config = Mamba2Config(
        d_model=64, d_state=16, headdim=16, chunk_size=16, n_layer=3, vocab_size=90
    )
    model = Mamba2LMHeadModel(config, device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, 90, (batch, 11), device="cuda")
    for kwargs in (
        dict(temperature=0),
        dict(temperature=1.0, top_p=0.9, eos_token_id=7),
    ):
        runs = [
            model.generate(
                ids,
                30,
                cuda_graph=graph,
                **kwargs,
                generator=torch.Generator("cuda").manual_seed(1),
            )
            for graph in (False, True)
        ]
        assert torch.equal(runs[0], runs[1]), kwargs


def test_a_model_cannot_load_onto_the_meta_device(tmp_path):
    "meta holds shapes, not values: loading weights there is refused by name, also from the CLI."
    Mamba2LMHeadModel(
        Mamba2Config(
            d_model=32, d_state=8, headdim=8, chunk_size=8, n_layer=1, vocab_size=50
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device 'meta' holds no values"):
        Mamba2LMHeadModel.from_pretrained(tmp_path, device="meta")

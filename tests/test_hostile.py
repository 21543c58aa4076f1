"""Hostile files (docs/faults.md, "Hostile files"): model directories, tokenizers, chat templates, configs and
checkpoints written by strangers. Each is refused in one line naming the file and the key, tensor or pattern, before
anything is built or read past what the check needs; nothing here may hang or blow up memory (a regression would, so
the FIFO and /dev/zero cases run in a subprocess with a timeout)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import config
import inputs
import model
import train
from conftest import ROOT
from model import Llama, ModelConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMALL = ["--loss=dpo", "--dim=16", "--n_layers=1", "--n_heads=2", "--batch_size=4", "--micro_batch_size=4",
         "--max_steps=2", "--eval_size=8", "--num_samples=2", "--max_new_tokens=4", "--max_length=16",
         "--max_prompt_length=8", "--warmup_steps=1", "--ckpt_every=2", "--eval_every=0"]


def one_line(rc: int, err: str, *parts: str, prog: str = "train.py"):
    assert rc == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def train_main(args, capsys):
    rc = train.main(args)
    return rc, *capsys.readouterr()


@pytest.fixture
def hf(tmp_path) -> Path:
    """A 2-layer Llama directory, head not tied."""
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=300, dim=16, n_layers=2, n_heads=2, max_seq_len=64, bos_id=256, eos_id=2,
                      tie_embeddings=False)).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(path: Path, **changes):
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**c, **changes}))


# ----------------------------------------------------------------------------------------------------------------------
# config.json: every key read is checked for its type and range, in one line naming the file and the key

BAD_CONFIGS = [
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be an integer >= 1, got '2'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer >= 1, got 2.0"),
    ({"hidden_size": -1}, "hidden_size must be an integer >= 1, got -1"),
    ({"vocab_size": 1.5}, "vocab_size must be an integer >= 1, got 1.5"),
    ({"vocab_size": True}, "vocab_size must be an integer >= 1, got True"),
    ({"eos_token_id": "x"}, "eos_token_id must be an integer >= 0 or a list of them or null, got 'x'"),
    ({"eos_token_id": [2, None]}, "eos_token_id must be an integer >= 0 or a list of them"),
    ({"bos_token_id": -1}, "bos_token_id must be an integer >= 0 or null, got -1"),
    ({"rope_scaling": [1], "rope_parameters": None}, "rope_scaling must be an object or null, got [1]"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}}, "rope_parameters.factor must be a finite number"),
    ({"rope_parameters": {"rope_type": ["llama3"]}}, "rope_parameters.rope_type must be a string"),
    ({"rope_theta": 0, "rope_parameters": None}, "rope_theta must be a finite number > 0, got 0"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number > 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1"),
    ({"model_type": ["llama"]}, "model_type must be a string"),
    ({"dtype": {"x": 1}}, "dtype must be a string or null"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ({"num_attention_heads": -2}, "num_attention_heads must be an integer >= 1, got -2"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1 or null, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
    ({"head_dim": 7}, "head_dim 7 must be even and >= 2: RoPE rotates pairs of features"),
    ({"head_dim": None, "num_attention_heads": 16, "num_key_value_heads": 16},
     "head_dim 1 (hidden_size 16 / num_attention_heads 16) must be even and >= 2"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config: a quantized checkpoint"),
    ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["full_attention"]},
     "layer_types has 1 entries, num_hidden_layers is 2"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[next(iter(c)) + str(i) for i, (c, _) in
                                                                enumerate(BAD_CONFIGS)])
def test_a_config_json_of_the_wrong_type_is_one_line_naming_the_key(hf, changes, message):
    edit_config(hf, **changes)
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(hf)
    assert str(e.value).startswith(f"{hf / 'config.json'}: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [("[1, 2]", "expected a JSON object, got array"),
                                              ('"x"', "expected a JSON object, got string"),
                                              ('{"a": 1,}', "line 1: Expecting property name")])
def test_a_config_json_that_is_not_an_object_is_one_line(hf, content, message):
    (hf / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(hf)


@pytest.mark.parametrize("layers", [3, 100_000_000])
def test_more_layers_than_the_weights_hold_is_refused_before_any_module_is_built(hf, monkeypatch, layers):
    """num_hidden_layers=1e8 once built layers for 13 minutes: now the safetensors header is compared first."""
    def built(*args, **kwargs):
        raise AssertionError("a module was built before the sizes were checked")
    edit_config(hf, num_hidden_layers=layers)
    monkeypatch.setattr(model.Block, "__init__", built)
    with pytest.raises(ValueError, match=f"config.json: num_hidden_layers is {layers}, but the weights hold 2 layer"):
        Llama.from_pretrained(hf)


@pytest.mark.parametrize("changes, message", [({"hidden_size": 1 << 40}, "has shape (300, 16), the config implies "
                                                                          "(300, 1099511627776)"),
                                              ({"vocab_size": 1 << 40}, "the config implies (1099511627776, 16)"),
                                              ({"intermediate_size": 1 << 40}, "the config implies"),
                                              ({"head_dim": 1 << 30}, "the config implies")])
def test_sizes_that_disagree_with_the_weights_are_refused_without_memory(hf, changes, message):
    """Sizes read from config.json are checked against the header's shapes on the meta device: no allocation."""
    edit_config(hf, **changes)
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(hf)
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# weights: float only (no silent cast of a quantized checkpoint), finite, regular files

@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32"),
                                         (torch.int64, "I64"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.float64, "F64")])
def test_weights_that_are_not_fp32_bf16_fp16_are_refused_naming_the_tensor(hf, dtype, name):
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(dtype)
    save_file(tensors, hf / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: tensor model.layers.1.mlp.up_proj.weight is {name}; "
                                         f"only float weights \\(F32, BF16, F16\\)"):
        Llama.from_pretrained(hf)


def test_fp16_and_bf16_weights_load():
    for dtype in (torch.float16, torch.bfloat16):
        assert model.is_finite(torch.full((3,), 60000.0, dtype=dtype))  # an fp16 sum would overflow to inf


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(hf, value, dtype):
    tensors = {k: v.to(dtype) for k, v in load_file(hf / "model.safetensors").items()}
    tensors["model.layers.0.self_attn.k_proj.weight"][3, 1] = value
    save_file(tensors, hf / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: tensor model.layers.0.self_attn.k_proj.weight holds NaN "
                                         "or inf values"):
        Llama.from_pretrained(hf)


def test_bad_safetensors_files_and_shards_are_one_line(hf):
    good = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        Llama.from_pretrained(hf)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match="model.safetensors: a directory, not a regular file"):
        Llama.from_pretrained(hf)
    (hf / "model.safetensors").rmdir()
    (hf / "weights.safetensors").write_bytes(good)
    names = list(load_file(hf / "weights.safetensors"))
    index = hf / "model.safetensors.index.json"
    for weight_map, message in [(["x"], "no 'weight_map' object"),
                                ({k: "../weights.safetensors" for k in names}, "not a file name in"),
                                ({k: "/etc/passwd" for k in names}, "not a file name in"),
                                ({k: 3 for k in names}, "no 'weight_map' object"),
                                ({**{k: "weights.safetensors" for k in names}, "extra": "weights.safetensors"},
                                 "weight_map and the shards disagree on \\['extra'\\]")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=message):
            Llama.from_pretrained(hf)
    index.write_text(json.dumps({"weight_map": {k: "weights.safetensors" for k in names}}))
    assert Llama.from_pretrained(hf).config.n_layers == 2


def test_a_bad_init_from_is_one_line_through_train(hf, tmp_path, capsys):
    edit_config(hf, vocab_size="300")
    rc, _, err = train_main(SMALL + [f"--out_dir={tmp_path / 'a'}", f"--init_from={hf}", "--tokenizer=byte"], capsys)
    one_line(rc, err, f"cannot read vocab_size from {hf / 'config.json'}", "vocab_size must be an integer >= 1")
    edit_config(hf, vocab_size=300, num_hidden_layers=100_000_000)
    rc, _, err = train_main(SMALL + [f"--out_dir={tmp_path / 'b'}", f"--init_from={hf}", "--tokenizer=byte"], capsys)
    one_line(rc, err, f"init_from={hf}: {hf / 'config.json'}: num_hidden_layers is 100000000")
    edit_config(hf, num_hidden_layers=2)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, hf / "model.safetensors")
    rc, _, err = train_main(SMALL + [f"--out_dir={tmp_path / 'c'}", f"--init_from={hf}", "--tokenizer=byte"], capsys)
    one_line(rc, err, f"init_from={hf}: {hf / 'model.safetensors'}: tensor model.norm.weight holds NaN or inf")


# ----------------------------------------------------------------------------------------------------------------------
# options: heads, head_dim, seed, WORLD_SIZE

@pytest.mark.parametrize("args, message", [
    (["--n_heads=0"], "n_heads=0 must be >= 1"),
    (["--n_heads=-4"], "n_heads=-4 must be >= 1"),
    (["--dim=24", "--n_heads=8"], "dim=24 / n_heads=8 = head_dim 3 must be even"),
    (["--dim=16", "--n_heads=16"], "head_dim 1 must be even"),
    (["--seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    (["--seed=4294967296"], "seed=4294967296 must be in [0, 4294967295]"),
])
def test_bad_model_and_seed_options_are_one_line(args, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        config.parse_config(args, world_size=1)


def test_model_config_refuses_zero_heads_and_an_odd_head_dim():
    for kwargs in ({"n_heads": 0}, {"n_heads": 2, "n_kv_heads": -1}, {"dim": 24, "n_heads": 8}, {"head_dim": 5}):
        with pytest.raises(ValueError, match="ModelConfig: "):
            ModelConfig(**{"dim": 32, **kwargs})


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 and RANK=0: need WORLD_SIZE >= 1"),
                                          ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2' must be an integer >= 1"),
                                          ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer >= 1"),
                                          ({"WORLD_SIZE": "1.5"}, "WORLD_SIZE='1.5' must be an integer >= 1"),
                                          ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2: need"),
                                          ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' must be an integer >= 0")])
def test_a_bad_world_size_is_one_line(monkeypatch, capsys, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, _, err = train_main(["--max_steps=1"], capsys)
    one_line(rc, err, message)


# ----------------------------------------------------------------------------------------------------------------------
# paths: regular files of a sane size, refused before a byte is read

PROBE = """
import json, sys, data, train
for arg in sys.argv[1:]:
    prog, *args = json.loads(arg)
    print(json.dumps({"train": train.main, "data": data.main}[prog](args)), flush=True)
"""


def test_a_fifo_or_a_device_where_a_file_belongs_is_refused_before_reading(tmp_path):
    """--data, --eval_data and --config on a FIFO (blocked forever) or /dev/zero (read until memory ran out), and
    data.py on them, in one subprocess with a timeout, so that a regression fails here instead of hanging the suite."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    cases = [(["train", f"--{option}={path}", f"--out_dir={tmp_path / 'run'}"], f"{path}: {kind}, not a regular file")
             for option in ("data", "eval_data", "config") for path, kind in ((fifo, "a FIFO"),
                                                                               ("/dev/zero", "a character device"))]
    cases += [(["data", str(fifo), "--tokenizer=byte"], f"{fifo}: a FIFO, not a regular file")]
    p = subprocess.run([sys.executable, "-c", PROBE, *(json.dumps(args) for args, _ in cases)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.stdout.split() == ["2"] * len(cases), p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == len(cases) and "Traceback" not in p.stderr, p.stderr
    for (args, message), line in zip(cases, lines):
        assert line.startswith(f"{args[0]}.py: error: ") and message in line, (args, line)


def test_a_directory_or_a_huge_file_where_a_json_file_belongs_is_refused(tmp_path):
    (tmp_path / "c.json").mkdir()
    with pytest.raises(config.ConfigError, match="c.json: a directory, not a regular file"):
        config.parse_config([f"--config={tmp_path / 'c.json'}"], world_size=1)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: 65 MiB on paper, nothing on disk
        f.truncate(65 * inputs.MiB)
    with pytest.raises(config.ConfigError, match=f"--config={big}: 68157440 bytes, more than the 64 MiB"):
        config.parse_config([f"--config={big}"], world_size=1)
    for path in (Path("/dev/zero"), tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            inputs.read_json(path)
    import tokenizer
    (tmp_path / "t").mkdir()
    with open(tmp_path / "t" / "tokenizer.json", "wb") as f:  # sparse, past the 1 GiB bound of tokenizer files
        f.truncate(inputs.TOKENIZER_LIMIT + 1)
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json: 1073741825 bytes, more than the 1024 MiB"):
        tokenizer.get_tokenizer(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="nested too deeply"):
        (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
        inputs.read_json(tmp_path / "deep.json", want=None)


@pytest.mark.parametrize("content, message", [
    ({"beta": [0.1]}, "beta must be float, got [0.1]"), ({"dim": 1.5}, "dim must be int, got 1.5"),
    ({"seed": 1e30}, "seed must be int, got 1e+30"), ({"packing": "maybe"}, "packing must be bool, got 'maybe'"),
    ({"loss": 3}, "loss must be str, got 3"), ({"max_steps": None}, "max_steps must be int, got None"),
    ({"lr": 1e400}, "lr=inf must be a finite number"), ([{"loss": "dpo"}], "expected a JSON object of options")])
def test_a_config_file_value_of_the_wrong_type_is_one_line(tmp_path, content, message):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(content).replace("Infinity", "1e400"))  # json writes inf as Infinity; 1e400 reads as inf
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.parse_config([f"--config={f}"], world_size=1)


def test_a_config_json_fifo_is_refused(hf, tmp_path):
    (hf / "config.json").unlink()
    os.mkfifo(hf / "config.json")
    with pytest.raises(ValueError, match="config.json: a FIFO, not a regular file"):
        Llama.from_pretrained(hf)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: a manifest.json or state.json of the wrong shape is damage --resume falls back past

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(SMALL + ["--max_steps=4", f"--out_dir={out}"]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def rewrite(ckpt: Path, name: str, value):
    (ckpt / name).write_text(json.dumps(value))
    if name != "manifest.json":  # a manifest that vouches for the damage: verify must look inside
        checkpoint.write_manifest(ckpt)


BAD_CHECKPOINTS = [
    ("manifest.json", [1], "manifest.json: expected a JSON object, got array"),
    ("manifest.json", {"files": []}, "manifest.json is not a valid manifest"),
    ("manifest.json", {"files": {"state.json": {"bytes": "1", "sha256": "x"}}}, "is not a valid manifest"),
    ("manifest.json", {"files": {"../../x": {"bytes": 1, "sha256": "x"}}}, "names '../../x', a file outside"),
    ("state.json", [4], "state.json: expected a JSON object, got array"),
    ("state.json", {"step": "4", "data": {}}, "state.json: step must be an integer >= 0, got '4'"),
    ("state.json", {"step": 4}, "state.json: no data"),
    ("state.json", {"step": 4, "data": {"step": 4, "steps_per_epoch": 0, "batch_size": 4, "seed": 1}},
     "state.json: data.steps_per_epoch must be an integer >= 1, got 0"),
    ("state.json", {"step": 4, "data": {"step": 4, "batch_size": 4, "seed": 1}}, "state.json: no data.steps_per_epoch"),
    ("train_config.json", {"max_steps": None}, "train_config.json: max_steps must be an integer >= 1"),
    ("rng-rank0.json", {"python": 1}, "rng-rank0.json: python must be a list"),
    ("rng-rank0.json", {"python": [3, [], None], "numpy": [], "torch": []},
     "rng-rank0.json: not an RNG state a resume"),
    ("rng-rank0.json", {"python": [3, [1] * 625, None], "numpy": ["MT19937", [1] * 624, 0, 0, 0.0],
                        "torch": [300] * 5056}, "rng-rank0.json: not an RNG state a resume can restore"),
    ("config.json", {"vocab_size": "259"}, "config.json: vocab_size must be an integer >= 1"),
]


@pytest.mark.parametrize("name, value, message", BAD_CHECKPOINTS, ids=[f"{n} {i}" for i, (n, _, _) in
                                                                       enumerate(BAD_CHECKPOINTS)])
def test_verify_names_a_checkpoint_json_of_the_wrong_shape(run_dir, tmp_path, name, value, message):
    shutil.copytree(run_dir / "ckpt-000004", tmp_path, dirs_exist_ok=True)
    if name == "config.json":  # the policy's config.json, its keys edited
        value = {**json.loads((tmp_path / name).read_text()), **value}
    rewrite(tmp_path, name, value)
    problem = checkpoint.verify(tmp_path)
    assert problem is not None and message in problem and "\n" not in problem, problem


@pytest.mark.parametrize("name, value", [("manifest.json", {"files": []}), ("state.json", {"step": "4", "data": {}})])
def test_resume_falls_back_past_a_checkpoint_with_bad_json(run_dir, tmp_path, capsys, name, value):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    rewrite(tmp_path / "ckpt-000004", name, value)
    rc, out, err = train_main(SMALL + ["--max_steps=4", f"--out_dir={tmp_path}", "--resume"], capsys)
    assert rc == 0, err
    assert f"passing over {tmp_path / 'ckpt-000004' / name}" in out
    assert f"falling back to {tmp_path / 'ckpt-000002'}" in out


def test_every_checkpoint_with_bad_json_is_one_line(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    for ckpt in tmp_path.glob("ckpt-*"):
        rewrite(ckpt, "state.json", {"step": [], "data": {}})
    rc, _, err = train_main(SMALL + ["--max_steps=4", f"--out_dir={tmp_path}", "--resume"], capsys)
    one_line(rc, err, "--resume: no usable checkpoint", "state.json: step must be an integer >= 0, got []")


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers: JSON shapes, unique ids, merges of vocabulary tokens, split regexes tiktoken applies as tokenizers does

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> dict:
    """A small byte-level BPE trained by tokenizers, as its tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(["a b! hello world ab ab, it's 2024"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return json.loads(hf.to_str())


def load_tokenizer(tmp_path: Path, tj, config=None, hf_too: bool = False):
    """Our Tokenizer of tj (and, hf_too, whether tokenizers itself loads it: (ours or the error, tokenizers' or its
    error))."""
    import tokenizer
    (tmp_path / "tokenizer.json").write_text(tj if isinstance(tj, str) else json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"} if config is None else config))
    return tokenizer.get_tokenizer(str(tmp_path / "tokenizer.json"))


def edited(tj: dict, edit) -> dict:
    tj = json.loads(json.dumps(tj))
    edit(tj)
    return tj


def split(pattern: dict):
    return lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": pattern, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})


BAD_TOKENIZERS = [
    (lambda tj: tj.clear() or tj.update(x=1), "model must be an object, got None"),
    (lambda tj: tj.update(model=[1]), "model must be an object, got [1]"),
    (lambda tj: tj["model"].update(vocab=[["a", 0]]), "model.vocab must be an object of token -> id"),
    (lambda tj: tj["model"]["vocab"].update(zz="5"), "model.vocab['zz'] must be an id (an integer >= 0), got '5'"),
    (lambda tj: tj["model"]["vocab"].update(zz=-1), "model.vocab['zz'] must be an id (an integer >= 0), got -1"),
    (lambda tj: tj["model"].update(merges={"a": "b"}), "model.merges must be a list"),
    (lambda tj: tj["model"]["merges"].append("a b c"), "must be \"a b\" or [\"a\", \"b\"] (two tokens), got 'a b c'"),
    (lambda tj: tj["model"]["merges"].append(7), "(two tokens), got 7"),
    (lambda tj: tj.update(added_tokens={"<|eos|>": 0}), "added_tokens must be a list"),
    (lambda tj: tj["added_tokens"][0].pop("id"), "added_tokens[0] must be an object with content"),
    (lambda tj: tj["added_tokens"][0].update(id="0"), "added_tokens[0] must be an object with content"),
    (lambda tj: tj.update(pre_tokenizer="ByteLevel"), "pre_tokenizer must be null or an object with a 'type'"),
    (lambda tj: tj.update(normalizer={"types": "NFC"}), "normalizer must be null or an object with a 'type'"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": 3}), "pre_tokenizer.pretokenizers must "
                                                                                    "be a list, got 3"),
    (lambda tj: tj.update(post_processor={"type": "TemplateProcessing", "single": [{"x": 1}]}),
     "post_processor.single must be a list of"),
    (split({"Regex": 5}), "pre_tokenizer.pretokenizers[0].pattern must be {\"Regex\": str}"),
    (split(["a"]), "pre_tokenizer.pretokenizers[0].pattern must be"),
]


@pytest.mark.parametrize("edit, message", BAD_TOKENIZERS, ids=[str(i) for i in range(len(BAD_TOKENIZERS))])
def test_a_tokenizer_json_of_the_wrong_shape_is_one_line_naming_the_key(tmp_path, tokenizer_json, edit, message):
    import tokenizer
    with pytest.raises(tokenizer.TokenizerError) as e:
        load_tokenizer(tmp_path, edited(tokenizer_json, edit))
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer.json'}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_tokenizer_json_that_is_not_an_object_or_not_a_file_is_one_line(tmp_path, tokenizer_json):
    import tokenizer
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json: expected a JSON object, got array"):
        load_tokenizer(tmp_path, "[1]")
    (tmp_path / "tokenizer.json").unlink()
    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json: a FIFO, not a regular file"):
        tokenizer.get_tokenizer(str(tmp_path / "tokenizer.json"))
    for name in ("tok.model", "tok512.bin"):  # a tiktoken BPE file, a llama2.c tokenizer
        os.mkfifo(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: a FIFO, not a regular file"):
            tokenizer.get_tokenizer(str(tmp_path / name))


def test_duplicate_ids_are_refused_where_they_would_lose_text(tmp_path, tokenizer_json):
    """Two tokens with one id: tokenizers loads the file, and one of the two decodes as the other; refused,
    naming both tokens. Added tokens must not take another token's id either."""
    import tokenizer
    dup = edited(tokenizer_json, lambda tj: tj["model"]["vocab"].update({"!": tj["model"]["vocab"]["b"]}))
    hf = tokenizers.Tokenizer.from_str(json.dumps(dup))
    assert hf.token_to_id("!") == hf.token_to_id("b")  # what the refusal prevents: one of them decodes as the other
    with pytest.raises(tokenizer.TokenizerError, match="model.vocab: tokens '!' and 'b' have the same id|"
                                                       "model.vocab: tokens 'b' and '!' have the same id"):
        load_tokenizer(tmp_path, dup)
    b = tokenizer_json["model"]["vocab"]["b"]
    for edit in (lambda tj: tj["added_tokens"][0].update(id=b),
                 lambda tj: tj["added_tokens"].append({**tj["added_tokens"][0], "content": "<|x|>"}),
                 lambda tj: tj["added_tokens"].append({**tj["added_tokens"][0], "id": 999})):
        with pytest.raises(tokenizer.TokenizerError, match="added_tokens\\[[01]\\] .* each id must be one token's"):
            load_tokenizer(tmp_path, edited(tokenizer_json, edit))
    ranks = tmp_path / "tokenizer.model"  # a tiktoken BPE file with a rank twice
    ranks.write_text("YQ== 0\nYg== 0\n")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.model:2: token b'b' rank 0: each token and each"):
        tokenizer.get_tokenizer(str(ranks))


def test_merges_must_be_of_tokens_in_the_vocabulary_as_tokenizers_requires(tmp_path, tokenizer_json):
    import tokenizer
    for parts in (["zz", "q"], ["a", "qq"]):  # the result is in the vocabulary, one part is not
        bad = edited(tokenizer_json, lambda tj: (tj["model"]["vocab"].update({"".join(parts): 500}),
                                                 tj["model"]["merges"].append(parts)))
        with pytest.raises(Exception, match="out of vocabulary"):
            tokenizers.Tokenizer.from_str(json.dumps(bad))
        with pytest.raises(tokenizer.TokenizerError, match=f"merge {len(bad['model']['merges']) - 1} .*: "
                                                           f"'{[p for p in parts if len(p) == 2][0]}' is not in the "
                                                           f"vocabulary"):
            load_tokenizer(tmp_path, bad)


@pytest.mark.parametrize("pattern", [{"Regex": "a*"}, {"Regex": ""}, {"Regex": "x?"}, {"Regex": "\\b"},
                                     {"Regex": "(?=a)"}, {"Regex": "\\s*"}, {"String": ""}])
def test_a_split_regex_that_can_match_the_empty_string_is_refused(tmp_path, tokenizer_json, pattern):
    """tokenizers skips empty matches; tiktoken drops the text after one ('ab' -> 'a') or panics in Rust."""
    import tokenizer
    tj = edited(tokenizer_json, split(pattern))
    hf = tokenizers.Tokenizer.from_str(json.dumps(tj))
    assert hf.decode(hf.encode("a b!ab").ids) == "a b!ab"  # tokenizers applies it without loss
    with pytest.raises(tokenizer.TokenizerError) as e:
        load_tokenizer(tmp_path, tj)
    assert f"tokenizer.json: pre_tokenizer Split pattern {next(iter(pattern.values()))!r} can match the empty " \
           f"string" in str(e.value)


def test_a_split_regex_that_cannot_match_the_empty_string_loads(tmp_path, tokenizer_json):
    pattern = " ?\\p{L}+|\\p{N}{1,3}|\\s+|[^\\s\\p{L}\\p{N}]+"
    tok = load_tokenizer(tmp_path, edited(tokenizer_json, split({"Regex": pattern})))
    assert tok.decode(tok.encode("a b!ab 2024")) == "a b!ab 2024"


BAD_TOKENIZER_CONFIGS = [
    ([1], "tokenizer_config.json: expected a JSON object, got array"),
    ({"eos_token": 5}, "tokenizer_config.json: eos_token must be null, a string or an object with a content string"),
    ({"eos_token": {"text": "<|eos|>"}}, "eos_token must be null, a string or an object with a content string"),
    ({"eos_token": "<|eos|>", "pad_token": ["x"]}, "pad_token must be null, a string or an object"),
    ({"eos_token": "<|eos|>", "chat_template": 5}, "chat_template must be null, a string or a list of"),
    ({"eos_token": "<|eos|>", "chat_template": [1]}, "chat_template must be null, a string or a list of"),
    ({"eos_token": "<|eos|>", "chat_template": [{"name": "default"}]}, "chat_template must be null, a string or a"),
    ({"eos_token": "<|eos|>", "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "rag",
                                                                                       "template": "y"}]},
     "chat_template lists the templates ['tool_use', 'rag'] but none named 'default'"),
]


@pytest.mark.parametrize("config, message", BAD_TOKENIZER_CONFIGS, ids=[str(i) for i in
                                                                        range(len(BAD_TOKENIZER_CONFIGS))])
def test_a_tokenizer_config_of_the_wrong_shape_is_one_line(tmp_path, tokenizer_json, config, message):
    import tokenizer
    with pytest.raises(tokenizer.TokenizerError) as e:
        load_tokenizer(tmp_path, tokenizer_json, config)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_template_list_without_default_is_refused_as_transformers_does(tmp_path, tokenizer_json):
    transformers = pytest.importorskip("transformers")
    config = {"eos_token": "<|eos|>", "chat_template": [{"name": "tool_use", "template": "{{ messages }}"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              chat_template={"tool_use": "{{ messages }}"})
    with pytest.raises(ValueError, match="no default"):
        hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    import tokenizer
    with pytest.raises(tokenizer.TokenizerError, match="none named 'default'"):
        tokenizer.get_tokenizer(str(tmp_path))


@pytest.mark.parametrize("gen, message", [([1], "expected a JSON object, got array"),
                                          ({"eos_token_id": "x"}, "eos_token_id must be an integer >= 0 or a list"),
                                          ({"eos_token_id": [1.5]}, "eos_token_id must be an integer >= 0 or a list")])
def test_a_generation_config_of_the_wrong_shape_is_one_line(tmp_path, tokenizer_json, gen, message):
    import tokenizer
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(tokenizer.TokenizerError, match=f"generation_config.json: {message}"):
        load_tokenizer(tmp_path, tokenizer_json)


def test_a_bad_tokenizer_is_one_line_through_train(tmp_path, tokenizer_json, capsys):
    load_dir = tmp_path / "tok"
    load_dir.mkdir()
    (load_dir / "tokenizer.json").write_text(json.dumps(edited(
        tokenizer_json, lambda tj: tj["model"]["vocab"].update({"!": tj["model"]["vocab"]["b"]}))))
    (load_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    rc, _, err = train_main(SMALL + [f"--out_dir={tmp_path / 'run'}", f"--tokenizer={load_dir / 'tokenizer.json'}",
                                     f"--data={data}"], capsys)
    one_line(rc, err, "tokenizer.json: model.vocab: tokens", "have the same id")


# ----------------------------------------------------------------------------------------------------------------------
# chat templates are untrusted code: bounded in loop items, size and time, refused naming the template's tokenizer

HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops take more than"),
    ("{% for m in messages %}{% for i in range(100000) %}{% for c in 'abcdefghijklmnopqrstuvwxyz' %}{% endfor %}"
     "{% endfor %}{% endfor %}", "loops take more than"),
    ("{% set s = 'x' * 10000000 %}{% for a in s %}{{ '' }}{% endfor %}", "loops take more than"),
    ("{{ 'x' * 500000000 }}", "it repeats a value of 1 items 500000000 times"),
    ("{% set n = 250000000 %}{{ n * 'ab' }}", "it repeats a value of 2 items 250000000 times"),
    ("{{ ['x'] * 100000000 }}", "it repeats a value of 1 items 100000000 times"),
    ("{{ 2 ** 100000000 }}", "it raises 2 to the power 100000000"),
    ("{{ 'x' | center(1000000000) }}", "it passes 1000000000 to a call or filter"),
    ("{{ 'x'.ljust(1000000000) }}", "it passes 1000000000 to a call or filter"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "it builds a value of 16777216 items"),
    ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s }}{% endmacro %}{{ f('x', 40) }}", "it builds a value of"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "its output passes 16000000 characters"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "it recurses too deeply"),
    # refused before the call: a string method or filter whose result outgrows its inputs (100M characters here)
    ("{% set s = 'x' * 10000 %}{{ s.replace('', s) }}", "its replace would build 100020000 characters"),
    ("{% set s = 'x' * 10000 %}{{ s | replace('x', s) }}", "its replace would build 100000000 characters"),
    ("{% set s = 'x' * 10000 %}{{ s.join(s) }}", "its join would build 100000000 characters"),
    ("{% set s = 'y' * 10000 %}{{ s | join(s) }}", "its join would build 100000000 characters"),
    ("{{ ('\\t' * 10000).expandtabs(10000) }}", "its expandtabs would build 100010000 characters"),
    ("{{ '%100000000d' % 1 }}", "its % would build 100000000 characters"),
    ("{{ '{:>100000000}'.format(1) }}", "its format would build 100000000 characters"),
    ("{{ '%100000000d' | format(1) }}", "its format would build 100000000 characters"),
]


@pytest.mark.parametrize("source, message", HOSTILE_TEMPLATES, ids=[str(i) for i in range(len(HOSTILE_TEMPLATES))])
def test_a_template_past_a_rendering_bound_is_refused(source, message):
    import chat
    import tokenizer
    tok = tokenizer.get_tokenizer("byte")
    tok.chat_template = source
    with pytest.raises(chat.ChatTemplateError) as e:
        tok.render([{"role": "user", "content": "hi"}], [[{"role": "assistant", "content": "yo"}]])
    assert str(e.value).startswith("chat template of byte: refused: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_the_time_bound_refuses_a_template_with_no_loop_bound_reached(monkeypatch):
    """The wall-clock bound, checked at every loop item, call and output piece: with it set to 0, any template that
    loops or calls is refused (the real bound, 10 s, is far above what a chat template takes)."""
    import chat
    import tokenizer
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.0)
    tok = tokenizer.get_tokenizer("byte")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(chat.ChatTemplateError, match="refused: rendering takes more than 0 s"):
        chat.render_template(tok, [{"role": "user", "content": "hi"}], False)


def test_bounded_templates_render_as_before():
    """The bounds change nothing a real template does: loop variables, filters with the context, namespaces."""
    import chat
    import tokenizer
    tok = tokenizer.get_tokenizer("byte")
    tok.chat_template = ("{% set ns = namespace(n=0) %}{% for m in messages if m['role'] != 'system' %}"
                         "{% set ns.n = ns.n + 1 %}{{ loop.index }}/{{ loop.length }} {{ m['content'] | trim | upper }}"
                         "{{ '!' if loop.last }}{% endfor %}{{ ns.n }}"
                         "{{ messages | map(attribute='role') | join(',') }}"
                         "{{ [1, 2] * 2 }}{{ 2 ** 10 }}")
    out = chat.render_template(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": " a "},
                                     {"role": "assistant", "content": "b"}], False)
    assert out == "1/2 A2/2 B!2system,user,assistant[1, 2, 1, 2]1024"


def test_a_hostile_template_is_one_line_through_data_py(tmp_path, tokenizer_json):
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|eos|>", "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                                 "{% endfor %}"}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    p = subprocess.run([sys.executable, "data.py", str(data), f"--tokenizer={tmp_path / 'tokenizer.json'}"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    one_line(p.returncode, p.stderr, "loops take more than 1000000 items", prog="data.py")

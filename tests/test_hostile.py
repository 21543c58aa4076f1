"""Hostile files (docs/faults.md, "Hostile files"): model directories, tokenizers, chat templates, configs and
checkpoints written by strangers. Each is refused in one line naming the file and the key, tensor or pattern, before
anything is built or read past what the check needs; nothing here may hang or blow up memory (a regression would, so
the FIFO and /dev/zero cases run in a subprocess with a timeout)."""
import json
import os
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
import json, sys, train
for arg in sys.argv[1:]:
    rc = train.main([arg, "--out_dir=" + sys.argv[1].split("=", 1)[1] + ".run"])
    print(json.dumps(rc), flush=True)
"""


def test_a_fifo_or_a_device_where_a_file_belongs_is_refused_before_reading(tmp_path):
    """--data, --eval_data and --config on a FIFO (blocked forever) or /dev/zero (read until memory ran out), in one
    subprocess with a timeout, so that a regression fails here instead of hanging the suite."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    cases = [(f"--{option}={path}", f"{path}: {kind}, not a regular file") for option in ("data", "eval_data",
                                                                                           "config")
             for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"))]
    p = subprocess.run([sys.executable, "-c", PROBE, *(arg for arg, _ in cases)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.stdout.split() == ["2"] * len(cases), p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == len(cases) and "Traceback" not in p.stderr, p.stderr
    for (arg, message), line in zip(cases, lines):
        assert line.startswith("train.py: error: ") and message in line, (arg, line)


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
    with pytest.raises(ValueError, match="nested too deeply"):
        (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
        inputs.read_json(tmp_path / "deep.json", want=None)


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

"""sample.py: a run directory, a checkpoint or a Hugging Face directory; the run's tokenizer; one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

import sample
from conftest import ROOT
from tokenizer import get_tokenizer
from model import Llama, ModelConfig


def fake_run(path):
    """A run directory as train.py leaves it: train_config.json beside ckpt-<step>/ (a model and its own copy)."""
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, max_seq_len=32,
                              bos_id=tok.bos_id, eos_id=tok.eos_id))
    for step in (1, 2):
        model.save_pretrained(path / f"ckpt-{step:06d}")
        (path / f"ckpt-{step:06d}" / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    (path / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    return model, tok


def greedy(model, tok, prompt: str) -> str:
    new = model.generate([[tok.bos_id] + tok.encode(prompt)], 6, temperature=0.0)[0]
    return prompt + tok.decode([t for t in new if t != tok.eos_id]) + "\n---------------\n"


@pytest.mark.parametrize("where", ["", "ckpt-000002", "ckpt-000001"])
def test_run_dir_or_checkpoint_without_tokenizer(tmp_path, capsys, where):
    model, tok = fake_run(tmp_path)
    assert sample.main(["--ckpt", str(tmp_path / where), "--prompt", "abc=", "--max_new_tokens", "6",
                        "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy(model, tok, "abc=")


def test_hugging_face_dir_needs_tokenizer(tmp_path, capsys):
    model, tok = fake_run(tmp_path / "run")
    model.save_pretrained(tmp_path / "hf")
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--prompt", "x"]) == 2
    assert "no tokenizer.json, llama2.c tok*.bin or train_config.json naming its tokenizer" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "x", "--max_new_tokens",
                        "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy(model, tok, "x")


@pytest.mark.parametrize("args, culprit", [
    (["--ckpt", "{tmp}/missing"], "--ckpt {tmp}/missing: no such file or directory"),
    (["--ckpt", "{tmp}"], "neither a model directory (config.json) nor a run directory"),
    (["--ckpt", "{tmp}/run", "--tokenizer", "nope"], "tokenizer nope: unknown tokenizer 'nope'"),
])
def test_bad_paths_fail_in_one_line(tmp_path, args, culprit):
    fake_run(tmp_path / "run")
    args = [a.format(tmp=tmp_path) for a in args]
    p = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("sample.py: error: ") and culprit.format(tmp=tmp_path) in p.stderr


def test_a_sliding_window_shorter_than_prompt_plus_new_tokens_is_refused(tmp_path, capsys):
    """A Mistral whose window is 16: BOS + "abc" + 12 new tokens fit, 13 would be cut by the window."""
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, bos_id=tok.bos_id,
                              eos_id=tok.eos_id, model_type="mistral", sliding_window=16))
    model.save_pretrained(tmp_path)
    common = ["--ckpt", str(tmp_path), "--tokenizer", "byte", "--prompt", "abc", "--temperature", "0"]
    assert sample.main(common + ["--max_new_tokens", "12"]) == 0
    capsys.readouterr()
    assert sample.main(common + ["--max_new_tokens", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sliding_window 16 (config.json) < 17" in err and "--max_new_tokens" in err

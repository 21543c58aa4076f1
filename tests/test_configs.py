"""configs/*.json, the recipes users copy: each parses (at the world size it is written for), names no path of ours
(data, tokenizer and model come from the command line), keeps the paper's TR-DPO settings as TRL's docs record them,
and trains a step on a tiny Hugging Face Llama (FSDP2 recipes on 2 processes)."""
import json

import pytest
import torch

import config
import tokenizer
from conftest import ROOT
from model import Llama, ModelConfig
from test_bench import preference_file
from test_train import metrics, run

RECIPES = sorted((ROOT / "configs").glob("*.json"))
# Gorbatovski et al.'s TR-DPO settings as TRL's DPOTrainer docs record them (PR #5078)
PAPER = {"alpha": 0.6, "tau": 512, "beta": 0.05, "lr": 1e-6, "grad_clip": 2.0, "warmup_steps": 100}


def world_size(recipe: dict) -> int:
    return 8 if recipe.get("fsdp") else 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_names_no_path_and_keeps_the_papers_settings(path):
    recipe = json.loads(path.read_text())
    assert not {"data", "eval_data", "tokenizer", "init_from", "out_dir"} & recipe.keys()
    assert not any(isinstance(v, str) and ("/" in v or "shared" in v) for v in recipe.values())
    assert {k: recipe[k] for k in PAPER} == PAPER
    cfg = config.parse_config([f"--config={path}"], world_size=world_size(recipe))
    assert cfg.loss == "dpo" and cfg.ref_update == "soft" and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_trains_a_step_on_a_tiny_hf_llama(path, tmp_path):
    recipe = json.loads(path.read_text())
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=tokenizer.get_tokenizer("byte").n_vocab, dim=32, n_layers=2, n_heads=4,
                      max_seq_len=128)).save_pretrained(tmp_path / "hf")
    nproc = 2 if recipe.get("fsdp") else 0
    out = tmp_path / "run"
    run([f"--config={path}", f"--init_from={tmp_path / 'hf'}", f"--data={preference_file(tmp_path)}",
         "--tokenizer=byte", "--max_length=64", "--max_prompt_length=32", f"--batch_size={2 * max(nproc, 1)}",
         "--micro_batch_size=1", "--max_steps=1", "--eval_size=4", "--num_samples=1", "--max_new_tokens=4",
         f"--out_dir={out}"], nproc=nproc)
    rows = metrics(out)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (1, "eval")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

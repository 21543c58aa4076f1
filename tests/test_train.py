"""train.py: config parsing and validation, schedules, and whole runs (1 process, torchrun DDP and FSDP2 on CPU,
SIGKILL + --resume, KTO across ranks, the HH-RLHF recipe, the embedded demo) on a tiny Llama."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, shared_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# a tiny DPO run with a soft TR reference (τ = 2): 4 pairs per step = 2 micro steps of 2 on one process, 1 on two
TINY = ["--loss=dpo", "--ref_update=soft", "--tau=2", "--alpha=0.5", "--dim=32", "--n_layers=2", "--n_heads=4",
        "--batch_size=4", "--micro_batch_size=2", "--max_steps=12", "--eval_every=6", "--eval_size=8",
        "--num_samples=4", "--max_new_tokens=8", "--max_length=16", "--max_prompt_length=8", "--warmup_steps=2",
        "--lr=3e-3"]


def run(args: list[str], nproc: int = 0, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    """train.py (or tests/<script>) in a subprocess: plain python, or torchrun with nproc CPU processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    script = args[0] if args and args[0].endswith(".py") else str(ROOT / "train.py")
    rest = args[1:] if args and args[0].endswith(".py") else args
    p = subprocess.run(launcher + [script, *rest], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout, **kw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(run_dir: Path, sub: str = "") -> dict[str, torch.Tensor]:
    return load_file(train.checkpoint_dir(run_dir) / sub / "model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing column (the only one that may differ between identical runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------------------------------
# config


def test_parse_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"loss": "ipo", "beta": 0.5, "fsdp": False, "max_steps": 7}))
    cfg = train.parse_config([f"--config={f}", "--beta=0.25", "--ref_update=hard", "--resume"], world_size=1)
    assert (cfg.loss, cfg.beta, cfg.ref_update, cfg.max_steps, cfg.resume) == ("ipo", 0.25, "hard", 7, True)


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--loss=ppo"], "loss='ppo'"),
    (["--ref_update=sometimes"], "ref_update"),
    (["--beta=abc"], "beta must be float"),
    (["--max_steps=1.5"], "max_steps must be int"),
    (["--alpha=0"], "alpha=0.0"),
    (["--tau=0"], "tau=0"),
    (["--label_smoothing=0.5"], "label_smoothing"),
    (["--loss=sft", "--ref_update=soft"], "loss=sft has none"),
    (["--batch_size=6", "--micro_batch_size=2"], "x 2 process(es)"),  # 6 pairs do not split over 2 ranks x 2
    (["--data=/no/such.jsonl"], "no such file"),
    (["--init_from=/no/such/dir"], "no such file"),
    (["--tokenizer=gpt2"], "byte-level task"),
    (["loss=dpo"], "expected --key=value"),
])
def test_bad_configs_are_rejected(argv, message):
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.parse_config(argv, world_size=2)


def test_bad_config_file_names_the_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"loss": "dpo", "betta": 0.1}))
    with pytest.raises(train.ConfigError, match=f"{f}: unknown option 'betta'"):
        train.parse_config([f"--config={f}"], world_size=1)
    f.write_text(json.dumps({"beta": "high"}))
    with pytest.raises(train.ConfigError, match="beta must be float"):
        train.parse_config([f"--config={f}"], world_size=1)


def test_cli_rejects_bad_config_without_traceback_and_help_lists_every_option():
    p = subprocess.run([sys.executable, "train.py", "--loss=dpo", "--beta=-1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.strip() == "train.py: error: beta=-1.0 and lr=0.001 must be > 0"
    text = train.help_text()
    for f in train.fields(train.TrainConfig):
        assert f"| `{f.name}` | `{json.dumps(f.default)}` |" in text


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, max_steps=14)
    assert [train.get_lr(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.get_lr(4, cfg) == 1.0 and train.get_lr(9, cfg) == pytest.approx(0.5)
    assert train.get_lr(13, cfg) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
    assert train.get_lr(9, train.TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="linear")) == 0.5
    assert train.get_lr(13, train.TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="constant")) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# whole runs: one process with 2 micro steps ≡ 2-process DDP ≡ 2-process FSDP2; SIGKILL + --resume ≡ uninterrupted


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted single-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("straight")
    run(TINY + [f"--out_dir={out}"])
    return out


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_accumulation(straight, tmp_path, backend):
    run(TINY + [f"--out_dir={tmp_path}", f"--fsdp={backend == 'fsdp'}"], nproc=2)
    for sub in ("", "reference"):  # the policy, and the soft-updated reference sharded like it
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=1e-5)
    for a, b in zip(metrics(tmp_path), metrics(straight), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_sigkill_then_resume_matches_uninterrupted(straight, tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), *TINY, f"--out_dir={tmp_path}", "--ckpt_every=1"]
    kill_at = random.randint(1, 10)  # completed steps (metrics lines) before the kill, plus a random delay
    p = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = tmp_path / "metrics.jsonl"
    while p.poll() is None and not (lines.exists() and lines.read_text().count('"train"') >= kill_at
                                    and list(tmp_path.glob("ckpt-*"))):
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.05))
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, f"the run ended before the kill (step {kill_at}): {p.stderr.read()[-2000:]}"
    print(f"killed after {kill_at} steps; checkpoints on disk: {sorted(x.name for x in tmp_path.glob('ckpt-*'))}")
    run(args[2:] + ["--resume"])
    for sub in ("", "reference"):
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=0.0)
    assert metrics(tmp_path) == metrics(straight)
    assert len(list(tmp_path.glob("ckpt-*"))) == 2 and not list(tmp_path.glob(".tmp-*"))  # keep_last=2

"""train.py: config parsing and validation, schedules, and whole runs (1 process, torchrun DDP and FSDP2 on CPU,
SIGKILL + --resume, KTO across ranks, the HH-RLHF recipe, the embedded demo) on a tiny Llama."""
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import losses
import reference as ref_lib
import synthetic
import train
from model import Llama, ModelConfig
from conftest import ROOT, shared_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# a tiny DPO run with a soft TR reference (τ = 2): 4 pairs per step = 2 micro steps of 2 on one process, 1 on two
TINY = ["--loss=dpo", "--ref_update=soft", "--tau=2", "--alpha=0.5", "--dim=32", "--n_layers=2", "--n_heads=4",
        "--batch_size=4", "--micro_batch_size=2", "--max_steps=12", "--eval_every=6", "--eval_size=8",
        "--num_samples=4", "--max_new_tokens=8", "--max_length=16", "--max_prompt_length=8", "--warmup_steps=2",
        "--lr=3e-3", "--ckpt_every=6"]


def run(args: list[str], nproc: int = 0, script: Path = ROOT / "train.py") -> subprocess.CompletedProcess:
    """A script (train.py) in a subprocess: plain python, or torchrun with nproc CPU processes."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc else [])
    p = subprocess.run(launcher + [str(script), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def weights(run_dir: Path, sub: str = "") -> dict[str, torch.Tensor]:
    return load_file(checkpoint.model_dir(run_dir) / sub / "model.safetensors")


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
    ([f"--init_from={ROOT / 'configs'}"], "neither a model directory"),
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


def test_help_lists_every_option_wrapped():
    """`--key=default  meaning`, one option after another, no line past the width."""
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout == train.help_text() + "\n"
    lines = train.help_text(width=80).splitlines()
    assert max(map(len, lines)) <= 80 and lines[0].startswith("usage: ")
    starts = [line.split()[0] for line in lines[2:] if line.startswith("  --")]
    assert starts == ["--config=FILE.json"] + [f"--{f.name}={config.shown(f.default)}"
                                               for f in config.fields(config.TrainConfig)]
    assert "  --eval_data=\"\"  " in train.help_text() and "  --fsdp=false  " in train.help_text()
    assert "  --loss=sft  " in train.help_text() and "(one of sft, dpo, ipo, kto, rm)" in train.help_text()


def test_docs_option_table_is_generated_from_train_config():
    """docs/training.md pastes config.options_table(); after adding or changing an option, regenerate it with
    python -c "import train; print(config.options_table())" """
    table = config.options_table()
    for f in config.fields(config.TrainConfig):
        assert f"| `{f.name}` | `{json.dumps(f.default)}` |" in table
    assert table in (ROOT / "docs" / "training.md").read_text()


def touch(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def test_data_and_eval_splits_of_dataset_directories(tmp_path):
    """config.data_splits: (the train split, where held-out examples come from); a split that is not there or an auto
    choice that is not obvious fails in one line listing the splits, before any file is read."""
    h4 = touch(tmp_path / "h4", [f"data/{s}_{k}-00000-of-00001.parquet" for s in ("train", "test")
                                 for k in ("prefs", "sft")])
    only_train = touch(tmp_path / "only", ["train.jsonl", "README.md"])
    file = touch(tmp_path, ["a.jsonl"]) / "a.jsonl"

    def splits(*argv):
        return config.data_splits(train.parse_config(list(argv), world_size=1))

    assert splits(f"--data={h4}") == ("train_prefs", (str(h4), "test_prefs"))
    assert splits(f"--data={h4}", "--data_split=train_sft") == ("train_sft", (str(h4), "test_sft"))  # the twin
    assert splits(f"--data={h4}", "--eval_split=test_sft") == ("train_prefs", (str(h4), "test_sft"))
    assert splits(f"--data={h4}", "--eval_split=none") == ("train_prefs", None)  # the first eval_size of train
    assert splits(f"--data={only_train}") == ("train", None)
    assert splits(f"--data={file}") == ("", None)
    assert splits(f"--data={only_train}", f"--eval_data={h4}") == ("train", (str(h4), "test_prefs"))
    assert splits(f"--data={h4}", f"--eval_data={file}") == ("train_prefs", (str(file), ""))
    listed = "the splits are test_prefs (1 file), test_sft (1 file), train_prefs (1 file), train_sft (1 file)"
    for argv, message in [
        ([f"--data={h4}", "--data_split=train"], f"{h4}: no split 'train'; {listed}"),
        ([f"--data={h4}", "--eval_split=dev"], f"{h4}: no split 'dev'; {listed}"),
        ([f"--data={h4}", "--eval_split=train_prefs"], "eval_split=train_prefs is the split data_split trains on"),
        ([f"--data={file}", "--data_split=train"], f"data_split=train: data={file} is not a dataset directory"),
        ([f"--data={file}", "--eval_split=test"], f"eval_split=test: data={file} is not a dataset directory"),
        ([f"--data={h4}", f"--eval_data={file}", "--eval_split=test"],
         f"eval_split=test: eval_data={file} is a file"),
        ([f"--data={h4}", f"--eval_data={h4}", "--eval_split=none"], "eval_split=none holds out examples of data"),
        ([f"--data={h4}", f"--eval_data={only_train}"], f"{only_train}: which eval split? none is named test or "
         "test_prefs or validation or val or dev or holds 'test'; the splits are train (1 file); name one with "
         "--eval_split"),
        ([f"--data={touch(tmp_path / 'sft', ['train_sft.json', 'train_gen.json'])}"],
         "which train split? several names hold 'train'; the splits are train_gen (1 file), train_sft (1 file); "
         "name one with --data_split"),
    ]:
        with pytest.raises(train.ConfigError) as e:
            train.parse_config(argv, world_size=1)
        assert message in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_a_run_on_a_dataset_directory_trains_on_train_and_evaluates_on_test(tmp_path, capsys):
    """A Hub snapshot (train in two Parquet shards, test): train.py reads both shards and evaluates the first
    eval_size examples of test; without a test split it holds out the first eval_size of train, as for a file."""
    pa = pytest.importorskip("pyarrow", reason="Parquet needs the optional pyarrow")
    import pyarrow.parquet as pq
    records = synthetic.make_records(72, seed=5, sft=False)
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for name, part in (("train-00000-of-00002", records[:30]), ("train-00001-of-00002", records[30:64]),
                       ("test-00000-of-00001", records[64:])):
        pq.write_table(pa.Table.from_pylist(part), hub / f"{name}.parquet")
    args = ["--loss=dpo", "--max_steps=2", "--eval_size=6", "--batch_size=4", "--micro_batch_size=4", "--dim=32",
            "--num_samples=2", "--max_new_tokens=2", "--max_length=16", "--max_prompt_length=8"]
    train.train(train.parse_config(args + [f"--data={hub.parent}", f"--out_dir={tmp_path / 'a'}"], world_size=1))
    out = capsys.readouterr().out
    assert f"train data: {hub.parent} (split train: 2 files); eval data: {hub.parent} (split test: 1 file)\n" in out
    assert "train data: 64 pairs of 64 rows" in out and "eval data: 6 pairs of 6 rows" in out
    assert [(r["step"], r["split"]) for r in metrics(tmp_path / "a")] == [(1, "train"), (2, "train"), (2, "eval")]
    (hub / "test-00000-of-00001.parquet").unlink()
    train.train(train.parse_config(args + [f"--data={hub.parent}", f"--out_dir={tmp_path / 'b'}"], world_size=1))
    out = capsys.readouterr().out
    assert f"eval data: the first 6 examples of {hub.parent} (split train: 2 files)\n" in out
    assert "train data: 58 pairs of 58 rows" in out


def test_startup_warnings(tmp_path, capsys):
    """A TR run with τ >= max_steps never updates π_ref; limits that cut most examples: one line each at start-up."""
    tr = train.TrainConfig(loss="dpo", ref_update="soft", tau=30, max_steps=30)
    assert train.schedule_warning(tr) == ("warning: ref_update=soft with tau=30 >= max_steps=30: π_ref is never "
                                          "updated before the run ends, so this is plain DPO (lower --tau for TR)")
    assert train.schedule_warning(dataclasses.replace(tr, tau=29)) is None
    assert train.schedule_warning(dataclasses.replace(tr, ref_update="static")) is None
    report = {"examples": 10, "truncated": {"prompt": 5, "response": 6}}  # a half is not most
    assert train.truncation_warnings("eval", report, tr) == [
        "warning: eval data: max_length=64 cuts the response of 6 of 10 examples (60%); raise it unless that is "
        "meant (a cut response is trained without its EOS)"]
    # synthetic prompts are BOS + 4 characters: max_prompt_length=3 cuts every one, max_length=10 no response
    train.train(train.parse_config(["--loss=ipo", "--ref_update=hard", "--tau=2", "--max_steps=2", "--eval_size=8",
                                    "--max_prompt_length=3", "--max_length=10", "--batch_size=4",
                                    "--micro_batch_size=4", "--num_samples=2", "--max_new_tokens=2",
                                    f"--out_dir={tmp_path}"], world_size=1))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1] for w in warnings] == [" ref_update=hard with tau=2 >= max_steps=2", " train data",
                                                   " eval data"]
    assert "plain IPO" in warnings[0] and "max_prompt_length=3 cuts the prompt of 4096 of 4096 examples (100%)" \
        in warnings[1] and "of 8 of 8 examples" in warnings[2]


WANDB_RUNS = """
import sys, train
args = ["--loss=dpo", "--ref_update=soft", "--tau=1", "--max_steps=3", "--eval_every=2", "--eval_size=8",
        "--num_samples=2", "--max_new_tokens=2", "--batch_size=4", "--micro_batch_size=4"]
assert train.main(args + ["--out_dir=" + sys.argv[1] + "/plain"]) == 0
print("wandb" in sys.modules)
assert train.main(args + ["--out_dir=" + sys.argv[1] + "/tracked", "--wandb_project=nanotr-test"]) == 0
"""


def test_wandb_logs_the_metrics_rows_and_is_imported_only_when_set(tmp_path):
    """--wandb_project: W&B (offline here) receives every metrics.jsonl row under "split/key" and the config."""
    pytest.importorskip("wandb", reason="wandb_project needs the optional wandb package")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, "-c", WANDB_RUNS, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [line for line in p.stdout.splitlines() if line in ("True", "False")] == ["False"]  # not imported
    assert not (tmp_path / "plain" / "wandb").exists()
    [run_file] = (tmp_path / "tracked" / "wandb").glob("offline-run-*/run-*.wandb")
    raw = run_file.read_bytes()  # W&B's record log: protobuf records holding each key and value as JSON text
    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"),
                                                       (3, "eval")]
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "split"):
                assert f"{r['split']}/{k}".encode() in raw and json.dumps(v).encode() in raw, (r["split"], k)
    assert b"nanotr-test" in raw and b"wandb_project" in raw and b"ref_update" in raw  # the project and the config


FAULTS_AFTER_FREE = """
import resource, sys, torch, train
applied = train.keep_freed_memory(torch.device("cpu")) if sys.argv[1] == "keep" else False
faults = []
for _ in range(12):  # a training loop in miniature: the same 256 MB allocated, written and freed every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2 ** 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[6:]))  # the last 6 steps: with the setting the heap settles within 4 (30 of 30 trials)
"""


def test_keep_freed_memory_stops_refaulting_large_blocks():
    """glibc hands a freed 256 MB block back to the kernel, so every later step page-faults all its pages again;
    after train.keep_freed_memory, malloc keeps and reuses it. Asserted as a ratio, which holds whatever the page
    size (4 KB pages: 393222 faults over the last 6 steps without the setting, 0 with it; transparent huge pages
    would divide both)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory is a glibc malloc setting")
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE, mode], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60).stdout.split() for mode in ("default", "keep")}
    (default_applied, default), (keep_applied, keep) = ((a, int(n)) for a, n in (runs["default"], runs["keep"]))
    assert default_applied == "False" and keep_applied == "True"
    assert default >= 6 and keep * 20 <= default  # every step refaults by default; the setting removes > 95% of it
    assert not train.keep_freed_memory(torch.device("cuda"))  # GPU memory is the caching allocator's business


def test_batch_logps_skips_the_shared_prompt_positions_and_changes_nothing():
    """Logits (and the LM head's work) only from the position before the batch's first response token; log-probs and
    gradients as with every position's logits, for the policy and the (no-grad) reference."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, hidden_dim=48))
    ids = torch.randint(0, 61, (3, 14))
    mask = (torch.arange(14) >= torch.tensor([[6], [4], [9]])).long()  # prompts of 6, 4, 9 tokens
    mask[1, 12:] = 0  # right padding
    kept = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: kept.append(out.shape[1]), with_kwargs=True)
    logps, n = train.batch_logps(model, ids, mask)
    hook.remove()
    assert kept == [14 - 3]  # from position 3, which predicts the first response token (column 4)
    want, want_n = losses.sequence_logps(model(ids), ids, mask)
    torch.testing.assert_close(logps, want, rtol=0, atol=1e-5)
    assert torch.equal(n, want_n)
    grads = torch.autograd.grad(logps.sum(), list(model.parameters()))
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    reference = ref_lib.make_reference(model)
    ref_logps, _ = train.batch_logps(reference, ids, mask, reference=True, keep=14 - 3)  # a given window
    assert not ref_logps.requires_grad
    torch.testing.assert_close(ref_logps, want.detach(), rtol=0, atol=1e-5)


def test_synthetic_task_labels_pairs_by_gold_reward():
    assert synthetic.gold_reward("abhdea") == 4 / 6 and synthetic.gold_reward("ab") == 2 / 6
    pairs = synthetic.make_records(2000, seed=0, sft=False)
    scored = [(synthetic.gold_reward(r["chosen"]), synthetic.gold_reward(r["rejected"])) for r in pairs]
    agree = sum(c > r for c, r in scored) / sum(c != r for c, r in scored)
    assert 0.75 < agree < 0.95  # Bradley–Terry labels: mostly, not always, the better response
    assert synthetic.make_records(3, seed=0, sft=True)[0].keys() == {"prompt", "completion"}


def test_rng_states_round_trip_through_json():
    state = json.loads(json.dumps(checkpoint.rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


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


@pytest.mark.parametrize("nproc, backend, compiled", [(2, "ddp", False), (2, "fsdp", False),
                                                     (0, "-", True), (2, "ddp", True), (2, "fsdp", True)])
def test_other_runs_match_one_eager_process_with_accumulation(straight, tmp_path, nproc, backend, compiled):
    """2 processes (DDP or FSDP2) and/or --compile=true give the weights and metrics of the straight run: gradients
    reduce right, and the compiled reference forward sees every TR update (τ = 2) of the reference's parameters."""
    run(TINY + [f"--out_dir={tmp_path}", f"--fsdp={backend == 'fsdp'}", f"--compile={compiled}"], nproc=nproc)
    for sub in ("", "reference"):  # the policy, and the soft-updated reference sharded like it
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=1e-5)
    for a, b in zip(metrics(tmp_path), metrics(straight), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_the_padded_path_matches_the_packed_default(straight, tmp_path):
    """--packing=false (padded rows, the prompt computed twice) trains to the same weights and metrics."""
    run(TINY + [f"--out_dir={tmp_path}", "--packing=false"])
    for sub in ("", "reference"):
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=1e-5)
    for a, b in zip(metrics(tmp_path), metrics(straight), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


@pytest.mark.parametrize("loss", ["dpo", "sft", "rm"])
def test_packed_micro_batches_of_a_small_budget_are_world_size_invariant(tmp_path, loss):
    """A budget of 3 rows gives one process uneven micro batches (3 + 1 examples, 2 + 2 on each of 2 ranks); DDP and
    FSDP2 on 2 processes still reproduce 1 process: the loss weights make the global batch mean (SFT: its token
    mean) of any split."""
    args = [a for a in TINY if not a.startswith(("--loss", "--ref_update"))]
    args += [f"--loss={loss}", "--ref_update=soft" if loss == "dpo" else "--ref_update=static",
             f"--micro_batch_tokens={48 if loss == 'sft' else 93}", "--max_steps=6", "--eval_every=0", "--ckpt_every=0"]
    runs = {}
    for name, extra, nproc in (("one", [], 0), ("ddp", [], 2), ("fsdp", ["--fsdp=true"], 2)):
        runs[name] = tmp_path / name
        run(args + [f"--out_dir={runs[name]}", *extra], nproc=nproc)
    for name in ("ddp", "fsdp"):
        assert_close(weights(runs[name]), weights(runs["one"]), atol=1e-5)
        for a, b in zip(metrics(runs[name]), metrics(runs["one"]), strict=True):
            assert all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_a_fresh_run_with_overwrite_replaces_an_earlier_runs_checkpoints(straight, tmp_path):
    """Running again into the same out_dir with --overwrite (without it: refused, tests/test_faults.py) must not trip
    over the earlier run's ckpt-<step> of the same step, nor leave a newer one that init_from or --resume would pick."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)  # ckpt-000006 and ckpt-000012 of a 12-step run
    p = run(TINY + [f"--out_dir={tmp_path}", "--max_steps=6", "--seed=7", "--overwrite=true"])
    assert f"--overwrite: the run in {tmp_path} (ckpt-000012: step 12 of max_steps=12, written " in p.stdout
    assert sorted(d.name for d in tmp_path.glob("*ckpt-*")) == ["ckpt-000006"]
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r][-1] == 6
    new, old = weights(tmp_path), weights(straight)
    assert any(not torch.equal(new[k], old[k]) for k in old)  # the new run's own weights, not the copied ones


def test_on_two_processes_rank_0_decides_and_every_rank_agrees(straight, tmp_path):
    """A run into an out_dir holding a run, under torchrun: every rank stops with the same line (none waits in a
    collective); with --overwrite the earlier run is replaced at the first checkpoint, which all ranks write."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(launcher + [str(ROOT / "train.py"), *TINY, f"--out_dir={tmp_path}", "--max_steps=6"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0 and p.stderr.count(f"train.py: error: out_dir={tmp_path} holds a run (ckpt-000012") == 2
    run(TINY + [f"--out_dir={tmp_path}", "--max_steps=6", "--overwrite=true"], nproc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-000006", "metrics.jsonl", "train_config.json"]
    assert [r["step"] for r in metrics(tmp_path) if r["split"] == "eval"] == [6]


KILLED_RUN = """
import os, signal, sys, checkpoint, train
module, name = sys.argv[1].split(".")
where, n, calls = {"checkpoint": checkpoint, "train": train}[module], int(sys.argv[2]), [0]
original = getattr(where, name)
def kill_on_nth_call(*args, **kwargs):  # SIGKILL: no handler, no cleanup, no flush, as when the machine dies
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(where, name, kill_on_nth_call)
sys.exit(train.main(sys.argv[3:]))
"""


# Replayable kill points: the process kills itself on entering the n-th call of a function. TINY with ckpt_every=1
# checkpoints every step and runs compute_loss twice per step (2 micro steps) plus once per eval batch at step 6.
KILL_POINTS = [("checkpoint.write_manifest", 5),  # step 5's checkpoint fully written but for its manifest, not renamed
               ("train.compute_loss", 19)]  # inside a training step after step 6's eval (the last checkpoint: 6+)


LORA = ["--lora_rank=4", "--lora_alpha=8", "--lora_ref_rank=8"]  # TINY's TR-DPO with LoRA: W0 + s·B·A, ΔW_ref = U·V


def all_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint's safetensors files (policy and reference/; LoRA: merged model, base/,
    adapter/ and the reference's factors), keyed by file and name."""
    ckpt = checkpoint.model_dir(run_dir)
    return {f"{f.relative_to(ckpt)}:{k}": v for f in sorted(ckpt.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.parametrize("function, call, extra", [pytest.param(f, c, [], id=f"{f}-{c}") for f, c in KILL_POINTS]
                         + [pytest.param(f, c, LORA, id=f"lora-{f}-{c}") for f, c in KILL_POINTS])
def test_sigkill_then_resume_matches_uninterrupted(request, tmp_path, function, call, extra):
    straight_run = request.getfixturevalue("straight_lora" if extra else "straight")
    args = [*TINY, *extra, f"--out_dir={tmp_path}", "--ckpt_every=1"]
    p = subprocess.run([sys.executable, "-c", KILLED_RUN, function, str(call), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, f"the run was not killed at call {call} of {function}: {p.stderr[-2000:]}"
    on_disk = sorted(x.name for x in tmp_path.glob("*ckpt-*"))
    print(f"killed on entering call {call} of {function}; checkpoints on disk: {on_disk}")
    run(args + ["--resume"])
    assert_close(all_weights(tmp_path), all_weights(straight_run), atol=0.0)
    assert metrics(tmp_path) == metrics(straight_run)
    assert len(list(tmp_path.glob("ckpt-*"))) == 2 and not list(tmp_path.glob(".tmp-*"))  # keep_last=2
    with pytest.raises(train.ConfigError, match="other values of beta"):  # a resume must not change the objective
        train.resume_checkpoint(train.parse_config(TINY + extra + [f"--out_dir={tmp_path}", "--resume", "--beta=0.2"]))


@pytest.fixture(scope="module")
def straight_lora(tmp_path_factory) -> Path:
    """The uninterrupted single-process LoRA run (soft TR-DPO, exact low-rank reference updates)."""
    out = tmp_path_factory.mktemp("straight_lora")
    run(TINY + LORA + [f"--out_dir={out}"])
    return out


# --loss=rm: the same kill points, a reward model (no reference) resumes to the uninterrupted run's weights and rows
RM_TINY = [a for a in TINY if not a.startswith(("--loss", "--ref_update", "--tau", "--alpha"))] + ["--loss=rm"]


@pytest.fixture(scope="module")
def straight_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight_rm")
    run(RM_TINY + [f"--out_dir={out}"])
    return out


@pytest.mark.parametrize("function, call", KILL_POINTS)
def test_rm_sigkill_then_resume_matches_uninterrupted(straight_rm, tmp_path, function, call):
    args = [*RM_TINY, f"--out_dir={tmp_path}", "--ckpt_every=1"]
    p = subprocess.run([sys.executable, "-c", KILLED_RUN, function, str(call), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, f"the run was not killed at call {call} of {function}: {p.stderr[-2000:]}"
    run(args + ["--resume"])
    assert_close(weights(tmp_path), weights(straight_rm), atol=0.0)
    assert "score.weight" in weights(tmp_path) and not (checkpoint.model_dir(tmp_path) / "reference").exists()
    assert metrics(tmp_path) == metrics(straight_rm)
    assert [r["step"] for r in metrics(tmp_path) if r["split"] == "eval"] == [6, 12]


def test_a_checkpoint_older_than_an_option_resumes_with_its_default(straight, tmp_path):
    """A checkpoint written before data_split and eval_split existed resumes: what it lacks, it ran as the default."""
    shutil.copytree(straight, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "ckpt-000012")
    ckpt = tmp_path / "run" / "ckpt-000006"
    saved = json.loads((ckpt / "train_config.json").read_text())
    del saved["data_split"], saved["eval_split"]
    (ckpt / "train_config.json").write_text(json.dumps(saved))
    checkpoint.write_manifest(ckpt)
    assert train.resume_checkpoint(train.parse_config(TINY + [f"--out_dir={tmp_path / 'run'}", "--resume"])) == ckpt
    with pytest.raises(train.ConfigError, match="other values of beta"):
        train.resume_checkpoint(train.parse_config(TINY + [f"--out_dir={tmp_path / 'run'}", "--resume", "--beta=0.2"]))


@pytest.mark.parametrize("step", [6, 12])
def test_a_kill_between_checkpoint_and_eval_resumes_with_that_eval(straight, tmp_path, step):
    """The checkpoint of an eval step is written before its eval. A run killed in between (its metrics end with the
    step's train row) resumes by running that eval first: at step 6 it then trains on, at the final step 12 (which
    is not a complete run yet) it only evaluates. Either way, the metrics and weights of the uninterrupted run."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(rows) if (r := json.loads(line))["step"] == step and r["split"] == "eval")
    (tmp_path / "metrics.jsonl").write_text("".join(rows[:cut]))
    if step == 6:
        shutil.rmtree(tmp_path / "ckpt-000012")
    p = run(TINY + [f"--out_dir={tmp_path}", "--resume"])
    assert f"eval {step} |" in p.stdout
    for sub in ("", "reference"):
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=0.0)
    assert metrics(tmp_path) == metrics(straight)
    with pytest.raises(train.ConfigError, match="the run is complete"):  # now it is
        train.resume_checkpoint(train.parse_config(TINY + [f"--out_dir={tmp_path}", "--resume"]))


def test_checkpoint_of_one_process_resumes_on_two_fsdp_processes(straight, tmp_path):
    """Checkpoints hold full, name-keyed state: step 6 of the single-process run continues under FSDP2 on 2 ranks."""
    shutil.copytree(straight / "ckpt-000006", tmp_path / "ckpt-000006")
    shutil.copy(straight / "metrics.jsonl", tmp_path / "metrics.jsonl")
    run(TINY + [f"--out_dir={tmp_path}", "--resume", "--fsdp=true"], nproc=2)
    for sub in ("", "reference"):
        assert_close(weights(tmp_path, sub), weights(straight, sub), atol=1e-5)
    for a, b in zip(metrics(tmp_path), metrics(straight), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_tr_kto_z_ref_is_identical_on_ranks(tmp_path):
    """KTO's z_ref (the batch KL estimate) is all-reduced: equal on both ranks although their batches differ."""
    args = [a for a in TINY if not a.startswith(("--loss", "--ref_update"))]
    run([*args, "--loss=kto", "--ref_update=hard", f"--out_dir={tmp_path}", "--max_steps=8", "--eval_every=0"],
        nproc=2, script=ROOT / "tests" / "kto_ranks.py")
    rank0, rank1 = (torch.tensor(r) for r in json.loads((tmp_path / "kto_ranks.json").read_text()))
    assert rank0.shape == (8, 2)  # one micro batch per step per rank
    assert torch.equal(rank0[:, 0], rank1[:, 0])
    assert (rank0[:, 1] != rank1[:, 1]).all()  # different data on the two ranks
    assert (rank0[:, 0] > 0).any()  # not trivially equal: z_ref = max(0, KL estimate) left 0 at some steps


def test_hh_rlhf_recipe_runs_on_a_tiny_hf_llama(tmp_path):
    """configs/hh_rlhf.json on real HH-RLHF text: a tiny random Llama in Hugging Face format, the gpt2 tokenizer,
    bf16 autocast on CPU, two TR-DPO steps; the checkpoint loads back and its reference took one soft update (τ = 2)."""
    from model import Llama, ModelConfig
    hh = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    shared_path("tiktoken_cache")  # gpt2's BPE files: skip rather than let tiktoken go to the network
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=50257, dim=32, n_layers=2, n_heads=4, max_seq_len=128, bos_id=50256,
                      eos_id=50256)).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    run([f"--config={ROOT / 'configs' / 'hh_rlhf.json'}", f"--init_from={tmp_path / 'hf'}", f"--data={hh}",
         "--tokenizer=gpt2", "--max_length=128", "--max_prompt_length=64", "--batch_size=2", "--micro_batch_size=1",
         "--max_steps=2", "--tau=2", "--lr=1e-3", "--warmup_steps=0", "--eval_size=4", "--num_samples=2",
         "--max_new_tokens=4", "--log_every=1", f"--out_dir={out}"])
    rows = metrics(out)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    policy, reference, initial = weights(out), weights(out, "reference"), load_file(tmp_path / "hf/model.safetensors")
    assert_close(reference, {k: policy[k] * 0.6 + v * 0.4 for k, v in initial.items()}, atol=1e-6)  # α·θ+(1−α)·θ_ref
    Llama.from_pretrained(checkpoint.model_dir(out))


def test_qwen3_and_mistral_init_from_train_or_refuse_a_window_that_would_cut(tmp_path, capsys):
    """A Qwen3 (biases, q/k norms) and a Mistral with a window >= the run's longest sequence train a DPO step and
    save their own model_type; a window shorter than it is refused in one line, naming both, before any step."""
    import tokenizer
    n_vocab = tokenizer.get_tokenizer("byte").n_vocab
    shape = dict(vocab_size=n_vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)
    args = ["--loss=dpo", "--ref_update=soft", "--tau=1", "--max_steps=1", "--eval_size=4", "--batch_size=2",
            "--micro_batch_size=2", "--max_length=16", "--max_prompt_length=8", "--num_samples=2",
            "--max_new_tokens=10", "--ckpt_every=1", "--tokenizer=byte"]
    assert train.longest_sequence(train.parse_config(args, world_size=1)) == 18  # an eval prompt + its generation
    assert train.longest_sequence(train.parse_config(args + ["--num_samples=0"], world_size=1)) == 16
    for name, flags in (("qwen3", dict(model_type="qwen3", qkv_bias=True, o_bias=True, head_dim=16)),
                        ("mistral", dict(model_type="mistral", sliding_window=18))):
        torch.manual_seed(0)
        Llama(ModelConfig(**shape, **flags)).save_pretrained(tmp_path / name)
        assert train.main(args + [f"--init_from={tmp_path / name}", f"--out_dir={tmp_path / 'run' / name}"]) == 0
        saved = json.loads((checkpoint.model_dir(tmp_path / "run" / name) / "config.json").read_text())
        assert saved["model_type"] == name
    capsys.readouterr()
    assert train.main(args + [f"--init_from={tmp_path / 'mistral'}", "--max_new_tokens=11",
                              f"--out_dir={tmp_path / 'cut'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"init_from={tmp_path / 'mistral'}: sliding_window 18 (config.json) < 19" in err
    assert not (tmp_path / "cut" / "metrics.jsonl").exists()


def test_no_arguments_run_the_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(train.synthetic, "demo", lambda cfg, run: seen.append((cfg, run)))
    assert train.main([]) == 0
    assert seen == [(train.TrainConfig(demo=True), train.train)]


def test_demo_pipeline_writes_its_table(tmp_path):
    """The demo's four stages at toy size: SFT, then DPO, TR-DPO soft and hard from the SFT checkpoint; a progress
    line every max_steps/20 steps; the figure of the four runs, named on the last line."""
    p = run(["--demo", f"--out_dir={tmp_path}", "--max_steps=40", "--batch_size=8", "--micro_batch_size=8",
             "--eval_size=16", "--num_samples=8", "--max_new_tokens=8", "--warmup_steps=1"])
    progress = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/40" for s in range(2, 41, 2)] * 4
    assert all(" | ETA " in line for line in progress)
    assert p.stdout.splitlines()[-1].startswith(f"figure: {tmp_path / 'demo.png'} (python plot.py ")
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "demo_table.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:6]] == ["| SFT", "| DPO", "| TR-DPO soft", "| TR-DPO hard"]
    soft = json.loads((tmp_path / "tr-dpo-soft" / "train_config.json").read_text())
    assert (soft["init_from"], soft["ref_update"], soft["loss"]) == (str(tmp_path / "sft"), "soft", "dpo")
    for stage in ("sft", "dpo", "tr-dpo-soft", "tr-dpo-hard"):
        assert [r["step"] for r in metrics(tmp_path / stage) if r["split"] == "eval"] == [40]


def test_the_demo_run_again_replaces_its_own_runs_and_refuses_another(tmp_path, capsys, one_thread):
    """`python train.py` twice: the second demo replaces the first one's runs (the same options would reproduce
    them). A stage directory holding another run stops the demo before its first stage, in one line; with
    --overwrite=true the demo replaces it too."""
    args = ["--demo", f"--out_dir={tmp_path}", "--max_steps=2", "--batch_size=4", "--micro_batch_size=4", "--dim=16",
            "--n_layers=1", "--n_heads=2", "--eval_size=4", "--num_samples=2", "--max_new_tokens=4",
            "--warmup_steps=1"]
    assert train.main(args) == 0
    first = (tmp_path / "sft" / "ckpt-000002" / "model.safetensors").stat().st_mtime_ns
    assert train.main(args) == 0
    assert "--overwrite: the run in" in capsys.readouterr().out
    assert (tmp_path / "sft" / "ckpt-000002" / "model.safetensors").stat().st_mtime_ns != first
    assert sorted(p.name for p in (tmp_path / "dpo").iterdir()) == [".lock", "ckpt-000002", "metrics.jsonl",
                                                                   "train_config.json"]
    saved = json.loads((tmp_path / "dpo" / "train_config.json").read_text())
    (tmp_path / "dpo" / "train_config.json").write_text(json.dumps({**saved, "beta": 0.5}))  # another run's
    sft = (tmp_path / "sft" / "ckpt-000002" / "model.safetensors").stat().st_mtime_ns
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"train.py: error: demo: out_dir={tmp_path / 'dpo'} holds a run that is not this demo's "
                   f"(ckpt-000002: step 2 of max_steps=2, {checkpoint.written(tmp_path / 'dpo' / 'ckpt-000002')}): "
                   "rerun the demo with --overwrite=true or another --out_dir\n")
    assert (tmp_path / "sft" / "ckpt-000002" / "model.safetensors").stat().st_mtime_ns == sft  # no stage ran
    assert train.main(args + ["--overwrite=true"]) == 0
    assert json.loads((tmp_path / "dpo" / "train_config.json").read_text())["beta"] == saved["beta"]


def test_stories260K_dpo_with_its_llama2c_tokenizer_end_to_end(tmp_path, capsys):
    """karpathy's stories260K with the tok512.bin beside it: --tokenizer left at auto finds it (and a run from our
    checkpoint finds it in the checkpoint's train_config.json); DPO trains, evaluates with decoded samples,
    checkpoints, and sample.py continues a story from the result."""
    import sample
    stories = shared_path("models", "stories260K")
    tok512 = str(stories / "tok512.bin")
    pairs = [{"prompt": "Once upon a time", "chosen": " there was a happy girl. She smiled.",
              "rejected": " there was a sad boy. He cried."},
             {"prompt": "One day, Tom", "chosen": " found a red ball and laughed.", "rejected": " fell and hurt."}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs * 4))
    with pytest.raises(train.ConfigError, match="byte-level task: tokenizer must be 'byte', not '.*tok512.bin'"):
        train.parse_config([f"--init_from={stories}"], world_size=1)  # data=synthetic is letters, not stories
    explicit = train.TrainConfig(init_from=str(stories), tokenizer=tok512)
    assert train.auto_tokenizer(explicit) == tok512 == train.auto_tokenizer(train.TrainConfig(init_from=str(stories)))
    common = [f"--data={tmp_path / 'pairs.jsonl'}", "--loss=dpo", "--eval_size=2", "--batch_size=2",
              "--micro_batch_size=2", "--max_steps=2", "--num_samples=2", "--max_new_tokens=12", "--lr=1e-4"]
    p = run([f"--init_from={stories}", f"--out_dir={tmp_path / 'dpo'}", *common])
    assert "sample | '<s> Once upon a time' -> '" in p.stdout  # decoded text, BOS shown as <s>
    saved = json.loads((tmp_path / "dpo" / "train_config.json").read_text())
    assert saved["tokenizer"] == tok512
    assert [(r["step"], r["split"]) for r in metrics(tmp_path / "dpo")][-1] == (2, "eval")
    run([f"--init_from={tmp_path / 'dpo'}", f"--out_dir={tmp_path / 'tr'}", "--ref_update=hard", "--tau=1", *common])
    assert json.loads((tmp_path / "tr" / "train_config.json").read_text())["tokenizer"] == tok512
    sample.main(["--ckpt", str(checkpoint.model_dir(tmp_path / "tr")), "--tokenizer", tok512, "--prompt",
                 "Once upon a time", "--max_new_tokens", "20", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("Once upon a time") and len(printed.split()) > 8


def test_a_model_directory_with_a_tokenizer_json_trains_and_its_checkpoint_carries_it(tmp_path, capsys):
    """--tokenizer=auto takes a model directory's tokenizer.json (SmolLM2's beside a tiny random Llama of its 49,152
    ids); the checkpoint carries a copy of it and its tokenizer_config.json, so that a run from the checkpoint,
    sample.py and transformers find the tokenizer there; BOS is not added (SmolLM2's tokenizer adds none)."""
    import sample
    smol = shared_path("models", "smollm2-135m-instruct")
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=49152, dim=16, n_layers=1, n_heads=2, max_seq_len=64, bos_id=1,
                      eos_id=2)).save_pretrained(tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / f, tmp_path / "hf" / f)
    pairs = [{"prompt": "Say hi", "chosen": " Hi there.", "rejected": " No."}] * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    common = [f"--data={tmp_path / 'pairs.jsonl'}", "--loss=dpo", "--eval_size=2", "--batch_size=2",
              "--micro_batch_size=2", "--max_steps=1", "--num_samples=1", "--max_new_tokens=4", "--max_length=32",
              "--max_prompt_length=16"]
    run([f"--init_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'a'}", *common])
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["tokenizer"] == str(
        tmp_path / "hf" / "tokenizer.json")
    ckpt = checkpoint.model_dir(tmp_path / "a")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / f).read_bytes() == (smol / f).read_bytes()
    assert "tokenizer.json" in json.loads((ckpt / "manifest.json").read_text())["files"]
    run([f"--init_from={tmp_path / 'a'}", f"--out_dir={tmp_path / 'b'}", *common])
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["tokenizer"] == str(ckpt / "tokenizer.json")
    shutil.rmtree(tmp_path / "hf")  # the original directory is gone: the checkpoints still bring their tokenizer
    assert sample.main(["--ckpt", str(tmp_path / "b"), "--prompt", "Say hi", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Say hi")
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoTokenizer.from_pretrained(str(checkpoint.model_dir(tmp_path / "b")))
    assert reloaded("Say hi")["input_ids"] == train.tokenizer.get_tokenizer(str(ckpt)).encode("Say hi")


def test_lengths_are_bounded_by_the_models_context(tmp_path, capsys):
    """init_from a model of 16 positions: max_length, or an eval prompt with its generation, past them is refused in
    one line naming the options and the limit, before any step; from scratch, the context holds both."""
    import tokenizer
    tok = tokenizer.get_tokenizer("byte")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    model.save_pretrained(tmp_path / "m")
    args = ["--loss=dpo", "--max_steps=1", "--eval_size=4", "--batch_size=2", "--micro_batch_size=2",
            "--tokenizer=byte", "--max_length=16", "--max_prompt_length=8", "--num_samples=2", "--max_new_tokens=8",
            "--ckpt_every=1", f"--init_from={tmp_path / 'm'}"]
    for extra, culprit in ((["--max_new_tokens=9"], "max_prompt_length + max_new_tokens = 8 + 9 = 17 tokens"),
                           (["--max_length=17"], "max_length=17 tokens")):
        assert train.main(args + extra + [f"--out_dir={tmp_path / 'no'}"]) == 2
        err = capsys.readouterr().err
        assert err == f"train.py: error: {culprit} is longer than the context of init_from={tmp_path / 'm'}, " \
                      f"max_position_embeddings 16 (config.json): use at most 16 tokens\n"
        assert not (tmp_path / "no" / "metrics.jsonl").exists()
    assert train.main(args + ["--max_new_tokens=100", "--num_samples=0", f"--out_dir={tmp_path / 'ok'}"]) == 0
    cfg = train.parse_config(["--max_length=16", "--max_prompt_length=8", "--max_new_tokens=100"], world_size=1)
    assert train.load_model(cfg, tok).config.max_seq_len == 108  # from scratch: eval prompts with their generation
    assert train.load_model(dataclasses.replace(cfg, max_new_tokens=4), tok).config.max_seq_len == 16

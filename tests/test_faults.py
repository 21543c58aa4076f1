"""Faults a user meets, injected one by one (docs/faults.md): each ends in one line naming the culprit with exit
status 2, or is survived, and no finite work is lost. Runs are in-process train.main calls on a 0.01M-parameter
Llama."""
import dataclasses
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import losses
import train
from model import Llama, ModelConfig
from conftest import ROOT, shared_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 4 DPO steps of 4 pairs, a checkpoint every 2 (keep_last 2: ckpt-000002 and ckpt-000004), eval at the end only
SMALL = ["--loss=dpo", "--dim=16", "--n_layers=1", "--n_heads=2", "--batch_size=4", "--micro_batch_size=4",
         "--max_steps=4", "--eval_size=8", "--num_samples=2", "--max_new_tokens=4", "--max_length=16",
         "--max_prompt_length=8", "--warmup_steps=1", "--lr=3e-3", "--ckpt_every=2", "--eval_every=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def main(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of train.py with these arguments, in this process."""
    rc = train.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *parts: str, prog: str = "train.py"):
    """Exit status 2 and a single stderr line `prog: error: ...` holding every part, no traceback."""
    assert rc == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def strict_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN or Infinity fails the test."""
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpts(run_dir: Path) -> list[str]:
    return sorted(d.name for d in run_dir.glob("ckpt-*"))


def finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for sub in ("", "reference") for t in load_file(ckpt / sub /
                                                                                        "model.safetensors").values())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run that damaged and resumed runs are compared with, on one thread as they are (a module
    fixture runs before the function-scoped one_thread, and other thread counts sum in other orders)."""
    out, n = tmp_path_factory.mktemp("straight"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(SMALL + [f"--out_dir={out}"]) == 0
    finally:
        torch.set_num_threads(n)
    assert ckpts(out) == ["ckpt-000002", "ckpt-000004"]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# non-finite values: options, steps, checkpoints


@pytest.mark.parametrize("arg", ["--beta=nan", "--beta=inf", "--grad_clip=nan", "--lr=nan", "--alpha=nan",
                                 "--weight_decay=inf", "--label_smoothing=nan"])
def test_every_float_option_must_be_finite(arg, capsys, tmp_path):
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", arg], capsys)
    one_line_error(rc, err, f"{arg[2:].split('=')[0]}=", "must be a finite number")
    assert not tmp_path.joinpath("metrics.jsonl").exists()  # refused before any work


def test_huge_lr_skips_non_finite_steps_then_stops_keeping_the_last_finite_checkpoint(tmp_path, capsys):
    """lr=1e30 in bf16: step 1 is finite (weights ~1e30), every later gradient norm is NaN. Those steps are skipped
    (no optimizer step, no TR update), max_bad_steps=3 in a row stop the run, ckpt-000001 stays and is finite."""
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--lr=1e30", "--dtype=bfloat16", "--ckpt_every=1",
                                 "--ref_update=soft", "--tau=1", "--max_steps=10"], capsys)
    one_line_error(rc, err, "3 non-finite steps in a row at step 2", f"{tmp_path / 'ckpt-000001'}", "lower lr=1e+30",
                   "dtype=float32")
    assert out.count("non-finite gradient norm nan") == 3
    rows = strict_rows(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train")] + [(2, "skipped")] * 3
    assert all(r["grad_norm"] is None for r in rows[1:]) and [r["in_a_row"] for r in rows[1:]] == [1, 2, 3]
    assert ckpts(tmp_path) == ["ckpt-000001"] and finite(tmp_path / "ckpt-000001")
    assert checkpoint.verify(tmp_path / "ckpt-000001") is None  # and --resume would take it


def nan_loss_at(monkeypatch, calls: set[int]):
    """Make dpo_loss NaN (gradients NaN too) on these 1-based calls of the training run."""
    real, seen = losses.dpo_loss, [0]

    def hooked(*args):
        per_example, chosen, rejected = real(*args)
        seen[0] += 1
        if seen[0] in calls:
            per_example = per_example * float("nan")
        return per_example, chosen, rejected
    monkeypatch.setattr(losses, "dpo_loss", hooked)


def test_a_few_nan_losses_are_skipped_and_the_run_finishes(tmp_path, capsys, monkeypatch):
    """Two NaN steps (< max_bad_steps) in a TR run: skipped, retried on the next batches, the run reaches max_steps with
    finite weights; metrics.jsonl stays strict JSON. eval_every=0 and ckpt_every=0: only the training calls count."""
    nan_loss_at(monkeypatch, {2, 3})
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--ref_update=hard", "--tau=1", "--ckpt_every=0"], capsys)
    assert rc == 0, err
    rows = strict_rows(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "skipped"), (2, "skipped"), (2, "train"),
                                                      (3, "train"), (4, "train"), (4, "eval")]
    assert rows[1]["loss"] is None and rows[2]["in_a_row"] == 2
    assert ckpts(tmp_path) == ["ckpt-000004"] and finite(tmp_path / "ckpt-000004")
    assert json.loads((tmp_path / "ckpt-000004" / "state.json").read_text())["data"]["step"] == 6  # 6 batches read


def test_nan_loss_forever_stops_with_every_finite_step_checkpointed(tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, set(range(4, 100)))
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--ckpt_every=1", "--max_steps=8", "--max_bad_steps=2"],
                      capsys)
    one_line_error(rc, err, "2 non-finite steps in a row at step 4", str(tmp_path / "ckpt-000003"))
    assert ckpts(tmp_path) == ["ckpt-000002", "ckpt-000003"]  # keep_last=2: the 3 finite steps' newest two
    assert all(checkpoint.verify(tmp_path / c) is None for c in ckpts(tmp_path))


def test_is_finite_survives_an_overflowing_sum():
    big = torch.full((4,), 3e38)
    assert not torch.isfinite(big.sum()) and checkpoint.is_finite(big)  # the fast path's sum overflows: checked again
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not checkpoint.is_finite(torch.tensor([1.0, bad, 2.0]))
    assert checkpoint.nonfinite({"a": torch.ones(2), "state": {3: {"exp_avg": torch.tensor([float("nan")])}}},
                                "optimizer") == "optimizer[state][3] exp_avg"


def test_save_refuses_non_finite_tensors_and_keeps_the_newest_checkpoint(straight, tmp_path):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    policy = Llama.from_pretrained(tmp_path / "ckpt-000004")
    optimizer = torch.optim.AdamW(policy.parameters())
    with torch.no_grad():
        policy.norm.weight[0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to write .*ckpt-000006: non-finite values in "
                                                         "policy weight norm.weight; the newest finite checkpoint is "
                                                         ".*ckpt-000004"):
        checkpoint.save(tmp_path, 6, policy, None, optimizer, {}, {}, keep_last=1)
    assert ckpts(tmp_path) == ["ckpt-000002", "ckpt-000004"] and not list(tmp_path.glob(".tmp-*"))


def test_resume_refuses_a_non_finite_checkpoint(straight, tmp_path, capsys):
    """A NaN written into ckpt-000004 (its manifest rewritten to match, as an older writer might have left it):
    --resume passes over it to ckpt-000002 and continues to the straight run's exact weights."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    file = tmp_path / "ckpt-000004" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    checkpoint.write_manifest(tmp_path / "ckpt-000004")
    assert "non-finite values in " + str(file) + " model.norm.weight" in checkpoint.verify(tmp_path / "ckpt-000004")
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume"], capsys)
    assert rc == 0, err
    assert f"passing over non-finite values in {file}" in out and "falling back to" in out
    new, old = load_file(file), load_file(straight / "ckpt-000004" / "model.safetensors")
    assert all(torch.equal(v, old[k]) for k, v in new.items())  # steps 3-4 repeated exactly


# ----------------------------------------------------------------------------------------------------------------------
# evaluation never costs the training


def test_an_empty_eval_set_is_skipped_and_the_run_finishes(tmp_path, capsys):
    """Every eval pair has chosen == rejected, so tokenize drops all 8: training runs, the final checkpoint is
    written, eval logs that it has nothing to do."""
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": "ab", "chosen": "cd", "rejected": "cd"}) + "\n"
                                 for _ in range(8)))
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path / 'run'}", f"--eval_data={eval_file}"], capsys)
    assert rc == 0, err
    assert "eval data: no examples left: held-out metrics and generations are skipped" in out
    assert ckpts(tmp_path / "run") == ["ckpt-000002", "ckpt-000004"]
    assert strict_rows(tmp_path / "run")[-1] == {"step": 4, "split": "eval"}


def test_num_samples_zero_evaluates_without_generations(tmp_path, capsys):
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--num_samples=0"], capsys)
    assert rc == 0, err
    assert "num_samples=0: no generations at eval" in out and "sample |" not in out
    row = strict_rows(tmp_path)[-1]
    assert row["split"] == "eval" and "reward_acc" in row
    assert not {"gold_greedy", "gold_sampled", "kl_ref", "kl_init"} & row.keys()


def test_the_final_checkpoint_is_written_before_the_final_eval(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("eval broke")
    monkeypatch.setattr(train, "evaluate", broken)
    with pytest.raises(RuntimeError, match="eval broke"):
        train.main(SMALL + [f"--out_dir={tmp_path}"])
    assert ckpts(tmp_path) == ["ckpt-000002", "ckpt-000004"]


# ----------------------------------------------------------------------------------------------------------------------
# one run per out_dir

HOLD = """
import sys, checkpoint
with checkpoint.lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_busy_out_dir_stops_naming_the_first(straight, tmp_path, capsys):
    """Another process holds out_dir/.lock: train.py exits at once naming its pid and touches nothing; after that
    process is SIGKILLed the kernel has dropped its lock and a run goes ahead."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != ".lock"}
        rc, _, err = main(SMALL + [f"--out_dir={tmp_path}"], capsys)
        one_line_error(rc, err, f"out_dir={tmp_path} is in use by another run (pid {holder.pid} holds")
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != ".lock"} == before
        p = subprocess.run([sys.executable, "train.py", *SMALL, f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        one_line_error(p.returncode, p.stderr, f"(pid {holder.pid} holds")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--max_steps=2", "--overwrite=true"], capsys)
    assert rc == 0, err
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())  # the last holder's pid


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with checkpoint.lock(tmp_path):
        with pytest.raises(checkpoint.CheckpointError, match=f"pid {os.getpid()}"):
            with checkpoint.lock(tmp_path):
                pass
    with checkpoint.lock(tmp_path):  # released on exit
        pass


# ----------------------------------------------------------------------------------------------------------------------
# a second run in the same out_dir: refused, or with --overwrite replacing the first only at its own first checkpoint

def snapshot(run_dir: Path) -> dict:
    """Every file under run_dir but .lock: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_second_run_into_a_finished_run_is_refused_and_touches_nothing(straight, tmp_path, capsys):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--seed=7"], capsys)
    one_line_error(rc, err, f"out_dir={tmp_path} holds a run (ckpt-000004: step 4 of max_steps=4, written 20",
                   " UTC): continue it with --resume, choose another --out_dir, or replace it with --overwrite=true")
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".new-", ".replaced-", ".tmp-"))]


def test_a_run_without_a_checkpoint_is_a_run_but_empty_leftovers_are_not(straight, tmp_path, capsys):
    """metrics.jsonl with rows is a run's record (refused, and --resume is no way out); an empty metrics.jsonl, a
    train_config.json and an unfinished checkpoint (a run that stopped before its first row) are replaced."""
    shutil.copy(straight / "metrics.jsonl", tmp_path / "metrics.jsonl")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}"], capsys)
    one_line_error(rc, err, f"out_dir={tmp_path} holds a run (no checkpoint; metrics.jsonl to step 4, written ",
                   "choose another --out_dir, or replace it with --overwrite=true")
    assert "--resume" not in err
    (tmp_path / "metrics.jsonl").write_text("")
    shutil.copy(straight / "train_config.json", tmp_path / "train_config.json")
    shutil.copytree(straight / "ckpt-000002", tmp_path / ".tmp-ckpt-000003")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--max_steps=2"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-000002", "metrics.jsonl", "train_config.json"]
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 2


def test_overwrite_replaces_the_earlier_run_only_at_its_first_checkpoint(straight, tmp_path, capsys, monkeypatch):
    """Until the new run's first checkpoint is whole the earlier run is untouched (its rows and options too: the new
    ones go to side files); then it is gone at once, even its ckpt-000004 newer than the new run's only one."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    before, seen = snapshot(tmp_path), []
    real = checkpoint.write_manifest

    def at_first_manifest(ckpt):  # the new checkpoint is written but for its manifest
        seen.append(snapshot(tmp_path))
        seen.append([json.loads(line) for line in (tmp_path / ".new-metrics.jsonl").read_text().splitlines()])
        return real(ckpt)
    monkeypatch.setattr(checkpoint, "write_manifest", at_first_manifest)
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--overwrite=true", "--seed=7", "--max_steps=2"], capsys)
    assert rc == 0, err
    assert f"--overwrite: the run in {tmp_path} (ckpt-000004: step 4 of max_steps=4" in out
    old_files, new_rows = seen[0], seen[1]
    assert {p: v for p, v in old_files.items() if p in before} == before  # all of the earlier run, as it was
    assert [(r["step"], r["split"]) for r in new_rows] == [(1, "train"), (2, "train")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-000002", "metrics.jsonl", "train_config.json"]
    assert json.loads((tmp_path / "train_config.json").read_text())["seed"] == 7
    assert [(r["step"], r["split"]) for r in strict_rows(tmp_path)] == [(1, "train"), (2, "train"), (2, "eval")]
    new, old = (load_file(d / "ckpt-000002" / "model.safetensors") for d in (tmp_path, straight))
    assert any(not torch.equal(new[k], old[k]) for k in old)  # the new run's own weights
    assert checkpoint.verify(tmp_path / "ckpt-000002") is None


def test_overwrite_failing_before_its_first_checkpoint_leaves_the_earlier_run_resumable(straight, tmp_path, capsys,
                                                                                         monkeypatch):
    """The earlier run stopped at step 2 of 4; the new run (--overwrite) fails at step 2, before its first checkpoint:
    its message names no checkpoint of the earlier run as its own, the earlier run is byte for byte as it was, and
    --resume finishes it exactly as the uninterrupted run."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "ckpt-000004")
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r)["step"] <= 2))
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:
        nan_loss_at(m, set(range(2, 100)))
        rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--overwrite=true", "--seed=7", "--ckpt_every=3"],
                          capsys)
    one_line_error(rc, err, "3 non-finite steps in a row at step 2",
                   "the newest finite checkpoint is none (none was due yet: see ckpt_every)")
    assert "ckpt-000002" not in err
    assert snapshot(tmp_path) == {**before, **{p: v for p, v in snapshot(tmp_path).items() if ".new-" in p.name}}
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume"], capsys)
    assert rc == 0, err
    assert not list(tmp_path.glob(".new-*"))  # the failed run's side files are gone
    for sub in ("", "reference"):
        new, old = (load_file(d / "ckpt-000004" / sub / "model.safetensors") for d in (tmp_path, straight))
        assert all(torch.equal(new[k], old[k]) for k in old)
    timeless = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in strict_rows(tmp_path)]
    assert timeless == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in strict_rows(straight)]


def test_init_from_the_run_being_replaced_is_refused_and_the_advice_works(straight, tmp_path, capsys):
    """--init_from=out --out_dir=out (or one of its checkpoints) would delete what it reads: refused before any work,
    with or without --overwrite; the other out_dir it advises trains, and its result is a complete run that sample.py
    and a later init_from use."""
    import sample
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = snapshot(run_dir)
    for init_from in (run_dir, run_dir / "ckpt-000002"):
        for extra in ([], ["--overwrite=true"]):
            rc, _, err = main(SMALL + [f"--out_dir={run_dir}", f"--init_from={init_from}", *extra], capsys)
            one_line_error(rc, err, f"init_from={init_from} is read from the run in out_dir={run_dir} (ckpt-000004",
                           f"choose another --out_dir (e.g. --out_dir={run_dir}-2)")
    assert snapshot(run_dir) == before
    assert main(SMALL + [f"--out_dir={run_dir}-2", f"--init_from={run_dir}", "--max_steps=2"], capsys)[0] == 0
    assert main(SMALL + [f"--out_dir={run_dir}-3", f"--init_from={run_dir}-2", "--max_steps=2"], capsys)[0] == 0
    assert sample.main(["--ckpt", f"{run_dir}-3", "--prompt", "abc=", "--max_new_tokens", "3"]) == 0


def test_the_resume_refusals_advise_commands_that_work(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shutil.rmtree(run_dir / "ckpt-000004")
    rc, _, err = main(SMALL + [f"--out_dir={run_dir}", "--resume", "--max_steps=6"], capsys)
    advice = f"--init_from={run_dir} --out_dir={run_dir}-2"
    one_line_error(rc, err, advice)
    rc, _, err = main(SMALL + advice.split() + ["--max_steps=6"], capsys)
    assert rc == 0, err
    assert [r["step"] for r in strict_rows(Path(f"{run_dir}-2")) if r["split"] == "eval"] == [6]


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume", "--overwrite=true"], capsys)
    one_line_error(rc, err, "resume=true continues the run in out_dir, overwrite=true replaces it: choose one")


# ----------------------------------------------------------------------------------------------------------------------
# files written into out_dir are the run's own: a planted symbolic link is refused, and what it points to untouched

PLANTED = [".lock", "metrics.jsonl", "train_config.json", "ckpt-000002", ".tmp-ckpt-000002", ".new-metrics.jsonl"]


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("extra", [[], ["--overwrite=true"], ["--resume"]])
def test_a_planted_symbolic_link_is_refused_and_its_target_untouched(straight, tmp_path, capsys, name, extra):
    run_dir, victim = tmp_path / "run", tmp_path / "victim"
    if name.startswith(("ckpt", ".tmp")):  # a link to a directory: a checkpoint the run might write into or delete
        shutil.copytree(straight / "ckpt-000002", victim)
    else:
        shutil.copy(straight / "train_config.json", victim)
    if extra:  # a run there to overwrite or resume
        shutil.copytree(straight, run_dir)
        checkpoint.remove(run_dir / name)
    run_dir.mkdir(exist_ok=True)
    (run_dir / name).symlink_to(victim)
    before = snapshot(tmp_path / "victim") if victim.is_dir() else victim.read_bytes()
    rc, _, err = main(SMALL + [f"--out_dir={run_dir}", *extra], capsys)
    one_line_error(rc, err, f"{run_dir / name} is a symbolic link (to {victim})", "remove the link")
    assert (snapshot(victim) if victim.is_dir() else victim.read_bytes()) == before


def test_an_out_dir_that_is_a_symbolic_link_is_followed(tmp_path, capsys):
    """out_dir itself is the user's choice (out -> /scratch/out): the run writes into the directory it names."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'link'}", "--max_steps=2"], capsys)
    assert rc == 0, err
    assert ckpts(tmp_path / "real") == ["ckpt-000002"]


def test_write_file_is_atomic_and_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "a.json").symlink_to(victim)
    with pytest.raises(checkpoint.CheckpointError, match="a.json is a symbolic link"):
        checkpoint.write_file(tmp_path / "a.json", "x")
    (tmp_path / f".b.json.tmp-{os.getpid()}").symlink_to(victim)  # a link where the temp file goes: removed, not used
    checkpoint.write_file(tmp_path / "b.json", "new")
    assert (tmp_path / "b.json").read_text() == "new" and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "victim"]


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path / '.lock'} is not a regular file"):
        with checkpoint.lock(tmp_path):
            pass


# ----------------------------------------------------------------------------------------------------------------------
# resume finds the last good state


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'typo'}", "--resume"], capsys)
    one_line_error(rc, err, f"--resume: no checkpoint (ckpt-*) in out_dir={tmp_path / 'typo'}", "drop --resume")
    assert "overwrite" not in err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train"}) + "\n")  # killed before ckpt 1
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume"], capsys)
    one_line_error(rc, err, "drop --resume to start a fresh run (it holds a run, no checkpoint; metrics.jsonl to step "
                   "1, written ", ": add --overwrite=true)")
    assert main(SMALL + [f"--out_dir={tmp_path}", "--overwrite=true", "--max_steps=2"], capsys)[0] == 0


def truncate(ckpt: Path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


DAMAGE = {
    "truncated model.safetensors": (truncate, "model.safetensors has"),
    "missing reference/": (lambda c: shutil.rmtree(c / "reference"), "reference/config.json is missing"),
    "invalid state.json": (lambda c: (c / "state.json").write_text("{\"step\": 4,"), "state.json has"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_a_damaged_newest_checkpoint(straight, tmp_path, capsys, damage):
    """The newest checkpoint damaged after it was written: --resume warns, takes ckpt-000002, sets the damaged one
    aside (renamed, not deleted) and repeats steps 3-4 to the straight run's exact weights and metrics."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    hurt, problem = DAMAGE[damage]
    hurt(tmp_path / "ckpt-000004")
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume"], capsys)
    assert rc == 0, err
    assert problem in out and f"falling back to {tmp_path / 'ckpt-000002'}" in out
    assert ckpts(tmp_path) == ["ckpt-000002", "ckpt-000004", "ckpt-000004.damaged"]
    for sub in ("", "reference"):
        new, old = (load_file(d / "ckpt-000004" / sub / "model.safetensors") for d in (tmp_path, straight))
        assert all(torch.equal(v, old[k]) for k, v in new.items())
    timeless = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in strict_rows(tmp_path)]
    assert timeless == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in strict_rows(straight)]


def test_resume_with_every_checkpoint_damaged_is_an_error(straight, tmp_path, capsys):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    for c in ckpts(tmp_path):
        truncate(tmp_path / c)
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume"], capsys)
    one_line_error(rc, err, f"--resume: no usable checkpoint in out_dir={tmp_path}", "ckpt-000004/model.safetensors",
                   "ckpt-000002/model.safetensors")


def test_resume_with_another_max_steps_is_refused_unless_the_lr_is_constant(straight, tmp_path, capsys):
    """The cosine schedule would be re-stretched at the resume step: refused, naming both learning rates."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "ckpt-000004")
    cfg = train.parse_config(SMALL, world_size=1)
    was, now = train.get_lr(2, cfg), train.get_lr(2, dataclasses.replace(cfg, max_steps=40))
    assert abs(now - was) > 1e-4
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--resume", "--max_steps=40"], capsys)
    one_line_error(rc, err, "--resume: max_steps=40 differs from the run's 4", f"from {was:.3g} to {now:.3g}",
                   f"init_from={tmp_path}")
    assert ckpts(tmp_path) == ["ckpt-000002"]
    shutil.copytree(straight, tmp_path / "done")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'done'}", "--resume"], capsys)
    one_line_error(rc, err, "at step 4 of max_steps=4: the run is complete")
    constant = tmp_path / "constant"
    assert train.main(SMALL + [f"--out_dir={constant}", "--schedule=constant", "--max_steps=2"]) == 0
    rc, _, err = main(SMALL + [f"--out_dir={constant}", "--schedule=constant", "--resume", "--max_steps=4"], capsys)
    assert rc == 0, err
    assert [r["lr"] for r in strict_rows(constant) if r["split"] == "train"] == [3e-3] * 4


# ----------------------------------------------------------------------------------------------------------------------
# disks that refuse to be written


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors"), "No space left on device"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "model.safetensors"), "choose a writable out_dir"),
    (RuntimeError("basic_ios::clear: iostream error"), "iostream error"),  # what torch.save says on a full disk
])
def test_a_failing_checkpoint_write_names_the_path_and_leaves_no_partial_copy(tmp_path, capsys, monkeypatch,
                                                                             error, reason):
    import model
    writes = [0]

    def save_file(*args, **kwargs):  # the second checkpoint's first file fails
        writes[0] += 1
        if writes[0] == 3:  # the policy and reference of ckpt-000002, then the policy of ckpt-000004
            raise error
        return real(*args, **kwargs)
    real = model.save_file
    monkeypatch.setattr(model, "save_file", save_file)
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}", "--ref_update=soft", "--tau=1"], capsys)
    one_line_error(rc, err, f"cannot write checkpoint {tmp_path / 'ckpt-000004'}", reason, "partial copy was removed")
    assert ckpts(tmp_path) == ["ckpt-000002"] and not list(tmp_path.glob(".tmp-*"))
    assert checkpoint.verify(tmp_path / "ckpt-000002") is None


@pytest.mark.parametrize("name, message", [(".lock", "out_dir={out}: cannot create {out}/.lock: Read-only file system"),
                                           ("metrics.jsonl", "{out}/metrics.jsonl: Read-only file system")])
def test_an_unwritable_out_dir_is_one_line(tmp_path, capsys, monkeypatch, name, message):
    real_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if name in str(file) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path}"], capsys)
    one_line_error(rc, err, message.format(out=tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# model and tokenizer vocabularies


def tiny_hf(path: Path, vocab: int) -> Path:
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=64, bos_id=256,
                      eos_id=2)).save_pretrained(path)
    return path


def test_a_model_vocab_smaller_than_the_tokenizers_is_refused_before_the_data_is_read(tmp_path, capsys):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text("not json\n")  # a data error would come first if the data were read first
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'run'}", f"--init_from={tiny_hf(tmp_path / 'hf', 200)}",
                               f"--data={bad_data}", "--tokenizer=byte"], capsys)
    one_line_error(rc, err, "vocab_size 200", "< the 259 ids of tokenizer=byte")


def test_a_larger_model_vocab_trains_and_never_generates_undecodable_ids(tmp_path, capsys, monkeypatch):
    """stories260K (vocab 512) with the 259-id byte tokenizer: ids 259..511 are never drawn (greedy or sampled) and
    generation stops on the tokenizer's EOS (257), not the model's eos_id 2."""
    model_dir = shared_path("models", "stories260K")
    seen = []
    real = Llama.generate

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append((kwargs, out))
        return out
    monkeypatch.setattr(Llama, "generate", spy)
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path}", f"--init_from={model_dir}", "--tokenizer=byte",
                                 "--loss=sft", "--num_samples=8", "--max_new_tokens=24", "--max_length=32",
                                 "--max_steps=2", "--max_prompt_length=16"], capsys)
    assert rc == 0, err
    assert len(seen) == 2 and all(kw["n_vocab"] == 259 and kw["stop_ids"] == [257] for kw, _ in seen)
    ids = [t for _, rows in seen for r in rows for t in r]
    assert ids and max(ids) < 259
    torch.manual_seed(0)  # unmasked, the same model does draw undecodable ids from these prompts
    model = Llama.from_pretrained(model_dir)
    free = real(model, [[256, 97, 98]] * 8, 24, temperature=1.0, stop_ids=())
    assert max(t for r in free for t in r) >= 259


def nan_weight(model_dir: Path):
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, model_dir / "model.safetensors")


def overflowing_weights(model_dir: Path):
    """Finite weights whose first forward overflows: an all-ones embedding (tied to the head) and a final norm of
    3e38 make every logit 16 x 3e38 = inf."""
    weights = load_file(model_dir / "model.safetensors")
    weights["model.embed_tokens.weight"].fill_(1.0)
    weights["model.norm.weight"].fill_(3e38)
    save_file(weights, model_dir / "model.safetensors")


@pytest.mark.parametrize("spoil", ["rope_theta 0", "a NaN weight", "an overflowing weight",
                                   "an overflowing weight in bf16"])
def test_a_non_finite_first_forward_names_the_model_not_the_lr(tmp_path, capsys, spoil):
    """Before any optimizer step lr has played no part: a NaN/inf loss or gradient there is the initial model's.
    rope_theta 0 and a NaN weight are refused when the model files are read (naming the key or tensor); finite weights
    that overflow reach the first forward, whose line names init_from. Never lr."""
    hf = tiny_hf(tmp_path / "hf", 300)
    if spoil == "rope_theta 0":
        config = json.loads((hf / "config.json").read_text())
        config["rope_parameters"]["rope_theta"] = 0  # transformers 5.x's place; 4.x's top-level key too
        (hf / "config.json").write_text(json.dumps({**config, "rope_theta": 0}))
    elif spoil == "a NaN weight":
        nan_weight(hf)
    else:
        overflowing_weights(hf)
    bf16 = ["--dtype=bfloat16"] * spoil.endswith("bf16")
    rc, out, err = main(SMALL + [f"--out_dir={tmp_path / 'run'}", f"--init_from={hf}", "--tokenizer=byte", *bf16],
                        capsys)
    one_line_error(rc, err, f"init_from={hf}")
    assert "lower lr" not in err and "non-finite steps in a row" not in err
    if spoil == "rope_theta 0":
        one_line_error(rc, err, f"{hf / 'config.json'}: rope_theta must be a finite number > 0, got 0")
    if spoil == "a NaN weight":
        one_line_error(rc, err, f"{hf / 'model.safetensors'}: tensor model.norm.weight holds NaN or inf values")
    if spoil.startswith("an overflowing weight"):
        one_line_error(rc, err, "the first forward is non-finite (loss nan, gradient norm nan), before any "
                       f"optimizer step: the model of init_from={hf} gives NaN/inf (check its weights and config.json,"
                       " e.g. rope_theta)" + (" or use dtype=float32" if bf16 else ""))


def test_the_guard_blames_the_initial_model_only_before_the_first_optimizer_step(tmp_path):
    cfg, rows = train.TrainConfig(init_from="some/model"), []
    run_dir = checkpoint.RunDir(tmp_path, [], [])
    for norm, loss in ((float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(train.ConfigError, match="first forward .* the model of init_from=some/model gives"):
            train.guard(norm, loss, 0, 0, cfg, run_dir, rows.append)
    assert train.guard(1.0, 1.0, 0, 0, cfg, run_dir, rows.append) == 0 and not rows
    assert train.guard(float("nan"), 1.0, 0, 1, cfg, run_dir, rows.append) == 1  # a later step: skipped, retried
    assert [(r["step"], r["split"], r["in_a_row"]) for r in rows] == [(2, "skipped", 1)]


# ----------------------------------------------------------------------------------------------------------------------
# bad data and bad setups: one line, exit status 2, naming the file (and line)

GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"


BAD_FILES = [
    ("blank.jsonl", GOOD * 3 + "\n" + GOOD, "blank.jsonl:4: line 4 is blank"),
    ("deep.jsonl", GOOD + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "deep.jsonl:2: JSON nested too deeply"),
    ("mixed.jsonl", GOOD + json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n",
     "mixed.jsonl:2: a record of format kto among records of format pairs"),
    ("cut.jsonl.gz", gzip.compress((GOOD * 50_000).encode(), mtime=0)[:5000], "cut.jsonl.gz:"),
    ("one.json", json.dumps([json.loads(GOOD), {"prompt": "p", "chosen": 1, "rejected": "b"}]),
     "one.json:1: record [1]: field 'chosen' must be str or list"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_data_files_are_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'run'}", f"--data={path}"], capsys)
    one_line_error(rc, err, message)
    p = subprocess.run([sys.executable, "data.py", str(path), "--tokenizer=byte"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    one_line_error(p.returncode, p.stderr, message, prog="data.py")


def test_bad_setups_are_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD * 9 + json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'a'}", f"--data={data}", "--eval_size=9"], capsys)
    one_line_error(rc, err, f"data={data}: every one of its 1 training rows was dropped")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'b'}", f"--data={data}", "--eval_size=2", "--batch_size=8",
                               "--micro_batch_size=8"], capsys)
    one_line_error(rc, err, f"data={data}: batch_size 8 is larger than the 7 training examples")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'c'}", f"--data={data}", "--eval_size=10"], capsys)
    one_line_error(rc, err, "cannot hold out 10 of 10 examples")
    hf = tiny_hf(tmp_path / "hf", 300)
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'c'}", f"--init_from={hf}"], capsys)  # no tokenizer: no guess
    one_line_error(rc, err, f"tokenizer=auto: {hf}: no tokenizer.json, llama2.c tok*.bin or train_config.json")
    (hf / "config.json").write_text((hf / "config.json").read_text().replace('"silu"', '"gelu"'))
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'd'}", f"--init_from={hf}", "--tokenizer=byte"], capsys)
    one_line_error(rc, err, f"init_from={hf}: {hf / 'config.json'}: field 'hidden_act' is 'gelu'")
    (hf / "config.json").write_text("{")
    rc, _, err = main(SMALL + [f"--out_dir={tmp_path / 'e'}", f"--init_from={hf}", "--tokenizer=byte"], capsys)
    one_line_error(rc, err, f"cannot read vocab_size from {hf / 'config.json'}")


def test_resume_on_data_that_changed_under_the_run_is_one_line(tmp_path, capsys):
    """The data file rewritten with fewer pairs between the checkpoint and --resume: the data position cannot be
    restored (another number of steps per epoch), said in one line naming the checkpoint and the data."""
    pairs = [{"prompt": f"q{i}=", "chosen": "a" * (1 + i % 3), "rejected": "b" * (1 + i % 4)} for i in range(48)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = SMALL + [f"--data={data}", "--tokenizer=byte", f"--out_dir={tmp_path / 'run'}", "--max_steps=2",
                    "--schedule=constant"]
    assert main(args, capsys)[0] == 0
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs[:24]))
    rc, _, err = main(args[:-2] + ["--max_steps=4", "--schedule=constant", "--resume"], capsys)
    one_line_error(rc, err, "--resume: ", "ckpt-000002: cannot resume the data position: steps_per_epoch changed",
                   f"data={data} is not the data the run trained on")

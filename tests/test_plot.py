"""plot.py: run directories -> one PNG of their metrics."""
import json
import subprocess
import sys

import pytest

import plot
from conftest import ROOT

pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib (requirements.txt)")


def fake_run(path, loss: str, ref_update: str = "static", tau: int = 4, steps: int = 10, gold: bool = True):
    """A run directory as train.py writes it: train rows every step, eval rows every 5 (synthetic: gold reward)."""
    path.mkdir(parents=True)
    (path / "train_config.json").write_text(json.dumps({"loss": loss, "ref_update": ref_update, "tau": tau}))
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "split": "train", "loss": 1 / s, "grad_norm": 1.0, "lr": 1e-3}
        if loss != "sft":
            row.update(reward_acc=0.5 + s / 40, margin=s / 10, chosen_reward=s / 20, rejected_reward=-s / 20,
                       chosen_logp=-10 - s, rejected_logp=-10 - 2 * s, kl_ref=0.01 * s)
        rows.append(row)
        if s % 5 == 0:
            ev = {"step": s, "split": "eval", "loss": 1 / s}
            if loss != "sft":
                ev.update(reward_acc=0.6, margin=s / 10, kl_init=0.1 * s, chosen_logp=-11.0, rejected_logp=None)
                if ref_update != "static":
                    ev["kl_ref"] = 0.05 * s
            if gold:
                ev.update(gold_greedy=0.5 + s / 100, gold_sampled=0.5)
            rows.append(ev)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "spl')
    return path


def test_runs_overlaid_into_one_png_with_the_expected_panels(tmp_path):
    runs = [fake_run(tmp_path / "sft", "sft"), fake_run(tmp_path / "dpo", "dpo"),
            fake_run(tmp_path / "tr-dpo", "dpo", "soft", tau=4)]
    out = tmp_path / "figs" / "runs.png"
    panels = plot.plot(runs, out)
    assert panels == [title for title, _ in plot.PANELS]  # every panel: gold from eval, train kl_ref from dpo
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    h, w = matplotlib.image.imread(out).shape[:2]
    assert w > h > 300  # 3 columns x 3 rows of panels at 80 dpi
    assert plot.load_run(runs[2])["ref_updates"] == [4, 8]  # ticks every τ up to the last step; static: none
    assert plot.load_run(runs[1])["ref_updates"] == []


def test_panels_follow_the_metrics_present(tmp_path):
    """An SFT run on real data has a loss only; an eval row's null (a non-finite value) is not drawn."""
    panels = plot.plot([fake_run(tmp_path / "sft", "sft", gold=False)], tmp_path / "sft.png")
    assert panels == ["loss"]
    train, evals = plot.load_run(tmp_path / "sft")["train"], plot.load_run(tmp_path / "sft")["eval"]
    assert len(train) == 10 and len(evals) == 2  # the half-written last line of a killed run is skipped
    run = fake_run(tmp_path / "dpo", "dpo")
    assert plot.series(plot.load_run(run)["eval"], "rejected_logp") == ([], [])


def test_cli_default_path_and_one_line_errors(tmp_path):
    fake_run(tmp_path / "a", "dpo")
    fake_run(tmp_path / "b", "dpo", "hard")
    out = subprocess.run([sys.executable, "plot.py", str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "plot.png") and (tmp_path / "plot.png").is_file()
    bad = tmp_path / "c"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    for run, culprit in ((tmp_path / "missing", "no metrics.jsonl"), (bad, "metrics.jsonl:2: not JSON")):
        out = subprocess.run([sys.executable, "plot.py", str(run)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("plot.py: error: ") and culprit in out.stderr


def test_judge_score_is_drawn_against_kl_init(tmp_path):
    """A run evaluated with --judge: its judge_score against kl_init, the eval rows in step order (a row without either
    number, or a null, is left out); runs without it draw no such panel."""
    run = fake_run(tmp_path / "dpo", "dpo")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    judge = {5: 0.25, 10: None}
    for r in rows:
        if r["split"] == "eval":
            r["judge_score"] = judge[r["step"]]
    rows.append({"step": 15, "split": "eval", "kl_init": 2.0, "judge_score": -0.5})
    rows.append({"step": 20, "split": "eval", "judge_score": 0.1})  # no kl_init: not drawn
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.against_kl(plot.load_run(run)["eval"], "judge_score") == ([0.5, 2.0], [0.25, -0.5])
    title = plot.AGAINST_KL[0][0]
    assert plot.plot([run, fake_run(tmp_path / "sft", "sft")], tmp_path / "p.png")[-1] == title
    assert title not in plot.plot([fake_run(tmp_path / "other", "dpo")], tmp_path / "q.png")

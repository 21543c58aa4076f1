"""gpu_check.py's CPU part, what CI runs: packed against padded train.py steps in fp32 and bf16, the benchmark's
checks at a tiny shape, one report in Markdown and JSON, and a failed check failing the command. (Its CUDA part, the
`pytest -m cuda` tests, DDP/FSDP2 on 2 GPUs and the benchmarks at the recipe's and the 1B shape, needs a GPU.)"""
import json
import subprocess
import sys

import pytest

import gpu_check
from conftest import ROOT
from test_bench import preference_file


def report(out) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_the_cpu_part_checks_packing_against_padding_and_writes_one_report(tmp_path):
    out = tmp_path / "report"
    rc = gpu_check.main(["--device", "cpu", "--data", str(preference_file(tmp_path)), "--tokenizer", "byte",
                         "--steps", "2", "--out", str(out)])
    r = report(out)
    checks = {c["name"]: c for c in r["checks"]}
    assert rc == 0 and r["passed"], r["checks"]
    assert list(checks) == ["cuda_tests", "train_float32", "train_bfloat16", "bench_tiny"]
    assert checks["cuda_tests"]["status"] == "skipped"
    for dtype in ("float32", "bfloat16"):
        c = checks[f"train_{dtype}"]
        assert c["status"] == "pass" and c["steps"] == 2 and len(c["loss_packed_padded"]) == 2
        assert c["max_rel_dev_loss"] <= gpu_check.TOLERANCE[dtype] and c["max_rel_dev_grad_norm"] > 0  # not one run
    runs = r["bench"]["bench_tiny"]
    assert list(runs) == ["off", "shared", "fixed"] and runs["shared"]["attention"] == "sdpa"
    assert runs["shared"]["padding"] < runs["off"]["padding"] and runs["off"]["peak_mem_mb"] > 0
    env = r["environment"]
    assert env["device"] == "cpu" and env["torch"] and set(env["cpu"]) >= {"capability", "avx512_bf16", "amx_bf16"}
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check: PASSED") and "| train_bfloat16 | pass |" in md and "## bench_tiny" in md


def test_a_check_out_of_tolerance_fails_the_command(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.TOLERANCE, "float32", -1.0)  # no deviation, not even 0, is within it
    out = tmp_path / "report"
    assert gpu_check.main(["--device", "cpu", "--steps", "1", "--out", str(out)]) == 1  # synthetic data, no bench
    status = {c["name"]: c["status"] for c in report(out)["checks"]}
    assert status == {"cuda_tests": "skipped", "train_float32": "fail", "train_bfloat16": "pass"}
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check: FAILED")
    assert gpu_check.main(["--device", "cpu", "--steps", "1", "--out", str(out)]) == 1  # again: its runs replaced
    assert {c["name"]: c["status"] for c in report(out)["checks"]} == status


@pytest.mark.parametrize("option, culprit", [
    (["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file or directory"),
    (["--data", "{tmp}/broken.jsonl"], "--data {tmp}/broken.jsonl: {tmp}/broken.jsonl:1: "),
    (["--data", "{tmp}/few.jsonl"], "usable pair(s); need more than 8: the train checks hold out 8"),
    (["--data", "{tmp}/pairs.jsonl", "--tokenizer", "nope"], "--tokenizer nope: unknown tokenizer 'nope'"),
    (["--steps", "0"], "--steps 0: need >= 1"),
    (["--budget_s", "nan"], "--budget_s nan: need a finite number of seconds > 0"),
    (["--budget_s", "-5"], "--budget_s -5.0: need a finite number of seconds > 0"),
    (["--out", "{tmp}/pairs.jsonl"], "--out {tmp}/pairs.jsonl: exists and is not a directory"),
    (["--device", "cuda"], "--device cuda but torch sees no GPU"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
])
def test_bad_options_and_inputs_are_refused_in_one_line_before_any_check(tmp_path, capsys, monkeypatch, option,
                                                                         culprit):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "train_checks", lambda *a: pytest.fail("a check ran"))
    preference_file(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": \n')
    (tmp_path / "few.jsonl").write_text("".join((tmp_path / "pairs.jsonl").read_text().splitlines(True)[:8]))
    option = [o.format(tmp=tmp_path) for o in option]
    out = tmp_path / "report"
    try:
        rc = gpu_check.main(["--device", "cpu", "--out", str(out), *option])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("gpu_check.py: error: "), err
    assert culprit.format(tmp=tmp_path) in err, err
    assert not out.exists()


def test_a_missing_data_file_is_one_line_from_the_command(tmp_path):
    """The whole command, as a user runs it: one line, no traceback, no report, no check run."""
    p = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--data", str(tmp_path / "nope.jsonl"),
                        "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr == f"gpu_check.py: error: --data {tmp_path / 'nope.jsonl'}: no such file or directory\n"
    assert not (tmp_path / "report").exists()

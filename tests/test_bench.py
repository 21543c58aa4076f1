"""bench.py: a smoke run of the real CLI (the JSON contract), the FLOPs accounting, and its argument checks.
No timing is asserted: the numbers depend on the machine."""
import json
import subprocess
import sys

import pytest

import bench
from conftest import ROOT

TINY = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "97", "--prompt_len", "4",
        "--response_len", "6", "--pairs", "2", "--warmup", "1"]


def test_cli_smoke_json_last_line():
    out = subprocess.run([sys.executable, "bench.py", *TINY, "--steps", "2", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "step_ms", "tr_update_ms", "mfu", "peak_mem_mb"):
        assert r[key] > 0, key  # soft update at tau=1 runs every step, so its time is positive too
    assert r["tokens_per_step"] == 2 * 2 * (4 + 6) and len(r["step_ms_all"]) == 2
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_ms"] * 1000)
    assert 0 < r["ref_forward_share"] < 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own imports under torch.compile
def test_compiled_step_runs():
    r = bench.main([*TINY, "--steps", "1", "--compile"])
    assert r["compile"] and r["tokens_per_s"] > 0 and r["tr_update_ms"] > 0


def test_profile_prints_the_op_table(capsys):
    """The table's shape only: which ops lead it depends on the machine's load."""
    r = bench.main([*TINY, "--steps", "1", "--profile", "--profile_rows", "5"])
    lines = capsys.readouterr().out.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")]
    assert len(rules) == 3 and "Self CPU" in lines[rules[0] + 1] and rules[2] - rules[1] - 1 == 5  # 5 op rows
    assert lines[rules[2] + 1].startswith("Self CPU time total") and len(r["step_ms_all"]) == 1


@pytest.mark.parametrize("loss, extra, ref_passes", [("ipo", ["--ref_update", "static", "--precompute_ref"], 0),
                                                     ("kto", ["--ref_update", "hard", "--tau", "2"], 3)])
def test_flops_accounting(loss, extra, ref_passes):
    """3 forwards for the trained rows, plus one per reference (or KTO KL-row) forward pass; no reference forward
    inside the step when its log-probs are precomputed; a TR update only on steps divisible by tau. The LM head is not
    counted at the first 3 of the 4 prompt positions of each of the 4 rows: the 4th predicts the first response token.
    """
    r = bench.main([*TINY, "--loss", loss, "--steps", "2", *extra])
    model = bench.Llama(bench.ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2))
    forward = model.flops_per_token(10) * 40 - 2 * 32 * 97 * 4 * 3
    assert r["flops_per_step"] == forward * (3 + ref_passes)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["step_ms"] / 1000) / (r["matmul_peak_tflops"] * 1e12))
    if loss == "ipo":
        assert r["ref_forward_ms"] == 0 and r["tr_update_ms"] == 0
    else:  # steps 2 and 3 are timed (1 is warm-up); only step 2 updates, and both run 2 reference forwards (+ KL rows)
        assert r["ref_forward_ms"] > 0 and r["tr_update_ms"] > 0


def test_precompute_needs_static_reference(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--ref_update", "soft", "--precompute_ref"])
    assert "--precompute_ref needs --ref_update static" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--n_kv_heads", "3", "--n_heads", "2"], "not a multiple of n_kv_heads=3"),
                                           (["--tau", "0"], "tau=0 must be >= 1"),
                                           (["--alpha", "nan"], "alpha=nan must be a finite number")])
def test_refused_models_and_options_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        bench.main([*TINY, "--steps", "1", *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("bench.py: error: ") and err.count("\n") == 1 and message in err


def test_matmul_peak_is_positive_and_finite():
    peak = bench.matmul_peak(bench.torch.device("cpu"), bench.torch.float32, (64,), reps=2)
    assert 0 < peak < float("inf")


def test_trl_baseline_runs_on_the_same_tokens():
    """bench_trl.py drives TRL's DPOTrainer (sync_ref_model=True) over exactly bench.py's tokens per step."""
    pytest.importorskip("trl")
    import bench_trl
    r = bench_trl.main(["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "97", "--prompt_len", "4",
                        "--response_len", "6", "--pairs", "2", "--warmup", "1", "--steps", "1"])
    assert r["tokens_per_step"] == 2 * 2 * (4 + 6) and r["tokens_per_s"] > 0

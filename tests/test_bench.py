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
    for key in ("tokens_per_s", "step_ms", "tr_update_ms", "optimizer_ms", "mfu", "peak_mem_mb"):
        assert r[key] > 0, key  # soft update at tau=1 runs every step, so its time is positive too
    assert r["tokens_per_step"] == 2 * 2 * (4 + 6) and len(r["step_ms_all"]) == 2
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_ms"] * 1000)
    assert 0 < r["ref_forward_share"] < 1 and 0 < r["optimizer_share"] < 1
    assert r["optimizer_ms"] + r["tr_update_ms"] < r["step_ms"]  # parts of the step, each marked once
    assert r["compiles"] == 0 and r["attention"] is None and r["torch"] == bench.torch.__version__
    assert set(r["cpu"]) == {"capability", "name", "avx512_bf16", "amx_bf16"} and r["load_avg"] >= 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own imports under torch.compile
def test_compiled_step_runs():
    r = bench.main([*TINY, "--steps", "1", "--compile"])
    assert r["compile"] and r["tokens_per_s"] > 0 and r["tr_update_ms"] > 0
    assert 1 <= r["compiles"] < bench.torch._dynamo.config.recompile_limit  # policy and reference, not per step


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


@pytest.mark.parametrize("ref_update", ["static", "soft"])
def test_lora_step_trains_the_adapters_only(ref_update):
    """--lora_rank: train.py's LoRA policy (only the adapters in the optimizer) and its low-rank reference; a soft
    update at tau=1 runs every step and grows the reference's delta."""
    r = bench.main([*TINY, "--steps", "2", "--ref_update", ref_update, "--lora_rank", "4", "--lora_alpha", "8",
                    "--lora_targets", "q_proj,v_proj,down_proj"])
    hidden = 96  # model.ModelConfig's SwiGLU width for dim 32
    assert r["n_trainable"] == 4 * ((32 + 32) * 2 + (hidden + 32)) < r["n_params"]
    assert r["lora_rank"] == 4 and r["lora_ref_rank"] == 32 and r["tokens_per_s"] > 0
    assert (r["tr_update_ms"] > 0) == (ref_update == "soft")


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


def test_cpu_features_read_torch_and_proc_cpuinfo():
    f = bench.cpu_features()
    assert f["capability"] == bench.torch.backends.cpu.get_cpu_capability()
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    assert f["avx512_bf16"] == ("avx512_bf16" in flags) and f["amx_bf16"] == ("amx_bf16" in flags)


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


def test_trl_peft_lora_baseline_trains_the_adapters_only():
    """bench_trl.py --lora_rank: TRL's own PEFT path (peft_config, no ref_model: the adapter disabled is the static
    reference) on the same tokens; only the LoRA factors of the targeted layers train, r·(in + out) each."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    import bench_trl
    r = bench_trl.main(["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "97", "--prompt_len", "4",
                        "--response_len", "6", "--pairs", "2", "--warmup", "1", "--steps", "1", "--lora_rank", "4",
                        "--lora_alpha", "8", "--lora_targets", "q_proj,v_proj,down_proj"])
    hidden = 96  # model.ModelConfig's SwiGLU width for dim 32
    assert r["n_trainable"] == 4 * ((32 + 32) * 2 + (hidden + 32))
    assert r["ref_update"] == "static" and r["lora_rank"] == 4 and r["peft"]
    assert r["tokens_per_step"] == 2 * 2 * (4 + 6) and r["tokens_per_s"] > 0


def preference_file(tmp_path, n: int = 24):
    """A small JSONL of prompt/chosen/rejected texts of varied lengths."""
    rng = __import__("random").Random(0)
    words = "the a cat dog sat ran on under mat tree quickly slowly".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": text(1, 8), "chosen": text(1, 10), "rejected": text(1, 10)}) + "\n"
                            for _ in range(n)))
    return path


DATA = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--tokenizer", "byte", "--max_length", "64",
        "--max_prompt_length", "32", "--pairs", "4", "--micro_batch_size", "2", "--warmup", "1", "--steps", "2"]


def test_real_data_modes_do_the_same_useful_work(tmp_path):
    """--data: the same steps under every packing mode; shared packing computes the fewest positions (no padding, each
    prompt once), and MFU counts only the useful FLOPs, the same for all modes."""
    path = preference_file(tmp_path)
    r = {m: bench.main([*DATA, "--data", str(path), "--packing", m]) for m in ("off", "rows", "shared")}
    assert len({x["flops_per_step"] for x in r.values()}) == 1
    assert len({x["real_tokens_per_step"] for x in r.values()}) == 1
    assert r["shared"]["tokens_per_step"] < r["rows"]["tokens_per_step"] < r["off"]["tokens_per_step"]
    assert r["off"]["padding_fraction"] > 0 and r["off"]["micro_batches_per_step"] == 2
    assert r["off"]["attention"] is None and r["shared"]["attention"] == r["rows"]["attention"] == "sdpa"  # CPU
    assert r["shared"]["real_tokens_per_step"] <= r["shared"]["tokens_per_step"]
    for x in r.values():
        assert x["real_tokens_per_s"] == pytest.approx(x["real_tokens_per_step"] / x["step_ms"] * 1000)
    items = bench.data_batches(bench.parse_args([*DATA, "--data", str(path)]))[1].next_items()[0]
    for it in items[:1]:  # the real tokens: each prompt once, both responses
        assert bench.packing.real_tokens([it], "pairs") == len(it.prompt) + len(it.response) + len(it.rejected)


def test_trl_baseline_runs_on_the_same_real_steps(tmp_path):
    pytest.importorskip("trl")
    import bench_trl
    path = preference_file(tmp_path)
    r = bench_trl.main([*DATA, "--data", str(path)])
    ours = bench.main([*DATA, "--data", str(path), "--packing", "off"])
    assert r["real_tokens_per_step"] == ours["real_tokens_per_step"]
    # TRL pads like our padded path; a response cut at max_length gains TRL's EOS, so at most one more per sequence
    assert ours["tokens_per_step"] <= r["tokens_per_step"] <= ours["tokens_per_step"] + 2 * 4 * 2


def test_compare_runs_each_configuration_in_its_own_process(tmp_path, capsys):
    """--compare: one fresh process per run and round, a Markdown row per run, MFU against one shared peak."""
    path = preference_file(tmp_path)
    runs = bench.main([*DATA, "--steps", "1", "--data", str(path), "--compare", "shared,off,fixed", "--repeat", "1"])
    assert list(runs) == ["shared", "off", "fixed"] and all(len(rs) == 1 for rs in runs.values())
    assert runs["fixed"][0]["data"] == "" and runs["shared"][0]["packing"] == "shared"
    out = capsys.readouterr().out
    assert "| shared |" in out and "| off |" in out and "| fixed |" in out
    s, o = runs["shared"][0], runs["off"][0]  # the same useful FLOPs: MFU ratio = speed ratio
    assert s["mfu"] / o["mfu"] == pytest.approx(o["step_ms"] / s["step_ms"])

"""One command that checks this code on your GPU, and measures it there: run it before a real run.

    python gpu_check.py --data HH/helpful-base-test.jsonl.gz --tokenizer LLAMA3/tokenizer.model   # < 10 min, 1 H100
    python gpu_check.py --device cpu        # the CPU-only part (CI runs it): packed vs padded training steps

The checks, each passed or failed with its numbers:
- cuda_tests: `pytest -m cuda`, every CUDA-only test (compiled FlexAttention against SDPA's boolean mask, outputs and
  gradients; packing's check of it; a bounded number of compiles over micro batches of mixed shapes).
- train_float32, train_bfloat16: a few train.py TR-DPO steps (soft update, τ = 2) with packing (on CUDA the
  FlexAttention path, --attention=auto) and with --packing=false on the same batches: the loss and the gradient norm
  of every step agree within the dtype's tolerance (TOLERANCE).
- train_ddp_*, train_fsdp_*: with 2 or more GPUs, the packed steps through torchrun --nproc_per_node=2 (DDP, FSDP2)
  against the same one-process padded steps.
- bench_recipe, bench_1b (CUDA, with --data): `bench.py --compare off,shared,fixed` on --data at the recipe's shape
  (configs/hh_rlhf.json: 512/256, micro batches of 4 pairs, bf16), 8 pairs per step, with bench.py's small model and
  with docs/performance.md's 1B shape: tokens/s, real tokens/s, padding, MFU against the measured matmul peak and the
  device's datasheet bf16 peak, peak memory, compiles, the packed rows' kernel. Passes if every run completes, packed
  rows ran FlexAttention (its check passed) and compiled fewer times than dynamo's recompile limit.
Writes OUT/gpu_check.md and OUT/gpu_check.json (device, torch / CUDA versions, every check); exits 1 if any failed.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench
import data
import tokenizer

ROOT = Path(__file__).resolve().parent
RECIPE = json.loads((ROOT / "configs" / "hh_rlhf.json").read_text())  # the CUDA checks' lengths, micro batch, dtype
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # |packed − padded| / |padded|, per step, loss and gradient norm
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "GH200": 989, "A100": 312}  # dense, no sparsity
EVAL_SIZE = 8  # pairs the train checks hold out of --data
BENCH_SHAPES = {"bench_recipe": [], "bench_1b": ["--dim", "2048", "--n_layers", "16", "--n_heads", "32",
                                                 "--n_kv_heads", "8"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"gpu_check.py: error: {message}\n")  # one line, without the usage block
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="", help="a preference JSONL(.gz) (HH-RLHF): train checks and benchmarks on it "
                   "(without it: train checks on the synthetic task, no benchmark)")
    p.add_argument("--tokenizer", default="byte", help="with --data: a tiktoken name or a Llama 3 tokenizer.model")
    p.add_argument("--steps", type=int, default=3, help="train.py steps per train check")
    p.add_argument("--out", default="out/gpu_check", help="directory of the report and the runs")
    p.add_argument("--budget_s", type=float, default=570, help="wall time for everything; a check past it fails")
    p.add_argument("--activation_checkpointing", action="store_true", help="train.py's and bench.py's option, in every "
                   "run (CUDA runs a packed check with it and --logps_chunk=64 regardless)")
    p.add_argument("--logps_chunk", type=int, default=0, help="train.py's and bench.py's option, in every run")
    return p.parse_args(argv)


class OptionError(ValueError):
    """A bad option or input file: main() prints it as one line and exits with status 2, before any check runs."""


def check_options(args: argparse.Namespace):
    """Everything the checks will read, read once up front: a bad option, --out, or a --data that train.py and
    bench.py would refuse in every check in turn (missing, unreadable, no usable pairs) or its --tokenizer."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda but torch sees no GPU (--device cpu runs the CPU part)")
    if args.steps < 1:
        raise OptionError(f"--steps {args.steps}: need >= 1 train.py step per check")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise OptionError(f"--budget_s {args.budget_s}: need a finite number of seconds > 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise OptionError(f"--out {args.out}: exists and is not a directory")
    if not args.data:
        return
    if not Path(args.data).exists():
        raise OptionError(f"--data {args.data}: no such file or directory")
    try:
        tok = tokenizer.get_tokenizer(args.tokenizer)
    except (ValueError, RuntimeError, OSError) as e:
        raise OptionError(f"--tokenizer {args.tokenizer}: {e}") from None
    length, prompt = (RECIPE["max_length"], RECIPE["max_prompt_length"]) if args.device == "cuda" else (64, 32)
    try:  # as train.py and bench.py will read it
        pairs = len(data.tokenize(data.read_examples(args.data), tok, "pairs", length, prompt).items)
    except (ValueError, RuntimeError, OSError) as e:  # DataError is a ValueError
        raise OptionError(f"--data {args.data}: {e}") from None
    if pairs <= EVAL_SIZE:
        raise OptionError(f"--data {args.data}: {pairs} usable pair(s); need more than {EVAL_SIZE}: the train checks "
                          f"hold out {EVAL_SIZE} and train on the rest")


class Checks:
    """The report: each check's name, pass / fail / skipped, seconds and numbers, and the time left."""

    def __init__(self, budget_s: float):
        self.rows, self.end = [], time.time() + budget_s

    def left(self) -> float:
        return max(1.0, self.end - time.time())

    def add(self, name: str, status: str, seconds: float, detail: str = "", **numbers):
        self.rows.append({"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail, **numbers})
        print(f"gpu_check: {name}: {status.upper()} ({seconds:.0f} s) {detail}", flush=True)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command in the repository root; a timeout becomes a failed process with the reason."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s (--budget_s)")


def tail(p: subprocess.CompletedProcess, n: int = 300) -> str:
    return " ".join((p.stderr or p.stdout).strip().splitlines()[-3:])[-n:]


def cuda_tests(checks: Checks):
    t = time.time()
    p = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], checks.left())
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    ok = p.returncode == 0 and " passed" in summary and "skipped" not in summary
    checks.add("cuda_tests", "pass" if ok else "fail", time.time() - t, summary if ok else tail(p, 600))


def train_args(args, dtype: str, out: Path) -> list[str]:
    """TR-DPO, a few steps, nothing but the training steps and one cheap evaluation at the end."""
    common = ["--loss=dpo", "--ref_update=soft", "--alpha=0.6", "--tau=2", f"--max_steps={args.steps}",
              "--warmup_steps=1", "--lr=1e-4", "--log_every=1", "--eval_every=0", f"--eval_size={EVAL_SIZE}",
              "--num_samples=0", "--keep_last=1", "--seed=0", f"--dtype={dtype}", f"--device={args.device}",
              f"--out_dir={out}", f"--activation_checkpointing={args.activation_checkpointing}",
              f"--logps_chunk={args.logps_chunk}", "--overwrite=true"]  # its own runs: a second gpu_check replaces them
    cuda = args.device == "cuda"  # CUDA: a small model from scratch; CPU (CI): a tiny one, short lengths
    model = ["--dim=256", "--n_layers=2", "--n_heads=4"] if cuda else ["--dim=32", "--n_layers=1", "--n_heads=2"]
    micro = f"--micro_batch_size={RECIPE['micro_batch_size']}"
    if args.data:  # the recipe's lengths (CPU: shorter) and micro batches
        length, prompt = (RECIPE["max_length"], RECIPE["max_prompt_length"]) if cuda else (64, 32)
        return common + model + [f"--max_length={length}", f"--max_prompt_length={prompt}", f"--data={args.data}",
                                 f"--tokenizer={args.tokenizer}", "--batch_size=16", micro]
    return common + model + ["--batch_size=8", micro]


def train_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def compare_steps(got: list[dict], want: list[dict], tol: float) -> tuple[bool, dict]:
    """Every step's loss and gradient norm within tol (relative); the numbers: the largest deviation of each."""
    if len(got) != len(want):  # a step skipped as non-finite in one run
        return False, {"max_rel_dev_loss": float("inf"), "max_rel_dev_grad_norm": float("inf"), "steps": len(got)}
    dev = {}
    for key in ("loss", "grad_norm"):
        d = [abs(a[key] - b[key]) / max(abs(b[key]), 1e-12) if None not in (a[key], b[key]) else float("inf")
             for a, b in zip(got, want, strict=True)]
        dev[f"max_rel_dev_{key}"] = max(d)
    dev["steps"] = len(got)
    dev["loss_packed_padded"] = [[a["loss"], b["loss"]] for a, b in zip(got, want)]
    dev["grad_norm_packed_padded"] = [[a["grad_norm"], b["grad_norm"]] for a, b in zip(got, want)]
    return all(v <= tol for k, v in dev.items() if k.startswith("max_rel_dev")), dev


def train_checks(args, checks: Checks, out: Path):
    """Packed (1 process, then DDP and FSDP2 with >= 2 GPUs) against padded, same batches, in fp32 and bf16."""
    launches = [("", [sys.executable, "train.py"], [])]
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
        launches += [("_ddp", torchrun, []), ("_fsdp", torchrun, ["--fsdp=true"])]
    if args.device == "cuda":  # memory.py's recomputed blocks and chunked head against the padded plain run
        launches.append(("_memory", [sys.executable, "train.py"], ["--activation_checkpointing=true",
                                                                  "--logps_chunk=64"]))
    for dtype in ("float32", "bfloat16"):
        t = time.time()
        padded = out / f"train_{dtype}_padded"
        p = run([sys.executable, "train.py", *train_args(args, dtype, padded), "--packing=false"], checks.left())
        if p.returncode:
            checks.add(f"train_{dtype}", "fail", time.time() - t, f"the padded run failed: {tail(p)}")
            continue
        for suffix, launcher, extra in launches:
            t = time.time() if suffix else t
            packed = out / f"train_{dtype}_packed{suffix}"
            p = run([*launcher, *train_args(args, dtype, packed), "--packing=true", *extra], checks.left())
            name = f"train{suffix}_{dtype}"
            if p.returncode:
                checks.add(name, "fail", time.time() - t, f"the packed run failed: {tail(p)}")
                continue
            ok, numbers = compare_steps(train_rows(packed), train_rows(padded), TOLERANCE[dtype])
            fallback = [line for line in p.stdout.splitlines() if "failed its check" in line]
            checks.add(name, "pass" if ok and not fallback else "fail", time.time() - t,
                       f"loss within {numbers['max_rel_dev_loss']:.2g}, gradient norm within "
                       f"{numbers['max_rel_dev_grad_norm']:.2g} of the padded run's (tolerance {TOLERANCE[dtype]:g})"
                       + (f"; {fallback[0]}" if fallback else ""), **numbers)


def datasheet_peak(device: str) -> float | None:
    """The device's dense bf16 TFLOP/s from its datasheet, by name (None if not listed)."""
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device), None)


def bench_checks(args, checks: Checks, out: Path) -> dict:
    """bench.py --compare off,shared,fixed at each shape; returns {check: {run: result}} and adds a check each."""
    cuda = args.device == "cuda"
    common = ["--data", args.data, "--tokenizer", args.tokenizer, "--pairs", "8", "--micro_batch_size",
              str(RECIPE["micro_batch_size"]), "--compare", "off,shared,fixed", "--repeat", "1", "--json"]
    common += ["--activation_checkpointing"] * args.activation_checkpointing + ["--logps_chunk", str(args.logps_chunk)]
    if cuda:
        common += ["--dtype", RECIPE["dtype"], "--max_length", str(RECIPE["max_length"]), "--max_prompt_length",
                   str(RECIPE["max_prompt_length"]), "--warmup", "2", "--steps", "3"]
    else:  # CI: a tiny model and lengths, fp32 (the check's logic, not its numbers)
        common += ["--dtype", "float32", "--warmup", "1", "--steps", "1", "--device", "cpu", "--max_length", "64",
                   "--max_prompt_length", "32"]
    shapes = BENCH_SHAPES if cuda else {"bench_tiny": ["--dim", "32", "--n_layers", "1", "--n_heads", "2"]}
    results = {}
    for name, shape in shapes.items():
        t = time.time()
        p = run([sys.executable, "bench.py", *common, *shape], checks.left())
        if p.returncode:
            checks.add(name, "fail", time.time() - t, tail(p))
            continue
        runs = {k: v[0] for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}
        (out / f"{name}.txt").write_text(p.stdout)
        peak = datasheet_peak(runs["shared"]["device"])
        numbers = {run: {"tokens_per_s": r["tokens_per_s"], "real_tokens_per_s": r["real_tokens_per_s"],
                         "padding": r["padding_fraction"], "mfu_measured_peak": r["mfu"],
                         "mfu_datasheet_peak": None if peak is None else r["achieved_tflops"] / peak,
                         "matmul_peak_tflops": r["matmul_peak_tflops"], "peak_mem_mb": r["peak_mem_mb"],
                         "compiles": r["compiles"], "attention": r["attention"]} for run, r in runs.items()}
        results[name] = numbers
        want = "flex" if cuda else "sdpa"
        ok = (numbers["shared"]["attention"] == want
              and numbers["shared"]["compiles"] < torch._dynamo.config.recompile_limit)
        s = numbers["shared"]
        checks.add(name, "pass" if ok else "fail", time.time() - t,
                   f"shared: {s['real_tokens_per_s']:.0f} real tokens/s, padding {s['padding']:.1%}, attention "
                   f"{s['attention']} (want {want}), {s['compiles']} compiles", runs=numbers)
    return results


def environment(args) -> dict:
    """bench.py's environment, with the GPU count, cuDNN's version and the datasheet peak."""
    env, cuda = bench.environment(torch.device(args.device)), args.device == "cuda"
    return {**env, "gpus": torch.cuda.device_count() if cuda else 0, "cudnn": torch.backends.cudnn.version() if cuda
            else None, "datasheet_bf16_tflops": datasheet_peak(env["device"])}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check: {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"{env['device']} ({env['gpus']} GPU(s)), torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']};"
             f" CPU {env['cpu']['name']} ({env['cpu']['capability']}); {report['seconds']:.0f} s", "",
             "| check | status | seconds | numbers |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['seconds']} | {c['detail']} |" for c in report["checks"]]
    for name, runs in report["bench"].items():
        lines += ["", f"## {name}", "", "| run | tokens/s | real tokens/s | padding | MFU (measured peak) | MFU "
                  "(datasheet peak) | peak memory (MB) | compiles | attention |", "|---" * 9 + "|"]
        for run, r in runs.items():
            mfu_sheet = "" if r["mfu_datasheet_peak"] is None else f"{r['mfu_datasheet_peak']:.1%}"
            lines.append(f"| {run} | {r['tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} | {r['padding']:.1%} | "
                         f"{r['mfu_measured_peak']:.1%} | {mfu_sheet} | {r['peak_mem_mb']:.0f} | {r['compiles']} | "
                         f"{r['attention'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out, t0 = Path(args.out), time.time()
    try:
        check_options(args)
        out.mkdir(parents=True, exist_ok=True)
    except (OptionError, OSError) as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    checks = Checks(args.budget_s)
    if args.device == "cuda":
        cuda_tests(checks)
    else:
        checks.add("cuda_tests", "skipped", 0, "no CUDA")
    train_checks(args, checks, out)
    bench_results = bench_checks(args, checks, out) if args.data else {}
    report = {"environment": environment(args), "seconds": time.time() - t0, "checks": checks.rows,
              "bench": bench_results, "passed": all(c["status"] != "fail" for c in checks.rows)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: {'PASSED' if report['passed'] else 'FAILED'}; report: {out / 'gpu_check.md'}, "
          f"{out / 'gpu_check.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

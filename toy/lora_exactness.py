"""Does the exact soft update of a LoRA reference matter? TR-DPO with LoRA three ways on the demo's task.

With a LoRA policy W = W0 + s·B·A and a reference W0 + ΔW_ref, the paper's soft update is
ΔW_ref ← α·s·B·A + (1 − α)·ΔW_ref, which reference.py does exactly (the reference's factors gain r columns per
update, compressed past lora_ref_rank). The usual implementation keeps a reference adapter (A_r, B_r) and mixes the
factors separately, A_r ← α·A + (1 − α)·A_r, B_r ← α·B + (1 − α)·B_r; its delta s·B_r·A_r misses the paper's by

    (α·B + (1−α)·B_r)(α·A + (1−α)·A_r) = α·B·A + (1−α)·B_r·A_r − α(1−α)(B − B_r)(A − A_r)    (times s).

This study runs train.train on synthetic.py's task (gold reward known) three ways from one SFT model per seed:
- exact: --lora_rank with --ref_update=soft (reference.py's rule, the factors kept exactly: lora_ref_rank >= the
  layers' full rank, so no compression can lose anything);
- naive: the same run with reference.soft_update's LoRA step replaced, in this script only, by the separate mixing
  (A_r starts as the policy's initial A, B_r at 0, so both references start at ΔW_ref = 0);
- full: full-parameter TR-DPO soft (θ_ref ← α·θ + (1 − α)·θ_ref), the method LoRA approximates.
Every method of a seed starts from the same SFT model (the demo's SFT recipe, seeded by the seed) and sees the same
data in the same order (train.py's order depends on the seed only). Along each LoRA run, every reference update is
checked against the dense recurrence D ← α·s·B·A + (1 − α)·D (float64, from the policy's factors at that update):
the exact reference matches it to rounding; the naive one drifts from it by the accumulated cross terms.

Reported: the final held-out gold reward of greedy and sampled responses, KL(π‖π_SFT) per sampled response (train.py's
eval row: gold_greedy, gold_sampled, kl_init), and the reward accuracy, per method (mean, std, 95% CI over seeds) and
paired naive − exact and full − exact (paired percentile bootstrap over seeds, toy/stats.py).

    python -m toy.lora_exactness [--out toy/figures] [--quick] [--workers 2]   # writes lora_exactness.{json,png}
"""
import contextlib
import json
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

import lora
import reference as ref_lib
import train
from config import TrainConfig, validate
from toy.common import CI_METHOD, band, map_seeds, mean_std, parse_args, pyplot, save
from toy.stats import paired_diff, verdict

METHODS = ("exact", "naive", "full")
METRICS = ("gold_greedy", "gold_sampled", "kl_init", "reward_acc")  # of the final eval row
# The grid, fixed before any run of the study's seeds was looked at. SFT: the demo's recipe (train.py's defaults,
# loss=sft, 200 steps). DPO: the demo's β and steps; α = 0.5 maximises the cross term's weight α(1 − α); τ = 10 gives
# 20 reference updates in 200 steps. Full-parameter TR-DPO at the demo's lr/10. LoRA: rank 8, s = 2, every linear
# layer of the blocks, lr 3e-4, chosen on a pilot seed outside the study (seed 100; exact and full only, no naive
# run): at 1e-4 (τ = 20) LoRA hardly left π_SFT (KL 0.26 nats at step 200), at 1e-3 it was at 42 nats by step 50;
# at 3e-4 its KL and gold at step 50 were close to the full-parameter run's (0.50 vs 0.56 nats). The pilot also showed
# both running away from π_SFT after step 50 (KL > 50 nats by step 100) at this α and τ: the study reports every
# evaluation (every 25 steps), not only the final one. lora_ref_rank = 64 = dim, the largest rank any adapted
# layer's delta can have (64 x 64 or 64 x 192), so the exact reference is never compressed.
FULL = dict(seeds=list(range(10)), sft_steps=200, steps=200, alpha=0.5, tau=10, beta=0.1, lr_full=1e-4, lr_lora=3e-4,
            lora_rank=8, lora_alpha=16.0, lora_ref_rank=64, eval_every=25, eval_size=128, num_samples=64)
QUICK = dict(FULL, seeds=[0, 1], sft_steps=20, steps=12, tau=3, eval_every=6, eval_size=16, num_samples=8)
SCRIPT = "toy/lora_exactness.py"


# ---- the naive update and the dense recurrence (this script's instruments: not options of train.py) ----

@torch.no_grad()
def naive_soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float, max_rank: int = 2 ** 31
                      ) -> float:
    """reference.soft_update with the LoRA step replaced by separate mixing of the factors:
    A_r ← α·A + (1 − α)·A_r, B_r ← α·B + (1 − α)·B_r, ΔW_ref = s·B_r·A_r. The reference's layers carry (A_r, B_r) as
    naive_A / naive_B (track_initial_adapters puts them there). Everything that is not a LoRA factor follows
    reference.py's own rule."""
    ORIGINAL_SOFT_UPDATE(reference, policy, alpha, max_rank)  # non-LoRA tensors (none here) and the bookkeeping
    for ref, pol in ref_lib._lora_pairs(reference, policy):
        ref.naive_A.lerp_(pol.lora_A, alpha)
        ref.naive_B.lerp_(pol.lora_B, alpha)
        ref.set_delta(pol.scale * ref.naive_B.clone(), ref.naive_A.clone(), max_rank)  # rank r: never compressed
    return 0.0


def track_initial_adapters(policy: torch.nn.Module) -> torch.nn.Module:
    """lora.make_reference, plus the naive reference adapter a copy of the policy's initial one: A_r = A_0, B_r = 0
    (B_0 = 0), so s·B_r·A_r = 0 = the exact reference's initial ΔW_ref."""
    reference = ORIGINAL_MAKE_REFERENCE(policy)
    pol = lora.layers(getattr(policy, "module", policy), lora.LoRALinear)
    for name, ref in lora.layers(reference, lora.DeltaLinear).items():
        ref.naive_A, ref.naive_B = pol[name].lora_A.detach().clone(), pol[name].lora_B.detach().clone()
    return reference


ORIGINAL_SOFT_UPDATE, ORIGINAL_MAKE_REFERENCE = ref_lib.soft_update, lora.make_reference


def dense_check(update, errors: list[float]):
    """soft_update wrapped: before it, the dense recurrence D ← α·s·B·A + (1 − α)·D per layer (float64, D = 0 at the
    start, kept on the reference's layer); after it, max over layers of ‖ΔW_ref − D‖_F / ‖D‖_F appended to errors."""
    def checked(reference, policy, alpha, max_rank=2 ** 31):
        pairs = ref_lib._lora_pairs(reference, policy)
        for ref, pol in pairs:
            new = alpha * pol.scale * (pol.lora_B.double() @ pol.lora_A.double())
            ref.dense = new if not hasattr(ref, "dense") else new + (1 - alpha) * ref.dense
        out = update(reference, policy, alpha, max_rank)
        if pairs:  # (a full-parameter run has no low-rank delta to check)
            errors.append(max(((ref.delta().double() - ref.dense).norm() / ref.dense.norm().clamp_min(1e-300)).item()
                              for ref, _ in pairs))
        return out
    return checked


@contextlib.contextmanager
def patched(method: str, errors: list[float]):
    """For the duration of one run: exact = reference.soft_update as it is; naive = naive_soft_update (and the
    reference built with its initial adapter); both checked against the dense recurrence into errors."""
    update = naive_soft_update if method == "naive" else ORIGINAL_SOFT_UPDATE
    ref_lib.soft_update = dense_check(update, errors)
    lora.make_reference = track_initial_adapters if method == "naive" else ORIGINAL_MAKE_REFERENCE
    try:
        yield
    finally:
        ref_lib.soft_update, lora.make_reference = ORIGINAL_SOFT_UPDATE, ORIGINAL_MAKE_REFERENCE


# ---- the runs ----

def configs(grid: dict, root: Path, seed: int) -> dict[str, TrainConfig]:
    """SFT (the demo's recipe) and the three TR-DPO runs from it, for one seed; every run writes under root/seed<s>/."""
    d = root / f"seed{seed}"
    base = TrainConfig(seed=seed, log_every=max(1, grid["steps"] // 10), eval_every=grid["eval_every"],
                       eval_size=grid["eval_size"], num_samples=grid["num_samples"])
    sft = replace(base, loss="sft", max_steps=grid["sft_steps"], eval_every=0, out_dir=str(d / "sft"))
    dpo = replace(base, loss="dpo", ref_update="soft", alpha=grid["alpha"], tau=grid["tau"], beta=grid["beta"],
                  max_steps=grid["steps"], init_from=sft.out_dir)
    lora_opts = {k: grid[k] for k in ("lora_rank", "lora_alpha", "lora_ref_rank")}
    runs = {"sft": sft, "exact": replace(dpo, lr=grid["lr_lora"], out_dir=str(d / "exact"), **lora_opts),
            "naive": replace(dpo, lr=grid["lr_lora"], out_dir=str(d / "naive"), **lora_opts),
            "full": replace(dpo, lr=grid["lr_full"], out_dir=str(d / "full"))}
    return runs


def eval_rows(out_dir: str) -> dict[str, list]:
    """The run's eval rows of metrics.jsonl as columns (step and METRICS), and its reference rows' compression
    errors (LoRA runs)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    out = {k: [r[k] for r in evals] for k in ("step", *METRICS) if all(k in r for r in evals)}
    out["compression_error"] = max([r["compression_error"] for r in rows if r["split"] == "reference"], default=0.0)
    return out


def seed_runs(grid: dict, root: str, seed: int) -> dict[str, dict]:
    """SFT, then exact, naive and full TR-DPO from it, on one seed; train.py's output goes to <run>.log beside each
    run directory. Returns {method: eval columns (+ ref_error: per update, the relative distance of ΔW_ref to the
    dense recurrence, for LoRA runs) and seconds}."""
    out = {}
    for name, cfg in configs(grid, Path(root), seed).items():
        errors: list[float] = []
        t0 = time.time()
        Path(cfg.out_dir).parent.mkdir(parents=True, exist_ok=True)
        validate(cfg, world_size=1)  # train.train takes a checked config (parse_config checks the command line's)
        with open(f"{cfg.out_dir}.log", "w") as log, contextlib.redirect_stdout(log), patched(name, errors):
            train.train(cfg)
        out[name] = {**eval_rows(cfg.out_dir), "seconds": time.time() - t0}
        if cfg.lora_rank:
            out[name]["ref_error"] = errors
    return out


# ---- statistics, figure ----

def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per method the final value of each metric (mean, std, 95% CI over seeds); paired naive − exact and
    full − exact with their verdicts, at the end and at every evaluation; the reference's distance to the dense
    recurrence (LoRA runs)."""
    final = {m: {k: [h[k][-1] for h in runs[m]] for k in METRICS} for m in METHODS}
    out = {"final": {m: {k: mean_std(v) for k, v in final[m].items()} for m in METHODS}, "paired": {}}
    for other in ("naive", "full"):
        diffs = {k: paired_diff(final[other][k], final["exact"][k]) for k in METRICS}
        out["paired"][f"{other} - exact"] = {k: {**d, "verdict": verdict(d, other)} for k, d in diffs.items()}
    out["paired_by_step"] = {"step": runs["exact"][0]["step"], **{
        f"{other} - exact": {k: [paired_diff([h[k][i] for h in runs[other]], [h[k][i] for h in runs["exact"]])
                                 for i in range(len(runs["exact"][0]["step"]))] for k in METRICS}
        for other in ("naive", "full")}}
    out["ref_error"] = {m: {"final": mean_std([h["ref_error"][-1] for h in runs[m]]),
                            "max": max(max(h["ref_error"]) for h in runs[m])} for m in ("exact", "naive")}
    out["compression_error_max"] = max(h["compression_error"] for h in runs["exact"])
    return out


def figure(runs: dict[str, list[dict]], summary: dict, title: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {"exact": "C0", "naive": "C3", "full": "C2"}
    for ax, key, label in ((axes[0], "gold_sampled", "gold reward of sampled responses"),
                           (axes[1], "kl_init", "KL(π‖π_SFT) per sampled response [nats]")):
        for m in METHODS:
            p = summary["paired"].get(f"{m} - exact", {}).get(key)
            extra = f" (− exact: {p['mean']:+.3g} [{p['lo']:+.3g}, {p['hi']:+.3g}])" if p else ""
            band(ax, runs[m][0]["step"], [h[key] for h in runs[m]], m + extra, colors[m])
        ax.set(xlabel="step", ylabel=label)
        ax.legend(fontsize=7)
    ax = axes[2]
    for m in ("exact", "naive"):
        errs = np.maximum(np.asarray([h["ref_error"] for h in runs[m]], dtype=float), 1e-12)
        band(ax, list(range(1, errs.shape[1] + 1)), errs.tolist(), m, colors[m])
    ax.set(yscale="log", xlabel="reference update", ylabel="‖ΔW_ref − D‖_F / ‖D‖_F (worst layer)",
           title="distance to the dense recurrence D")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.5, 0.005, "lines: mean over seeds, bands: ±1 std; legend: final value, method − exact, paired 95% CI "
             "over seeds", ha="center", fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0])
    grid, t0 = QUICK if args.quick else FULL, time.time()
    with tempfile.TemporaryDirectory(prefix="lora_exactness_") as root:
        per_seed = map_seeds(partial(seed_runs, grid, root), grid["seeds"], args.workers)
    runs = {m: [s[m] for s in per_seed] for m in ("sft", *METHODS)}
    summary = summarise(runs)
    title = (f"TR-DPO soft with LoRA (r={grid['lora_rank']}, s={grid['lora_alpha'] / grid['lora_rank']:g}, every "
             f"block linear layer): exact vs A, B mixed separately vs full-parameter; α={grid['alpha']}, "
             f"τ={grid['tau']}, β={grid['beta']}, {grid['steps']} steps; {len(grid['seeds'])} seeds")
    payload = {"setup": {**grid, "methods": list(METHODS), "ci": CI_METHOD, "workers": args.workers,
                         "seconds": time.time() - t0}, "summary": summary, "runs": runs}
    save(args.out, "lora_exactness", payload, figure(runs, summary, title))
    print(f"\n{title}\nfinal held-out values, mean [95% CI] over seeds; paired differences against exact:")
    for k in METRICS:
        cells = [f"{m} {summary['final'][m][k]['mean']:.4g} [{summary['final'][m][k]['lo']:.4g}, "
                 f"{summary['final'][m][k]['hi']:.4g}]" for m in METHODS]
        diffs = [f"{o} {d['mean']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}] ({d['verdict']})"
                 for o, p in summary["paired"].items() for d in [p[k]]]
        print(f"  {k:<13} " + " | ".join(cells) + "\n                " + " | ".join(diffs))
    e = summary["ref_error"]
    print(f"reference vs the dense recurrence (relative Frobenius, worst layer): exact max {e['exact']['max']:.2g}; "
          f"naive final {e['naive']['final']['mean']:.3g} ± {e['naive']['final']['std']:.2g}, max "
          f"{e['naive']['max']:.3g}; compression error of the exact runs: max {summary['compression_error_max']:.2g}")
    print(f"{sum(len(s) for s in per_seed)} runs in {time.time() - t0:.0f} s -> {args.out}/lora_exactness.png, "
          f"lora_exactness.json")
    return payload


if __name__ == "__main__":
    main()

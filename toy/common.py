"""Shared toy machinery: an exactly enumerable response space and the preference-training loop of train.py in small.

Every toy response is a token row `[prompt, y_1..y_L]` with loss_mask on y, so a toy policy is scored by the same
`losses.sequence_logps` as the real one, and the whole space fits in one forward: probabilities are exact, not sampled.
The loop uses `losses.py` for DPO / IPO / KTO and `reference.py` for the static / soft / hard reference, like train.py.
"""
import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch

from losses import dpo_loss, ipo_loss, kto_loss, sequence_logps
from reference import MODES, ReferenceUpdater, make_reference, reference_logits
from toy.stats import bootstrap_ci, judge, paired_diff

LOSSES = ("dpo", "ipo", "kto")
CI_METHOD = "percentile bootstrap over seeds, 10000 resamples"  # toy/stats.py's defaults, as every summary uses them


@dataclass
class RunConfig:
    """One preference run: the loss, the reference schedule (paper's α, τ) and full-batch Adam."""
    loss: str = "dpo"
    mode: str = "static"  # static | soft (θ_ref ← α·θ + (1−α)·θ_ref every τ steps) | hard (θ_ref ← θ every τ)
    beta: float = 0.1
    alpha: float = 0.6
    tau: int = 32
    lr: float = 1e-2
    steps: int = 400
    eval_every: int = 10

    def __post_init__(self):
        if self.loss not in LOSSES or self.mode not in MODES:
            raise ValueError(f"toy/common.py RunConfig: loss must be one of {LOSSES} and mode one of {MODES}, "
                             f"got {self.loss!r}, {self.mode!r}")


def enumerate_sequences(vocab: int, length: int, prompt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All vocab**length responses as rows [prompt, y_1..y_L] and their loss_mask (1 on the response)."""
    ys = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)
    tokens = torch.cat([torch.full((len(ys), 1), prompt), ys], dim=1)
    mask = torch.ones_like(tokens)
    mask[:, 0] = 0
    return tokens, mask


def logps(forward: Callable, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y) and response length for each row, through losses.sequence_logps (logits upcast to fp32 first)."""
    return sequence_logps(forward(tokens).float(), tokens, mask)


@torch.no_grad()
def all_logps(model: Callable, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y) for every response of the space: one batched forward (sums to 1 in probability exactly)."""
    return logps(model, tokens, mask)[0]


def set_masses(lp: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Exact mass of the chosen set, the rejected set and everything else (OOD), plus mean log π per set."""
    p = lp.exp()
    in_data = torch.zeros_like(p, dtype=torch.bool)
    c, r = torch.unique(chosen), torch.unique(rejected)
    in_data[c] = True
    in_data[r] = True
    return {"mass_chosen": p[c].sum().item(), "mass_rejected": p[r].sum().item(),
            "mass_ood": p[~in_data].sum().item(), "logp_chosen": lp[chosen].mean().item(),
            "logp_rejected": lp[rejected].mean().item()}


def preference_loss(cfg: RunConfig, pol: torch.Tensor, ref: torch.Tensor, n_tokens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over P pairs and the margins h = (log π/π_ref)(y_w) − (log π/π_ref)(y_l); inputs are (2P,) rows
    [chosen ; rejected]. IPO takes length-averaged log-probs (losses.py convention). KTO unrolls the pairs into
    desirable = chosen, undesirable = rejected; with one prompt the "mismatched" KL completions of the batch are the
    batch's own completions, so z_ref = mean(log π − log π_ref) over the batch, as losses.kto_loss computes it."""
    if cfg.loss == "ipo":
        pol, ref = pol / n_tokens, ref / n_tokens
    n = pol.shape[0] // 2
    pc, pr, rc, rr = pol[:n], pol[n:], ref[:n], ref[n:]
    margins = ((pc - rc) - (pr - rr)).detach()
    if cfg.loss == "dpo":
        losses = dpo_loss(pc, pr, rc, rr, cfg.beta)[0]
    elif cfg.loss == "ipo":
        losses = ipo_loss(pc, pr, rc, rr, cfg.beta)[0]
    else:
        desirable = torch.arange(2 * n) < n
        losses = kto_loss(pol, ref, desirable, pol, ref, cfg.beta)[0]
    return losses.mean(), margins


def margin_stats(beta: float, h: torch.Tensor) -> dict[str, float]:
    """DPO's view of the margins: ℓ(h) = −log σ(βh), weight −ℓ'(h)/β = σ(−βh), curvature ℓ''(h) = β²σ(βh)σ(−βh)."""
    bh = beta * h
    return {"beta_margin": bh.mean().item(), "dpo_weight": torch.sigmoid(-bh).mean().item(),
            "dpo_curvature": (beta ** 2 * torch.sigmoid(bh) * torch.sigmoid(-bh)).mean().item()}


def train(policy: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor,
          rejected: torch.Tensor, cfg: RunConfig, evaluate: Callable[[torch.Tensor, torch.Tensor], dict],
          batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, list]:
    """Preference training on the pairs (chosen[i] ≻ rejected[i]): full-batch, or batches(step) -> (chosen, rejected)
    of that step (mini-batches, streaming). Every cfg.eval_every steps records evaluate(log π over the space,
    log π_SFT over the space) and the margin statistics of the step's pairs against the current reference.
    The reference starts as a frozen copy of the initial (SFT) policy and follows cfg.mode via reference.py. Its
    log-probs are computed for the whole space once per reference update and indexed per pair: exact, and a static
    reference costs one forward per run (the precomputed reference of train.py)."""
    reference = make_reference(policy)
    updater = ReferenceUpdater(cfg.mode, alpha=cfg.alpha, tau=cfg.tau)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    sft_lp = ref_table = all_logps(lambda x: reference_logits(reference, x), tokens, mask)
    history: dict[str, list] = {"step": [], "loss": []}
    for step in range(cfg.steps + 1):
        c, r = (chosen, rejected) if batches is None else batches(step)
        rows = torch.cat([c, r])
        lp, n_tok = logps(policy, tokens[rows], mask[rows])
        loss, h = preference_loss(cfg, lp, ref_table[rows], n_tok)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record = {"loss": loss.item(), **margin_stats(cfg.beta, h), **evaluate(all_logps(policy, tokens, mask),
                                                                                   sft_lp)}
            history["step"].append(step)
            for key, value in record.items():
                history.setdefault(key, []).append(value)
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if updater.after_step(step + 1, reference, policy):
            ref_table = all_logps(lambda x: reference_logits(reference, x), tokens, mask)
    return history


def sft(policy: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, steps: int, lr: float
        ) -> None:
    """Supervised fine-tuning: full-batch Adam on the mean NLL −log π(y) over the responses `ids` (with repeats).
    Repeats become weights on the unique responses: the same loss, one forward per distinct response."""
    ids, counts = ids.unique(return_counts=True)
    weights = counts.float() / counts.sum()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(weights * logps(policy, tokens[ids], mask[ids])[0]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def kl(lp: torch.Tensor, lq: torch.Tensor) -> float:
    """Exact KL(p‖q) = Σ p (log p − log q) over the enumerated space."""
    return (lp.exp() * (lp - lq)).sum().item()


def parse_args(argv: list[str] | None, description: str, replot: bool = False) -> argparse.Namespace:
    """--out, --quick and --workers, shared by every toy script (and --replot where the script has it). --quick writes
    under out/ unless told otherwise, so it never overwrites the committed toy/figures/."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="folder for the PNG figure and the JSON of its runs and numbers "
                                                    "(default: toy/figures, or out/toy-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small version (under a minute) for the test suite")
    parser.add_argument("--workers", type=int, default=2, help="processes running seeds in parallel (1: in-process)")
    if replot:
        parser.add_argument("--replot", action="store_true", help="no training: recompute every statistic and redraw "
                                                                  "the figures from the runs in the JSON under --out")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    args.out = args.out or ("out/toy-quick" if args.quick else "toy/figures")
    return args


def _one_thread_worker() -> None:
    torch.set_num_threads(1)


def map_seeds(fn: Callable, seeds: list[int], workers: int) -> list:
    """[fn(seed) for seed in seeds], over a pool of `workers` processes (one thread each) when workers > 1. Each
    seed's run is seeded by the seed alone, so the results do not depend on the number of workers. fn must be
    picklable: a module-level function or a functools.partial of one."""
    if workers == 1 or len(seeds) == 1:
        with one_thread():
            return [fn(seed) for seed in seeds]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=ctx, initializer=_one_thread_worker) as pool:
        return list(pool.map(fn, seeds))


@contextlib.contextmanager
def one_thread():
    """Toy tensors are tiny: intra-op threads cost more than they save on a shared CPU. Restored afterwards, since the
    tests call main() in-process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean, (population) standard deviation and the 95% bootstrap CI of the mean over seeds (toy/stats.py)."""
    a = np.asarray(values, dtype=float)
    lo, hi = bootstrap_ci(a)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size), "lo": lo, "hi": hi}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def band(ax, x: list, runs: list[list[float]], label: str, color=None, linestyle="-") -> None:
    """Plot the mean over seeds with a ±1 std band."""
    a = np.asarray(runs, dtype=float)
    m, s = a.mean(0), a.std(0)
    line, = ax.plot(x, m, label=label, color=color, linestyle=linestyle)
    ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)


def save(out: str | Path, name: str, payload: dict, fig) -> None:
    """Write OUT/NAME.json (the payload: the plotted numbers, or the histories --replot draws them from) and
    OUT/NAME.png (72 dpi keeps it small)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.json", "w") as f:
        json.dump(rounded(payload), f, allow_nan=False, separators=(",", ":"))  # compact: no spaces
    fig.savefig(out / f"{name}.png", dpi=72, bbox_inches="tight")
    shrink_png(out / f"{name}.png")


def replot_error(script: str, message: str) -> NoReturn:
    """--replot's one-line error naming what is missing (exit 2): there is nothing to redraw from."""
    print(f"{script} --replot: {message}", file=sys.stderr)
    sys.exit(2)


def read_saved(out: str | Path, name: str, keys: tuple[str, ...], script: str) -> list:
    """--replot: the `keys` of OUT/NAME.json as save() wrote it; an unreadable file or a missing key is replot_error."""
    try:
        with open(Path(out) / f"{name}.json") as f:
            saved = json.load(f)
        return [saved[k] for k in keys]
    except (OSError, ValueError, KeyError) as e:
        replot_error(script, f"cannot read the {'/'.join(keys)} of {out}/{name}.json ({e})")


def shrink_png(path: Path) -> None:
    """Re-encode with a 256-colour palette (Pillow comes with matplotlib): line plots lose nothing visible, the
    committed files get ~3x smaller."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256)
    small.save(path, optimize=True)


def rounded(obj):
    """Floats rounded to 5 significant digits for a small JSON; NaN/inf would be a bug upstream, so fail loudly."""
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"toy result is not finite: {obj}")
        return float(f"{obj:.5g}")
    return obj


# ---- the likelihood experiment shared by bandit.py and sequences.py: claims (a) and (b) ----

def loss_mode_grid(base: dict) -> dict[str, RunConfig]:
    """"loss/mode" -> RunConfig for every loss (DPO, IPO, KTO) and reference mode (static, soft, hard)."""
    return {f"{loss}/{mode}": RunConfig(loss=loss, mode=mode, **base) for loss in LOSSES for mode in MODES}


# what a likelihood toy keeps of each history (train records more: the loss and DPO's weight and curvature)
LIKELIHOOD_KEYS = ("step", "beta_margin", "mass_chosen", "mass_rejected", "mass_ood", "logp_chosen", "logp_rejected",
                   "kl_sft")


def likelihood_seed(build: Callable[[int], tuple], configs: dict[str, RunConfig], keys: tuple[str, ...], seed: int
                    ) -> dict[str, dict]:
    """Every config on one seed, the `keys` of each history; build(seed) -> (sft_policy, tokens, mask, chosen,
    rejected) and each run starts from a copy of that SFT policy (the static reference of the paper)."""
    policy, tokens, mask, chosen, rejected = build(seed)
    state = {k: v.clone() for k, v in policy.state_dict().items()}

    def evaluate(lp, sft_lp):
        return {**set_masses(lp, chosen, rejected), "kl_sft": kl(lp, sft_lp)}

    out = {}
    for name, cfg in configs.items():
        policy.load_state_dict(state)
        torch.manual_seed(seed)
        h = train(policy, tokens, mask, chosen, rejected, cfg, evaluate)
        out[name] = {k: h[k] for k in keys}
    return out


def likelihood_grid(build: Callable[[int], tuple], configs: dict[str, RunConfig], seeds: list[int], workers: int,
                    keys: tuple[str, ...] = LIKELIHOOD_KEYS) -> dict[str, list[dict]]:
    """name -> [history per seed, in the order of seeds]; the seeds run over `workers` processes."""
    per_seed = map_seeds(partial(likelihood_seed, build, configs, keys), seeds, workers)
    return {name: [runs[name] for runs in per_seed] for name in configs}


def likelihood_summary(history: dict[str, list]) -> dict[str, float]:
    """The numbers behind claims (a)/(b) for one run: changes from the SFT start, the chosen dip and its recovery."""
    c, r, o, mc = history["logp_chosen"], history["logp_rejected"], history["mass_ood"], history["mass_chosen"]
    return {"d_logp_chosen": c[-1] - c[0], "d_logp_rejected": r[-1] - r[0], "d_mass_ood": o[-1] - o[0],
            "mass_ood_final": o[-1], "mass_ood_max": max(o), "d_mass_chosen": mc[-1] - mc[0],
            "mass_chosen_final": mc[-1], "chosen_dip": min(c) - c[0], "chosen_recovery": c[-1] - min(c),
            "kl_sft_final": history["kl_sft"][-1]}


def static_of(name: str) -> str:
    """The static-reference run a TR run is paired with: same loss, β and data, mode static."""
    parts = name.split("/")
    return "/".join(["static" if p in ("soft", "hard") else p for p in parts
                     if not p.startswith(("alpha=", "tau="))])


def summarise(runs: dict[str, list[dict]], per_run: Callable[[dict], dict] | None = None) -> dict[str, dict]:
    """mean / std over seeds of every per_run number (default likelihood_summary), per config, and for each TR config
    "paired": its paired difference TR − static on the same seeds with a 95% bootstrap CI (toy/stats.py)."""
    per_run = per_run or likelihood_summary
    per_seed = {name: [per_run(h) for h in histories] for name, histories in runs.items()}
    out = {}
    for name, rows in per_seed.items():
        out[name] = {k: mean_std([r[k] for r in rows]) for k in rows[0]}
        base = static_of(name)
        if base != name and base in per_seed:
            out[name]["paired"] = {k: paired_diff([r[k] for r in rows], [r[k] for r in per_seed[base]])
                                   for k in rows[0]}
    return out


def claim_row(claim: str, quantity: str, diff: dict, expected: int, **means) -> dict:
    """One line of a verdict table: the claim, what is measured, its CI (stats.paired_diff or stats.mean_ci), the
    direction the paper predicts (+1 / −1) and the verdict; `means` are the per-method mean ± std beside it."""
    return {"claim": claim, "quantity": quantity, "expected": "+" if expected > 0 else "−", **means,
            **{k: diff[k] for k in ("mean", "lo", "hi", "n")}, "method": diff.get("method", CI_METHOD),
            "verdict": judge(diff, expected)}


def print_verdicts(title: str, rows: list[dict]) -> None:
    """The verdict table every toy prints at its end."""
    print(f"\n{title}")
    print(f"{'claim':<34} {'quantity':<44} {'exp':>3}  {'mean [95% CI]':<28} verdict")
    for r in rows:
        ci = f"{r['mean']:+.3g} [{r['lo']:+.3g}, {r['hi']:+.3g}]"
        n = "" if r["n"] == rows[0]["n"] else f" (n = {r['n']} seeds)"
        print(f"{r['claim']:<34.34} {r['quantity']:<44.44} {r['expected']:>3}  {ci:<28} {r['verdict']}{n}")
    print(f"(CI: {rows[0]['method']}, n = {rows[0]['n']} seeds unless a row says; exp = the sign the paper predicts)")


def likelihood_verdicts(summary: dict[str, dict], toy: str) -> list[dict]:
    """Claims (a) and (b) for every loss: (a) with a static reference the chosen and rejected log-likelihoods fall and
    the OOD mass rises; (b) TR (soft and hard) recovers more of the chosen's dip and ends with less OOD mass than
    static, on the same seeds."""
    rows = []
    for loss in LOSSES:
        s = summary[f"{loss}/static"]
        for key, sign in (("d_logp_chosen", -1), ("d_logp_rejected", -1), ("d_mass_ood", +1)):
            rows.append(claim_row(f"(a) {toy} {loss.upper()} static", f"{key} (end − SFT)", s[key], sign,
                                  static=s[key]))
        for mode in ("soft", "hard"):
            t = summary[f"{loss}/{mode}"]
            for key, sign in (("chosen_recovery", +1), ("mass_ood_final", -1)):
                rows.append(claim_row(f"(b) {toy} {loss.upper()} {mode} − static", key, t["paired"][key], sign,
                                      static=s[key], tr=t[key]))
    return rows


LIKELIHOOD_PANELS = (("logp_chosen", "mean log π(chosen) [nats]"), ("logp_rejected", "mean log π(rejected) [nats]"),
                     ("mass_ood", "OOD mass"))
LIKELIHOOD_CAPTION = ("OOD mass = exact probability π puts on responses in no preference pair; log π = summed over the "
                      "response tokens; lines: mean over seeds, bands: ±1 std over seeds")


def likelihood_figure(runs: dict[str, list[dict]], rows: dict[str, list[str]], title: str):
    """One row per group of configs, one column per LIKELIHOOD_PANELS quantity; mean ± std over seeds."""
    fig, axes = pyplot().subplots(len(rows), len(LIKELIHOOD_PANELS), figsize=(12, 2.6 * len(rows)), squeeze=False)
    for (row_title, names), row_axes in zip(rows.items(), axes):
        for (key, label), ax in zip(LIKELIHOOD_PANELS, row_axes):
            for name in names:
                band(ax, runs[name][0]["step"], [h[key] for h in runs[name]], name)
            ax.set_title(f"{row_title}: {label}", fontsize=9)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=8)
        row_axes[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.5, 0.005, LIKELIHOOD_CAPTION, ha="center", fontsize=8)
    return fig

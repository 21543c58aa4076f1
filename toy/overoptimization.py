"""Toy 3, over-optimisation (claim (c)): gold-vs-KL frontiers of static and trust-region references, and the data
regimes where TR helps.

A tiny Llama (model.py) over all V**L responses to one prompt. A hidden gold reward r*(y) (per-position token values
plus adjacent-token interactions, standardised over the space); an SFT policy fitted to samples of an unrelated base
distribution; preference pairs sampled from π_SFT and labelled by Bradley–Terry on the gold reward,
P(y1 ≻ y2) = σ(r*(y1) − r*(y2)), so the labels are noisy. E_π[r*] and KL(π‖π_SFT) are exact (enumerated) along
training.

Frontiers. A static reference reaches larger KL through a smaller β, TR through α / τ, so each is judged over its own
hyper-parameters: the frontier of a family at KL budget K is the best gold reward any of its runs reaches at any
evaluation with KL(π‖π_SFT) ≤ K (toy/stats.py frontier), per seed; TR − static is then paired over seeds.

Regimes. The same compute, B = 64 pairs per step for 100 steps (6,400 pair draws), from N distinct pairs: N = 16 and
64 train full-batch (100 passes over each pair), N = 256 25 passes, 1024 6.25, 4096 1.56, and "stream" draws fresh
pairs from π_SFT every step (each pair seen once: the paper's one-epoch setting). The regime map shows the paired
frontier gap per N, i.e. from many passes over few pairs to a single pass over fresh ones.

Beside the frontier, claim (c) and the regime map are read in two more views (toy/views.py): gold *at* KL (the best
and the mean gold of the evaluations in each bin (K/2, K]) and the final checkpoints (one point per run, a fitted
gold-vs-KL curve per family, compared at matched KL).

    python -m toy.overoptimization [--out toy/figures] [--quick] [--workers 2]   # writes overoptimization.*, regimes.*
    python -m toy.overoptimization --replot    # no training: statistics and figures from the runs in the JSONs
"""
from functools import partial

import numpy as np
import torch

from toy.common import (CI_METHOD, LOSSES, RunConfig, all_logps, claim_row, enumerate_sequences, kl, map_seeds,
                        mean_std, parse_args, print_verdicts, pyplot, read_saved, replot_error, save, sft,
                        summarise, train)
from toy.sequences import tiny_llama
from toy.stats import FORMULAS, frontier, paired_diff
from toy.views import criterion_line, final_panel, gap_panel, two_views, view_verdicts

VOCAB, LENGTH = 4, 5
N_SFT, BASE_TEMPERATURE = 2000, 0.5  # SFT samples, base distribution sharpness
SFT_STEPS, SFT_LR = 300, 3e-3
BATCH = 64  # pairs per step; N ≤ BATCH distinct pairs train full-batch
MAIN_PAIRS = 64  # the frontier study's data: 64 distinct pairs, full batch
KL_LEVELS = (0.5, 1.0, 2.0, 4.0)  # KL budgets of the verdict tables
K_GRID = [round(k, 2) for k in np.arange(0, 6.01, 0.25)]  # KL budgets of the frontier plots
STREAM = "stream"
SCRIPT = "toy/overoptimization.py"  # the name its one-line errors give

# The JSONs hold what --replot cannot recompute (setup, configs, every run's history) and the tables readers quote
# (summary, verdicts). The figures' numbers (frontiers, the regime map's gaps, the views) are main()'s return value
# only: --replot recomputes them from the histories in seconds, so storing them would only repeat the histories.
PLOTTED = ("frontiers", "gaps", "views")


def random_score(tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Σ_t u[t, y_t] + Σ_t w[y_t, y_{t+1}] with Gaussian tables, standardised to mean 0, std 1 over the space."""
    y = tokens[:, 1:]
    u = torch.randn(LENGTH, VOCAB, generator=g)
    w = torch.randn(VOCAB, VOCAB, generator=g)
    s = u[torch.arange(LENGTH), y].sum(1) + w[y[:, :-1], y[:, 1:]].sum(1)
    return (s - s.mean()) / s.std()


def build(seed: int, sft_steps: int = SFT_STEPS):
    """Gold reward and SFT policy for one seed (shared by every data regime of that seed)."""
    g = torch.Generator().manual_seed(seed)
    tokens, mask = enumerate_sequences(VOCAB, LENGTH)
    gold = random_score(tokens, g)
    base = torch.softmax(random_score(tokens, g) / BASE_TEMPERATURE, 0)
    policy = tiny_llama(seed)
    sft(policy, tokens, mask, torch.multinomial(base, N_SFT, replacement=True, generator=g), sft_steps, SFT_LR)
    return policy, tokens, mask, gold, all_logps(policy, tokens, mask).exp()


def sample_pairs(p_sft: torch.Tensor, gold: torch.Tensor, n: int, g: torch.Generator):
    """n pairs y1, y2 ~ π_SFT, labelled by Bradley–Terry on the gold reward: (chosen, rejected) indices."""
    y1, y2 = torch.multinomial(p_sft, 2 * n, replacement=True, generator=g).view(2, n)
    first_wins = torch.rand(n, generator=g) < torch.sigmoid(gold[y1] - gold[y2])
    return torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)


def regime_data(regime: int | str, p_sft: torch.Tensor, gold: torch.Tensor, seed: int):
    """(chosen, rejected, batches) of one data regime: N distinct pairs (full batch if N ≤ BATCH, else shuffled
    mini-batches, a fresh permutation per pass) or STREAM (fresh pairs every step). batches(step) depends on the seed
    and step only, so every method of a seed sees the same data in the same order (the pairing)."""
    if regime == STREAM:
        def stream(step: int):
            return sample_pairs(p_sft, gold, BATCH, torch.Generator().manual_seed(seed * 1_000_003 + step))
        return *stream(0), stream
    chosen, rejected = sample_pairs(p_sft, gold, regime, torch.Generator().manual_seed(seed * 7919 + regime))
    if regime <= BATCH:
        return chosen, rejected, None

    def minibatch(step: int):
        epoch, start = divmod(step * BATCH, regime)
        idx = torch.randperm(regime, generator=torch.Generator().manual_seed(seed * 7919 + epoch))[start:start + BATCH]
        return chosen[idx], rejected[idx]
    return chosen, rejected, minibatch


def seed_runs(configs: dict[str, dict[str, RunConfig]], sft_steps: int, seed: int) -> dict[str, dict]:
    """Every regime's configs on one seed ({regime: {name: RunConfig}}), each run from the same SFT policy."""
    policy, tokens, mask, gold, p_sft = build(seed, sft_steps)
    state = {k: v.clone() for k, v in policy.state_dict().items()}

    def evaluate(lp, sft_lp):
        return {"gold": (lp.exp() * gold).sum().item(), "kl_sft": kl(lp, sft_lp)}

    out = {}
    for regime, grid in configs.items():
        chosen, rejected, batches = regime_data(regime, p_sft, gold, seed)
        for name, cfg in grid.items():
            policy.load_state_dict(state)
            torch.manual_seed(seed)
            h = train(policy, tokens, mask, chosen, rejected, cfg, evaluate, batches)
            out[name] = {k: h[k] for k in ("step", "beta_margin", "gold", "kl_sft")}
    return out


def run_summary(h: dict[str, list]) -> dict[str, float]:
    """One run's SFT, peak and final gold reward and their KLs."""
    i = int(np.argmax(h["gold"]))
    return {"gold_sft": h["gold"][0], "gold_peak": h["gold"][i], "kl_at_peak": h["kl_sft"][i],
            "gold_final": h["gold"][-1], "kl_final": h["kl_sft"][-1]}


def frontiers(runs: dict[str, list[dict]], static: list[str], tr: list[str], grid: list[float]) -> dict:
    """Per-seed frontiers of the static and TR families on the grid, their mean and 95% CI, and the paired gap."""
    n_seeds = len(runs[static[0]])
    per_seed = {fam: [frontier([runs[n][s]["kl_sft"] for n in names], [runs[n][s]["gold"] for n in names], grid)
                      for s in range(n_seeds)] for fam, names in (("static", static), ("tr", tr))}
    out = {"static_runs": static, "tr_runs": tr, "K": grid}
    for fam, rows in per_seed.items():
        cols = np.asarray(rows).T
        out[fam] = [mean_std(c) for c in cols]
        out[f"{fam}_per_seed"] = [r.tolist() for r in rows]
    out["gap"] = [paired_diff(a, b) for a, b in zip(np.asarray(per_seed["tr"]).T, np.asarray(per_seed["static"]).T)]
    return out


def frontier_verdicts(label: str, f: dict, levels: tuple) -> list[dict]:
    """Claim (c) at each KL budget: TR's frontier above static's, paired over seeds."""
    rows = []
    for k in levels:
        i = f["K"].index(k)
        rows.append(claim_row(f"(c) {label} TR − static", f"frontier: max gold at KL ≤ {k:g}", f["gap"][i], +1,
                              static=f["static"][i], tr=f["tr"][i]))
    return rows


def frontier_figure(fronts: dict[str, dict], views: dict[str, dict], title: str, caption: str):
    """Per loss: the static and TR frontiers (mean, 95% CI band over seeds); below them TR − static in the three views
    (frontier, at KL, final checkpoints); below that the final checkpoints with their fitted curves."""
    fig, axes = pyplot().subplots(3, len(fronts), figsize=(4.4 * len(fronts), 10.2), squeeze=False)
    for (loss, f), (ax_f, ax_g, ax_c) in zip(fronts.items(), axes.T):
        for fam, label, color in (("static", f"static, β ∈ sweep ({len(f['static_runs'])} runs)", "C0"),
                                  ("tr", f"TR soft/hard, α/τ/β ({len(f['tr_runs'])} runs)", "C3")):
            m, lo, hi = (np.array([d[k] for d in f[fam]]) for k in ("mean", "lo", "hi"))
            ax_f.plot(f["K"], m, color=color, label=label)
            ax_f.fill_between(f["K"], lo, hi, color=color, alpha=0.2, linewidth=0)
        gap_panel(ax_g, f["K"], f["gap"], views[loss]["at_kl"], views[loss]["final"])
        final_panel(ax_c, views[loss]["final"])
        ax_f.set_title(f"{loss.upper()}: gold-reward frontier", fontsize=9)
        ax_g.set_title(f"{loss.upper()}: TR − static in three views, paired over seeds", fontsize=9)
        ax_c.set_title(f"{loss.upper()}: final checkpoints (shaded: KL both families cover)", fontsize=9)
        ax_f.set_ylabel("max E_π[r*] with KL ≤ K", fontsize=8)
        for ax in (ax_f, ax_g):
            ax.set_xlabel("KL budget K = KL(π‖π_SFT) [nats]", fontsize=8)
        for ax in (ax_f, ax_g, ax_c):
            ax.tick_params(labelsize=8)
        for ax in (ax_f, ax_g, ax_c):
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.text(0.5, 0.005, caption, ha="center", fontsize=8)
    return fig


def regime_figure(gaps: dict[str, dict], views: dict[str, dict], labels: list[str], levels: tuple, title: str,
                  caption: str):
    """The regime map: per data regime the paired TR − static in the three views (frontier at each KL budget, at-KL
    best gold per bin, final-checkpoint curves at matched KL; 95% CI bars), and each regime's final checkpoints."""
    fig = pyplot().figure(figsize=(15, 8.4))
    grid = fig.add_gridspec(2, 6, height_ratios=(1.25, 1))
    top = [fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3)]
    x = np.arange(len(labels))

    def bars(ax, cells, names):  # cells[regime][j]: a paired diff or None; one line per j
        for j, name in enumerate(names):
            d = [cells[r][j] for r in cells]
            keep = [i for i, e in enumerate(d) if e is not None]
            m = np.array([d[i]["mean"] for i in keep])
            err = np.array([[d[i]["mean"] - d[i]["lo"] for i in keep], [d[i]["hi"] - d[i]["mean"] for i in keep]])
            ax.errorbar(x[keep] + 0.08 * (j - (len(names) - 1) / 2), m, yerr=err.reshape(2, -1), marker="o", ms=3.5,
                        capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)

    bars(top[0], {r: [gaps[r][f"{k:g}"] for k in levels] for r in gaps}, [f"KL ≤ {k:g}" for k in levels])
    at = {r: views[r]["at_kl"] for r in views}
    first = next(iter(at.values()))
    bars(top[1], {r: a["gap_best"] for r, a in at.items()}, [f"KL in ({lo:g}, {hi:g}]" for lo, hi in first["bins"]])
    fin = {r: views[r]["final"] for r in views}
    matched = next(iter(fin.values()))["matched_K"]
    bars(top[2], {r: [g if g["inside"] else None for g in f["gap"]] for r, f in fin.items()},
         [f"KL = {k:g}" for k in matched])
    for ax, what in zip(top, ("frontier: best gold at KL ≤ K", "at KL: best gold in the bin",
                              "final checkpoints: fitted curves at matched KL")):
        ax.set_title(f"TR − static, {what}", fontsize=9)
        ax.set_xlabel("data regime: distinct pairs N (passes over them)", fontsize=8)
    top[0].set_ylabel("TR − static (gold reward), paired 95% CI", fontsize=8)
    for i, (r, label) in enumerate(zip(views, labels)):
        ax = fig.add_subplot(grid[1, i])
        final_panel(ax, views[r]["final"])
        ax.set_title(f"final checkpoints, N = {label.splitlines()[0]}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5)
        if i:
            ax.set_ylabel("")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    return fig


def family_views(runs: dict[str, list[dict]], static: list[str], tr: list[str], g: dict) -> dict:
    """The at-KL and the final-checkpoint views (toy/views.py) of two families (run names; runs[name][seed] a
    history) on the bins, curve form and matched KLs of setup()."""
    n_seeds = len(runs[static[0]])
    return two_views({fam: [[(np.asarray(runs[n][s]["kl_sft"]), np.asarray(runs[n][s]["gold"])) for n in names]
                            for s in range(n_seeds)] for fam, names in (("static", static), ("tr", tr))}, g)


def load_runs(out: str, names: list[str]) -> dict[str, list[dict]]:
    """--replot: the histories of `names` from OUT/overoptimization.json and OUT/regimes.json; a run missing from them
    is a one-line error (exit 2) that names it."""
    runs = {}
    for file in ("overoptimization", "regimes"):
        runs.update(read_saved(out, file, ("runs",), SCRIPT)[0])
    missing = [n for n in names if n not in runs]
    if missing:
        replot_error(SCRIPT, f"{out} has no run {missing[0]!r} ({len(missing)} missing); run without --replot")
    return {n: runs[n] for n in names}


def stored(payload: dict) -> dict:
    """What save() writes of a payload: all but the PLOTTED numbers."""
    return {k: v for k, v in payload.items() if k not in PLOTTED}


def setup(quick: bool) -> tuple:
    """(seeds, steps, lr, sft_steps, regimes, grid). The grids were fixed before any result and are the same for every
    loss: static over β ∈ static_betas; TR at each β of tr_betas, soft over α ∈ alphas × τ ∈ soft_taus and hard over
    τ ∈ hard_taus (in 100 steps τ = 32 is 3 updates); the regime map's TR configs (mode, α, τ) at β = 0.1.
    The other two views of claim (c): at_kl_bins, the K of the bins (K/2, K] (the frontier's budgets, so the two
    views sit side by side); final_kl, the KLs at which the final-checkpoint curves are compared (inside the 1.5–5
    nats the final checkpoints span), and curve, their form: Gao et al.'s RL form d(α − β·log d), d = √KL, which
    predicts held-out seeds better than their best-of-n form d(α − β·d) for every loss and data regime here (the
    views' "criterion": leave-one-seed-out squared error, toy/stats.py curve_criterion; main prints both)."""
    if quick:  # τ = 6 gives the TR runs 3 reference updates in 20 steps; lr 1e-3 so they move visibly
        return [0, 1], 20, 1e-3, 30, (16, 64, STREAM), dict(
            static_betas=(0.1, 0.3), tr_betas=(0.1,), alphas=(0.6,), soft_taus=(6,), hard_taus=(6,),
            regime_tr=[("soft", 0.6, 6), ("hard", RunConfig.alpha, 6)], at_kl_bins=(1.0, 2.0, 4.0), final_kl=(2.0,),
            curve="gao_rl")
    return list(range(10)), 100, 4e-4, SFT_STEPS, (16, 64, 256, 1024, 4096, STREAM), dict(
        static_betas=(0.01, 0.03, 0.1, 0.3, 1.0), tr_betas=(0.1, 0.3), alphas=(0.3, 0.6, 0.9), soft_taus=(4, 16),
        hard_taus=(8, 16, 32), regime_tr=[("soft", 0.6, 4), ("soft", 0.6, 16), ("hard", RunConfig.alpha, 16)],
        at_kl_bins=KL_LEVELS, final_kl=(2.0, 3.0, 4.0), curve="gao_rl")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], replot=True)
    seeds, steps, lr, sft_steps, regimes, g = setup(args.quick)
    static_betas, tr_betas, alphas, soft_taus, hard_taus, regime_tr = (g[k] for k in (
        "static_betas", "tr_betas", "alphas", "soft_taus", "hard_taus", "regime_tr"))
    base = dict(lr=lr, steps=steps, eval_every=4 if args.quick else 5)

    def cfg(loss, mode, beta, alpha=RunConfig.alpha, tau=RunConfig.tau):
        c = RunConfig(loss=loss, mode=mode, beta=beta, alpha=alpha, tau=tau, **base)
        extra = "" if mode == "static" else f"/alpha={c.alpha:g}/tau={c.tau}" if mode == "soft" else f"/tau={c.tau}"
        return f"{loss}/{mode}/beta={beta:g}{extra}", c

    main_grid = []
    for loss in LOSSES:
        main_grid += [cfg(loss, "static", b) for b in static_betas]
        main_grid += [cfg(loss, "soft", b, a, t) for b in tr_betas for a in alphas for t in soft_taus]
        main_grid += [cfg(loss, "hard", b, tau=t) for b in tr_betas for t in hard_taus]
    main_grid = dict(main_grid)
    # the regime map (DPO): static over the whole β grid against the regime TR configs at β = 0.1
    regime_grid = dict([cfg("dpo", "static", b) for b in static_betas] + [cfg("dpo", m, 0.1, a, t)
                                                                         for m, a, t in regime_tr])
    configs = {r: {f"n={r}/{n}": c for n, c in regime_grid.items()} for r in regimes if r != MAIN_PAIRS}
    configs[MAIN_PAIRS] = main_grid
    if args.replot:
        runs = load_runs(args.out, [name for grid in configs.values() for name in grid])
    else:
        per_seed = map_seeds(partial(seed_runs, configs, sft_steps), seeds, args.workers)
        runs = {name: [r[name] for r in per_seed] for grid in configs.values() for name in grid}
    for r in regimes:  # the N = 64 cell of the regime map is the main study's runs of the regime grid
        if r == MAIN_PAIRS:
            runs.update({f"n={r}/{n}": runs[n] for n in regime_grid})

    # (c): frontiers per loss over the full grid
    main_runs = {n: runs[n] for n in main_grid}
    fronts = {loss: frontiers(main_runs, [n for n in main_grid if n.startswith(f"{loss}/static")],
                              [n for n in main_grid if n.startswith(loss) and "/static" not in n], K_GRID)
              for loss in LOSSES}
    summary = summarise(main_runs, run_summary)
    verdicts = [row for loss in LOSSES for row in frontier_verdicts(loss.upper(), fronts[loss], KL_LEVELS)]
    for loss in LOSSES:  # "gold-vs-KL peaks later and higher": TR soft (α = 0.6, the smaller τ) against static, same β
        t = summary[f"{loss}/soft/beta=0.1/alpha=0.6/tau={soft_taus[0]}"]
        for key in ("gold_peak", "kl_at_peak"):
            verdicts.append(claim_row(f"(c) {loss.upper()} soft − static β=0.1", key, t["paired"][key], +1,
                                      static=summary[f"{loss}/static/beta=0.1"][key], tr=t[key]))
    views = {loss: family_views(main_runs, fronts[loss]["static_runs"], fronts[loss]["tr_runs"], g) for loss in LOSSES}
    for loss in LOSSES:
        verdicts += view_verdicts(loss.upper(), views[loss]["at_kl"], views[loss]["final"])
    n_seeds = f"{len(seeds)} seeds"
    caption = ("frontier(K) = max over a family's runs and evaluations of E_π[r*] with KL(π‖π_SFT) ≤ K (exact, nats); "
               "\nat KL: the best / mean E_π[r*] of the evaluations with KL in (K/2, K]; final checkpoints: each run's "
               f"last evaluation, curve gain = {FORMULAS[g['curve']]}, d = √KL; bands and bars: 95% bootstrap CI over "
               f"{n_seeds}")
    fig = frontier_figure(fronts, views, f"over-optimisation frontiers: tiny Llama, {VOCAB ** LENGTH} responses, "
                                  f"{MAIN_PAIRS} noisy BT pairs full-batch, {steps} steps, Adam lr={lr}; static β ∈ "
                                  f"{list(static_betas)}; TR β ∈ {list(tr_betas)}, soft α ∈ {list(alphas)} × τ ∈ "
                                  f"{list(soft_taus)}, hard τ ∈ {list(hard_taus)}; {n_seeds}",
                         caption)
    payload = {"setup": {"vocab": VOCAB, "length": LENGTH, "n_pairs": MAIN_PAIRS, "n_sft": N_SFT,
                         "base_temperature": BASE_TEMPERATURE, "sft_steps": sft_steps, "sft_lr": SFT_LR,
                         "kl_levels": list(KL_LEVELS), "seeds": seeds, "ci": CI_METHOD, **base,
                         "grid": {"static_betas": static_betas, "tr_betas": tr_betas, "alphas": alphas,
                                  "soft_taus": soft_taus, "hard_taus": hard_taus, "at_kl_bins": g["at_kl_bins"],
                                  "final_kl": g["final_kl"], "curve": g["curve"]}},
               "configs": {n: vars(c) for n, c in main_grid.items()}, "frontiers": fronts, "views": views,
               "summary": summary,
               "verdicts": verdicts, "runs": main_runs}
    save(args.out, "overoptimization", stored(payload), fig)
    print_verdicts(f"overoptimization: claim (c); {n_seeds} (figure and JSON in {args.out})", verdicts)
    print(criterion_line([views[loss]["final"] for loss in LOSSES]))

    # the regime map: the regime grid's frontier gap per data regime, and its other two views
    gaps, regime_views, regime_rows, labels = {}, {}, [], []
    for r in regimes:
        names = [f"n={r}/{n}" for n in regime_grid]
        f = frontiers(runs, [n for n in names if "/static" in n], [n for n in names if "/static" not in n],
                      list(KL_LEVELS))
        gaps[str(r)] = {f"{k:g}": g for k, g in zip(KL_LEVELS, f["gap"])}
        gaps[str(r)]["frontiers"] = f
        regime_views[str(r)] = family_views(runs, f["static_runs"], f["tr_runs"], g)
        regime_rows += frontier_verdicts(f"DPO N={r}", f, KL_LEVELS)
        regime_rows += view_verdicts(f"DPO N={r}", regime_views[str(r)]["at_kl"], regime_views[str(r)]["final"])
        labels.append(f"{r}\n(1 pass)" if r == STREAM else f"{r}\n({steps * min(BATCH, r) / r:g} passes)")
    tr_runs = ", ".join(f"{m} τ={t}" + (f" α={a}" if m == "soft" else "") for m, a, t in regime_tr)
    fig = regime_figure(gaps, regime_views, labels, KL_LEVELS,
                        f"where TR helps: DPO, {BATCH} pairs/step × {steps} steps, static β ∈ {list(static_betas)} "
                        f"vs TR (β=0.1) {tr_runs}; {n_seeds}",
                        "frontier: max{E_π[r*] : KL(π‖π_SFT) ≤ K}; at KL: max E_π[r*] of the evaluations with KL in "
                        f"(K/2, K]; final checkpoints: each run's last evaluation, curve {FORMULAS[g['curve']]}, "
                        "d = √KL; bars and bands: 95% bootstrap CI over seeds; stream = fresh pairs every step")
    regime_payload = {"setup": {**payload["setup"], "batch_pairs": BATCH, "regimes": [str(r) for r in regimes],
                                "passes": {str(r): 1 if r == STREAM else steps * min(BATCH, r) / r for r in regimes}},
                      "configs": {f"n={r}/{n}": vars(c) for r in regimes for n, c in regime_grid.items()},
                      "gaps": gaps, "views": regime_views, "verdicts": regime_rows,
                      "summary": summarise({n: runs[n] for r in regimes for n in (f"n={r}/{m}" for m in regime_grid)},
                                           run_summary),
                      "runs": {n: runs[n] for r in regimes if r != MAIN_PAIRS for n in configs[r]}}
    save(args.out, "regimes", stored(regime_payload), fig)
    print_verdicts(f"regimes: TR − static per data regime in three views; {n_seeds}", regime_rows)
    print(criterion_line([v["final"] for v in regime_views.values()]))
    return payload | {"regimes": regime_payload}


if __name__ == "__main__":
    main()

"""Claim (c) in three views, for a study with two families of runs (static, TR) on the same seeds.

- Frontier: the best gold a family reaches at KL(π‖π_SFT) ≤ K over all its runs and evaluations (stats.frontier),
  the practitioner's question "what is the best I can get within this budget?".
- At KL: the best and the mean gold over the family's evaluations whose KL lies in the bin (K/2, K] (stats.at_kl),
  the paper's question "how good is a policy that sits this far from π_SFT?". A family that passes through a KL
  early gets no credit there for its earlier points.
- Final checkpoints: each run's last evaluation as a point (KL, gain), gain = gold − gold(π_SFT) of its seed, and one
  curve per family through them (stats.CURVES, Gao et al. 2022), with a bootstrap band over seeds; TR − static is the
  difference of the curves at matched KL, inside the KL range both families' final checkpoints cover (the curves are
  not compared where either one is an extrapolation). This is the paper's own figure: quality against KL, one point
  per trained model.

Each view's TR − static is paired over seeds (toy/stats.py). The study scripts (toy/overoptimization.py,
toy/sentiment.py) give per seed each run's (KL, gold) at every evaluation (two_views); this file turns them into the
views, their verdict rows and their figure panels.
"""
import numpy as np

from toy.common import claim_row, mean_std
from toy.stats import CURVES, at_kl, curve_band, curve_criterion, paired_curve_diff, paired_diff_present

FAMILIES = (("static", "static", "C0"), ("tr", "TR", "C3"))  # key, label, colour
PLOT_POINTS = 60  # KLs at which a figure's curves and bands are drawn


def _none_for_nan(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


def two_views(curves: dict[str, list[list[tuple]]], grid: dict) -> dict:
    """The at-KL and the final-checkpoint views of two families on a study's at_kl_bins, curve and final_kl.
    curves[family][seed] = per run of the family its (KL, gold) at every evaluation, step 0 first: every evaluation
    is a point of the at-KL view, each run's last one a final checkpoint with gain = gold − gold at step 0."""
    points = {f: [(np.concatenate([k for k, _ in runs]), np.concatenate([g for _, g in runs])) for runs in per_seed]
              for f, per_seed in curves.items()}
    finals = {f: [([k[-1] for k, _ in runs], [g[-1] - g[0] for _, g in runs]) for runs in per_seed]
              for f, per_seed in curves.items()}
    return {"at_kl": at_kl_view(points, grid["at_kl_bins"]), "final": final_view(finals, grid["curve"],
                                                                                 grid["final_kl"])}


def at_kl_view(points: dict[str, list], bins: list[float]) -> dict:
    """points[family] = per seed (kl, gold) arrays of every evaluation of the family's runs. Per bin (K/2, K]: each
    family's best and mean gold per seed (None where the seed has no evaluation in the bin), and over the seeds where
    both families have one the paired TR − static and each family's mean ± std: None unless that is at least half
    the seeds (and 2), so a bin only a few seeds reach is not judged on them."""
    out = {"K": list(bins), "bins": [[k / 2, k] for k in bins]}
    per_seed = {}
    for fam in ("static", "tr"):
        rows = [at_kl(kl, gold, bins) for kl, gold in points[fam]]
        for j, stat in enumerate(("best", "mean")):
            a = np.array([r[j] for r in rows])  # (seeds, bins)
            per_seed[f"{fam}_{stat}"] = a
            out[f"{fam}_{stat}_per_seed"] = [_none_for_nan(r) for r in a]
    min_n = max(2, -(-len(points["static"]) // 2))
    out["min_seeds"] = min_n
    for stat in ("best", "mean"):
        tr, st = per_seed[f"tr_{stat}"].T, per_seed[f"static_{stat}"].T  # (bins, seeds)
        out[f"gap_{stat}"] = [paired_diff_present(t, s, min_n) for t, s in zip(tr, st)]
        both = np.isfinite(tr) & np.isfinite(st)  # each family's mean ± std over the seeds the gap pairs
        for fam, a in (("tr", tr), ("static", st)):
            out[f"{fam}_{stat}"] = [mean_std(c[m]) if m.sum() >= min_n else None for c, m in zip(a, both)]
    return out


def final_view(finals: dict[str, list], form: str, matched: list[float]) -> dict:
    """finals[family] = per seed (kl, gain) arrays of the last evaluation of each of the family's runs. One `form`
    curve per family with its bootstrap band, the paired TR − static of the curves at the matched KLs (each marked
    inside or outside the KL range both families cover), the same on a plotting grid inside that range (as columns),
    and every form's leave-one-seed-out error (stats.curve_criterion, summed over the two families)."""
    kl = {f: [np.asarray(k, dtype=float) for k, _ in finals[f]] for f in ("static", "tr")}
    gain = {f: [np.asarray(g, dtype=float) for _, g in finals[f]] for f in ("static", "tr")}
    rng = {f: [float(min(k.min() for k in kl[f])), float(max(k.max() for k in kl[f]))] for f in kl}
    overlap = [max(rng["static"][0], rng["tr"][0]), min(rng["static"][1], rng["tr"][1])]
    grid = np.linspace(0, max(rng["static"][1], rng["tr"][1]), PLOT_POINTS)
    inner = np.linspace(*overlap, PLOT_POINTS) if overlap[0] < overlap[1] else np.array([])
    gap = paired_curve_diff(kl["tr"], gain["tr"], kl["static"], gain["static"], form, matched)
    for row in gap:
        row["inside"] = overlap[0] <= row["K"] <= overlap[1]
    criterion = {}
    for name in CURVES:
        c = [curve_criterion(kl[f], gain[f], name) for f in ("static", "tr")]
        criterion[name] = {"sse": sum(x["sse"] for x in c), "n_points": sum(x["n_points"] for x in c)}
    return {"form": form, "matched_K": list(matched), "range": rng, "overlap": overlap,
            "points": {f: {"kl": [k.tolist() for k in kl[f]], "gain": [g.tolist() for g in gain[f]]} for f in kl},
            "curves": {f: curve_band(kl[f], gain[f], form, grid) for f in kl},
            "at_matched": {f: curve_band(kl[f], gain[f], form, matched) for f in kl},
            "gap": gap, "gap_curve": _columns(paired_curve_diff(kl["tr"], gain["tr"], kl["static"], gain["static"],
                                                               form, inner)) if inner.size else {},
            "criterion": criterion}


def _columns(rows: list[dict]) -> dict:
    """A plotted curve's rows as columns (K, mean, lo, hi): one list each, not a dict per point."""
    return {key: [r[key] for r in rows] for key in ("K", "mean", "lo", "hi")}


def criterion_line(finals: list[dict]) -> str:
    """Every curve form's leave-one-seed-out RMSE over the final-checkpoint views of a study (pooled), and the form
    the study uses: the numbers behind the choice of form in setup()."""
    form = finals[0]["form"]
    n = sum(f["criterion"][form]["n_points"] for f in finals)  # every form predicts the same points
    rmse = ", ".join(f"{name} {(sum(f['criterion'][name]['sse'] for f in finals) / n) ** 0.5:.4f}" for name in CURVES)
    return f"final-checkpoint curves, leave-one-seed-out RMSE over {n} points: {rmse} (used: {form})"


def view_verdicts(label: str, at: dict, final: dict) -> list[dict]:
    """Claim (c) in the at-KL view (best and mean gold per bin, where at_kl_view paired enough seeds) and
    the final-checkpoint view (the curves at each matched KL inside both families' range): TR above static."""
    rows = []
    for stat in ("best", "mean"):
        for j, (lo, hi) in enumerate(at["bins"]):
            if at[f"gap_{stat}"][j] is not None:
                rows.append(claim_row(f"(c) {label} TR − static", f"at KL: {stat} gold in ({lo:g}, {hi:g}]",
                                      at[f"gap_{stat}"][j], +1, static=at[f"static_{stat}"][j],
                                      tr=at[f"tr_{stat}"][j]))
    for j, g in enumerate(final["gap"]):
        if g["inside"]:
            fit = {f: {k: final["at_matched"][f][k][j] for k in ("fit", "lo", "hi")} for f in ("static", "tr")}
            rows.append(claim_row(f"(c) {label} TR − static", f"final checkpoints: {final['form']} gain at KL "
                                                              f"{g['K']:g}", g, +1, **fit))
    return rows


def gap_panel(ax, frontier_K: list, frontier_gap: list[dict], at: dict, final: dict, log_x: bool = False) -> None:
    """The three views' TR − static on one axis: the frontier gap (line, 95% band), the at-KL gaps of the best and the
    mean gold (markers at each bin's upper edge K, 95% CI bars) and the difference of the final-checkpoint curves
    (dashed, 95% band, inside both families' range; the axis fits the first two and the curve, the band may be cut)."""
    m, lo, hi = (np.array([d[k] for d in frontier_gap]) for k in ("mean", "lo", "hi"))
    ax.plot(frontier_K, m, color="k", label="frontier: best at KL ≤ K")
    ax.fill_between(frontier_K, lo, hi, color="k", alpha=0.15, linewidth=0)
    for stat, color, shift in (("best", "C2", 0.97), ("mean", "C4", 1.03)):
        pts = [(k * shift if log_x else k + (shift - 1) * max(at["K"]), d)  # side by side, not on top
               for k, d in zip(at["K"], at[f"gap_{stat}"]) if d is not None]
        if pts:
            x = np.array([p[0] for p in pts])
            y = np.array([p[1]["mean"] for p in pts])
            err = np.array([[p[1]["mean"] - p[1]["lo"] for p in pts], [p[1]["hi"] - p[1]["mean"] for p in pts]])
            ax.errorbar(x, y, yerr=err, fmt="o", ms=3.5, capsize=2, color=color,
                        label=f"at KL: {stat} gold in (K/2, K]")
    span = [*lo, *hi] + [v for d in at["gap_best"] + at["gap_mean"] if d is not None for v in (d["lo"], d["hi"])]
    if final["gap_curve"]:
        k, m, lo, hi = (np.array(final["gap_curve"][key]) for key in ("K", "mean", "lo", "hi"))
        ax.plot(k, m, "--", color="C1", label="final checkpoints: curve difference")
        ax.fill_between(k, lo, hi, color="C1", alpha=0.2, linewidth=0)
        span += list(m)
    pad = 0.15 * (max(span) - min(span)) + 1e-3  # the curves' band may run off the axis: the other views stay legible
    ax.set_ylim(min(span) - pad, max(span) + pad)
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_ylabel("TR − static (gold), paired 95% CI", fontsize=8)


def final_panel(ax, final: dict) -> None:
    """Final checkpoints: one point per run and seed (gain over π_SFT against KL), each family's fitted curve and its
    95% bootstrap band over seeds."""
    for fam, label, color in FAMILIES:
        p, c = final["points"][fam], final["curves"][fam]
        ax.scatter([x for k in p["kl"] for x in k], [y for g in p["gain"] for y in g], s=7, alpha=0.45, color=color,
                   linewidths=0, label=f"{label} ({sum(map(len, p['kl']))} final checkpoints)")
        ax.plot(c["K"], c["fit"], color=color, label=f"{label}: {final['form']} fit, α={c['alpha']:.2g} "
                                                     f"β={c['beta']:.2g}")
        ax.fill_between(c["K"], c["lo"], c["hi"], color=color, alpha=0.2, linewidth=0)
    lo, hi = final["overlap"]
    if lo < hi:
        ax.axvspan(lo, hi, color="grey", alpha=0.08, linewidth=0)
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("KL(π‖π_SFT) of the final checkpoint", fontsize=8)
    ax.set_ylabel("gold − gold(π_SFT)", fontsize=8)

"""Plot training runs: one or more run directories (their metrics.jsonl and train_config.json) -> one PNG.

    python plot.py out/dpo out/tr-dpo-soft                 # writes out/plot.png, the runs overlaid
    python plot.py out/demo/* --out=demo.png

Lines are the train rows of metrics.jsonl (one every log_every steps), markers the eval rows (every eval_every steps;
their rewards and margins are measured against the *initial* policy, so static and TR runs share one scale). A TR
run's reference updates, every τ steps, are ticks along the bottom of each panel in the run's colour. A panel is drawn
when some run has its metric (an SFT run has a loss and, on synthetic data, the gold reward only). A run evaluated with
--judge also gets its judge_score drawn against kl_init, one point per eval row joined in step order: quality against
the KL to the initial policy, the paper's over-optimization view.
Needs matplotlib, the same optional dependency as toy/.
"""
import argparse
import json
import sys
from pathlib import Path

# (title, [(metric, line style)]): the metrics train.py writes (see train.compute_loss and train.evaluate)
PANELS = [
    ("loss", [("loss", "-")]),
    ("reward accuracy", [("reward_acc", "-")]),
    ("reward margin β·(r_w − r_l)", [("margin", "-")]),
    ("log π(y): chosen —, rejected --", [("chosen_logp", "-"), ("rejected_logp", "--")]),
    ("train kl_ref, nats per token", [("kl_ref", "-")]),
    ("eval KL per response: π_ref —, π_init --", [("kl_ref", "-"), ("kl_init", "--")]),
    ("gold reward: greedy —, sampled --", [("gold_greedy", "-"), ("gold_sampled", "--")]),
]
TRAIN_ONLY, EVAL_ONLY = {"train kl_ref, nats per token"}, {"eval KL per response: π_ref —, π_init --",
                                                          "gold reward: greedy —, sampled --"}
AGAINST_KL = [("judge score against KL(π‖π_init)", "judge_score")]  # eval rows: y against kl_init, not the step


class PlotError(ValueError):
    """A run directory that cannot be plotted: main() prints it as one line."""


def load_run(run_dir: str | Path) -> dict:
    """{"name", "train": [rows], "eval": [rows], "ref_updates": [steps]} of one run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (not a train.py run directory)")
    rows, lines = [], path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                break  # the half-written last line of a run that was killed
            raise PlotError(f"{path}:{i}: not JSON ({e.msg})") from None
    cfg_path = run_dir / "train_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    train = [r for r in rows if r.get("split") == "train"]
    last = max((r["step"] for r in rows), default=0)
    tau = cfg.get("tau", 0)
    updates = list(range(tau, last + 1, tau)) if cfg.get("ref_update") in ("soft", "hard") and tau > 0 else []
    return {"name": str(run_dir).rstrip("/"), "train": train, "eval": [r for r in rows if r.get("split") == "eval"],
            "ref_updates": updates}


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have a finite number for key (strict JSON writes a non-finite one as null)."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return [s for s, _ in pts], [v for _, v in pts]


def against_kl(rows: list[dict], key: str) -> tuple[list, list]:
    """(kl_init values, key's values) of the eval rows that have finite numbers for both, in step order."""
    pts = [(r["kl_init"], r[key]) for r in rows if all(isinstance(r.get(k), (int, float)) and r[k] == r[k]
                                                       for k in ("kl_init", key))]
    return [x for x, _ in pts], [y for _, y in pts]


def plot(run_dirs: list[str | Path], out: str | Path) -> list[str]:
    """Draw the runs into one PNG at out; returns the titles of the panels drawn."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    drawn = []
    for title, keys in PANELS:
        splits = ["train"] * (title not in EVAL_ONLY) + ["eval"] * (title not in TRAIN_ONLY)
        if any(series(run[s], k)[0] for run in runs for s in splits for k, _ in keys):
            drawn.append((title, keys, splits))
    for title, key in AGAINST_KL:
        if any(against_kl(run["eval"], key)[0] for run in runs):
            drawn.append((title, [(key, "-")], ["kl"]))
    if not drawn:
        raise PlotError(f"{', '.join(map(str, run_dirs))}: no metrics to plot yet")
    ncols = min(3, len(drawn))
    nrows = -(-len(drawn) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, splits) in zip(axes.flat, drawn):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for key, style in keys:
                if splits == ["kl"]:
                    ax.plot(*against_kl(run["eval"], key), "o-", color=color, markersize=4, linewidth=1.0)
                    continue
                if "train" in splits:
                    ax.plot(*series(run["train"], key), style, color=color, linewidth=1.2)
                if "eval" in splits:  # eval points marked, joined thinly when the panel has no train line
                    ax.plot(*series(run["eval"], key), "o" + (style if title in EVAL_ONLY else ""), color=color,
                            markersize=4, linewidth=1.0, markerfacecolor="white" if style == "--" else color)
            if run["ref_updates"] and splits != ["kl"]:  # θ_ref updated after these steps
                ax.plot(run["ref_updates"], [0] * len(run["ref_updates"]), "|", color=color, markersize=10, mew=1.5,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("kl_init, nats per response" if splits == ["kl"] else "step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=run["name"]) for i, run in enumerate(runs)]
    handles += [plt.Line2D([], [], color="gray", marker="o", linestyle="", label="eval (vs π_init)"),
                plt.Line2D([], [], color="gray", marker="|", linestyle="", markersize=8, label="θ_ref update")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 6), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return [title for title, _, _ in drawn]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (train.py's out_dir)")
    p.add_argument("--out", help="PNG to write (default: plot.png beside the first run directory)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "plot.png"
    try:
        plot(args.runs, out)
    except (PlotError, OSError) as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

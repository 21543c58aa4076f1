"""Over-optimisation on real text: stories260K made more positive by DPO / IPO / KTO, static vs trust-region reference.

The DPO paper's controlled-sentiment setup at laptop scale, run by this repository's code. π_SFT is karpathy's
TinyStories 260K Llama (../shared/models/stories260K) with its own tokenizer (tokenizer.get_tokenizer). Prompts: the
story openings of OPENINGS. Responses: π_SFT samples at temperature 1, at most RESPONSE_TOKENS tokens (a story may end
earlier with EOS). Gold reward r*(y): VADER's compound sentiment of the decoded response, in [−1, 1] (vaderSentiment,
a lexicon scorer: an optional dependency of this file only). Pairs: two π_SFT responses to one prompt, the preferred
one drawn by Bradley–Terry on the gold reward, P(y1 ≻ y2) = σ(GOLD_SCALE·(r*(y1) − r*(y2))), so labels are noisy.

Training: train.compute_loss (losses.py's DPO / IPO / KTO) against reference.py's static, soft (θ_ref ← α·θ +
(1−α)·θ_ref every τ steps) or hard (θ_ref ← θ every τ) reference, AdamW and gradient clipping as in train.py.
Evaluation along training, on fresh samples from the policy (the grid's eval_samples per evaluation, the same
sampling noise at every evaluation of every run of a seed): the mean gold reward, and KL(π‖π_SFT) estimated on them as
train.evaluate's kl_init does: the mean over y ~ π of log π(y|x) − log π_SFT(y|x), in nats per response. That
estimator is unbiased but noisy (its standard error, std/√n, is recorded with every point) and can be < 0 near π_SFT.

Frontier of a family of runs (static over the β grid; TR over the α/τ grid, at β = TR_BETA): the best mean gold
reached at KL ≤ K over all its runs and evaluations, per seed, compared TR − static with a paired bootstrap CI over
seeds (toy/stats.py). Beside it the two other views of toy/views.py: gold at KL (best and mean gold of the evaluations
in each bin (K/2, K]) and the final checkpoints (a fitted gold-vs-KL curve per family, compared at matched KL).

    python -m toy.sentiment [--quick] [--out toy/figures] [--workers 2]   # --quick: out/toy-quick by default
    python -m toy.sentiment --replot     # no training: statistics and figure from the runs in OUT/sentiment.json
"""
import math
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

import data
import tokenizer
import train
from model import Llama
from reference import ReferenceUpdater, make_reference
from toy.common import claim_row, parse_args, print_verdicts, pyplot, read_saved, replot_error, save
from toy.stats import FORMULAS, frontier, paired_diff, verdict
from toy.views import criterion_line, final_panel, gap_panel, two_views, view_verdicts

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
OPENINGS = ["Once upon a time", "One day,", "Tom and his dog", "Lily went to the park", "There was a little bird",
            "The sun was", "Ben had a red ball", "Mom said", "In a small house", "A big cat", "Sue found a box",
            "It was raining", "The boy wanted", "Max saw a tree", "Anna and her friend", "At the beach,"]
RESPONSE_TOKENS = 24
GOLD_SCALE = 4.0  # a compound difference of 0.5 wins with probability σ(2) ≈ 0.88
TR_BETA = 0.1

# the study, fixed before any result was looked at
# (sizes: pairs per loss; the first is the main size of the figure's left column and of the stories)
# (static and TR get five configurations each: with a noisy evaluation a frontier is a max over evaluations, and a
# family with more runs would get more tries at a lucky one)
# (the other two views: at_kl_bins, the K of the bins (K/2, K], the frontier's budgets from 2 nats and one past them,
# where TR's longest runs end; final_kl, where the final-checkpoint curves are compared, inside the 4–110 nats the
# final checkpoints span and only where both families' checkpoints reach; curve, their form, as toy/overoptimization.py
# setup() argues: Gao et al.'s RL form, which predicts held-out seeds better here too, pooled over the cells (per cell
# the best-of-n form is ahead in 4 of 6; the JSON's "criterion", printed by main))
FULL = dict(seeds=[0, 1, 2, 3, 4], sizes={"dpo": [128, 512], "ipo": [128, 512], "kto": [128, 512]},
            betas=[0.03, 0.1, 0.3, 0.6, 1.0], soft=[(0.3, 4), (0.6, 4), (0.6, 16)], hard=[4, 16], steps=40,
            eval_every=5, eval_samples=48, batch_pairs=16, lr=4e-4, warmup=3, kl_grid=[0.5, 1, 2, 4, 8, 16, 32],
            at_kl_bins=[2, 4, 8, 16, 32, 64], final_kl=[8, 16, 32, 48], curve="gao_rl")
QUICK = dict(seeds=[0, 1], sizes={"dpo": [16], "ipo": [16], "kto": [16]}, betas=[0.1], soft=[(0.6, 2)], hard=[4],
             steps=6, eval_every=3, eval_samples=16, batch_pairs=4, lr=3e-4, warmup=1, kl_grid=[1, 2, 4],
             at_kl_bins=[0.5, 1, 2, 4], final_kl=[0.5, 1], curve="gao_rl")


def gold_reward(texts: list[str]) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = gold_reward.__dict__.setdefault("analyzer", SentimentIntensityAnalyzer())
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def load_sft():
    """(π_SFT, its tokenizer); the tokenizer and the model must agree on the vocabulary."""
    tok = tokenizer.get_tokenizer(str(MODEL_DIR))
    model = Llama.from_pretrained(MODEL_DIR).eval()
    assert model.config.vocab_size == tok.n_vocab, (model.config.vocab_size, tok.n_vocab)
    return model, tok


def prompt_ids(tok) -> list[list[int]]:
    return [[tok.bos_id] + tok.encode(o) for o in OPENINGS]


def response_text(tok, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t != tok.eos_id])


def make_pairs(model, tok, seed: int, n_pairs: int) -> list[tuple[int, list[int], list[int]]]:
    """n_pairs (prompt index, chosen, rejected): two π_SFT samples per prompt, labelled by Bradley–Terry on the gold
    reward. main draws the largest size once per seed and gives a smaller size its first pairs: nested datasets."""
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed)
    prompts = prompt_ids(tok)
    which = rng.integers(0, len(prompts), size=n_pairs)
    rows = [prompts[i] for i in which for _ in range(2)]
    ys = []
    for s in range(0, len(rows), 256):  # batched generation
        ys += model.generate(rows[s:s + 256], RESPONSE_TOKENS, temperature=1.0, generator=gen)
    gold = gold_reward([response_text(tok, y) for y in ys])
    pairs = []
    for k, i in enumerate(which):
        y1, y2, r1, r2 = ys[2 * k], ys[2 * k + 1], gold[2 * k], gold[2 * k + 1]
        first = rng.random() < 1 / (1 + math.exp(-GOLD_SCALE * (r1 - r2)))
        pairs.append((int(i), y1, y2) if first else (int(i), y2, y1))
    return pairs


def dataset(pairs, prompts: list[list[int]], kind: str, tok) -> data.Dataset:
    """The pairs as data.py items: pairs for DPO / IPO; for KTO chosen = desirable, rejected = undesirable."""
    if kind == "pairs":
        items = [data.Item(prompts[i], c, r, None, g) for g, (i, c, r) in enumerate(pairs) if c != r]
    else:
        items = [data.Item(prompts[i], y, None, good, g) for g, (i, c, r) in enumerate(pairs) if c != r
                 for y, good in ((c, True), (r, False))]
    return data.Dataset(kind, items, {}, tok.pad_id, 1 + max(map(len, prompts)) + RESPONSE_TOKENS)


@torch.no_grad()
def evaluate(policy, sft, tok, seed: int, n: int, keep_texts: int = 0) -> dict:
    """Fresh samples from the policy on the openings (cycled), the same generator seed at every evaluation: mean gold
    reward, on-policy KL(π‖π_SFT) per response and both standard errors, mean length, the first keep_texts stories."""
    prompts = prompt_ids(tok)
    rows = [prompts[j % len(prompts)] for j in range(n)]
    ys = policy.generate(rows, RESPONSE_TOKENS, temperature=1.0, generator=torch.Generator().manual_seed(10_000 + seed))
    ids, mask = data.pad(list(zip(rows, ys)), tok.pad_id)
    logp, _ = train.batch_logps(policy, ids, mask)
    logq, _ = train.batch_logps(sft, ids, mask, reference=True)
    texts = [response_text(tok, y) for y in ys]
    gold, kl = np.array(gold_reward(texts)), (logp - logq).numpy()
    return {"gold": float(gold.mean()), "gold_se": float(gold.std() / math.sqrt(n)), "kl": float(kl.mean()),
            "kl_se": float(kl.std() / math.sqrt(n)), "length": float(np.mean([len(y) for y in ys])),
            "texts": [tok.decode(rows[j][1:]) + texts[j] for j in range(keep_texts)]}


def run(task: dict) -> dict:
    """One preference run from π_SFT; its history of evaluations every eval_every steps (step 0 included)."""
    torch.set_num_threads(1)
    model, tok = load_sft()
    kind = "kto" if task["loss"] == "kto" else "pairs"
    ds = dataset(task["pairs"], prompt_ids(tok), kind, tok)
    per_step = task["batch_pairs"] * (2 if kind == "kto" else 1)  # KTO: both completions of the same pairs
    cfg = train.TrainConfig(loss=task["loss"], ref_update=task["mode"], alpha=task["alpha"], tau=task["tau"],
                            beta=task["beta"], lr=task["lr"], warmup_steps=task["warmup"], schedule="constant",
                            max_steps=task["steps"], batch_size=per_step, micro_batch_size=per_step)
    batches = data.Batches(ds, per_step, per_step, 0, 1, task["seed"])
    policy, sft = model, make_reference(model)  # sft: the frozen π_SFT, for KL
    reference = sft if task["mode"] == "static" else make_reference(model)
    updater = ReferenceUpdater(task["mode"], task["alpha"], task["tau"])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(task["seed"])
    history, t0 = [], time.time()
    for step in range(task["steps"] + 1):
        if step % task["eval_every"] == 0 or step == task["steps"]:
            history.append({"step": step, **evaluate(policy, sft, tok, task["seed"], task["eval_samples"],
                                                     keep_texts=task["keep_texts"])})
        if step == task["steps"]:
            break
        for group in optimizer.param_groups:
            group["lr"] = train.get_lr(step, cfg)
        loss, _ = train.compute_loss(policy, reference, next(batches)[0], cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updater.after_step(step + 1, reference, policy)
    return {"seconds": time.time() - t0, "history": history}


def configs(grid: dict, loss: str) -> dict[str, dict]:
    """name -> (loss, mode, β, α, τ): static over the β grid, TR soft over (α, τ) and hard over τ at β = TR_BETA."""
    out = {f"{loss}/static/beta={beta:g}": dict(loss=loss, mode="static", beta=beta, alpha=1.0, tau=1)
           for beta in grid["betas"]}
    for alpha, tau in grid["soft"]:
        out[f"{loss}/soft/alpha={alpha:g},tau={tau}"] = dict(loss=loss, mode="soft", beta=TR_BETA, alpha=alpha, tau=tau)
    for tau in grid["hard"]:
        out[f"{loss}/hard/tau={tau}"] = dict(loss=loss, mode="hard", beta=TR_BETA, alpha=1.0, tau=tau)
    return out


def cells(grid: dict) -> list[tuple[str, str, int]]:
    """(cell, loss, pairs) for every loss and dataset size: 'dpo/n=128', ..."""
    return [(f"{loss}/n={n}", loss, n) for loss, sizes in grid["sizes"].items() for n in sizes]


def is_tr(name: str) -> bool:
    return name.split("/")[1] != "static"


def summarise(runs: dict, grid: dict) -> dict:
    """Per cell (loss, dataset size): each family's frontier per seed (best gold at KL ≤ K over its runs and
    evaluations), the paired TR − static difference with its CI; per config the final and the peak gold and their KL
    (mean and std over seeds)."""
    out = {}
    for cell, by_name in runs.items():
        fronts = {}
        for fam, names in (("static", [n for n in by_name if not is_tr(n)]), ("tr", [n for n in by_name if is_tr(n)])):
            fronts[fam] = np.array([frontier([p["kl"] for n in names for p in by_name[n][s]],
                                             [p["gold"] for n in names for p in by_name[n][s]], grid["kl_grid"])
                                    for s in range(len(grid["seeds"]))])  # (seeds, K); step 0 makes K ≥ 0 reachable
        rows = []
        for j, k in enumerate(grid["kl_grid"]):
            st, tr = fronts["static"][:, j], fronts["tr"][:, j]
            diff = paired_diff(tr, st)
            rows.append({"K": k, "static": float(st.mean()), "static_std": float(st.std()), "tr": float(tr.mean()),
                         "tr_std": float(tr.std()), "diff": diff, "verdict": verdict(diff)})
        out[cell] = {"frontier": rows, **cell_views(by_name, grid), "configs": {}}
        for n, hs in by_name.items():
            peak = [max(h, key=lambda p: p["gold"]) for h in hs]
            out[cell]["configs"][n] = {key: {"mean": float(np.mean(v)), "std": float(np.std(v))} for key, v in (
                ("gold_final", [h[-1]["gold"] for h in hs]), ("kl_final", [h[-1]["kl"] for h in hs]),
                ("gold_peak", [p["gold"] for p in peak]), ("kl_at_peak", [p["kl"] for p in peak]))}
    return out


def cell_views(by_name: dict, grid: dict) -> dict:
    """The at-KL and final-checkpoint views (toy/views.py) of one cell's static and TR runs."""
    fams = {"static": [n for n in by_name if not is_tr(n)], "tr": [n for n in by_name if is_tr(n)]}
    return two_views({f: [[(np.array([p["kl"] for p in by_name[n][s]]), np.array([p["gold"] for p in by_name[n][s]]))
                           for n in names] for s in range(len(grid["seeds"]))] for f, names in fams.items()}, grid)


def verdicts(summary: dict, grid: dict) -> list[dict]:
    """Claim (c) per cell in the three views: the frontier at each K ≥ 2 of kl_grid (all of it in --quick), the
    at-KL bins and the final-checkpoint curves (toy/views.py view_verdicts)."""
    rows = []
    for cell, s in summary.items():
        label = f"{cell.split('/')[0].upper()} {cell.split('=')[1]}"
        for r in s["frontier"]:
            if r["K"] >= min(2, grid["kl_grid"][-1]):
                rows.append(claim_row(f"(c) {label} TR − static", f"frontier: max gold at KL ≤ {r['K']:g}",
                                      r["diff"], +1, static={"mean": r["static"], "std": r["static_std"]},
                                      tr={"mean": r["tr"], "std": r["tr_std"]}))
        rows += view_verdicts(label, s["at_kl"], s["final"])
    return rows


def load_runs(out: str, grid: dict) -> tuple[dict, dict, dict]:
    """--replot: (runs, stories, setup) from OUT/sentiment.json; a missing file, cell or run is a one-line error
    (exit 2) that names it."""
    runs, stories, setup = read_saved(out, "sentiment", ("runs", "stories", "setup"), "toy/sentiment.py")
    for cell, loss, _ in cells(grid):
        for name in configs(grid, loss):
            if len(runs.get(cell, {}).get(name, [])) != len(grid["seeds"]):
                replot_error("toy/sentiment.py", f"{out}/sentiment.json has no run {cell} {name} for every seed; run "
                                                 f"without --replot")
    return runs, stories, setup


def matched_stories(by_name: dict, seed_index: int = 0) -> dict:
    """Stories of the first seed: π_SFT (step 0), DPO static β = TR_BETA at the end of training, and the TR-DPO
    evaluation (any α/τ, any step) whose KL is closest to that DPO run's."""
    dpo = by_name[f"dpo/static/beta={TR_BETA:g}"][seed_index]
    tr_name, tr = min(((n, p) for n, h in by_name.items() if is_tr(n) for p in h[seed_index]),
                      key=lambda item: abs(item[1]["kl"] - dpo[-1]["kl"]))
    pick = {"SFT": ("π_SFT (step 0)", dpo[0]), "DPO": (f"dpo/static/beta={TR_BETA:g}, step {dpo[-1]['step']}", dpo[-1]),
            "TR-DPO": (f"{tr_name}, step {tr['step']}", tr)}
    return {k: {"run": name, "gold": p["gold"], "kl": p["kl"], "texts": p["texts"]} for k, (name, p) in pick.items()}


def figure(runs: dict, summary: dict, grid: dict, title: str):
    """Row per loss: gold vs KL per config (mean over seeds at each evaluation) at the loss's first dataset size; the
    frontiers of both families (mean over seeds; bars: paired 95% CI of TR − static, drawn around TR) per size; per
    size TR − static in the three views (toy/views.py gap_panel); per size the final checkpoints and their curves."""
    plt = pyplot()
    n_sizes = max(len(sizes) for sizes in grid["sizes"].values())
    fig, axes = plt.subplots(len(grid["sizes"]), 2 + 2 * n_sizes, figsize=(7.6 + 7.6 * n_sizes,
                                                                           3.6 * len(grid["sizes"])), squeeze=False)
    for (loss, sizes), row in zip(grid["sizes"].items(), axes):
        ax, ax_f = row[:2]
        for sz, ax_g, ax_c in zip(sizes, row[2:2 + n_sizes], row[2 + n_sizes:]):
            s = summary[f"{loss}/n={sz}"]
            gap_panel(ax_g, [r["K"] for r in s["frontier"]], [r["diff"] for r in s["frontier"]], s["at_kl"],
                      s["final"], log_x=True)
            ax_g.set_title(f"{loss.upper()}, {sz} pairs: TR − static\nin three views, paired over seeds", fontsize=9)
            ax_g.set_xlabel("K [nats / response]", fontsize=8)
            ax_g.legend(fontsize=6)
            final_panel(ax_c, s["final"])
            ax_c.set_title(f"{loss.upper()}, {sz} pairs: final checkpoints\n(shaded: KL both families cover)",
                           fontsize=9)
            ax_c.legend(fontsize=6)
        by_name = runs[f"{loss}/n={sizes[0]}"]
        for names, cmap in (([n for n in by_name if not is_tr(n)], "Blues"), ([n for n in by_name if is_tr(n)],
                                                                               "Oranges")):
            for n, c in zip(names, plt.get_cmap(cmap)(np.linspace(0.45, 0.95, len(names)))):
                kl = np.mean([[p["kl"] for p in h] for h in by_name[n]], 0)
                gold = np.mean([[p["gold"] for p in h] for h in by_name[n]], 0)
                ax.plot(kl, gold, "o-", ms=2.5, lw=1, color=c, label=n.split("/", 1)[1])
        ax.set_title(f"{loss.upper()}, {sizes[0]} pairs: gold vs KL\n(mean of {len(grid['seeds'])} seeds)", fontsize=9)
        ax.set_xlabel("KL(π‖π_SFT) [nats / response]", fontsize=8)
        ax.set_ylabel("gold (VADER compound)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        for sz, ls in zip(sizes, ("-", "--")):
            rows = summary[f"{loss}/n={sz}"]["frontier"]
            K = [r["K"] for r in rows]
            ax_f.plot(K, [r["static"] for r in rows], ls, color="C0", marker="o", ms=3, label=f"static, {sz} pairs")
            err = [[r["diff"]["mean"] - r["diff"]["lo"] for r in rows], [r["diff"]["hi"] - r["diff"]["mean"]
                                                                          for r in rows]]
            ax_f.errorbar(K, [r["tr"] for r in rows], yerr=err, fmt=ls, color="C1", marker="s", ms=3, capsize=2,
                          label=f"TR, {sz} pairs")
        ax_f.set_xscale("log", base=2)
        ax_f.set_title(f"{loss.upper()}: frontier, best gold at KL ≤ K\n(bars: paired 95% CI of TR − static)",
                       fontsize=9)
        ax_f.set_xlabel("K [nats / response]", fontsize=8)
        ax_f.legend(fontsize=6)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    fig.text(0.5, 0.005, "at KL: best / mean gold of a family's evaluations with KL in (K/2, K], drawn at K; final "
                         "checkpoints: each run's last evaluation, curve gold − gold(π_SFT) = "
                         f"{FORMULAS[grid['curve']]}, d = √KL; bars and bands: 95% bootstrap CI over seeds",
             ha="center", fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], replot=True)  # --quick writes under out/toy-quick, as every toy's
    grid, t0 = QUICK if args.quick else FULL, time.time()
    if args.replot:
        runs, stories, setup = load_runs(args.out, grid)
        results = None
    else:
        runs, stories, results = train_all(grid, args.workers)
    summary = summarise(runs, grid)
    for cell, s in summary.items():
        print(f"{cell} frontier (best gold at KL ≤ K), static vs TR, Δ = TR − static [paired 95% CI]:\n  "
              + "\n  ".join(
            f"K={r['K']:<3g} {r['static']:.3f} vs {r['tr']:.3f}  Δ {r['diff']['mean']:+.3f} [{r['diff']['lo']:+.3f}, "
            f"{r['diff']['hi']:+.3f}]  {r['verdict']}" for r in s["frontier"]))
    for k, v in stories.items():
        print(f"\n{k} ({v['run']}; mean gold {v['gold']:.3f}, KL {v['kl']:.1f} nats):\n  " + "\n  ".join(v["texts"]))
    rows = verdicts(summary, grid)
    title = (f"stories260K made positive (gold: VADER compound), {len(grid['seeds'])} seeds; static over β "
             f"{grid['betas']}, TR at β = {TR_BETA}; AdamW lr {grid['lr']:g}, {grid['steps']} steps of "
             f"{grid['batch_pairs']} pairs")
    if results is not None:
        setup = {**grid, "openings": OPENINGS, "response_tokens": RESPONSE_TOKENS, "gold_scale": GOLD_SCALE,
                 "tr_beta": TR_BETA, "workers": args.workers, "seconds": time.time() - t0,
                 "run_seconds": sum(r["seconds"] for r in results),
                 "configs": {cell: configs(grid, loss) for cell, loss, _ in cells(grid)}}
    # the views' bins, form and matched KLs are the grid's, with --replot too
    setup = {**setup, **{k: grid[k] for k in ("at_kl_bins", "final_kl", "curve")}}
    payload = {"setup": setup, "summary": summary, "verdicts": rows, "stories": stories, "runs": runs}
    save(args.out, "sentiment", payload, figure(runs, summary, grid, title))
    print_verdicts(f"sentiment: claim (c) in three views; {len(grid['seeds'])} seeds", rows)
    print(criterion_line([s["final"] for s in summary.values()]))
    print(f"\n{'replotted' if args.replot else f'{len(results)} runs'} in {time.time() - t0:.0f} s -> "
          f"{args.out}/sentiment.png, sentiment.json")
    return payload


def train_all(grid: dict, workers: int) -> tuple[dict, dict, list]:
    """Every run of the grid, over `workers` processes: (runs[cell][name] = histories in seed order, the matched
    stories, each run's result)."""
    torch.set_num_threads(1)
    model, tok = load_sft()
    n_max = max(n for sizes in grid["sizes"].values() for n in sizes)
    pairs = {s: make_pairs(model, tok, s, n_max) for s in grid["seeds"]}
    shared = {k: grid[k] for k in ("steps", "eval_every", "eval_samples", "batch_pairs", "lr", "warmup")}
    tasks = [{**c, **shared, "name": name, "cell": cell, "seed": s, "pairs": pairs[s][:n], "keep_texts": 3}
             for cell, loss, n in cells(grid) for name, c in configs(grid, loss).items() for s in grid["seeds"]]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            results = pool.map(run, tasks, chunksize=1)
    else:
        results = [run(t) for t in tasks]
    runs: dict[str, dict[str, list]] = {cell: {} for cell, _, _ in cells(grid)}
    for task, r in zip(tasks, results):
        runs[task["cell"]].setdefault(task["name"], []).append(r["history"])  # seeds in order: tasks are
    stories = matched_stories(runs[f"dpo/n={grid['sizes']['dpo'][0]}"])
    for h in (h for by_name in runs.values() for hs in by_name.values() for h in hs):
        for p in h:
            del p["texts"]  # only the matched stories are kept: every sample of every run would be megabytes
    return runs, stories, results


if __name__ == "__main__":
    main()

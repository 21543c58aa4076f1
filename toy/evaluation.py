"""evaluate.py checked against a known truth: the demo's synthetic task, whose gold reward is known.

    python -m toy.evaluation            # the demo's runs (200 steps each), checkpoints every 50 steps
    python -m toy.evaluation --quick    # the same pipeline in small, under a minute (tests/test_evaluate.py runs it)

1. SFT, then DPO, TR-DPO soft and TR-DPO hard from it, as `python train.py` (synthetic.demo) trains them, with a
   checkpoint beside each of its evaluations (every 50 steps; --quick: a smaller model, every 3 of 6 steps).
2. A reward model trained with --loss=rm on the same synthetic pairs, from the SFT model (a new score head).
3. evaluate.py on those runs with two judges, the gold reward and that reward model, and checks:
   - with the gold judge it reproduces train.py's own evaluation rows at every checkpoint: gold_greedy (the greedy
     responses), gold_sampled and kl_init (its first sample per prompt: the one train.py draws) are equal;
   - the reward model agrees with gold on held-out pairs (a fresh seed's): accuracy with a bootstrap 95% CI;
   - the win rates against π_SFT under the reward model, beside the gold ones.
Writes out/evaluation[-quick]/proof.json and proof.md (the table docs/evaluation.md shows).
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

import evaluate
import winrates
import judge
import synthetic
import train
from config import TrainConfig

HELD_OUT_SEED = 2024  # the reward model's held-out pairs: not the training seed's


PREFERENCE_RUNS = ("DPO", "TR-DPO soft", "TR-DPO hard")


def train_runs(out: Path, quick: bool, log, only: tuple[str, ...] = PREFERENCE_RUNS) -> dict[str, Path]:
    """The demo's runs (and its options: synthetic.demo's lr / 10 and τ): SFT and the preference runs named in only,
    plus the reward model; each skipped when its last checkpoint is there already."""
    base = TrainConfig(max_steps=200, eval_every=50, ckpt_every=50, keep_last=100, log_every=20)
    if quick:  # a smaller model, 6 preference steps (checkpoints at 3 and 6), 8 prompts of 6 new tokens
        base = replace(base, max_steps=6, eval_every=3, ckpt_every=3, log_every=3, dim=32, n_layers=1, n_heads=2,
                       batch_size=16, micro_batch_size=16, num_samples=8, max_new_tokens=6, eval_size=16)
    steps, sft_steps = base.max_steps, 30 if quick else 200  # SFT (and the reward model): the demo's 200 steps
    sft = replace(base, loss="sft", out_dir=str(out / "sft"), eval_every=0, ckpt_every=0, max_steps=sft_steps)
    runs = {name: mode for name, mode in (("DPO", ("static", base.tau)), ("TR-DPO soft", ("soft", max(1, steps // 10))),
                                          ("TR-DPO hard", ("hard", max(1, steps // 4)))) if name in only}
    lr = base.lr if quick else base.lr / 10  # quick: a few steps that move the policy
    cfgs = {"SFT": sft, **{name: replace(base, loss="dpo", ref_update=mode, tau=tau, lr=lr,
                                         init_from=sft.out_dir, out_dir=str(out / name.lower().replace(" ", "-")))
                           for name, (mode, tau) in runs.items()},
            "RM": replace(base, loss="rm", init_from=sft.out_dir, out_dir=str(out / "rm"), num_samples=0,
                          eval_every=0, ckpt_every=0, max_steps=sft_steps)}
    for name, cfg in cfgs.items():
        if (Path(cfg.out_dir) / f"ckpt-{cfg.max_steps:06d}").is_dir():
            continue
        log(f"training {name} ({cfg.loss}, {cfg.ref_update}, {cfg.max_steps} steps) -> {cfg.out_dir}")
        train.train(cfg)
    return {name: Path(cfg.out_dir) for name, cfg in cfgs.items()}


def rm_accuracy(rm_dir: Path, n: int, n_boot: int = 10_000) -> dict:
    """The reward model's agreement with gold on n held-out pairs: the share of pairs with a gold difference that it
    orders as gold does (its ties count ½), with a percentile bootstrap 95% CI over pairs; and against the pairs'
    noisy labels (Bradley-Terry draws on gold), as train.py's reward_acc reads them."""
    pairs = synthetic.make_records(n, HELD_OUT_SEED, sft=False)
    rm, gold = judge.load_judge(str(rm_dir)), judge.load_judge("gold")
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    r, g = (np.array(j.score(prompts, responses)).reshape(2, n) for j in (rm, gold))
    decided = g[0] != g[1]
    agree = winrates.win(np.sign(r[0] - r[1]) * np.sign(g[0] - g[1]), 0)[decided]
    label = winrates.win(r[0], r[1])
    ones = np.ones((n_boot, 1))
    out = {}
    for name, x in (("gold_agreement", agree), ("label_accuracy", label)):
        stat = winrates.ratio_stat(x[None], np.ones((1, len(x))), ones,
                                   winrates.resample_counts(len(x), n_boot, np.random.default_rng(0)))
        out[name] = {**stat, "pairs": int(len(x))}
    return out


def reproduces_train(report: dict, runs: dict[str, Path]) -> list[dict]:
    """Per run and checkpoint: train.py's eval row (gold_greedy, gold_sampled, kl_init) beside the same quantities
    from evaluate.py's cache: the greedy responses, and the first sample per prompt (the one train.py draws)."""
    out = []
    for r in report["rows"]:
        rows = [json.loads(line) for line in (runs[r["run"]] / "metrics.jsonl").read_text().splitlines()]
        train_row = next((x for x in rows if x["split"] == "eval" and x["step"] == r["step"]), None)
        if train_row is None or r["step"] == 0:
            continue
        cache = Path(r["caches"][0])
        gens, gold = (evaluate.read_lines(cache / f) for f in ("generations.jsonl", "judge-gold.jsonl"))
        ours = {"gold_greedy": np.mean([gold[i]["greedy"] for i in gens]),
                "gold_sampled": np.mean([gold[i]["samples"][0] for i in gens]),
                "kl_init": np.mean([g["logps"]["policy"][0] - g["logps"]["init"][0] for g in gens.values()])}
        theirs = {k: train_row[k] for k in ours}
        # gold: the same responses give the same mean; kl_init: the same log-probs up to float32 summation order
        equal = all(ours[k] == theirs[k] for k in ("gold_greedy", "gold_sampled")) and \
            abs(ours["kl_init"] - theirs["kl_init"]) <= 1e-4 * max(1.0, abs(theirs["kl_init"]))
        out.append({"run": r["run"], "step": r["step"], "train": theirs,
                    "evaluate": {k: float(v) for k, v in ours.items()}, "equal": bool(equal)})
    return out


def proof(out: Path, quick: bool, log=print, only: tuple[str, ...] = PREFERENCE_RUNS) -> dict:
    runs = train_runs(out, quick, log, only)
    acc = rm_accuracy(runs["RM"], 256 if quick else 2048)
    argv = [*(f"--runs={n}={runs[n]}" for n in only), "--judge=gold",
            f"--judge={runs['RM']}", f"--out={out / 'eval'}", f"--samples={2 if quick else 4}",
            f"--bootstrap={200 if quick else 1000}"]
    report = evaluate.evaluate(evaluate.parse_args(argv), log=log)
    command = "python -m toy.evaluation" + " --quick" * quick + "".join(f' --only "{n}"' for n in only
                                                                      if only != PREFERENCE_RUNS)
    result = {"command": command, "rm_accuracy": acc,
              "reproduces_train": reproduces_train(report, runs), "evaluate_argv": argv, "report": report}
    (out / "proof.json").write_text(json.dumps(result, indent=1))
    (out / "proof.md").write_text(table(result))
    log(table(result))
    return result


def table(result: dict) -> str:
    report = result["report"]
    (gold, rm) = list(report["judges"])
    lines = [f"`{result['command']}`", "",
             "| run | step | KL(π‖π_SFT) | gold win rate vs π_SFT | local-RM win rate vs π_SFT | gold score | "
             "local-RM score | judges agree (pairs both decide) |", "|---" * 8 + "|"]
    for r in report["rows"]:
        if r["step"] == 0:
            continue
        agree = r["agreement"][f"{gold} ~ {rm}"]
        lines.append(f"| {r['run']} | {r['step']} | {evaluate.fmt(r.get('kl_init'))} | "
                     f"{evaluate.fmt(r[gold].get('win_sampled'))} | {evaluate.fmt(r[rm].get('win_sampled'))} | "
                     f"{evaluate.fmt(r[gold]['score_sampled'])} | {evaluate.fmt(r[rm]['score_sampled'])} | "
                     f"{evaluate.fmt(agree)} ({agree['decided']:.0%}) |")
    acc = result["rm_accuracy"]
    checks = result["reproduces_train"]
    lines += ["", f"reward model vs gold on {acc['gold_agreement']['pairs']} held-out pairs with a gold difference: "
              f"agreement {evaluate.fmt(acc['gold_agreement'])}; against the pairs' noisy labels "
              f"({acc['label_accuracy']['pairs']} pairs) {evaluate.fmt(acc['label_accuracy'])}.",
              f"evaluate.py with the gold judge reproduces train.py's eval rows (gold_greedy, gold_sampled, kl_init) "
              f"at {sum(c['equal'] for c in checks)} of {len(checks)} checkpoints."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small runs and few prompts: the pipeline in under a minute")
    p.add_argument("--out", help="default: out/evaluation, or out/evaluation-quick")
    p.add_argument("--only", action="append", choices=PREFERENCE_RUNS, help="train and judge only these preference "
                   "runs (repeatable; default: all three)")
    a = p.parse_args(argv)
    result = proof(Path(a.out or ("out/evaluation-quick" if a.quick else "out/evaluation")), a.quick,
                   only=tuple(n for n in PREFERENCE_RUNS if n in (a.only or PREFERENCE_RUNS)))
    return 0 if all(c["equal"] for c in result["reproduces_train"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The embedded demo (what `python train.py` runs): a preference task with a known gold reward, so that alignment can
be scored, and the pipeline SFT -> DPO / TR-DPO soft / TR-DPO hard with a table comparing them.

A prompt is 3 distinct letters of "abcdefgh" and "=" (context the policy may use, the reward does not); a response is
6 letters. The gold reward of a response is the fraction of its 6 positions holding a letter of the first half of the
alphabet, "abcd": r("bdg=", "abhdea") = 4/6. The behaviour policy π_b writes 6 uniform letters (mean gold reward 1/2),
so there is room both ways and the optimum (only a-d) is known.

- SFT data: one π_b response per prompt, so the SFT model learns π_b, the policy the preference pairs come from.
- Preference data: two π_b responses per prompt, the preferred one drawn by Bradley–Terry on the gold reward,
  P(y1 ≻ y2) = σ(GOLD_BETA·(r(y1) − r(y2))), so labels are noisy as human ones are.
"""
import json
import math
import os
import random
from dataclasses import asdict, replace
from pathlib import Path

import checkpoint

ALPHABET, GOOD = "abcdefgh", set("abcd")
PROMPT_LETTERS, RESPONSE_LEN = 3, 6
GOLD_BETA = 8.0  # one better letter (Δr = 1/6) wins with probability σ(8/6) ≈ 0.79
TRAIN_EXAMPLES = 4096  # train.py holds out eval_size more


def gold_reward(response: str) -> float:
    """Fraction of the RESPONSE_LEN response positions holding a letter of GOOD (missing positions score 0)."""
    return sum(c in GOOD for c in response[:RESPONSE_LEN]) / RESPONSE_LEN


def make_records(n: int, seed: int, sft: bool) -> list[dict]:
    """n records in data.py's formats: {"prompt", "completion"} (sft) or {"prompt", "chosen", "rejected"}."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = "".join(sorted(rng.sample(ALPHABET, PROMPT_LETTERS))) + "="
        y1, y2 = ("".join(rng.choice(ALPHABET) for _ in range(RESPONSE_LEN)) for _ in range(2))
        if sft:
            records.append({"prompt": prompt, "completion": y1})
            continue
        p1 = 1 / (1 + math.exp(-GOLD_BETA * (gold_reward(y1) - gold_reward(y2))))
        chosen, rejected = (y1, y2) if rng.random() < p1 else (y2, y1)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def demo(cfg, train) -> str:
    """SFT on the task, then DPO with a static, soft and hard reference from that SFT model, each for cfg.max_steps
    steps via train(cfg) -> {"train": metrics, "eval": metrics}; returns (and prints, and writes to
    out_dir/demo_table.md) the table of held-out results, and draws the four runs into out_dir/demo.png (plot.py).
    The preference stages use lr/10 (at the SFT lr the tiny model degenerates within 50 DPO steps) and a τ scaled to
    the short run (the paper's τ = 512 would never fire): soft every max_steps/10 steps, hard every max_steps/4.
    Progress lines (and metrics rows) come at least every max_steps/20 steps, not every step.

    Run again, the demo replaces its own earlier runs (same options: it would reproduce them) as --overwrite does; a
    stage directory holding any other run stops it before the first stage (CheckpointError), unless cfg.overwrite."""
    out = Path(cfg.out_dir)
    base = replace(cfg, demo=False, log_every=max(cfg.log_every, cfg.max_steps // 20))
    runs = [("SFT", replace(base, loss="sft", out_dir=str(out / "sft")))]
    for name, mode, tau in (("DPO", "static", cfg.tau), ("TR-DPO soft", "soft", max(1, cfg.max_steps // 10)),
                            ("TR-DPO hard", "hard", max(1, cfg.max_steps // 4))):
        runs.append((name, replace(base, loss="dpo", ref_update=mode, tau=tau, lr=cfg.lr / 10,
                                   init_from=str(out / "sft"), out_dir=str(out / name.lower().replace(" ", "-")))))
    for _, run_cfg in runs:
        held = checkpoint.earlier_run(run_cfg.out_dir)
        if held and not cfg.overwrite and not same_run(run_cfg):
            raise checkpoint.CheckpointError(f"demo: out_dir={run_cfg.out_dir} holds a run that is not this demo's "
                                             f"({held}): rerun the demo with --overwrite=true or another --out_dir")
    runs = [(name, replace(run_cfg, overwrite=True)) for name, run_cfg in runs]  # none holds another run now
    cols = ("reward_acc", "gold_greedy", "gold_sampled", "kl_init")
    lines = ["| method | final train loss | held-out " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    master = int(os.environ.get("RANK", "0")) == 0
    for i, (name, run_cfg) in enumerate(runs, 1):
        if master:
            print(f"\n=== {i}/{len(runs)} {name}: loss={run_cfg.loss} ref_update={run_cfg.ref_update} "
                  f"tau={run_cfg.tau} lr={run_cfg.lr:g} ===", flush=True)
        result = train(run_cfg)
        cells = [f"{result['eval'][c]:.3f}" if c in result["eval"] else "-" for c in cols]
        lines.append(f"| {name} | {result['train']['loss']:.4f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + (
        "\n\nreward_acc: implicit reward β·log π/π_SFT ranks the held-out pair as labelled; gold: mean gold reward of "
        "greedy / sampled\nresponses to held-out prompts (π_b: 0.5, best: 1); kl_init: KL(π‖π_SFT) per sampled "
        "response, nats.\n")
    if master:
        print("\n" + table, flush=True)
        checkpoint.write_file(out / "demo_table.md", table)
        try:
            import plot
            figure = out / ".demo.tmp.png"  # drawn beside, then renamed over demo.png: never through a link
            checkpoint.remove(figure)
            if (out / "demo.png").is_symlink():
                raise checkpoint.CheckpointError(checkpoint.link_problem(out / "demo.png"))
            plot.plot([run_cfg.out_dir for _, run_cfg in runs], figure)
            os.replace(figure, out / "demo.png")
            print(f"figure: {out / 'demo.png'} (python plot.py {' '.join(c.out_dir for _, c in runs)})", flush=True)
        except ImportError as e:  # matplotlib is optional, as for toy/
            print(f"no figure: {e} (pip install matplotlib)", flush=True)
    return table


def same_run(cfg) -> bool:
    """Whether the run in cfg.out_dir was made with cfg's options (train_config.json; the tokenizer as resolved)."""
    try:
        saved = json.loads((Path(cfg.out_dir) / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    ours = asdict(replace(cfg, tokenizer="byte"))  # the demo's task is byte-level (config.validate)
    return isinstance(saved, dict) and {**saved, "overwrite": None} == {**ours, "overwrite": None}

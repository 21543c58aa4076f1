"""Toy 3, over-optimisation: exact expected gold reward against exact KL(π‖π_SFT), static vs updated reference.

A tiny Llama (model.py) over all V**L responses to one prompt. A hidden gold reward r*(y) (per-position token values
plus adjacent-token interactions, standardised over the space); an SFT policy fitted to samples of an unrelated base
distribution; P preference pairs sampled from π_SFT and labelled by Bradley–Terry on the gold reward,
P(y1 ≻ y2) = σ(r*(y1) − r*(y2)), so the labels are noisy. Then DPO / IPO / KTO with a static, soft (α, τ) or hard (τ)
reference; E_π[r*] and KL(π‖π_SFT) are computed exactly over the space along training, for several seeds, plus an
α / τ / learning-rate sweep for DPO.

    python -m toy.overoptimization [--out toy/figures] [--quick]
"""
import numpy as np
import torch

from reference import MODES
from toy.common import (LOSSES, RunConfig, all_logps, band, enumerate_sequences, kl, loss_mode_grid, mean_std,
                        one_thread, parse_args, pyplot, save, sft, train)
from toy.sequences import tiny_llama

VOCAB, LENGTH = 4, 5
N_PAIRS, N_SFT, BASE_TEMPERATURE = 64, 2000, 0.5  # preference pairs, SFT samples, base distribution sharpness
SFT_STEPS, SFT_LR = 300, 3e-3
KL_LEVELS = (0.5, 1.0, 2.0, 4.0)  # where the gold reward of TR and static runs is compared at equal KL


def random_score(tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Σ_t u[t, y_t] + Σ_t w[y_t, y_{t+1}] with Gaussian tables, standardised to mean 0, std 1 over the space."""
    y = tokens[:, 1:]
    u = torch.randn(LENGTH, VOCAB, generator=g)
    w = torch.randn(VOCAB, VOCAB, generator=g)
    s = u[torch.arange(LENGTH), y].sum(1) + w[y[:, :-1], y[:, 1:]].sum(1)
    return (s - s.mean()) / s.std()


def build(seed: int, sft_steps: int = SFT_STEPS, n_pairs: int = N_PAIRS):
    """Gold reward, SFT policy and the noisy Bradley–Terry pairs for one seed."""
    g = torch.Generator().manual_seed(seed)
    tokens, mask = enumerate_sequences(VOCAB, LENGTH)
    gold = random_score(tokens, g)
    base = torch.softmax(random_score(tokens, g) / BASE_TEMPERATURE, 0)
    policy = tiny_llama(seed)
    sft(policy, tokens, mask, torch.multinomial(base, N_SFT, replacement=True, generator=g), sft_steps, SFT_LR)
    p_sft = all_logps(policy, tokens, mask).exp()
    y1, y2 = torch.multinomial(p_sft, 2 * n_pairs, replacement=True, generator=g).view(2, n_pairs)
    first_wins = torch.rand(n_pairs, generator=g) < torch.sigmoid(gold[y1] - gold[y2])
    chosen, rejected = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    return policy, tokens, mask, chosen, rejected, gold


def gold_at_kl(kls: list[float], golds: list[float], level: float) -> float | None:
    """Gold reward when training first reaches KL(π‖π_SFT) = level (linear between evaluations); None if never."""
    for i in range(1, len(kls)):
        if kls[i] >= level:
            t = (level - kls[i - 1]) / (kls[i] - kls[i - 1]) if kls[i] > kls[i - 1] else 1.0
            return golds[i - 1] + max(0.0, t) * (golds[i] - golds[i - 1])
    return None


def run_summary(h: dict[str, list]) -> dict[str, float | None]:
    """The numbers behind claim (c) for one run: the SFT, peak and final gold reward, their KLs, gold at KL_LEVELS."""
    i = int(np.argmax(h["gold"]))
    out = {"gold_sft": h["gold"][0], "gold_peak": h["gold"][i], "kl_at_peak": h["kl_sft"][i],
           "gold_final": h["gold"][-1], "kl_final": h["kl_sft"][-1]}
    out.update({f"gold_at_kl_{k:g}": gold_at_kl(h["kl_sft"], h["gold"], k) for k in KL_LEVELS})
    return out


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """mean / std over seeds per config; a gold_at_kl entry counts only the seeds that reached that KL (n says so)."""
    out = {}
    for name, histories in runs.items():
        per_seed = [run_summary(h) for h in histories]
        out[name] = {}
        for key in per_seed[0]:
            reached = [s[key] for s in per_seed if s[key] is not None]
            out[name][key] = mean_std(reached) if reached else None
    return out


def figure(runs: dict[str, list[dict]], groups: dict[str, list[str]], title: str):
    """Per group of configs: gold reward against KL (one line per seed) and against the step (mean ± std)."""
    fig, axes = pyplot().subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False)
    for (group, names), (ax_kl, ax_t) in zip(groups.items(), axes.T):
        for name in names:
            for j, h in enumerate(runs[name]):  # one thin line per seed: KL is not shared across seeds
                ax_kl.plot(h["kl_sft"], h["gold"], color=f"C{names.index(name)}", lw=0.8,
                           label=name if j == 0 else None)
            band(ax_t, runs[name][0]["step"], [h["gold"] for h in runs[name]], name, color=f"C{names.index(name)}")
        ax_kl.set_title(f"{group}: gold reward vs KL(π‖π_SFT)", fontsize=9)
        ax_kl.set_xlabel("KL(π‖π_SFT) [nats]", fontsize=8)
        ax_t.set_title(f"{group}: gold reward vs step (mean ± std)", fontsize=9)
        ax_t.set_xlabel("step", fontsize=8)
        ax_kl.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], "toy/figures")
    steps, seeds, sft_steps = (30, [0], 30) if args.quick else (400, [0, 1, 2], SFT_STEPS)
    base = dict(beta=0.1, lr=1e-4, alpha=0.6, tau=32, steps=steps, eval_every=max(steps // 50, 1))
    configs = loss_mode_grid(base)
    sweep = {f"dpo/soft/alpha={a:g}": RunConfig(mode="soft", **{**base, "alpha": a}) for a in (0.1, 0.3, 0.9)}
    sweep.update({f"dpo/hard/tau={t}": RunConfig(mode="hard", **{**base, "tau": t}) for t in (8, 128)})
    fast = {f"dpo/{m}/lr=0.001": RunConfig(mode=m, **{**base, "lr": 1e-3}) for m in MODES}
    more_data = {f"dpo/{m}/pairs={4 * N_PAIRS}": RunConfig(mode=m, **base) for m in MODES}
    runs: dict[str, list[dict]] = {}
    with one_thread():
        for seed in seeds:
            for n_pairs, grid in ((N_PAIRS, {**configs, **sweep, **fast}), (4 * N_PAIRS, more_data)):
                policy, tokens, mask, chosen, rejected, gold = build(seed, sft_steps, n_pairs)
                state = {k: v.clone() for k, v in policy.state_dict().items()}

                def evaluate(lp, sft_lp):
                    return {"gold": (lp.exp() * gold).sum().item(), "kl_sft": kl(lp, sft_lp)}

                for name, cfg in grid.items():
                    policy.load_state_dict(state)
                    torch.manual_seed(seed)
                    runs.setdefault(name, []).append(train(policy, tokens, mask, chosen, rejected, cfg, evaluate))
    groups = {loss.upper(): [f"{loss}/{mode}" for mode in MODES] for loss in LOSSES}
    groups["DPO α/τ sweep"] = ["dpo/static", "dpo/soft", "dpo/hard", *sweep]
    groups["DPO lr=1e-3"] = list(fast)
    groups[f"DPO {4 * N_PAIRS} pairs"] = list(more_data)
    fig = figure(runs, groups, f"over-optimisation: tiny Llama, V={VOCAB}, L={LENGTH}, {N_PAIRS} noisy BT pairs, "
                               f"β={base['beta']}, Adam lr={base['lr']}, α={base['alpha']}, τ={base['tau']}, "
                               f"{len(seeds)} seeds")
    payload = {"setup": {"vocab": VOCAB, "length": LENGTH, "n_pairs": N_PAIRS, "n_sft": N_SFT,
                         "base_temperature": BASE_TEMPERATURE, "sft_steps": sft_steps, "sft_lr": SFT_LR,
                         "kl_levels": list(KL_LEVELS), "seeds": seeds, **base},
               "configs": {n: vars(c) for n, c in {**configs, **sweep, **fast, **more_data}.items()},
               "summary": summarise(runs), "runs": runs}
    save(args.out, "overoptimization", payload, fig)
    return payload


if __name__ == "__main__":
    main()

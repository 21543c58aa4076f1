"""Toy 4, claim (d): the DPO loss flattens as margins grow, and reference updates bring the margins back.

With h = (log π/π_ref)(y_w) − (log π/π_ref)(y_l), DPO's loss ℓ(h) = −log σ(βh) has gradient weight −ℓ'(h)/β = σ(−βh)
and curvature ℓ''(h) = β²σ(βh)σ(−βh), both → 0 as βh grows: a static reference lets the margins run away and the
loss goes flat. Moving π_ref towards π shrinks h, back to where the loss still has slope and curvature. Left: weight
and curvature from autograd through losses.dpo_loss (against the closed forms). Right: the margins and the mean
curvature over the preference pairs along DPO training of the sequences toy (toy/sequences.py, same setup).

    python -m toy.curvature [--out toy/figures] [--quick] [--workers 2]
"""
from functools import partial

import numpy as np
import torch

from losses import dpo_loss, ipo_loss
from reference import MODES
from toy.common import (CI_METHOD, RunConfig, band, claim_row, likelihood_grid, parse_args, print_verdicts, pyplot,
                        save, summarise)
from toy.sequences import SFT_STEPS, build

BETA = 0.1


def loss_derivatives(loss_fn, h: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ℓ(h), ℓ'(h), ℓ''(h) by autograd through a losses.py pair loss (π_ref log-probs 0, rejected log-prob 0)."""
    h = h.detach().double().requires_grad_(True)
    zero = torch.zeros_like(h)
    loss = loss_fn(h, zero, zero, zero, beta)[0]
    d1, = torch.autograd.grad(loss.sum(), h, create_graph=True)
    d2, = torch.autograd.grad(d1.sum(), h)
    return loss.detach(), d1.detach(), d2


def analytic(beta: float) -> dict[str, list[float]]:
    """DPO weight and curvature against βh from autograd, with the closed forms; IPO's curvature for contrast."""
    bh = torch.linspace(-6, 10, 161, dtype=torch.float64)
    loss, d1, d2 = loss_derivatives(dpo_loss, bh / beta, beta)
    ipo_d2 = loss_derivatives(ipo_loss, bh / beta, beta)[2]
    return {"beta_h": bh.tolist(), "dpo_loss": loss.tolist(), "dpo_weight": (-d1 / beta).tolist(),
            "dpo_curvature": d2.tolist(), "weight_closed_form": torch.sigmoid(-bh).tolist(),
            "curvature_closed_form": (beta ** 2 * torch.sigmoid(bh) * torch.sigmoid(-bh)).tolist(),
            "ipo_curvature": ipo_d2.tolist()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0])
    # --quick: τ = 8 gives the TR runs 3 reference updates in 30 steps, lr 1e-3 so that they move visibly
    steps, seeds, sft_steps, tau, lr = ((30, [0, 1], 100, 8, 1e-3) if args.quick else
                                        (300, list(range(10)), SFT_STEPS, 32, 1e-4))
    base = dict(beta=BETA, lr=lr, alpha=0.6, tau=tau, steps=steps, eval_every=max(steps // 15, 1))
    configs = {f"dpo/{mode}": RunConfig(mode=mode, **base) for mode in MODES}
    curves = analytic(BETA)
    runs = likelihood_grid(partial(build, sft_steps=sft_steps), configs, seeds, args.workers,
                           keys=("step", "beta_margin", "dpo_weight", "dpo_curvature"))
    summary = summarise(runs, run_summary)
    verdicts = [row for mode in ("soft", "hard") for key, sign in (("mean_dpo_curvature", +1), ("mean_dpo_weight", +1),
                                                                   ("mean_beta_margin", -1), ("final_dpo_weight", +1))
                for row in [claim_row(f"(d) DPO {mode} − static", key, summary[f"dpo/{mode}"]["paired"][key], sign,
                                      static=summary["dpo/static"][key], tr=summary[f"dpo/{mode}"][key])]]

    fig, (a0, a1, a2) = pyplot().subplots(1, 3, figsize=(14, 3.8))
    a0.plot(curves["beta_h"], curves["dpo_weight"], label="weight σ(−βh)")
    a0.plot(curves["beta_h"], np.array(curves["dpo_curvature"]) / BETA ** 2, label="curvature ℓ''(h)/β² = σ(βh)σ(−βh)")
    a0.plot(curves["beta_h"], curves["dpo_loss"], label="loss −log σ(βh)", color="grey", lw=0.8)
    a0.set_ylim(-0.05, 1.5)
    a0.set_xlabel("βh")
    a0.set_ylabel("value (autograd through losses.dpo_loss)", fontsize=8)
    a0.set_title("DPO: slope and curvature vanish as βh grows", fontsize=9)
    a0.legend(fontsize=7)
    for name, hs in runs.items():
        band(a1, hs[0]["step"], [h["beta_margin"] for h in hs], name)
        band(a2, hs[0]["step"], [h["dpo_curvature"] for h in hs], name)
    a1.set_title("mean βh over the pairs, against the current π_ref", fontsize=9)
    a1.set_ylabel("mean βh", fontsize=8)
    a2.set_title("mean curvature β²σ(βh)σ(−βh) over the pairs", fontsize=9)
    a2.set_ylabel("mean ℓ''(h)", fontsize=8)
    for ax in (a1, a2):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"sequences toy, DPO β={BETA}, Adam lr={base['lr']}, α={base['alpha']}, τ={base['tau']}; "
                 f"mean ± std over {len(seeds)} seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.5, 0.005, "h = (log π/π_ref)(y_w) − (log π/π_ref)(y_l), π_ref the current reference (it moves with TR); "
                         "bands: ±1 std over seeds", ha="center", fontsize=8)
    payload = {"setup": {"seeds": seeds, "sft_steps": sft_steps, **base, "toy": "toy/sequences.py", "ci": CI_METHOD},
               "analytic": curves, "summary": summary, "verdicts": verdicts, "runs": runs}
    save(args.out, "curvature", payload, fig)
    print_verdicts(f"curvature: claim (d); {len(seeds)} seeds (figure and JSON in {args.out})", verdicts)
    return payload


def run_summary(h: dict[str, list]) -> dict[str, float]:
    """Time-averages over training (the whole run, not only its end) and the final values of the margin statistics."""
    return {"mean_beta_margin": float(np.mean(h["beta_margin"])), "mean_dpo_weight": float(np.mean(h["dpo_weight"])),
            "mean_dpo_curvature": float(np.mean(h["dpo_curvature"])), "final_beta_margin": h["beta_margin"][-1],
            "final_dpo_weight": h["dpo_weight"][-1]}


if __name__ == "__main__":
    main()

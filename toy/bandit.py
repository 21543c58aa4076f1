"""Toy 1, the bandit: one prompt, K responses, a policy whose parameters are shared by every response.

π(y) = softmax_y f(φ(y)) with f a small MLP over fixed random response features φ(y) ∈ R^d, so raising one response
moves its neighbours in feature space. The preference data is P disjoint pairs over 2P of the K responses; the SFT
policy is fitted to those 2P responses (they were "sampled from it"), and is both the start and the static reference.
DPO / IPO / KTO then run with a static, soft (α, τ) and hard (τ) reference; the exact probabilities of the chosen set,
the rejected set and the other K − 2P (out-of-distribution) responses are recorded through training.

    python -m toy.bandit [--out toy/figures] [--quick] [--workers 2]
"""
import torch
import torch.nn as nn

from toy.common import (CI_METHOD, LOSSES, MODES, RunConfig, likelihood_figure, likelihood_grid, likelihood_verdicts,
                        loss_mode_grid, parse_args, print_verdicts, save, sft, summarise)

K, D, HIDDEN, N_PAIRS = 64, 8, 32, 4  # responses, feature size, MLP width, preference pairs
SFT_STEPS, SFT_LR = 60, 1e-2  # early-stopped SFT: the 2P data responses hold ~80% of the mass


class BanditPolicy(nn.Module):
    """logits(y) = MLP(φ(y)); forward(idx) ignores its context (one prompt) and returns the same next-token logits
    over the K responses at every position, so a response is a one-token sequence scored by losses.sequence_logps."""

    def __init__(self, features: torch.Tensor, hidden: int):
        super().__init__()
        self.register_buffer("features", features)
        self.net = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(self.features).squeeze(-1).expand(*idx.shape, -1)


def build(seed: int):
    """Features, SFT policy and the P pairs for one seed."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(K, D, generator=g)
    torch.manual_seed(seed)
    policy = BanditPolicy(features, HIDDEN)
    tokens = torch.stack([torch.zeros(K, dtype=torch.long), torch.arange(K)], dim=1)  # [prompt, y]
    mask = torch.tensor([[0, 1]]).expand(K, 2)
    in_data = torch.randperm(K, generator=g)[: 2 * N_PAIRS]
    chosen, rejected = in_data[:N_PAIRS], in_data[N_PAIRS:]
    sft(policy, tokens, mask, in_data, SFT_STEPS, SFT_LR)
    return policy, tokens, mask, chosen, rejected


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0])
    # --quick: τ = 25 gives the TR runs 3 reference updates in 100 steps
    steps, seeds, tau = (100, [0, 1], 25) if args.quick else (1500, list(range(10)), 32)
    base = dict(beta=0.1, lr=1e-3, alpha=0.6, tau=tau, steps=steps, eval_every=max(steps // 50, 1))
    configs = loss_mode_grid(base)
    counter = {f"dpo/{mode}/lr=0.01": RunConfig(mode=mode, **{**base, "lr": 1e-2}) for mode in MODES}
    runs = likelihood_grid(build, {**configs, **counter}, seeds, args.workers)
    rows = {loss.upper(): [f"{loss}/{mode}" for mode in MODES] for loss in LOSSES}
    rows["DPO, lr=1e-2"] = list(counter)
    fig = likelihood_figure(runs, rows, f"bandit: K={K} responses, {N_PAIRS} pairs, β={base['beta']}, Adam "
                                        f"lr={base['lr']}, α={base['alpha']}, τ={base['tau']}; {len(seeds)} seeds")
    summary = summarise(runs)
    verdicts = likelihood_verdicts(summary, "bandit")
    payload = {"setup": {"K": K, "D": D, "hidden": HIDDEN, "n_pairs": N_PAIRS, "sft_steps": SFT_STEPS,
                         "sft_lr": SFT_LR, "sft_on": "both", "seeds": seeds, "ci": CI_METHOD, **base},
               "configs": {n: vars(c) for n, c in {**configs, **counter}.items()}, "summary": summary,
               "verdicts": verdicts, "runs": runs}
    save(args.out, "bandit", payload, fig)
    print_verdicts(f"bandit: claims (a), (b); {len(seeds)} seeds (figure and JSON in {args.out})", verdicts)
    return payload


if __name__ == "__main__":
    main()

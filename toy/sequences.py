"""Toy 2, likelihood dynamics of a tiny Llama (model.py) over a sequence space small enough to enumerate exactly.

Vocabulary V, responses of exactly L tokens after a one-token prompt (token 0, which doubles as BOS): V**L responses,
scored in one batched forward, so the chosen / rejected / out-of-distribution (OOD) masses are exact. The preference
data is P pairs of near-duplicates (the rejected response is the chosen one with one token changed, as two samples of
one SFT model often are); the SFT policy is the randomly initialised Llama fitted to the 2P responses. Then DPO / IPO /
KTO with a static, soft (α, τ) and hard (τ) reference (the paper's likelihood plot).

    python -m toy.sequences [--out toy/figures] [--quick] [--workers 2]
"""
from functools import partial

import torch

from model import Llama, ModelConfig
from toy.common import (CI_METHOD, LOSSES, MODES, enumerate_sequences, likelihood_figure, likelihood_grid,
                        likelihood_verdicts, loss_mode_grid, parse_args, print_verdicts, save, sft, summarise)

VOCAB, LENGTH, N_PAIRS = 4, 5, 8  # 4**5 = 1024 responses
MODEL = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
SFT_STEPS, SFT_LR = 300, 3e-3


def tiny_llama(seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(vocab_size=VOCAB, max_seq_len=LENGTH + 1, bos_id=0, eos_id=None, **MODEL))


def make_pairs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """P chosen responses (indices into the enumeration) and their one-token edits as the rejected, all distinct."""
    n = VOCAB ** LENGTH
    chosen, rejected, used = [], [], set()
    while len(chosen) < N_PAIRS:
        c = int(torch.randint(n, (1,), generator=g))
        pos = int(torch.randint(LENGTH, (1,), generator=g))
        shift = int(torch.randint(1, VOCAB, (1,), generator=g))
        digit = (c // VOCAB ** pos) % VOCAB  # enumerate_sequences is base-V with the last token least significant
        r = c + (((digit + shift) % VOCAB) - digit) * VOCAB ** pos
        if c in used or r in used:
            continue
        used |= {c, r}
        chosen.append(c)
        rejected.append(r)
    return torch.tensor(chosen), torch.tensor(rejected)


def build(seed: int, sft_steps: int = SFT_STEPS):
    """SFT policy (fitted to the chosen and rejected responses), space and pairs for one seed."""
    tokens, mask = enumerate_sequences(VOCAB, LENGTH)
    chosen, rejected = make_pairs(torch.Generator().manual_seed(seed))
    policy = tiny_llama(seed)
    sft(policy, tokens, mask, torch.cat([chosen, rejected]), sft_steps, SFT_LR)
    return policy, tokens, mask, chosen, rejected


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0])
    # --quick: τ = 8 gives the TR runs 3 reference updates in 30 steps, lr 1e-3 so that they move visibly
    steps, seeds, sft_steps, tau, lr = ((30, [0, 1], 100, 8, 1e-3) if args.quick else
                                        (300, list(range(10)), SFT_STEPS, 32, 1e-4))
    base = dict(beta=0.1, lr=lr, alpha=0.6, tau=tau, steps=steps, eval_every=max(steps // 15, 1))
    configs = loss_mode_grid(base)
    runs = likelihood_grid(partial(build, sft_steps=sft_steps), configs, seeds, args.workers)
    rows = {loss.upper(): [f"{loss}/{mode}" for mode in MODES] for loss in LOSSES}
    fig = likelihood_figure(runs, rows, f"tiny Llama, V={VOCAB}, L={LENGTH} ({VOCAB ** LENGTH} responses), "
                                        f"{N_PAIRS} pairs, β={base['beta']}, Adam lr={base['lr']}, α={base['alpha']}, "
                                        f"τ={base['tau']}; {len(seeds)} seeds")
    summary = summarise(runs)
    verdicts = likelihood_verdicts(summary, "sequences")
    payload = {"setup": {"vocab": VOCAB, "length": LENGTH, "n_pairs": N_PAIRS, "model": MODEL, "sft_steps": sft_steps,
                         "sft_lr": SFT_LR, "sft_on": "both", "seeds": seeds,
                         "ci": CI_METHOD, **base},
               "configs": {n: vars(c) for n, c in configs.items()},
               "summary": summary, "verdicts": verdicts, "runs": runs}
    save(args.out, "sequences", payload, fig)
    print_verdicts(f"sequences: claims (a), (b); {len(seeds)} seeds (figure and JSON in {args.out})", verdicts)
    return payload


if __name__ == "__main__":
    main()

"""The embedded demo's preference task: short letter strings with a known gold reward, so alignment can be scored.

A prompt is 3 distinct letters of "abcdefgh" and "="; a response is 6 letters. The gold reward of a response is the
fraction of its 6 letters that occur in the prompt, e.g. r("bdg=", "bbxdga") = 4/6. The behaviour policy π_b writes 6
uniform letters (gold reward 3/8 on average), so there is a lot to gain and the optimum (only prompt letters) is known.

- SFT data: one π_b response per prompt (the SFT model learns π_b, the policy that the preference pairs come from).
- Preference data: two π_b responses per prompt, the preferred one drawn by Bradley–Terry on the gold reward,
  P(y1 ≻ y2) = σ(GOLD_BETA·(r(y1) − r(y2))), so labels are noisy as human ones are.
"""
import math
import random

ALPHABET = "abcdefgh"
PROMPT_LETTERS, RESPONSE_LEN = 3, 6
GOLD_BETA = 8.0  # a one-letter difference (1/6) is preferred with probability σ(8/6) ≈ 0.79


def gold_reward(prompt: str, response: str) -> float:
    """Fraction of the RESPONSE_LEN response positions holding a letter of the prompt (missing positions score 0)."""
    letters = set(prompt.rstrip("="))
    return sum(c in letters for c in response[:RESPONSE_LEN]) / RESPONSE_LEN


def make_examples(n: int, seed: int) -> list[dict]:
    """n preference examples {"prompt", "chosen", "rejected"}; an SFT run trains on "chosen", which for this task is
    a plain π_b sample: see sft_examples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(sorted(rng.sample(ALPHABET, PROMPT_LETTERS))) + "="
        y1, y2 = ("".join(rng.choice(ALPHABET) for _ in range(RESPONSE_LEN)) for _ in range(2))
        p1 = 1 / (1 + math.exp(-GOLD_BETA * (gold_reward(prompt, y1) - gold_reward(prompt, y2))))
        chosen, rejected = (y1, y2) if rng.random() < p1 else (y2, y1)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def sft_examples(examples: list[dict]) -> list[dict]:
    """SFT on π_b: each pair's first-drawn... no preference information: a fair coin picks chosen or rejected."""
    rng = random.Random(0)
    return [{"prompt": e["prompt"], "chosen": e[rng.choice(("chosen", "rejected"))], "rejected": e["rejected"]}
            for e in examples]

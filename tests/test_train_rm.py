"""train.py's reward-model training (--loss=rm) and eval-time judging (--judge): packed rewards and gradients equal
the padded path's, a run from a causal LM saves a *ForSequenceClassification that transformers scores as we do,
judge_score beside kl_init, and one-line refusals before any work."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers

import checkpoint
import data
import packing
import train
from conftest import ROOT
from model import Llama, ModelConfig
from tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

V, PAD = 61, 60
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--batch_size=4", "--micro_batch_size=2", "--eval_size=8",
        "--max_length=16", "--max_prompt_length=8", "--warmup_steps=2", "--lr=3e-3", "--max_new_tokens=8"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    """train.py in a subprocess, which must succeed."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def rows(run_dir, split: str) -> list[dict]:
    return [r for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["split"]
            == split]


def pair_items(n: int, seed: int = 0, max_length: int = 24) -> list[data.Item]:
    rng = random.Random(seed)

    def toks(lo, hi):
        return [rng.randrange(PAD) for _ in range(rng.randint(lo, hi))]
    items = []
    for i in range(n):
        p = toks(1, 10)
        items.append(data.Item(p, toks(1, 12)[:max_length - len(p)], toks(1, 12)[:max_length - len(p)], None, i))
    return items


@pytest.mark.parametrize("shared", [True, False])
def test_rm_packed_rewards_loss_and_gradients_equal_the_padded_path(shared):
    """One micro batch of pairs: packed ([prompt | chosen | rejected] trees, the reward read at each response's last
    token through logits_index) and padded rows give the same loss, metrics and gradients; each reward is the model's
    score of that (prompt, response) alone."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                              reward_model=True, pad_id=PAD))
    items = pair_items(6, seed=5)
    cfg = train.TrainConfig(loss="rm")
    padded = data.collate(items, "pairs", PAD)
    packed = packing.collate(items, "pairs", [None] * 6, PAD, packing.row_capacity("pairs", 24, shared), shared)
    results = []
    for batch in (padded, packed):
        loss, metrics = train.compute_loss(model, None, batch, cfg)
        results.append((loss, metrics, torch.autograd.grad(loss, list(model.parameters()))))
    (l1, m1, g1), (l2, m2, g2) = results
    assert m1.keys() == m2.keys() == {"loss", "reward_acc", "margin", "chosen_reward", "rejected_reward"}
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    with torch.no_grad():  # the rewards are the scores of each (prompt, response) alone
        seqs = [it.prompt + getattr(it, r) for r in ("response", "rejected") for it in items]
        alone = [model.rewards(torch.tensor([s]), torch.ones(1, len(s))) for s in seqs]
        alone = torch.cat(alone)
        want = -torch.nn.functional.logsigmoid(alone[:6] - alone[6:]).mean()
    assert l1.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run(TINY + ["--loss=sft", "--max_steps=4", "--eval_every=0", "--num_samples=0", f"--out_dir={out}"])
    return out


def test_rm_from_a_causal_lm_saves_what_transformers_scores_as_we_do(sft_run, tmp_path, capsys):
    """--loss=rm from an SFT run: a new score head, no reference, no generations; held-out pair accuracy and margin
    in the eval rows (train rows too); the checkpoint is a LlamaForSequenceClassification whose transformers scores
    give the eval row's held-out accuracy and margin."""
    out = tmp_path / "rm"
    p = run(TINY + ["--loss=rm", "--max_steps=6", "--eval_every=3", f"--init_from={sft_run}", f"--out_dir={out}"])
    assert "a reward model generates nothing" in p.stdout
    ckpt = checkpoint.model_dir(out)
    assert not (ckpt / "reference").exists()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 258
    evals, trains = rows(out, "eval"), rows(out, "train")
    assert [r["step"] for r in evals] == [3, 6] and len(trains) == 6
    for r in evals + trains:
        assert {"reward_acc", "margin", "chosen_reward", "rejected_reward"} <= r.keys()
        assert not {"kl_init", "kl_ref", "gold_sampled", "judge_score"} & r.keys()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = train.parse_config(TINY + ["--loss=rm", f"--init_from={sft_run}", f"--out_dir={out}"])
    _, eval_batches, prompts, _ = train.make_data(cfg, get_tokenizer("byte"), 0, 1)
    assert prompts == []
    correct, margins = [], []
    ours = Llama.from_pretrained(ckpt)
    with torch.no_grad():
        for batch in eval_batches:  # right-padded with the byte pad 258, which no text holds
            ids = batch["input_ids"]
            scores = hf(input_ids=ids, attention_mask=(ids != 258).long()).logits[:, 0]
            assert (ours.rewards(ids, ids != 258) - scores).abs().max() <= 1e-5 * scores.abs().max()
            b = len(ids) // 2
            correct.append((scores[:b] > scores[b:]).float().mean().item())
            margins.append((scores[:b] - scores[b:]).mean().item())
    assert evals[-1]["reward_acc"] == pytest.approx(sum(correct) / len(correct), abs=1e-6)
    assert evals[-1]["margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4)
    # a reward model trains on as one (--loss=rm from it); as a policy it is refused in one line
    run(TINY + ["--loss=rm", "--max_steps=1", f"--init_from={out}", f"--out_dir={tmp_path / 'more'}"])
    capsys.readouterr()
    assert train.main(TINY + ["--loss=dpo", "--max_steps=1", f"--init_from={out}", f"--out_dir={tmp_path / 'dpo'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a reward model (a score head, no LM head): loss=dpo" in err


def test_judge_scores_eval_samples_beside_kl_init(sft_run, tmp_path):
    """--judge=gold gives judge_score = gold_sampled (the same responses, the same reward); --judge=<a reward model
    run> gives its mean score of them; both beside kl_init in every eval row."""
    gold = tmp_path / "gold"
    run(TINY + ["--loss=dpo", "--max_steps=4", "--eval_every=2", "--num_samples=6", f"--init_from={sft_run}",
                "--judge=gold", f"--out_dir={gold}"])
    for r in rows(gold, "eval"):
        assert "kl_init" in r and r["judge_score"] == pytest.approx(r["gold_sampled"], abs=1e-12)
    rm = tmp_path / "rm"
    run(TINY + ["--loss=rm", "--max_steps=2", "--eval_every=0", f"--init_from={sft_run}", f"--out_dir={rm}"])
    judged = tmp_path / "judged"
    run(TINY + ["--loss=dpo", "--max_steps=2", "--eval_every=1", "--num_samples=4", f"--init_from={sft_run}",
                f"--judge={rm}", f"--out_dir={judged}"])
    evals = rows(judged, "eval")
    assert len(evals) == 2 and all(isinstance(r["judge_score"], float) and "kl_init" in r for r in evals)


@pytest.mark.parametrize("extra, culprit", [
    (["--judge={lm}"], "is a LlamaForCausalLM, not a reward model"),
    (["--judge={tmp}/missing"], "no such file or directory"),
    (["--judge=gold", "--loss=rm"], "generates none"),
    (["--loss=rm", "--ref_update=soft"], "loss=rm has none"),
    (["--judge=gold", "--num_samples=0"], "num_samples=0 samples none"),
    (["--loss=rm", "--lora_rank=4"], "LoRA on a reward model is not supported"),
])
def test_bad_judges_and_rm_options_are_one_line_before_any_work(sft_run, tmp_path, capsys, extra, culprit):
    args = [a.format(lm=sft_run, tmp=tmp_path) for a in extra]
    out = tmp_path / "out"
    assert train.main(TINY + ["--loss=dpo", "--max_steps=1", *args, f"--out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and culprit in err and err.startswith("train.py: error: ") and not out.exists()

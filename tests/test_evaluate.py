"""evaluate.py: the win-rate, length-control and bootstrap maths against independent computations (scikit-learn and
SciPy as references, or the resamples drawn directly), the cache (a killed evaluation continues without generating
again what it had; another judge reuses the generations), and one-line errors on bad input."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import evaluate
from config import TrainConfig
from model import Llama, ModelConfig
from tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# maths


def test_win_counts_ties_as_half():
    assert evaluate.win([1, 2, 3], [2, 2, 2]).tolist() == [0.0, 0.5, 1.0]


def test_distinct_n_over_words():
    assert evaluate.distinct(["a b a", "b a"], 1) == (2 / 5, 1.0)
    assert evaluate.distinct(["a b a", "b a"], 2) == (2 / 3, 1.0)  # (a b), (b a), (b a)
    assert evaluate.distinct(["a", ""], 2) == (0.0, 0.0)  # no bigram: left out of the mean


def sklearn_fit(x, y, w):
    """scikit-learn's unpenalised logistic regression (C = ∞, formerly penalty=None); a tie (y = ½) is a win and a loss of half the weight each."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    tie = y == 0.5
    xs = np.concatenate([x[~tie], x[tie], x[tie]])[:, None]
    ys = np.concatenate([y[~tie], np.ones(tie.sum()), np.zeros(tie.sum())])
    ws = np.concatenate([w[~tie], w[tie] / 2, w[tie] / 2])
    m = linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(xs, ys, sample_weight=ws)
    return m.intercept_[0], m.coef_[0, 0]


def test_logistic_fit_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = np.where(rng.random(300) < 1 / (1 + np.exp(-(0.3 + 1.5 * x))), 1.0, 0.0)
    y[rng.random(300) < 0.2] = 0.5  # ties
    w = rng.integers(0, 4, size=300).astype(float)  # bootstrap counts, zeros included
    b = evaluate.logistic_fit(x, y, np.vstack([np.ones(300), w]))
    for row, weights in zip(b, (np.ones(300), w)):
        np.testing.assert_allclose(row, sklearn_fit(x, y, weights), rtol=1e-5, atol=1e-7)


def test_length_controlled_win_rate_matches_sklearn_and_its_resamples():
    """σ(b0) of the fit on tanh(Δlen / std) is the length-controlled win rate; its CI is the percentile interval of
    the same fit on each bootstrap resample (prompts drawn with replacement, a prompt's K pairs together)."""
    rng = np.random.default_rng(1)
    n, K, B = 40, 3, 30
    dlen = rng.normal(30, 50, size=(1, n, K))  # the policy writes longer
    y = (rng.random((1, n, K)) < 1 / (1 + np.exp(-dlen / 40))).astype(float)  # longer wins more often
    cp = evaluate.resample_counts(n, B, np.random.default_rng(2))
    got = evaluate.length_controlled(y, dlen, np.ones((B, 1)), cp)
    x = np.tanh(dlen / dlen.std()).ravel()
    fits = [sklearn_fit(x, y.ravel(), np.repeat(c, K)) for c in [np.ones(n), *cp]]
    lc = [1 / (1 + np.exp(-b0)) for b0, _ in fits]
    assert got["value"] == pytest.approx(lc[0], abs=1e-6)
    np.testing.assert_allclose(got["ci"], np.percentile(lc[1:], [2.5, 97.5]), atol=1e-6)
    assert got["value"] < y.mean()  # the longer responses' wins are discounted: at equal length fewer win


def test_ratio_bootstrap_equals_resamples_drawn_directly():
    """A crossed bootstrap over seeds and prompts: each resample draws S seeds and n prompts with replacement."""
    rng = np.random.default_rng(3)
    S, n, B = 3, 12, 200
    N, D = rng.normal(size=(S, n)), rng.integers(1, 5, size=(S, n)).astype(float)
    cs = evaluate.resample_counts(S, B, np.random.default_rng(10))
    cp = evaluate.resample_counts(n, B, np.random.default_rng(11))
    seeds = np.random.default_rng(10).integers(0, S, size=(B, S))
    prompts = np.random.default_rng(11).integers(0, n, size=(B, n))
    direct = [N[np.ix_(s, p)].sum() / D[np.ix_(s, p)].sum() for s, p in zip(seeds, prompts)]
    got = evaluate.ratio_stat(N, D, cs, cp)
    assert got["value"] == pytest.approx(N.sum() / D.sum())
    np.testing.assert_allclose(got["ci"], np.percentile(direct, [2.5, 97.5]), rtol=1e-12)


def test_ratio_bootstrap_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    n, B = 60, 20_000
    x, d = rng.normal(size=n), rng.integers(1, 6, size=n).astype(float)
    cp = evaluate.resample_counts(n, B, np.random.default_rng(5))
    ones = np.ones((B, 1))
    mean = evaluate.ratio_stat(x[None], np.ones((1, n)), ones, cp)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=B, random_state=0).confidence_interval
    np.testing.assert_allclose(mean["ci"], [ref.low, ref.high], atol=0.02)  # Monte Carlo error of two bootstraps
    ratio = evaluate.ratio_stat(x[None], d[None], ones, cp)  # per-token quantities: Σ N / Σ D, N and D paired
    ref = stats.bootstrap((x, d), lambda a, b: a.sum() / b.sum(), paired=True, vectorized=False, method="percentile",
                          n_resamples=B // 4, random_state=0).confidence_interval
    np.testing.assert_allclose(ratio["ci"], [ref.low, ref.high], atol=0.01)


def test_head_to_head_every_seed_pair_directly():
    rng = np.random.default_rng(6)
    n, K, B = 10, 2, 50
    a = [{"scores": {"j": (rng.integers(0, 3, n), rng.integers(0, 3, (n, K)))}} for _ in range(2)]
    b = [{"scores": {"j": (rng.integers(0, 3, n), rng.integers(0, 3, (n, K)))}} for _ in range(3)]
    csa, csb = (evaluate.resample_counts(len(g), B, np.random.default_rng(7 + i)) for i, g in enumerate((a, b)))
    cp = evaluate.resample_counts(n, B, np.random.default_rng(9))
    got = evaluate.head_to_head(a, b, "j", csa, csb, cp)
    sa, sb = (np.random.default_rng(7 + i).integers(0, len(g), size=(B, len(g))) for i, g in enumerate((a, b)))
    ps = np.random.default_rng(9).integers(0, n, size=(B, n))

    def rate(i, j, p):  # sampled: the k-th sample of a against the k-th of b
        return np.mean([evaluate.win(a[i]["scores"]["j"][1][q], b[j]["scores"]["j"][1][q]).mean() for q in p])

    value = np.mean([rate(i, j, range(n)) for i in range(2) for j in range(3)])
    direct = [np.mean([rate(i, j, p) for i in s for j in t]) for s, t, p in zip(sa, sb, ps)]
    assert got["win_sampled"]["value"] == pytest.approx(value)
    np.testing.assert_allclose(got["win_sampled"]["ci"], np.percentile(direct, [2.5, 97.5]), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# runs: tiny random models saved as train.py leaves them


def save_model(path, seed: int, max_seq_len: int = 64):
    tok = get_tokenizer("byte")
    torch.manual_seed(seed)
    Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=max_seq_len,
                      bos_id=tok.bos_id, eos_id=tok.eos_id)).save_pretrained(path)


def fake_run(path, init, seed: int, steps=(2, 4), ref_update: str = "static", tokenizer: str = "byte"):
    cfg = asdict(TrainConfig(out_dir=str(path), init_from=str(init), loss="dpo", ref_update=ref_update,
                             eval_size=16, num_samples=8, max_new_tokens=6, tokenizer=tokenizer, seed=seed))
    for step in steps:
        save_model(path / f"ckpt-{step:06d}", seed * 100 + step)
        if ref_update != "static":
            save_model(path / f"ckpt-{step:06d}" / "reference", seed * 100 + step + 50)
    (path / "train_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def runs(tmp_path):
    save_model(tmp_path / "sft", 0)
    return {"dpo": fake_run(tmp_path / "dpo", tmp_path / "sft", 1),
            "tr": fake_run(tmp_path / "tr", tmp_path / "sft", 2, ref_update="soft")}


def args_for(runs: dict, out, *extra) -> list[str]:
    return [*(f"--runs={k}={v}" for k, v in runs.items()), "--judge=gold", f"--out={out}", "--samples=2",
            "--batch_size=4", "--bootstrap=50", *extra]


def count_generated(monkeypatch) -> list:
    calls, original = [], Llama.generate

    def counting(self, prompts, *a, **kw):
        calls.append(len(prompts))
        return original(self, prompts, *a, **kw)
    monkeypatch.setattr(Llama, "generate", counting)
    return calls


def test_report_rows_and_metrics(runs, tmp_path):
    report = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval")), log=lambda *_: None)
    assert [(r["run"], r["step"]) for r in report["rows"]] == [("dpo", 0), ("dpo", 2), ("dpo", 4), ("tr", 0),
                                                               ("tr", 2), ("tr", 4)]
    assert report["prompts"] == {"source": "synthetic", "n": 8}
    dpo2, tr4 = report["rows"][1], report["rows"][5]
    assert "kl_ref" not in dpo2 and "kl_ref" in tr4  # only a run whose reference moved has a KL to it
    assert {"score_greedy", "score_sampled", "win_greedy", "win_sampled", "lc_win_sampled"} <= set(dpo2["gold"])
    assert "win_sampled" not in report["rows"][0]["gold"]  # step 0 is π_init itself
    assert [(h["a"], h["b"], h["step"]) for h in report["head_to_head"]] == [("dpo", "tr", 2), ("dpo", "tr", 4)]
    for name in ("report.json", "report.md", "overoptimization.png"):
        assert (tmp_path / "eval" / name).is_file()
    assert "gold win rate vs π_init, sampled" in (tmp_path / "eval" / "report.md").read_text()


def test_killed_evaluation_continues_without_generating_again(runs, tmp_path, monkeypatch):
    """Killed at its 8th chunk write: the rerun generates only the chunks not cached, and its report equals that of
    an evaluation never interrupted (chunk c samples from seed + c, whatever ran before)."""
    fresh = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "fresh")), log=lambda *_: None)
    write, writes = evaluate.append_lines, []

    def killed(file, rows):
        if file.name == "generations.jsonl" and len(writes) == 7:
            raise KeyboardInterrupt
        writes.append(file.name) if file.name == "generations.jsonl" else None
        write(file, rows)
    monkeypatch.setattr(evaluate, "append_lines", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval")), log=lambda *_: None)
    monkeypatch.setattr(evaluate, "append_lines", write)
    calls = count_generated(monkeypatch)
    again = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval")), log=lambda *_: None)
    # 5 caches (π_init, shared by both runs, and 4 checkpoints) x 2 chunks of 4 prompts, 7 chunks done; a chunk is
    # 1 greedy and 2 sampled generate calls
    assert calls == [4] * 3 * (5 * 2 - 7)
    assert again["rows"] == fresh["rows"] and again["head_to_head"] == fresh["head_to_head"]
    evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval")), log=lambda *_: None)
    assert calls == [4] * 3 * (5 * 2 - 7)  # a third run (e.g. with another judge) generates nothing


def test_seeds_group_and_last(runs, tmp_path):
    fake_run(tmp_path / "dpo2", tmp_path / "sft", 3)
    report = evaluate.evaluate(evaluate.parse_args(
        [f"--runs=dpo={runs['dpo']},{tmp_path / 'dpo2'}", "--judge=gold", f"--out={tmp_path / 'eval'}", "--samples=2",
         "--bootstrap=50", "--last"]), log=lambda *_: None)
    assert [(r["run"], r["step"], r["seeds"]) for r in report["rows"]] == [("dpo", 0, 2), ("dpo", 4, 2)]
    assert report["rows"][1]["kl_init"]["value"] != 0


# ----------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing lost


def fails(argv, capsys) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1, err
    return err


def test_run_without_checkpoints(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_config.json").write_text((runs["dpo"] / "train_config.json").read_text())
    assert "no checkpoints (ckpt-*)" in fails(args_for({"x": tmp_path / "empty"}, tmp_path / "eval"), capsys)
    assert "no train_config.json" in fails(args_for({"x": tmp_path / "sft"}, tmp_path / "eval"), capsys)


def test_prompt_set_with_no_prompts(runs, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    err = fails(args_for(runs, tmp_path / "eval", f"--prompts={tmp_path / 'empty.jsonl'}"), capsys)
    assert f"--prompts {tmp_path / 'empty.jsonl'}" in err


def test_seeds_of_one_group_on_different_tokenizers(runs, tmp_path, capsys):
    fake_run(tmp_path / "gpt2", tmp_path / "sft", 3, tokenizer="gpt2")
    err = fails(args_for({"dpo": f"{runs['dpo']},{tmp_path / 'gpt2'}"}, tmp_path / "eval"), capsys)
    assert "its seeds were trained with different tokenizers" in err


def test_judge_that_is_no_reward_model(runs, tmp_path, capsys):
    err = fails(args_for(runs, tmp_path / "eval", f"--judge={tmp_path / 'sft'}"), capsys)
    assert f"--judge {tmp_path / 'sft'}" in err and "not a reward model" in err
    assert not (tmp_path / "eval").exists()  # refused before any generation

"""evaluate.py: head to head over seeds against the resamples drawn directly (the rest of the maths:
tests/test_winrates.py), the cache (a killed evaluation continues without generating again what it had; another judge
reuses the generations), and one-line errors on bad input."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import evaluate
import winrates
import judge
from conftest import shared_path
from config import TrainConfig
from model import Llama, ModelConfig
from tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# maths (the rest: tests/test_winrates.py)


def test_head_to_head_every_seed_pair_directly():
    rng = np.random.default_rng(6)
    n, K, B = 10, 2, 50
    a = [{"scores": {"j": (rng.integers(0, 3, n), rng.integers(0, 3, (n, K)))}} for _ in range(2)]
    b = [{"scores": {"j": (rng.integers(0, 3, n), rng.integers(0, 3, (n, K)))}} for _ in range(3)]
    csa, csb = (winrates.resample_counts(len(g), B, np.random.default_rng(7 + i)) for i, g in enumerate((a, b)))
    cp = winrates.resample_counts(n, B, np.random.default_rng(9))
    got = evaluate.head_to_head(a, b, "j", csa, csb, cp)
    sa, sb = (np.random.default_rng(7 + i).integers(0, len(g), size=(B, len(g))) for i, g in enumerate((a, b)))
    ps = np.random.default_rng(9).integers(0, n, size=(B, n))

    def rate(i, j, p):  # sampled: the k-th sample of a against the k-th of b
        return np.mean([winrates.win(a[i]["scores"]["j"][1][q], b[j]["scores"]["j"][1][q]).mean() for q in p])

    value = np.mean([rate(i, j, range(n)) for i in range(2) for j in range(3)])
    direct = [np.mean([rate(i, j, p) for i in s for j in t]) for s, t, p in zip(sa, sb, ps)]
    assert got["win_sampled"]["value"] == pytest.approx(value)
    np.testing.assert_allclose(got["win_sampled"]["ci"], np.percentile(direct, [2.5, 97.5]), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# runs: tiny random models saved as train.py leaves them


def save_model(path, seed: int, max_seq_len: int = 64, tokenizer: str = "byte"):
    tok = get_tokenizer(tokenizer)
    torch.manual_seed(seed)
    Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=max_seq_len,
                      bos_id=tok.bos_id, eos_id=tok.eos_id)).save_pretrained(path)


def fake_run(path, init, seed: int, steps=(2, 4), ref_update: str = "static", tokenizer: str = "byte"):
    cfg = asdict(TrainConfig(out_dir=str(path), init_from=str(init), loss="dpo", ref_update=ref_update,
                             eval_size=16, num_samples=8, max_new_tokens=6, tokenizer=tokenizer, seed=seed))
    for step in steps:
        save_model(path / f"ckpt-{step:06d}", seed * 100 + step, tokenizer=tokenizer)
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
    def numbers(report):  # the rows without the cache directories' names (another --out)
        return [{k: v for k, v in r.items() if k != "caches"} for r in report["rows"]], report["head_to_head"]
    assert numbers(again) == numbers(fresh)
    evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval")), log=lambda *_: None)
    assert calls == [4] * 3 * (5 * 2 - 7)  # a third run (e.g. with another judge) generates nothing


def test_seeds_group_and_last(runs, tmp_path):
    fake_run(tmp_path / "dpo2", tmp_path / "sft", 3)
    report = evaluate.evaluate(evaluate.parse_args(
        [f"--runs=dpo={runs['dpo']},{tmp_path / 'dpo2'}", "--judge=gold", f"--out={tmp_path / 'eval'}", "--samples=2",
         "--bootstrap=50", "--last"]), log=lambda *_: None)
    assert [(r["run"], r["step"], r["seeds"]) for r in report["rows"]] == [("dpo", 0, 2), ("dpo", 4, 2)]
    assert report["rows"][1]["kl_init"]["value"] != 0


def test_prompts_of_a_dataset_directory_held_out_split(runs, tmp_path):
    """--prompts DIR takes its held-out split (test), in file order; chat messages stay messages for the judges."""
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    for split, letters in (("train", "abc"), ("test", "def")):
        rows = [{"prompt": [{"role": "user", "content": f"{x}{y}="}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]} for x in letters for y in "gh"]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = evaluate.load_prompts(str(tmp_path / "ds"), "auto", json.loads((runs["dpo"] / "train_config.json")
                                    .read_text()), get_tokenizer("byte"), 4)
    assert [p[0]["content"] for p in prompts] == ["dg=", "dh=", "eg=", "eh="]
    report = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval", f"--prompts={tmp_path / 'ds'}",
                                                            "--num_prompts=3")), log=lambda *_: None)
    assert report["prompts"]["n"] == 3


def test_run_from_scratch_has_no_initial_policy(tmp_path):
    """init_from=scratch: scores, length and diversity, but no win rate against π_init and no KL to it."""
    run = fake_run(tmp_path / "scratch", "scratch", 4)
    report = evaluate.evaluate(evaluate.parse_args(args_for({"x": run}, tmp_path / "eval")), log=lambda *_: None)
    assert [r["step"] for r in report["rows"]] == [2, 4]
    assert "kl_init" not in report["rows"][0] and set(report["rows"][0]["gold"]) == {"score_greedy", "score_sampled"}


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


def reward_model(path, max_seq_len: int = 64, seed: int = 5):
    """A tiny random reward model on the byte tokenizer (named by the train_config.json beside it, as a run's)."""
    tok = get_tokenizer("byte")
    torch.manual_seed(seed)
    Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=max_seq_len, bos_id=tok.bos_id,
                      eos_id=tok.eos_id, reward_model=True, pad_id=tok.pad_id)).save_pretrained(path)
    (path / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    return path


def test_two_judges_agreement_and_truncation(runs, tmp_path):
    """A reward model whose context (10) is shorter than BOS + prompt (4) + response (6 tokens: 6 to 18 bytes, as a
    random byte decodes to U+FFFD) + EOS: the sequence is cut from the left and counted; the judges' agreement is
    reported."""
    rm = reward_model(tmp_path / "rm", max_seq_len=10)
    report = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval", f"--judge={rm}")),
                               log=lambda *_: None)
    key = evaluate.judge_key(str(rm))
    assert report["judges"][key]["label"] == "local-RM rm" and report["judges"][key]["truncated"] > 0
    assert report["judges"][key]["responses_cut"] < report["judges"][key]["truncated"]
    assert report["judges"]["gold"]["truncated"] == 0
    assert list(report["rows"][1]["agreement"]) == [f"gold ~ {key}"]
    assert "local-RM rm win rate vs π_init, sampled" in (tmp_path / "eval" / "report.md").read_text()


def test_judge_context_shorter_than_a_response(runs, tmp_path):
    """A response longer than the judge's context: cut from the left too, and counted apart."""
    rm = reward_model(tmp_path / "rm", max_seq_len=4)
    report = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval", f"--judge={rm}")),
                               log=lambda *_: None)
    counts = report["judges"][evaluate.judge_key(str(rm))]
    assert 0 < counts["responses_cut"] <= counts["truncated"] == 5 * 8 * 3  # every sequence of the 5 caches


def test_runs_on_different_tokenizers_compare_through_text(runs, tmp_path):
    """Groups on different tokenizers: head to head through the text, said in a note; each run's KL against its own
    initial policy, which shares its tokenizer."""
    save_model(tmp_path / "sft-gpt2", 7, tokenizer="gpt2")
    other = fake_run(tmp_path / "other", tmp_path / "sft-gpt2", 8, tokenizer="gpt2")
    lines = []
    report = evaluate.evaluate(evaluate.parse_args(args_for({"dpo": runs["dpo"], "other": other}, tmp_path / "eval")),
                               log=lines.append)
    assert any("head-to-head compares texts" in x for x in lines) and report["tokenizers"] == ["byte", "gpt2"]
    assert [h["step"] for h in report["head_to_head"]] == [2, 4]
    assert all("kl_init" in r for r in report["rows"] if r["step"])


# ----------------------------------------------------------------------------------------------------------------------
# a pairwise judge: a chat model asked which response is better, in both orders


@pytest.fixture
def chat_judge(tmp_path):
    """A tiny random chat model with SmolLM2's tokenizer and chat template."""
    source = shared_path("models", "smollm2-135m-instruct")
    tok = get_tokenizer(str(source))
    torch.manual_seed(0)
    Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=512, bos_id=tok.bos_id,
                      eos_id=tok.eos_id)).save_pretrained(tmp_path / "chat")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "chat" / f).write_bytes((source / f).read_bytes())
    return tmp_path / "chat"


def test_decide_in_both_orders():
    assert judge.decide(0.9, 0.2) == (1.0, False)  # a first: a; b first: a
    assert judge.decide(0.3, 0.6) == (0.0, False)
    assert judge.decide(0.9, 0.9) == (0.5, True)  # the first position wins both times: position bias, a tie
    assert judge.decide(0.5, 0.2) == (0.5, True)


def test_pairwise_judge_reads_its_answer_tokens(chat_judge):
    """The question as transformers' apply_chat_template writes it; P(A) from the logits of "A" and "B" at its last
    token, in a right-padded batch as alone; compare() in both orders is antisymmetric."""
    transformers = pytest.importorskip("transformers")
    j = judge.load_pairwise_judge(str(chat_judge))
    prompts, a, b = ["\n\nHuman: Hi?\n\nAssistant:", "2+2?"], ["Hello! How can I help?", "4"], ["Go away.", "5, or 22"]
    hf = transformers.AutoTokenizer.from_pretrained(chat_judge)
    turns = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "2+2?"}]]
    for p, t, x, y in zip(prompts, turns, a, b):
        text = judge.PAIRWISE_QUESTION.format(conversation="\n".join(f"{m['role']}: {m['content']}" for m in t),
                                              a=x, b=y)
        ids = hf(hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert j.question(p, x, y) == ids
    ids_a, ids_b = hf("A", add_special_tokens=False)["input_ids"], hf("B", add_special_tokens=False)["input_ids"]
    got = j.prob_first(prompts, a, b)
    for p, x, y, g in zip(prompts, a, b, got):
        with torch.no_grad():
            logits = j.model(torch.tensor([j.question(p, x, y)]))[0, -1]
        assert g == pytest.approx(torch.softmax(logits[ids_a + ids_b], -1)[0].item(), abs=1e-6)
    ab, ba = j.compare(prompts, a, b), j.compare(prompts, b, a)
    assert [1 - x for x in ab] == ba and j.disagreements == 2 * sum(x == 0.5 for x in ab)


def test_pairwise_judge_in_evaluate(runs, chat_judge, tmp_path, capsys):
    report = evaluate.evaluate(evaluate.parse_args(args_for(runs, tmp_path / "eval", f"--pairwise_judge={chat_judge}")),
                               log=lambda *_: None)
    key = evaluate.judge_key(str(chat_judge)) + "-pairwise"
    row = report["rows"][1]
    assert report["judges"][key]["label"] == "pairwise chat" and key not in report["rows"][0]
    assert {"win_greedy", "win_sampled", "lc_win_sampled", "disagreement"} == set(row[key])
    assert 0 <= row[key]["disagreement"]["value"] <= 1 and "gold ~ " + key in row["agreement"]
    assert "orders disagree" in (tmp_path / "eval" / "report.md").read_text()
    (tmp_path / "sft" / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    for refused in (tmp_path / "sft", reward_model(tmp_path / "rm")):  # no chat template; no LM head
        err = fails(args_for(runs, tmp_path / "eval", f"--pairwise_judge={refused}"), capsys)
        assert f"--pairwise_judge {refused}" in err and "a pairwise judge is a chat model" in err


def test_quick_synthetic_proof(tmp_path):
    """toy/evaluation.py --quick: train.py's own eval rows reproduced by evaluate.py with the gold judge, a reward
    model trained with --loss=rm beside it (docs/evaluation.md shows the full run's table)."""
    from toy import evaluation
    assert evaluation.main(["--quick", f"--out={tmp_path}"]) == 0
    result = json.loads((tmp_path / "proof.json").read_text())
    assert len(result["reproduces_train"]) == 6 and all(c["equal"] for c in result["reproduces_train"])
    assert 0 <= result["rm_accuracy"]["gold_agreement"]["value"] <= 1
    assert "local-RM win rate vs π_SFT" in (tmp_path / "proof.md").read_text()

"""judge.py: the gold judge, and reward-model judges reading (prompt, response) through their own tokenizer and chat
template, as transformers' apply_chat_template and Skywork-Reward's one-BOS recipe do; truncation; one-line errors."""
import json
import shutil

import pytest
import torch
import transformers

import judge
import synthetic
from conftest import shared_path
from model import Llama, ModelConfig
from tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HH = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"


def hf_reward_model(path, tokenizer_dir, family="Qwen2", max_positions=256, seed=0):
    """A tiny random transformers reward model over the tokenizer's vocabulary, saved with the tokenizer's files."""
    tok = get_tokenizer(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = getattr(transformers, family + "Config")(
        vocab_size=tok.n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, num_labels=1, pad_token_id=tok.pad_id,
        initializer_range=0.5, sliding_window=None)
    hf = getattr(transformers, family + "ForSequenceClassification")(cfg).eval()
    hf.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, path / f)
    return hf


def reference_ids(directory, messages):
    """Skywork-Reward's recipe with transformers' tokenizer: apply_chat_template to text, strip a leading BOS, then
    tokenize (the tokenizer adds its BOS, if it has one)."""
    ht = transformers.AutoTokenizer.from_pretrained(directory)
    text = ht.apply_chat_template(messages, tokenize=False)
    if ht.bos_token is not None and text.startswith(ht.bos_token):
        text = text[len(ht.bos_token):]
    return ht(text)["input_ids"]


def hf_score(hf, ids):
    """transformers' score of one unpadded row at its last token (pad_token_id None: the last position; Mistral's pad
    id is its EOS, which ends the row, so transformers' own rule would read the token before it)."""
    pad, hf.config.pad_token_id = hf.config.pad_token_id, None
    with torch.no_grad():
        score = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
    hf.config.pad_token_id = pad
    return score


def test_gold_judge_is_the_synthetic_gold_reward():
    j = judge.load_judge("gold")
    responses = ["abcdab", "efghef", "abc", "aeaeae"]
    assert j.name == "gold" and j.score(["abc="] * 4, responses) == [synthetic.gold_reward(r) for r in responses]
    assert j.score(["abc="] * 4, responses) == [1.0, 0.0, 0.5, 0.5] and j.truncated == 0


def test_hh_transcripts_become_chat_turns():
    assert judge.hh_messages(HH) == [{"role": "user", "content": "What is 2+2?"},
                                     {"role": "assistant", "content": "4."},
                                     {"role": "user", "content": "And 3+3?"}]
    assert judge.hh_messages("\n\nHuman: hi\n\nAssistant:") == [{"role": "user", "content": "hi"}]
    assert judge.hh_messages("abc=") is None and judge.hh_messages("\n\nHuman: no answer turn") is None


def test_every_shared_hh_test_prompt_becomes_alternating_turns_with_its_text():
    """The four HH-RLHF test files: every prompt parses; user and assistant alternate, from a user turn to the user
    turn being answered; the turns hold the transcript's text (whitespace aside)."""
    import glob
    import data
    files = sorted(glob.glob(str(shared_path("data", "hh-rlhf") / "*-test.jsonl.gz")))
    n = 0
    for f in files:
        for ex in data.read_examples(f):
            messages = judge.hh_messages(ex.prompt)
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], ex.prompt[:200]
            words = " ".join(m["content"] for m in messages).split()
            assert words == ex.prompt.replace("\n\nHuman:", " ").replace("\n\nAssistant:", " ").split()
            n += 1
    assert len(files) == 4 and n >= 1000  # (the four files hold 8,552 test pairs)


def test_qwen_judge_reads_the_conversation_as_transformers_writes_it(tmp_path):
    """Qwen2.5's template: the judge's ids are apply_chat_template's (its default system prompt included, as the
    template writes it when the data has none; a system turn of the data replaces it, never both), the trailing "\\n"
    after <|im_end|> included; scores equal transformers' model on the same conversation; no BOS (Qwen has none)."""
    qwen = shared_path("models", "qwen2.5-0.5b-instruct")
    hf = hf_reward_model(tmp_path, qwen)
    j = judge.load_judge(str(tmp_path))
    assert isinstance(j, judge.RewardModelJudge) and j.name == tmp_path.name and j.tok.bos_id is None
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompts = [HH, "abc=", system, [{"role": "user", "content": "Name a colour."}]]
    responses = [" 6.", "abdc", "Hello.", " Blue "]
    want = []
    for p, r in zip(prompts, responses):
        messages = (judge.hh_messages(p) or [{"role": "user", "content": p}]) if isinstance(p, str) else p
        ref = reference_ids(tmp_path, [*messages, {"role": "assistant", "content": r.strip()}])
        ids, n_prompt = j.encode(p, r)
        assert ids == ref
        text = j.tok.decode(ids)
        assert text.count("<|im_start|>system") == 1 and text.endswith("<|im_end|>\n")
        assert ("You are Qwen" in text) == (p is not system) and ("Be brief." in text) == (p is system)
        assert j.tok.decode(ids[n_prompt:]) == r.strip() + "<|im_end|>\n"
        want.append(hf_score(hf, ids))
    got = j.score(prompts, responses)  # batched, right-padded
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5 * max(map(abs, want))
    assert j.truncated == 0


def test_mistral_judge_keeps_one_bos(tmp_path):
    """Mistral's [INST] template writes <s> and its tokenizer adds one too: the judge keeps one, as Skywork's recipe."""
    mistral = shared_path("models", "mistral-7b-instruct-v0.1")
    hf = hf_reward_model(tmp_path, mistral, family="Mistral")
    j = judge.load_judge(tmp_path)
    ids, n_prompt = j.encode(HH, " 6.")
    ref = reference_ids(tmp_path, [*judge.hh_messages(HH), {"role": "assistant", "content": "6."}])
    assert ids == ref and ids.count(j.tok.bos_id) == 1 and ids[0] == j.tok.bos_id
    assert abs(j.score([HH], [" 6."])[0] - hf_score(hf, ids)) <= 1e-5 * abs(hf_score(hf, ids))


def byte_rm(path, max_seq_len=64, seed=0):
    """One of our reward models with the byte tokenizer (no chat template), as a --loss=rm run saves it."""
    tok = get_tokenizer("byte")
    torch.manual_seed(seed)
    rm = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=max_seq_len,
                           bos_id=tok.bos_id, eos_id=tok.eos_id, reward_model=True, pad_id=tok.pad_id))
    rm.save_pretrained(path)
    (path / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    return rm, tok


def test_judge_without_chat_template_reads_the_data_layout_and_truncates_from_the_left(tmp_path):
    rm, tok = byte_rm(tmp_path, max_seq_len=16)
    j = judge.load_judge(str(tmp_path))
    ids, n_prompt = j.encode("abc=", "abdcab")
    assert ids == [tok.bos_id, *b"abc=", *b"abdcab", tok.eos_id] and n_prompt == 5
    with torch.no_grad():
        want = rm.rewards(torch.tensor([ids]), torch.ones(1, len(ids)))
    assert j.score(["abc="], ["abdcab"]) == pytest.approx(want.tolist(), rel=1e-6) and j.truncated == 0
    long_prompt = "q" * 20 + "xyz="
    kept = [tok.bos_id, *b"qqqqxyz=", *b"abdcab", tok.eos_id]  # BOS and the last 15 tokens: the prompt cut on the left
    assert len(kept) == 16
    with torch.no_grad():
        want = rm.rewards(torch.tensor([kept]), torch.ones(1, len(kept)))
    got = j.score(["abc=", long_prompt], ["abdcab", "abdcab"])
    assert got[1] == pytest.approx(want.item(), rel=1e-6) and j.truncated == 1
    assert j.responses_cut == 0
    j.score(["abc="], ["a" * 15])  # BOS + 15 + EOS: the prompt and the response's first "a" go
    with torch.no_grad():
        want = rm.rewards(torch.tensor([[tok.bos_id, *b"a" * 14, tok.eos_id]]), torch.ones(1, 16))
    assert j.score(["abc="], ["a" * 15]) == pytest.approx(want.tolist(), rel=1e-6)
    assert (j.truncated, j.responses_cut) == (3, 2)


def test_bad_judges_are_one_line_errors(tmp_path):
    qwen = shared_path("models", "qwen2.5-0.5b-instruct")
    lm = tmp_path / "lm"
    Llama(ModelConfig(vocab_size=300, dim=16, n_layers=1, n_heads=2)).save_pretrained(lm)
    two = tmp_path / "two"
    byte_rm(two)
    cfg = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"}}))
    no_tok = tmp_path / "no_tok"
    byte_rm(no_tok)
    (no_tok / "train_config.json").unlink()
    cases = [(lm, "is a LlamaForCausalLM, not a reward model"), (two, "num_labels 2"),
             (no_tok, "no tokenizer.json"), (tmp_path / "missing", "neither a model directory")]
    for spec, culprit in cases:
        with pytest.raises(ValueError) as e:
            judge.load_judge(str(spec))
        assert "\n" not in str(e.value) and culprit in str(e.value), str(e.value)
    assert qwen.is_dir()


def test_a_reward_model_trained_here_is_read_where_its_training_read(tmp_path):
    """A --loss=rm checkpoint (train_config.json: loss rm) is read in data.tokenize's layout: with Qwen2.5's template,
    the ids of a tokenised pair's prompt + response (ending at <|im_end|>), one token short of apply_chat_template's
    conversation (its trailing "\\n"); a string prompt as text, as its training saw it."""
    import data
    qwen = shared_path("models", "qwen2.5-0.5b-instruct")
    hf_reward_model(tmp_path, qwen)
    hub = judge.load_judge(tmp_path)
    (tmp_path / "train_config.json").write_text(json.dumps({"loss": "rm", "tokenizer": str(tmp_path)}))
    here = judge.load_judge(tmp_path)
    assert (hub.data_layout, here.data_layout) == (False, True)
    for prompt, chosen, rejected in (([{"role": "user", "content": "Name a colour."}], "Blue.", "Red."),
                                     ("abc=", "abdcab", "efgh")):
        reply = (lambda t: [{"role": "assistant", "content": t}]) if isinstance(prompt, list) else (lambda t: t)
        item = data.tokenize([data.Pair(prompt, reply(chosen), reply(rejected))], here.tok, "pairs", 4096).items[0]
        assert here.encode(prompt, chosen) == (item.prompt + item.response, len(item.prompt))
    chat = [{"role": "user", "content": "Name a colour."}]
    assert hub.encode(chat, "Blue.")[0] == here.encode(chat, "Blue.")[0] + here.tok.encode("\n", start=False)

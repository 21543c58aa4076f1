"""sample.py: a run directory, a checkpoint or a Hugging Face directory; the run's tokenizer; --chat through the chat
template; one-line errors."""
import json
import subprocess
import sys

import pytest
import tiktoken
import torch

import sample
from conftest import ROOT, shared_path
from tokenizer import Tokenizer, get_tokenizer
from model import Llama, ModelConfig


def fake_run(path):
    """A run directory as train.py leaves it: train_config.json beside ckpt-<step>/ (a model and its own copy)."""
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, max_seq_len=32,
                              bos_id=tok.bos_id, eos_id=tok.eos_id))
    for step in (1, 2):
        model.save_pretrained(path / f"ckpt-{step:06d}")
        (path / f"ckpt-{step:06d}" / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    (path / "train_config.json").write_text(json.dumps({"tokenizer": "byte"}))
    return model, tok


def greedy(model, tok, prompt: str) -> str:
    new = model.generate([[tok.bos_id] + tok.encode(prompt)], 6, temperature=0.0)[0]
    return prompt + tok.decode([t for t in new if t != tok.eos_id]) + "\n---------------\n"


@pytest.mark.parametrize("where", ["", "ckpt-000002", "ckpt-000001"])
def test_run_dir_or_checkpoint_without_tokenizer(tmp_path, capsys, where):
    model, tok = fake_run(tmp_path)
    assert sample.main(["--ckpt", str(tmp_path / where), "--prompt", "abc=", "--max_new_tokens", "6",
                        "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy(model, tok, "abc=")


def test_hugging_face_dir_needs_tokenizer(tmp_path, capsys):
    model, tok = fake_run(tmp_path / "run")
    model.save_pretrained(tmp_path / "hf")
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--prompt", "x"]) == 2
    assert "no tokenizer.json, llama2.c tok*.bin or train_config.json naming its tokenizer" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "x", "--max_new_tokens",
                        "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy(model, tok, "x")


@pytest.mark.parametrize("args, culprit", [
    (["--ckpt", "{tmp}/missing"], "--ckpt {tmp}/missing: no such file or directory"),
    (["--ckpt", "{tmp}"], "neither a model directory (config.json) nor a run directory"),
    (["--ckpt", "{tmp}/run", "--tokenizer", "nope"], "tokenizer nope: unknown tokenizer 'nope'"),
])
def test_bad_paths_fail_in_one_line(tmp_path, args, culprit):
    fake_run(tmp_path / "run")
    args = [a.format(tmp=tmp_path) for a in args]
    p = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("sample.py: error: ") and culprit.format(tmp=tmp_path) in p.stderr


def test_a_reward_model_is_refused_in_one_line(tmp_path, capsys):
    tok = get_tokenizer("byte")
    Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, reward_model=True,
                      pad_id=tok.pad_id)).save_pretrained(tmp_path)
    assert sample.main(["--ckpt", str(tmp_path), "--tokenizer", "byte", "--prompt", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a reward model (a score head, no LM head) does not generate" in err


def test_a_sliding_window_shorter_than_prompt_plus_new_tokens_is_refused(tmp_path, capsys):
    """A Mistral whose window is 16: BOS + "abc" + 12 new tokens fit, 13 would be cut by the window."""
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, bos_id=tok.bos_id,
                              eos_id=tok.eos_id, model_type="mistral", sliding_window=16))
    model.save_pretrained(tmp_path)
    common = ["--ckpt", str(tmp_path), "--tokenizer", "byte", "--prompt", "abc", "--temperature", "0"]
    assert sample.main(common + ["--max_new_tokens", "12"]) == 0
    capsys.readouterr()
    assert sample.main(common + ["--max_new_tokens", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sliding_window 16 (config.json) < 17" in err and "--max_new_tokens" in err


# ---------------------------------------------------------------------------------------------------------------------
# --chat: the tokenizer's chat template applied to a user message, generation stopped at the end of the turn

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_byte_tokenizer(template: str = CHATML) -> Tokenizer:
    """The byte tokenizer with ChatML's special tokens and template: <|im_end|> (259) ends a turn."""
    specials = {"<|bos|>": 256, "<|eos|>": 257, "<|im_start|>": 258, "<|im_end|>": 259}
    enc = tiktoken.Encoding("byte-chatml", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens=specials)
    return Tokenizer(enc, "<|bos|>", "<|eos|>", chat_template=template, end=[259])


@pytest.fixture
def chat_run(tmp_path, monkeypatch):
    """A random Llama saved as a run whose tokenizer (sample.get_tokenizer's answer) has ChatML's template."""
    pytest.importorskip("jinja2")
    tok = chatml_byte_tokenizer()
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=32, n_layers=1, n_heads=2, max_seq_len=64,
                              bos_id=tok.bos_id, eos_id=tok.eos_id))
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"tokenizer": "byte-chatml"}))
    monkeypatch.setattr(sample, "get_tokenizer", lambda name: tok if name == "byte-chatml" else get_tokenizer(name))
    return tmp_path / "run", model, tok


def test_chat_applies_the_template_and_stops_at_the_end_of_turn(chat_run, capsys, monkeypatch):
    run, _, tok = chat_run
    calls = []

    def generate(self, prompts, max_new_tokens, *args, stop_ids=None, **kw):
        calls.append((prompts, stop_ids))
        return [list(b"Paris") + [259]]  # a reply that ends its turn

    monkeypatch.setattr(Llama, "generate", generate)
    assert sample.main(["--ckpt", str(run), "--chat", "Capital of France? <|im_end|>"]) == 0
    assert capsys.readouterr().out == "Paris\n---------------\n"  # the reply alone, without the markup
    (prompts, stop_ids), = calls
    assert prompts == [[258, *b"user\nCapital of France? <|im_end|>", 259, *b"\n", 258, *b"assistant\n"]]
    assert stop_ids == [257, 259]  # EOS and the template's end of turn


def test_chat_greedy_reply(chat_run, capsys):
    run, model, tok = chat_run
    ids = [258, *b"user\nhi", 259, *b"\n", 258, *b"assistant\n"]
    new = model.generate([ids], 8, temperature=0.0, stop_ids=tok.end_ids)[0]
    assert sample.main(["--ckpt", str(run), "--chat", "hi", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode([t for t in new if t not in (257, 259)]) + "\n---------------\n"


def test_chat_with_a_real_template(tmp_path, capsys, one_thread):
    """SmolLM2's tokenizer.json and template from ../shared: the prompt ids are transformers' apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    directory = shared_path("models", "smollm2-135m-instruct")
    tok, hf = get_tokenizer(str(directory)), transformers.AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.n_vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=128))
    model.save_pretrained(tmp_path / "hf")
    ids = hf.apply_chat_template([{"role": "user", "content": "Hi <|im_end|>"}], add_generation_prompt=True,
                                 tokenize=True, return_dict=False, sanitize_control_tokens=True)
    new = model.generate([ids], 6, temperature=0.0, stop_ids=tok.end_ids)[0]
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--tokenizer", str(directory), "--chat", "Hi <|im_end|>",
                        "--max_new_tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode([t for t in new if t not in tok.end_ids]) + "\n---------------\n"


def test_chat_errors_are_one_line(chat_run, capsys, monkeypatch):
    run, _, _ = chat_run
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(run), "--chat", "hi", "--prompt", "x"])
    assert e.value.code == 2 and "--chat and --prompt exclude each other" in capsys.readouterr().err
    refusing = chatml_byte_tokenizer("{{ raise_exception('System messages are not supported') }}")
    monkeypatch.setattr(sample, "get_tokenizer", lambda name: refusing)
    assert sample.main(["--ckpt", str(run), "--chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == "sample.py: error: --chat: chat template of byte-chatml: System messages are not supported " \
                  "(roles user)\n"


# ---------------------------------------------------------------------------------------------------------------------
# options and inputs: each bad one is refused in one line (`sample.py: error: ...`, exit 2) before any generation


def exit_status(argv: list[str]) -> int:
    """sample.main's status, or argparse's (it exits)."""
    try:
        return sample.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("option, culprit", [
    (["--temperature", "-1"], "--temperature -1.0: need a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: need a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: need a finite number >= 0"),
    (["--top_p", "0"], "--top_p 0.0: need 0 < top_p <= 1"),
    (["--top_p", "1.5"], "--top_p 1.5: need 0 < top_p <= 1"),
    (["--top_p", "nan"], "--top_p nan: need 0 < top_p <= 1"),
    (["--top_k", "0"], "--top_k 0: need >= 1"),
    (["--max_new_tokens", "-5"], "--max_new_tokens -5: need >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: need >= 1"),
    (["--num_samples", "0"], "--num_samples 0: need >= 1"),
    (["--seed", "-1"], "--seed -1: need 0 <= seed < 2**64"),
    (["--device", "nonsense"], "--device nonsense: not a device (cpu, cuda or cuda:N)"),
    (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
    (["--max_new_tokens", "many"], "argument --max_new_tokens: invalid int value: 'many'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--max_new_tokens", "100000"], "--max_new_tokens 100000: --prompt (4 tokens) + 100000 = 100004 tokens "
     "exceed the model's context of 32 (max_position_embeddings, {run}/ckpt-000002/config.json): use at most 28"),
    (["--max_new_tokens", "29"], "--max_new_tokens 29: --prompt (4 tokens) + 29 = 33 tokens exceed"),
    (["--prompt", "x" * 40], "--prompt is 41 tokens, which leaves no room in the model's context of 32"),
])
def test_bad_options_fail_in_one_line(tmp_path, capsys, monkeypatch, option, culprit):
    fake_run(tmp_path)
    monkeypatch.setattr(Llama, "generate", lambda *a, **k: pytest.fail("generated despite a bad option"))
    assert exit_status(["--ckpt", str(tmp_path), "--prompt", "abc", *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sample.py: error: ") and culprit.format(run=tmp_path) in err, err


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert sample.main(["--ckpt", str(tmp_path), "--device", device]) == 2
        assert capsys.readouterr().err == f"sample.py: error: --device {device}: torch sees no GPU (use --device cpu)\n"


def test_the_default_max_new_tokens_is_what_the_context_leaves(tmp_path, capsys):
    """--max_new_tokens left out: 200, or fewer where the context ends first (BOS + "abc" in 32 positions: 28)."""
    model, tok = fake_run(tmp_path)
    assert sample.main(["--ckpt", str(tmp_path), "--prompt", "abc", "--temperature", "0"]) == 0
    new = model.generate([[tok.bos_id] + tok.encode("abc")], 28, stop_ids=tok.end_ids)[0]
    text = tok.decode([t for t in new if t not in tok.end_ids])
    assert capsys.readouterr().out == "abc" + text + "\n---------------\n"
    with pytest.raises(ValueError, match=r"^33 tokens exceed the model's context, max_position_embeddings 32"):
        model.generate([[tok.bos_id] + tok.encode("abc")], 29)


@pytest.mark.parametrize("damage, culprit", [
    ("weights", "--ckpt {run}/ckpt-000002: {run}/ckpt-000002/model.safetensors: not a readable safetensors file "
                "(Error while deserializing header"),
    ("train_config", "{run}/ckpt-000002/train_config.json: not a JSON object (JSONDecodeError"),
    ("tokenizer_key", "{run}/ckpt-000002/train_config.json: 'tokenizer' is 7, not a tokenizer's name or path"),
    ("tokenizer_file", "tokenizer {run}/tok.bin: "),
])
def test_bad_files_fail_in_one_line(tmp_path, capsys, damage, culprit):
    fake_run(tmp_path)
    ckpt, extra = tmp_path / "ckpt-000002", []
    if damage == "weights":
        (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    elif damage == "train_config":
        (ckpt / "train_config.json").write_text("{")
    elif damage == "tokenizer_key":
        (ckpt / "train_config.json").write_text('{"tokenizer": 7}')
    else:
        (tmp_path / "tok.bin").write_bytes(b"\x00\x01 not a tokenizer")
        extra = ["--tokenizer", str(tmp_path / "tok.bin")]
    assert sample.main(["--ckpt", str(ckpt), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sample.py: error: ") and culprit.format(run=tmp_path) in err, err

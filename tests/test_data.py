"""data.py: chat rendering (Llama 3), formats, lossless HH split, truncation/drop accounting, bad input, batches."""
import gzip
import json
import subprocess
import sys

import pytest
import torch

import data
import datafiles
import tokenizer
from conftest import ROOT, shared_path

HH_ROWS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}


@pytest.fixture(scope="module")
def llama3():
    return tokenizer.get_tokenizer(str(shared_path("models", "llama3-tokenizer", "tokenizer.model")))


@pytest.fixture(scope="module")
def byte():
    return tokenizer.get_tokenizer("byte")


# ---------------------------------------------------------------------------------------------------------------------
# chat rendering

def test_llama3_chat_pair_renders_exact_tokens(llama3):
    rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there \n"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No"}]}
    ds = data.tokenize(data.from_records([rec]), llama3, "pairs", max_length=64)
    item = ds.items[0]
    enc = llama3.encode
    assert enc("system") == [9125] and enc("user") == [882] and enc("assistant") == [78191] and enc("\n\n") == [271]
    assert item.prompt == ([128000, 128006, 9125, 128007, 271] + enc("Be brief.") + [128009, 128006, 882, 128007, 271]
                           + enc("Hi there") + [128009, 128006, 78191, 128007, 271])
    assert item.response == enc("Hello!") + [128009] and item.rejected == enc("No") + [128009]
    assert llama3.decode(item.prompt + item.response) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")


# ---------------------------------------------------------------------------------------------------------------------
# the real HH-RLHF splits: parse, split losslessly, every row accounted for

def test_hh_rlhf_splits_lossless_and_accounted():
    paths = {split: shared_path("data", "hh-rlhf", f"{split}-test.jsonl.gz") for split in HH_ROWS}  # skip first,
    shared_path("tiktoken_cache")  # before tiktoken would go to the network for gpt2's files
    gpt2 = tokenizer.get_tokenizer("gpt2")
    for split, rows in HH_ROWS.items():
        path = paths[split]
        raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
        examples = data.read_examples(path)
        assert examples.format == "hh" and len(examples) == len(raw) == rows
        for ex, r in zip(examples, raw):
            assert ex.prompt + ex.chosen == r["chosen"] and ex.prompt + ex.rejected == r["rejected"]
            assert ex.prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" not in ex.chosen[:1]
        ds = data.tokenize(examples, gpt2, "pairs", max_length=512, max_prompt_length=256)
        rep = ds.report
        assert rep["rows"] == rows and rep["examples"] == len(ds) and rep["examples"] + sum(rep["dropped"].values()) \
            == rows
        assert rep["dropped"].get("chosen == rejected", 0) == sum(r["chosen"] == r["rejected"] for r in raw)
        assert rep["tokens"]["sequence"]["max"] <= 512 and rep["tokens"]["prompt"]["max"] <= 256
        whole = [it for it in ds.items if it.response[-1] == gpt2.eos_id and it.rejected[-1] == gpt2.eos_id]
        assert rep["truncated"]["response"] >= len(ds) - len(whole) > 0  # a cut response loses its EOS
        it = whole[0]
        assert it.prompt[0] == gpt2.bos_id and gpt2.decode(it.prompt[1:] + it.response[:-1]).startswith("\n\nHuman:")


# ---------------------------------------------------------------------------------------------------------------------
# formats

FORMAT_CASES = [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "hh",
     data.Pair("\n\nHuman: hi\n\nAssistant:", " yo", " no")),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "score": 3}, "pairs", data.Pair("p", "c", "r")),
    ({"prompt": "p", "completion": "c", "label": False}, "kto", data.Completion("p", "c", False)),
    ({"prompt": "p", "completion": "c"}, "sft", data.Completion("p", "c", None)),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "sft",
     data.Completion([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}], None)),
]


@pytest.mark.parametrize("record,fmt,expected", FORMAT_CASES)
def test_format_detection(record, fmt, expected):
    examples = data.from_records([record])
    assert examples.format == fmt and examples[0] == expected


def test_forced_format_and_files(tmp_path):
    rec = {"prompt": "p", "completion": "c", "label": True}
    assert data.from_records([rec], format="sft")[0] == data.Completion("p", "c", None)
    recs = [r for r, fmt, _ in FORMAT_CASES if fmt == "pairs"] * 3
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    loaded = [data.read_examples(tmp_path / n) for n in ("a.jsonl", "a.jsonl.gz", "a.json")]
    assert loaded[0] == loaded[1] == loaded[2] == [data.Pair("p", "c", "r")] * 3


def test_plain_chat_format_for_other_tokenizers(byte):
    rec = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    item = data.tokenize(data.from_records([rec]), byte, "sft", max_length=64).items[0]
    assert item.prompt == [byte.bos_id] + byte.encode("\n\nHuman: q\n\nAssistant:")
    assert item.response == byte.encode(" a") + [byte.eos_id]


# ---------------------------------------------------------------------------------------------------------------------
# bad input: file, 1-based line and field in the message, never a silent skip

GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
HH = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}).encode()
BAD_CASES = [
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": \n', 2, "malformed JSON"),
    ("a.jsonl", GOOD + b"\n" + GOOD + b'\n{"prompt": "p", "chosen": "c"}\n', 3, "'rejected' is missing"),
    ("a.jsonl", b'{"prompt": "p", "completion": "c", "label": "yes"}\n', 1, "'label' must be bool"),
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}\n', 2, "UTF-8.*'chosen'"),
    ("a.jsonl", GOOD + b'\n\n' + GOOD, 2, "line 2 is blank"),
    ("a.jsonl", GOOD + b'\n' + b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 2, "nested too deeply"),
    ("a.jsonl", b'{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": "c", "label": true}', 2,
     "a record of format kto among records of format sft"),
    ("a.json", b'[' + GOOD + b', ' + GOOD + b', {"prompt": "p", "chosen": "c"}]', 1, r"record \[2\]: .*'rejected'"),
    ("a.json", b'[' + b"[" * 100_000 + b"]" * 100_000 + b']', 1, "nested too deeply"),
    ("a.jsonl", b"", 1, "empty, no records"),
    ("a.jsonl", b'{"prompt": [{"role": "robot", "content": "x"}], "chosen": [], "rejected": []}', 1, r"'prompt'\[0\]"),
    ("a.jsonl", HH + b'\n{"chosen": "Human: hi", "rejected": "Human: yo"}', 2,  # no "\n\nAssistant:" in common
     "a record of format implicit among records of format hh"),
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}', 2,
     "a record of format implicit among records of format pairs"),  # a string prompt beside chats: TRL ignores it
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}', 2,
     "'rejected' must be a string exactly when 'prompt' is"),
    ("a.jsonl", b'[1, 2]', 1, "expected a JSON object, got list"),
    ("a.json", b'[\n' + GOOD + b',\n{"prompt": "p", "chosen": 3, "rejected": "r"}\n]', 3, "'chosen' must be"),
    ("a.json", b'[\n' + GOOD + b',\n' + GOOD + b'\n{"x": 1}]', 4, "malformed JSON"),
    ("a.json", b'[\n' + GOOD + b',\n{"prompt": "p\xc3", "chosen": "c", "rejected": "r"}]', 3, "invalid UTF-8"),
]


GOOD_GZ = gzip.compress(b"".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}).encode() + b"\n"
                                  for i in range(20_000)), mtime=0)
BAD_CASES += [  # a .gz cut short, one with damaged bytes mid-stream, one that is no gzip at all
    ("a.jsonl.gz", GOOD_GZ[:len(GOOD_GZ) // 2], r"\d+", "corrupted gzip data .*EOFError"),
    ("a.jsonl.gz", GOOD_GZ[:len(GOOD_GZ) // 2] + bytes(b ^ 0x55 for b in GOOD_GZ[len(GOOD_GZ) // 2:]), r"\d+",
     "corrupted gzip data"),
    ("a.jsonl.gz", b"not gzip", 1, "corrupted gzip data .*Not a gzipped file"),
]


@pytest.mark.parametrize("name,content,line,message", BAD_CASES, ids=[f"{c[0]}-{c[3]}" for c in BAD_CASES])
def test_bad_input_names_file_line_field(tmp_path, name, content, line, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=rf"^{path}:{line}: .*{message}"):
        data.read_examples(path)


# ---------------------------------------------------------------------------------------------------------------------
# tokenisation policy and report

def test_truncation_and_drops_are_counted(byte):
    recs = [{"prompt": "0123456789", "chosen": "abcdefghij", "rejected": "abcdefghiX"},  # both cuts, then identical
            {"prompt": "0123456789", "chosen": "ab", "rejected": "cd"},  # prompt cut only
            {"prompt": "p", "chosen": "abcdefghijklmn", "rejected": "c"},  # response cut
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "  ", "rejected": "r"},
            {"prompt": "p", "chosen": "c", "rejected": "r"}]
    ds = data.tokenize(data.from_records(recs), byte, "pairs", max_length=12, max_prompt_length=5)
    rep = ds.report
    assert rep["dropped"] == {"chosen == rejected after truncation": 1, "chosen == rejected": 1, "empty response": 1}
    assert rep["truncated"] == {"prompt": 1, "response": 1} and rep["examples"] == 3 == len(ds)
    cut_prompt, cut_response, whole = ds.items
    assert cut_prompt.prompt == [byte.bos_id] + byte.encode("6789")  # BOS + the end of the prompt
    assert cut_response.response == byte.encode("abcdefghij") and cut_response.rejected == byte.encode("c") + [257]
    assert whole.prompt == [256, ord("p")] and whole.response == [ord("c"), 257]
    no_room = data.tokenize(data.from_records(recs[:2]), byte, "pairs", max_length=11)
    assert no_room.report["dropped"] == {"prompt leaves no room for a response": 2} and len(no_room) == 0


def test_collate_pairs_masks_and_padding(byte):
    recs = [{"prompt": "ab", "chosen": "c", "rejected": "defg"}, {"prompt": "h", "chosen": "ij", "rejected": "k"}]
    ds = data.tokenize(data.from_records(recs), byte, "pairs", max_length=32)
    batch = data.collate(ds.items, "pairs", ds.pad_id)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape == mask.shape == (4, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [256, 97, 98, 99, 257, 258, 258, 258] and mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert ids[2].tolist() == [256, 97, 98, 100, 101, 102, 103, 257] and mask[2].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert ids[3].tolist()[:4] == [256, 104, 107, 257] and mask[3].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]


def _parts(ids: torch.Tensor, mask: torch.Tensor, tok) -> list[tuple[str, str]]:
    """(prompt, response) text of each row, split by the loss mask; BOS, EOS and pads dropped."""
    return [(tok.decode([t for t, m in zip(r, k) if not m and t < 256]), tok.decode([t for t, m in zip(r, k) if m
             and t < 256])) for r, k in zip(ids.tolist(), mask.tolist())]


def test_kto_unrolled_pairs_stay_balanced_with_mismatched_kl_rows(byte):
    pairs = [{"prompt": f"p{i}", "chosen": f"G{i}", "rejected": f"B{i}"} for i in range(10)]
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}  # desirable and undesirable at once: both dropped
    ds = data.tokenize(data.from_records(pairs + [same]), byte, "kto", max_length=32)
    assert [it.desirable for it in ds.items[:4]] == [True, False, True, False] and ds.report["desirable"] == 10
    assert ds.report["rows"] == 22 and ds.report["dropped"] == {"chosen == rejected": 2} and len(ds) == 20
    with pytest.raises(ValueError, match="pairs needs paired data"):
        data.tokenize(data.from_records([{"prompt": "p", "completion": "c", "label": True}]), byte, "pairs", 8)
    batches = data.Batches(ds, batch_size=4, micro_batch_size=4, seed=3)
    for _ in range(3 * batches.steps_per_epoch):
        (batch,) = next(batches)
        rows = _parts(batch["input_ids"], batch["loss_mask"], byte)
        kl = _parts(batch["kl_input_ids"], batch["kl_loss_mask"], byte)
        assert batch["desirable"].tolist() == [c.startswith("G") for _, c in rows] and batch["desirable"].sum() == 2
        assert [p for p, _ in kl] == [p for p, _ in rows]  # prompt i ...
        assert [c for _, c in kl] == [c for _, c in rows[1:] + rows[:1]]  # ... with the completion of item i+1
    with pytest.raises(ValueError, match="kto needs batch_size >= 2"):
        data.Batches(ds, batch_size=1, micro_batch_size=1)


# ---------------------------------------------------------------------------------------------------------------------
# batches: world-size invariance, epochs, resume

def _rows(micro_batches: list[dict], key: str = "input_ids") -> list[list[int]]:
    """The unpadded rows of micro batches (byte tokenizer: pad 258 appears nowhere else)."""
    return [[t for t in r if t != 258] for b in micro_batches for r in b[key].tolist()]


def _global_rows(micro_batches: list[dict], kind: str, key: str) -> list[list[int]]:
    """A step's rows in global order: for pairs, every chosen row, then every rejected row."""
    if kind != "pairs":
        return _rows(micro_batches, key)
    halves = [(mb[key][:len(mb[key]) // 2], mb[key][len(mb[key]) // 2:]) for mb in micro_batches]
    return _rows([{key: c} for c, _ in halves], key) + _rows([{key: r} for _, r in halves], key)


@pytest.mark.parametrize("kind", ["pairs", "kto", "sft"])
def test_global_batch_is_the_same_for_any_world_size(byte, kind):
    recs = [{"prompt": f"q{i}", "chosen": "c" * (i % 5 + 1), "rejected": "r" * (i % 3 + 1)} for i in range(37)]
    ds = data.tokenize(data.from_records(recs), byte, kind, max_length=16)
    one = data.Batches(ds, batch_size=8, micro_batch_size=8, seed=1)
    two = [data.Batches(ds, batch_size=8, micro_batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    seen = []
    for _ in range(2 * one.steps_per_epoch + 1):
        single, split = next(one), [mb for b in two for mb in next(b)]
        assert len(single) == 1 and len(split) == 4 and len(single[0]["input_ids"]) == (16 if kind == "pairs" else 8)
        for key in ["input_ids"] + (["kl_input_ids"] if kind == "kto" else []):
            assert _global_rows(split, kind, key) == _global_rows(single, kind, key)
        seen.append(_global_rows(single, kind, "input_ids"))
    assert len({str(s) for s in seen}) == len(seen)  # every step a different global batch


def test_epochs_reshuffle_and_resume_exactly(byte):
    recs = [{"prompt": f"{i}", "completion": "c"} for i in range(20)]
    ds = data.tokenize(data.from_records(recs), byte, "sft", max_length=8)
    b = data.Batches(ds, batch_size=6, micro_batch_size=3, seed=7)
    assert b.steps_per_epoch == 3 and sorted(b.order(0)) == list(range(20)) and b.order(0) != b.order(1)
    assert b.order(0) == data.Batches(ds, batch_size=6, micro_batch_size=3, seed=7).order(0)
    for _ in range(4):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))  # a checkpoint stores it as JSON
    assert state["step"] == 4 and state["epoch"] == 1
    resumed = data.Batches(ds, batch_size=6, micro_batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert _rows(next(b)) == _rows(next(resumed))
    with pytest.raises(ValueError, match="seed changed"):
        data.Batches(ds, batch_size=6, micro_batch_size=3, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple of world_size 2 × micro_batch_size 2"):
        data.Batches(ds, batch_size=6, micro_batch_size=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size 24 is larger than the 20 training examples"):
        data.Batches(ds, batch_size=24, micro_batch_size=3)


def test_eval_split_and_eval_batches(byte):
    recs = [{"prompt": f"{i}", "completion": "c", "label": i % 2 == 0} for i in range(10)]
    train, held = data.split_eval(data.from_records(recs), 4)
    assert len(train) == 6 and held[0].prompt == "0"
    assert (train.format, train.source) == (held.format, held.source) == (held[1:].format, held[1:].source) == \
        ("kto", "<records>")  # a slice of Examples keeps its format and source
    ds = data.tokenize(held, byte, "kto", max_length=8)
    shards = [data.eval_batches(ds, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1] and shards[1][0]["desirable"].tolist() == [False, False]
    assert _rows(shards[0], "kl_input_ids") == [[256, 48, 99, 257], [256, 50, 99, 257]]
    with pytest.raises(ValueError, match="different numbers of micro batches"):
        data.eval_batches(ds, micro_batch_size=1, world_size=3)
    with pytest.raises(ValueError, match="cannot hold out 10"):
        data.split_eval(recs, 10)


def test_cli_summary_accounts_for_every_row(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p" * (i % 4), "completion": "c" * (i % 3), "label": i % 2 == 0})
                            + "\n" for i in range(12)))
    out = subprocess.run([sys.executable, str(ROOT / "data.py"), str(path), "--tokenizer", "byte", "--max_length", "4",
                          "--max_prompt_length", "2"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["format"] == "kto" and report["examples"] + sum(report["dropped"].values()) == 12
    assert report["dropped"] == {"empty response": 4} and report["truncated"] == {"prompt": 4, "response": 3}
    assert "kept 8" in out and report["tokens"]["sequence"]["max"] <= 4


# ---------------------------------------------------------------------------------------------------------------------
# TRL's formats, standard (strings) and conversational (message lists)

def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
# trl-lib/ultrafeedback_binarized-like: whole conversations sharing their user turns, a string prompt beside them (the
# HuggingFaceH4 version), extra columns; the last row has chosen == rejected (a tie)
ULTRAFEEDBACK = [{"prompt": f"q{i}", "prompt_id": f"{i:064x}", "chosen": [user(f"q{i}"), bot(f"good {i}")],
                  "rejected": [user(f"q{i}"), bot(f"bad {i}")], "messages": [user(f"q{i}"), bot(f"good {i}")],
                  "score_chosen": 8.5, "score_rejected": 3.0} for i in range(5)]
ULTRAFEEDBACK[1] = {**ULTRAFEEDBACK[1], "chosen": [SYSTEM, user("a"), bot("b"), user("c"), bot("yes")],
                    "rejected": [SYSTEM, user("a"), bot("b"), user("c"), bot("no")]}
ULTRAFEEDBACK[4] = {**ULTRAFEEDBACK[4], "rejected": ULTRAFEEDBACK[4]["chosen"]}
RECORDS = {  # format -> records: each of TRL's dataset types that trains here, both variants, and HH's transcripts
    "implicit": ULTRAFEEDBACK,
    "pairs": [{"prompt": [SYSTEM, user(f"q{i}")], "chosen": [bot("yes")], "rejected": [bot("no")], "id": i}
              for i in range(3)],
    "kto": [{"prompt": [user(f"q{i}")], "completion": [bot(f"a{i}")], "label": i % 2 == 0} for i in range(4)],
    "sft": [{"messages": [SYSTEM, user(f"q{i}"), bot(f"a{i}")]} for i in range(3)],
    "sft-prompt-completion": [{"prompt": [user(f"q{i}")], "completion": [bot(f"a{i}")]} for i in range(3)],
    "implicit-standard": [{"chosen": f"The sky is {c}.", "rejected": f"The sky is {r}."}
                          for c, r in (("blue", "green"), ("clear", "cloudy"))],
    "pairs-standard": [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "score": 1.0} for i in range(3)],
    "kto-standard": [{"prompt": f"p{i}", "completion": "c", "label": i == 0} for i in range(3)],
    "sft-standard": [{"prompt": f"p{i}", "completion": "c"} for i in range(3)],
    "hh": [{"chosen": f"\n\nHuman: hi {i}\n\nAssistant: yo", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: no"}
           for i in range(3)],
}


def test_implicit_prompt_is_trls_extract_prompt():
    """trl.data_utils.maybe_extract_prompt (dev-only reference) on ultrafeedback-like rows, standard strings, and
    explicit prompts, which it keeps: the same Pair. With a string prompt beside conversations TRL ignores the
    prompt; so do we."""
    trl_data = pytest.importorskip("trl.data_utils", reason="trl is the reference for TRL's implicit prompt")
    odd = [{"chosen": "abc d", "rejected": "abc e"},  # a space before the difference goes to the responses
           {"chosen": "abc", "rejected": "abcd"},  # one a prefix of the other: TRL's loop stops at its last index
           {"chosen": "same", "rejected": "same"}]
    for fmt in ("implicit", "implicit-standard", "pairs", "pairs-standard"):
        records = RECORDS[fmt] + (odd if fmt == "implicit-standard" else [])
        examples = data.from_records(records)
        assert examples.format == fmt.removesuffix("-standard") and len(examples) == len(records)
        for rec, ex in zip(records, examples, strict=True):
            ref = trl_data.maybe_extract_prompt(rec)
            assert ex == data.Pair(ref["prompt"], ref["chosen"], ref["rejected"]), rec
    assert data.from_records(ULTRAFEEDBACK)[1] == data.Pair([SYSTEM, user("a"), bot("b"), user("c")], [bot("yes")],
                                                            [bot("no")])


def test_shared_prefix_length_equals_commonprefix():
    import os
    import random
    rng = random.Random(0)
    for _ in range(5000):
        a, b = ("".join(rng.choice("ab ") for _ in range(rng.randint(0, 12))) for _ in range(2))
        assert data._shared(a, b) == data._shared(b, a) == len(os.path.commonprefix([a, b])), (a, b)


def test_ties_are_dropped_and_counted(byte):
    ds = data.tokenize(data.from_records(ULTRAFEEDBACK), byte, "pairs", max_length=256)
    assert ds.report["dropped"] == {"chosen == rejected": 1} and len(ds) == 4


@pytest.mark.parametrize("record,message", [
    ({"chosen": [user("q"), bot("a"), user("more")], "rejected": [user("q"), bot("a"), user("less")]},
     "the 2 leading message\\(s\\) chosen and rejected share, the prompt, must end with a user turn, not assistant"),
    ({"chosen": [user("q"), bot("a"), user("r"), bot("s")], "rejected": [user("q"), bot("b")]},
     "'chosen' must continue the 1 shared message\\(s\\) with exactly one assistant message, got roles "
     "\\['assistant', 'user', 'assistant'\\]"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("Q"), bot("a")]}, "share no prompt"),
    ({"chosen": "blue", "rejected": "green"}, "share no prompt"),
    ({"chosen": [user("q"), bot("a")], "rejected": "q a"}, "must both be strings or both message lists"),
    ({"chosen": [user("q"), {"role": "assistant", "content": 3}], "rejected": [user("q")]}, r"'chosen'\[1\]"),
])
def test_implicit_prompt_errors_name_the_record(record, message):
    with pytest.raises(data.DataError, match=f"^<records>:2: .*{message}"):
        data.from_records([ULTRAFEEDBACK[0], record])


# ---------------------------------------------------------------------------------------------------------------------
# Parquet: the same records as JSONL, row-numbered errors

def write_parquet(path, records: list[dict], **kwargs):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs the optional pyarrow")
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, **kwargs)
    return path


def write_jsonl(path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if path.name.endswith(".gz") else text.encode())
    return path


@pytest.mark.parametrize("name", RECORDS)
def test_parquet_reads_as_jsonl(tmp_path, name):
    """Every format from Parquet (strings as string columns, chats as list<struct<role, content>>, extra columns of
    any type) gives the same examples as from JSONL."""
    records = RECORDS[name]
    from_parquet = data.read_examples(write_parquet(tmp_path / "d.parquet", records, row_group_size=2))
    from_jsonl = data.read_examples(write_jsonl(tmp_path / "d.jsonl", records))
    assert from_parquet == from_jsonl and len(from_parquet) == len(records)
    assert from_parquet.format == from_jsonl.format == name.split("-")[0]


def test_bad_parquet_names_file_and_row(tmp_path, monkeypatch):
    good = [{"prompt": f"p{i}" * 20, "chosen": f"c{i}" * 30, "rejected": "r"} for i in range(100)]
    path = write_parquet(tmp_path / "a.parquet", good, row_group_size=25)

    def fails(message: str, file=path, **kwargs):
        with pytest.raises(data.DataError, match=f"^{file}{message}"):
            data.read_examples(file, **kwargs)

    raw = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[:len(raw) // 2])
    fails(": not a readable Parquet file \\(Parquet magic bytes not found", tmp_path / "cut.parquet")
    import pyarrow.parquet as pq
    damaged, start = bytearray(raw), pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    damaged[start:start + 40] = bytes(b ^ 0x55 for b in damaged[start:start + 40])  # row group 2's page header
    (tmp_path / "damaged.parquet").write_bytes(damaged)
    fails(r": row \[50\]: corrupted Parquet data in row group 2 \(rows \[50\] to \[74\]\): ",
          tmp_path / "damaged.parquet")
    write_parquet(path, [{"prompt": "p", "chosen": "c"}] * 3)  # no rejected column
    fails(r": row \[0\]: cannot tell the format from the fields \['chosen', 'prompt'\]")
    fails(r": row \[0\]: field 'rejected' is missing", format="pairs")
    write_parquet(path, [{"prompt": "p", "completion": "c", "label": "yes"}])  # a string column, not bool
    fails(r": row \[0\]: field 'label' must be bool, got str")
    write_parquet(path, [{"prompt": "p", "chosen": c, "rejected": "r"} for c in ("c", "c", None)])  # a null
    fails(r": row \[2\]: field 'chosen' must be str or list, got NoneType")
    write_parquet(path, [{"prompt": "p", "chosen": 3, "rejected": 4}])
    fails(r": row \[0\]: field 'chosen' must be str or list, got int")
    write_parquet(path, [{"prompt": [user("q")], "chosen": [{"role": "assistant", "content": 3}],
                          "rejected": [bot("r")]}])
    fails(r": row \[0\]: field 'chosen'\[0\] must be")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)  # no rows
    fails(r": row \[0\]: empty, no records")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import pyarrow raises ImportError
    fails(": reading Parquet needs the optional pyarrow package \\(pip install pyarrow\\)")


# ---------------------------------------------------------------------------------------------------------------------
# dataset directories: Hub snapshots, their splits

def test_hub_snapshot_reads_its_splits_in_shard_order(tmp_path):
    """A Hub parquet snapshot (train_prefs in two shards, test_prefs) and the JSONL-per-split layout of the same
    records give the same examples; `datasets` (dev-only reference) names the same splits and rows."""
    rows = [{**r, "prompt": f"q{i}", "chosen": [user(f"q{i}"), bot(f"good {i}")],
             "rejected": [user(f"q{i}"), bot(f"bad {i}")]} for i, r in enumerate(ULTRAFEEDBACK * 2)]
    hub, flat = tmp_path / "hub", tmp_path / "flat"
    for split, part in (("train_prefs", rows[:7]), ("test_prefs", rows[7:])):
        shards = [part[:4], part[4:]] if split == "train_prefs" else [part]
        for k, shard in enumerate(shards):
            write_parquet(hub / "data" / f"{split}-{k:05d}-of-{len(shards):05d}.parquet", shard)
        write_jsonl(flat / f"{split}.jsonl", part)
    (hub / "README.md").write_text("# a dataset card\n")
    (hub / ".cache" / "huggingface").mkdir(parents=True)
    (hub / ".cache" / "huggingface" / "train_prefs.parquet").write_bytes(b"not parquet: hidden, never read")
    train, test = data.read_examples(hub), data.read_examples(hub, split="test_prefs")
    assert train == data.from_records(rows[:7]) and test == data.from_records(rows[7:]) and train.format == "implicit"
    assert train.source == f"{hub} (split train_prefs: 2 files)"
    assert (train, test) == (data.read_examples(flat), data.read_examples(flat, split="test_prefs"))
    # the Hub cache's layout: snapshots/<commit>/data/<name> are links to blobs/<hash>
    snapshot, blobs = tmp_path / "cache" / "snapshots" / "abc123", tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    for i, f in enumerate(sorted(hub.glob("data/*.parquet"))):
        f.rename(blobs / f"{i:040x}")
        (snapshot / "data").mkdir(parents=True, exist_ok=True)
        (snapshot / "data" / f.name).symlink_to(blobs / f"{i:040x}")
    assert (data.read_examples(snapshot), data.read_examples(snapshot, split="test_prefs")) == (train, test)
    datasets = pytest.importorskip("datasets", reason="datasets is the reference for a snapshot's splits")
    ref = datasets.load_dataset(str(snapshot), cache_dir=str(tmp_path / "datasets_cache"))
    assert sorted(ref) == list(datafiles.splits(snapshot)) == ["test_prefs", "train_prefs"]
    for split, part in (("train_prefs", rows[:7]), ("test_prefs", rows[7:])):
        assert [{k: r[k] for k in ("chosen", "rejected")} for r in ref[split]] == \
            [{k: r[k] for k in ("chosen", "rejected")} for r in part]


def test_hh_layouts_a_split_is_every_subsets_file(tmp_path):
    """Anthropic/hh-rlhf: a folder per subset, a file per split; a split reads every subset, in path order."""
    subsets = {s: [{"chosen": f"\n\nHuman: {s} {i}\n\nAssistant: yo",
                    "rejected": f"\n\nHuman: {s} {i}\n\nAssistant: no"} for i in range(3)]
               for s in ("helpful-base", "harmless-base")}
    for s, recs in subsets.items():
        write_jsonl(tmp_path / s / "train.jsonl.gz", recs)
        write_jsonl(tmp_path / s / "test.jsonl.gz", recs[:1])
    expected = data.from_records(subsets["harmless-base"] + subsets["helpful-base"])
    assert data.read_examples(tmp_path) == expected and expected.format == "hh"
    assert data.read_examples(tmp_path, split="test") == [expected[0], expected[3]]
    assert data.read_examples(tmp_path / "helpful-base") == expected[3:]  # one subset: its folder
    write_jsonl(tmp_path / "other" / "train.jsonl", RECORDS["sft"])  # a split holds one format
    with pytest.raises(data.DataError, match=f"^{tmp_path / 'other' / 'train.jsonl'}:1: a record of format sft among "
                       "records of format hh"):
        data.read_examples(tmp_path)
    datasets = pytest.importorskip("datasets", reason="datasets is the reference for a snapshot's splits")
    (tmp_path / "other" / "train.jsonl").unlink()
    ref = datasets.load_dataset(str(tmp_path), cache_dir=str(tmp_path.parent / "cache"))
    assert [r["chosen"] for r in ref["train"]] == [r["chosen"] for s in sorted(subsets) for r in subsets[s]]


def test_shared_hh_rlhf_directory_test_split():
    """../shared/data/hh-rlhf holds the four subsets' test files (<subset>-test.jsonl.gz): split test is all four."""
    hh = shared_path("data", "hh-rlhf")
    examples = data.read_examples(hh, split="test")
    assert len(examples) == sum(HH_ROWS.values()) and examples.format == "hh"
    assert examples[:HH_ROWS["harmless-base"]] == data.read_examples(hh / "harmless-base-test.jsonl.gz")
    assert examples[-1] == data.read_examples(hh / "helpful-rejection-sampled-test.jsonl.gz")[-1]


# ---------------------------------------------------------------------------------------------------------------------
# python data.py FILE_OR_DIR --show N: what a user checks before a long run

def test_cli_show_prints_the_first_tokenised_examples(tmp_path, capsys, byte):
    hub = tmp_path / "hub"
    write_jsonl(hub / "train_prefs.jsonl", RECORDS["pairs"])
    write_jsonl(hub / "test_prefs.jsonl", ULTRAFEEDBACK)
    assert data.main([str(hub), "--split=test_prefs", "--tokenizer=byte", "--show=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown, report = [json.loads(line) for line in lines[:2]], json.loads(lines[-1])
    assert lines[2].startswith(f"{hub} (split test_prefs: 1 file): 5 rows of format implicit as pairs")
    items = data.tokenize(data.from_records(ULTRAFEEDBACK), byte, "pairs", 1024, 512).items
    for row, it in zip(shown, items[:2], strict=True):
        assert list(row) == ["example", "prompt", "chosen", "rejected", "text"]
        assert (row["prompt"], row["chosen"], row["rejected"]) == (it.prompt, it.response, it.rejected)
        assert row["text"] == {k: byte.decode(row[k]) for k in ("prompt", "chosen", "rejected")}
    assert shown[1]["example"] == 1 and shown[1]["text"] == {
        "prompt": "<|bos|>\n\nSystem: Be brief.\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        "chosen": " yes<|eos|>", "rejected": " no<|eos|>"}
    assert report["rows"] == 5 and report["dropped"] == {"chosen == rejected": 1}
    write_parquet(tmp_path / "kto.parquet", RECORDS["kto-standard"])
    assert data.main([str(tmp_path / "kto.parquet"), "--tokenizer=byte", "--show=5"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:3]]
    assert [(r["example"], r["label"], r["text"]) for r in shown] == [
        (i, i == 0, {"prompt": f"<|bos|>p{i}", "completion": "c<|eos|>"}) for i in range(3)]
    assert data.main([str(hub / "test_prefs.jsonl"), "--split=test_prefs"]) == 2
    assert capsys.readouterr().err == (f"data.py: error: --split=test_prefs: {hub / 'test_prefs.jsonl'} is a file, "
                                       "not a dataset directory\n")
    assert data.main([str(hub), "--split=dev"]) == 2
    assert "no split 'dev'; the splits are test_prefs (1 file), train_prefs (1 file)" in capsys.readouterr().err


@pytest.mark.parametrize("args, culprit", [
    (["{tmp}/missing.jsonl"], "{tmp}/missing.jsonl:1: cannot read (No such file or directory)"),
    (["{tmp}/p.jsonl", "--show=-1"], "--show=-1: need N >= 0 examples"),
    (["{tmp}/p.jsonl", "--show=two"], "argument --show: invalid int value: 'two'"),
    (["{tmp}/p.jsonl", "--tokenizer=nope"], "--tokenizer=nope: unknown tokenizer 'nope'"),
    (["{tmp}/missing.jsonl", "--tokenizer=nope"], "--tokenizer=nope: unknown tokenizer 'nope'"),
    (["{tmp}/p.jsonl", "--tokenizer={tmp}/p.jsonl"], "--tokenizer={tmp}/p.jsonl: {tmp}/p.jsonl:1: expected"),
    (["{tmp}/p.jsonl", "--max_length=1"], "--max_length=1, --max_prompt_length=512: need max_length >= 2 and"),
    (["{tmp}/p.jsonl", "--max_prompt_length=0"], "--max_length=1024, --max_prompt_length=0: need"),
    (["{tmp}/p.jsonl", "--format=csv"], "argument --format: invalid choice: 'csv'"),
    (["{tmp}/p.jsonl", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: path"),
])
def test_cli_refuses_bad_options_and_inputs_in_one_line(tmp_path, capsys, args, culprit):
    """Each in one line, exit status 2 (argparse's refusals too, without its usage block); a bad --tokenizer is
    refused before the data is read."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    args = [a.format(tmp=tmp_path) for a in args]
    byte = [] if any(a.startswith("--tokenizer") for a in args) else ["--tokenizer=byte"]
    try:
        rc = data.main([*args, *byte])
    except SystemExit as e:  # argparse's
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("data.py: error: ") and culprit.format(tmp=tmp_path) in err, err

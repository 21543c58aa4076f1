"""data.py: chat rendering (Llama 3), formats, lossless HH split, truncation/drop accounting, bad input, batches."""
import gzip
import json
import subprocess
import sys

import pytest
import torch

import data
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
BAD_CASES = [
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": \n', 2, "malformed JSON"),
    ("a.jsonl", GOOD + b"\n" + GOOD + b'\n{"prompt": "p", "chosen": "c"}\n', 3, "'rejected' is missing"),
    ("a.jsonl", b'{"prompt": "p", "completion": "c", "label": "yes"}\n', 1, "'label' must be bool"),
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}\n', 2, "UTF-8.*'chosen'"),
    ("a.jsonl", GOOD + b'\n\n' + GOOD, 2, "line 2 is blank"),
    ("a.jsonl", GOOD + b'\n' + b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 2, "nested too deeply"),
    ("a.jsonl", b'{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": "c", "label": true}', 2,
     "a kto record in a file of sft records"),
    ("a.json", b'[' + GOOD + b', ' + GOOD + b', {"prompt": "p", "chosen": "c"}]', 1, r"record \[2\]: .*'rejected'"),
    ("a.json", b'[' + b"[" * 100_000 + b"]" * 100_000 + b']', 1, "nested too deeply"),
    ("a.jsonl", b"", 1, "empty file"),
    ("a.jsonl", b'{"prompt": [{"role": "robot", "content": "x"}], "chosen": [], "rejected": []}', 1, r"'prompt'\[0\]"),
    ("a.jsonl", b'{"chosen": "Human: hi", "rejected": "Human: yo"}', 1, "'chosen'.*Assistant"),
    ("a.jsonl", GOOD + b'\n{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}', 2,
     "'chosen' must be a string exactly when 'prompt' is"),
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

"""llama2.c tokenizers (llama2c.py): ids checked against a reference of llama2.c's encode (run.c), written here from
its algorithm."""
import json
import random
import struct

import pytest

import data
import sentencepiece_bpe as llama2c
import tokenizer
from conftest import shared_path


def read_llama2c(path) -> tuple[list[bytes], list[float]]:
    raw, pieces, scores, at = path.read_bytes(), [], [], 4
    while at < len(raw):
        score, n = struct.unpack_from("<fi", raw, at)
        scores.append(score), pieces.append(raw[at + 8:at + 8 + n])
        at += 8 + n
    return pieces, scores


def llama2c_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's encode without BOS/EOS: the dummy prefix " " as its own token when text is not empty; each character
    its piece if it has one, else its UTF-8 bytes as byte tokens (id 3 + byte); then repeatedly merge the adjacent
    pair whose concatenated strings are the highest-scoring piece (the leftmost one on ties)."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[b" "]] if text else []
    for ch in text:
        b = ch.encode()
        tokens += [lookup[b]] if b in lookup else [3 + x for x in b]
    while True:
        best = None  # (score, position, id)
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i, j)
        if best is None:
            return tokens
        tokens[best[1]:best[1] + 2] = [best[2]]


def write_llama2c(path, pieces: list[bytes], scores: list[float] | None = None):
    """A llama2.c tokenizer.bin: <unk>, BOS, EOS, the 256 byte tokens, then pieces (scores: descending by default)."""
    everything = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + pieces
    scores = [0.0] * 259 + (scores or [-float(i) for i in range(len(pieces))])
    path.write_bytes(struct.pack("<i", max(map(len, everything))) + b"".join(
        struct.pack("<fi", s, len(p)) + p for s, p in zip(scores, everything)))


STORY_CASES = ["Tom has 3 cats and 12 dogs; he was 7 (or 8?) years old!", "Wait... what?! \"No,\" she said - then ran.",
               "Line one.\nLine two.\n\n  Indented\tline", "Café “naïve” résumé – 5€ ™ 日本語 🤖 ñ",
               "", " ", "a", "  leading and trailing  "]


def test_llama2c_stories260K_ids_equal_llama2c_encode():
    model_dir = shared_path("models", "stories260K")
    ref = json.loads((model_dir / "reference.json").read_text())
    tok = tokenizer.get_tokenizer(str(model_dir / "tok512.bin"))
    assert tokenizer.get_tokenizer(str(model_dir)).enc.name == tok.enc.name == "tok512.bin"  # found in the directory
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (512, 1, 2) == (512, ref["bos_id"], ref["eos_id"])
    pieces, scores = read_llama2c(model_dir / "tok512.bin")
    assert tok.encode(ref["greedy_text"]) == ref["greedy_from_bos"][1:] == llama2c_encode(pieces, scores,
                                                                                        ref["greedy_text"])
    for text in STORY_CASES:
        assert tok.encode(text) == llama2c_encode(pieces, scores, text), text
        assert tok.decode(tok.encode(text)) == (" " + text if text else "")  # the dummy prefix is a real space
    rec = {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " it rained."}
    item = data.tokenize(data.from_records([rec]), tok, "pairs", max_length=64).items[0]
    assert item.prompt == [1] + llama2c_encode(pieces, scores, "Once upon a time")  # the prefix starts the sequence
    assert item.response == tok.enc.encode_ordinary(" there was a cat.") + [2]  # a response continues it
    # byte tokens decode to their bytes, also those whose byte has its own piece ("e" is 411, <0x65> is 3 + 0x65)
    assert tok.decode([3 + ord("e"), 411, 3 + 10]) == "ee\n" and tok.decode([3 + 0xC3, 3 + 0xBC]) == "ü"
    assert tok.decode([1, 403, 2]) == "<s> Once</s>" and tok.decode(range(512)).count("<unk>") == 1


def test_llama2c_any_vocabulary_size_matches_the_reference(tmp_path):
    """A small synthetic tokenizer.bin (276 tokens): merges that compete for the same characters, a non-ASCII piece,
    characters without a piece; random strings from that alphabet give llama2.c's ids."""
    merges = [b"ab", b" a", b"bc", b"ca", b" ab", b"abc", b"aa", b"cab", b" c", b"bb", b"abca"]
    chars = [b" ", b"a", b"b", b"c", "é".encode(), "“".encode()]
    write_llama2c(tmp_path / "tokenizer.bin", merges + chars)
    tok = tokenizer.get_tokenizer(str(tmp_path))
    pieces, scores = read_llama2c(tmp_path / "tokenizer.bin")
    assert tok.n_vocab == len(pieces) == 276 and tok.encode("ab") == [259 + 4]  # " ab"
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("aabbc é\nü“") for _ in range(rng.randrange(12)))
        assert tok.encode(text) == llama2c_encode(pieces, scores, text), repr(text)
        assert tok.decode(tok.encode(text)) == (" " + text if text else "")


def test_llama2c_non_ascii_merges_match_the_reference(tmp_path):
    """Llama 2's tokenizer.bin merges non-ASCII characters (" über", "ção", CJK pairs). A synthetic one with 2-, 3- and
    4-byte characters, merges of them with each other and with ASCII, characters that share UTF-8 prefixes with
    pieces but have none themselves, and merges that compete with the characters' own formation."""
    merges = ["éa", " é", "中国", " 中", "aé", "ab", "ção", "ço", " ü", "über", "b中", "🤖a", " 🤖", "ça", " über"]
    chars = [" ", "a", "b", "o", "r", "e", "é", "ü", "ç", "ã", "中", "国", "🤖"]
    write_llama2c(tmp_path / "tokenizer.bin", [m.encode() for m in merges + chars])
    tok = tokenizer.get_tokenizer(str(tmp_path / "tokenizer.bin"))
    pieces, scores = read_llama2c(tmp_path / "tokenizer.bin")
    assert tok.n_vocab == len(pieces) and tok.encode("éa") == [259 + len(merges), 259 + merges.index("éa")]  # " ", "éa"
    rng = random.Random(1)
    alphabet = "aborééüçã中国🤖 ab丢🤯ñ\n"  # 丢 shares 中's first two bytes, 🤯 🤖's first three: neither has a piece
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        assert tok.encode(text) == llama2c_encode(pieces, scores, text), repr(text)
        assert tok.decode(tok.encode(text)) == (" " + text if text else "")
    assert tok.enc.encode_ordinary_batch(["中国", "丢"]) == [tok.enc.encode_ordinary("中国"), [3 + b for b in "丢".encode()]]


def test_llama2c_bad_files_fail_with_the_file_named(tmp_path):
    write_llama2c(tmp_path / "tok.bin", [b"ab", b"a", b"b"])
    good = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-1])
    with pytest.raises(llama2c.Llama2cError, match="cut.bin: byte .*: truncated record of token 261"):
        tokenizer.get_tokenizer(str(tmp_path / "cut.bin"))
    (tmp_path / "x.bin").write_bytes(good.replace(b"<0x41>", b"<0x99>"))
    with pytest.raises(llama2c.Llama2cError, match="x.bin: not a llama2.c tokenizer"):
        tokenizer.get_tokenizer(str(tmp_path / "x.bin"))
    (tmp_path / "tokenizer.bin").write_bytes(good)
    with pytest.raises(ValueError, match="2 llama2.c tokenizers"):
        tokenizer.get_tokenizer(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no tokenizer in this directory"):
        tokenizer.get_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing.bin: cannot read"):
        tokenizer.get_tokenizer(str(tmp_path / "missing.bin"))

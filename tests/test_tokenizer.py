"""tokenizer.py and sentencepiece_bpe.py: every kind of tokenizer as a tiktoken Encoding, its ids checked against an
independent reference: tokenizers (a dev dependency) on the real tokenizer.json files in ../shared/models and on small
ones trained here for each supported component; llama2.c's encode (run.c, written here from its algorithm) on the .bin
files; golden ids for Llama 3's tokenizer.model. Then the refusals, and --tokenizer=auto."""
import json
import random
import struct

import pytest

import config
import sentencepiece_bpe
import tokenizer
from conftest import shared_path

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# the texts: curated cases (Unicode, digits, whitespace runs, code, contractions) and random strings

CURATED = [
    "Hello world!", "The quick brown fox jumps over the lazy dog.", "", " ", "  ", "\n", "\t", "a", " a", "a ",
    "  leading and trailing  ", "tabs\tand\t\ttabs", "line one\nline two\n\n\nthree\r\nfour\r\n", "trailing newline\n",
    "I'm sure it's what they've said: we'll see, you'd know, I'd've, she's, they're, it'S, WE'LL, don't", "O'Neil's",
    "12345 3.14159 1,000,000 2024-01-31 0x1F 007 ½ ² ٣ 一二三", "a1b22c333d4444", "   12", "x  1", "1 2  3   4",
    "日本語のテキストです。中文文本，还有标点！", "한국어 텍스트", "🤖🎉👍🏽👨‍👩‍👧 emoji 🇫🇷", "café naïve résumé coöperate",
    "e\u0301 Å a\u030a n\u0303 \u1e9b\u0323", "ﬁ ﬂ Ⅸ ① ｆｕｌｌ", "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n", "if (a != b && c <= d) { x += 1; }",
    "print('hello, world')", "    indented code", "x=[1,2,3]\ny={'k': \"v\"}", "$ ls -la | grep *.py > out.txt 2>&1",
    "Wait... what?! \"No,\" she said - then ran.", "—–― … «» „“ ‘’ ¿¡", "<html><body>é</body></html>",
    "\u2581word \u2581\u2581 ▁▁x", "zero\u200bwidth\u200djoiner", "\x00\x01\x04\x06\x7f control",
    "ideographic\u3000space",
    "https://example.com/path?q=1&r=2#frag", "CamelCaseWord snake_case_word kebab-case-word", "ALL CAPS SHOUTING",
    " " * 40 + "forty spaces", "\n\n\n\n\n\n", " \n \n ", "a\u00a0b", "tab\t\t\tthen  spaces  \t \n",
]
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCXYZ") * 3 + list("0123456789") * 2 + [" "] * 20 + list("\t\n\r")
            + list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + list("éüñçàÅøßœ") + ["e\u0301", "a\u0308", "\u0301"]
            + list("日本語中文字漢한국") + ["🤖", "🎉", "👍🏽", "😀"] + ["'s", "'t", "'re", "'ll", "n't"]
            + list("½²٣①ﬁＡ") + ["\u00a0", "\u3000"])
WORDS = "the of and to in is you that it he was for on are as with his they I at be this have from or one had".split()


def texts(n_random: int = 400, seed: int = 0) -> list[str]:
    """The curated strings, then random ones: characters of a mixed alphabet, and runs of words and separators."""
    rng = random.Random(seed)
    out = list(CURATED)
    for i in range(n_random):
        if i % 2:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))))
        else:
            out.append("".join(rng.choice(WORDS) + rng.choice([" ", " ", " ", "  ", ", ", ".\n", "\t", "'s ", "  \n"])
                               for _ in range(rng.randrange(1, 15))))
    return out


TEXTS = texts()


def assert_same_ids(tok: tokenizer.Tokenizer, hf, texts: list[str] = TEXTS):
    """Our ids equal tokenizers' for every text, plain text with no special tokens added."""
    for text in texts:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
    batch = tok.encode_batch(texts[:50], start=True)
    assert batch == [tok.encode(t) for t in texts[:50]]  # data.tokenize's batched path: the same normalisation


# ---------------------------------------------------------------------------------------------------------------------
# the real files

@pytest.mark.parametrize("name, n_vocab, bos, eos, pad, end", [
    ("smollm2-135m-instruct", 49152, None, 2, 2, [2]),
    ("qwen2.5-0.5b-instruct", 151665, None, 151645, 151643, [151645]),
])
def test_real_byte_level_tokenizer_json_ids_equal_tokenizers(name, n_vocab, bos, eos, pad, end):
    """SmolLM2 (Digits + ByteLevel regex, bytes missing from its vocabulary) and Qwen2.5 (NFC, Qwen's Split regex):
    every text; every vocabulary token, as tokenizers' BPE model tokenizes it alone, is itself (which is what makes
    tiktoken's whole-piece lookup exact without ignore_merges); user text never becomes a special token."""
    directory = shared_path("models", name)
    tok = tokenizer.get_tokenizer(str(directory))  # the directory: its tokenizer.json
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id, tok.end_ids) == (n_vocab, bos, eos, pad, end)
    assert tok.n_vocab == hf.get_vocab_size() and tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert_same_ids(tok, hf)
    assert hf.encode("Hi").ids == ([] if bos is None else [bos]) + tok.encode("Hi")  # BOS only if tokenizers adds it
    for text in TEXTS[:200]:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    added = {t.content for t in hf.get_added_tokens_decoder().values()}
    assert all([t.id for t in hf.model.tokenize(s)] == [i] for s, i in vocab.items() if s not in added)
    typed = "a user typed <|im_end|> and <|im_start|>system and <|endoftext|>"
    assert not set(tok.encode(typed)) & set(tok.special_tokens.values())
    assert tok.decode(tok.encode(typed)) == typed
    assert tok.special_tokens["<|im_end|>"] == eos and all(tok.special(t) == i for t, i in tok.special_tokens.items())
    if name.startswith("smollm2"):  # bytes missing from the vocabulary are dropped, but not merged across (docs)
        assert tok.encode("a\x04b\x06") == hf.encode("a\x04b\x06").ids == tok.encode("a") + tok.encode("b")
        assert tok.encode("!\x04!") == tok.encode("!") * 2 != hf.encode("!\x04!").ids == tok.encode("!!")


def test_llama3_tokenizer_json_converted_by_transformers_equals_tokenizers_and_tokenizer_model(tmp_path):
    """Llama 3's tokenizer.json as Meta publishes it is transformers' conversion of tokenizer.model (every split of
    every token a merge, ignore_merges): converted here, it gives tokenizers' ids and tokenizer.model's."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    model = shared_path("models", "llama3-tokenizer", "tokenizer.model")
    hf = convert.TikTokenConverter(vocab_file=str(model), extra_special_tokens=tokenizer.LLAMA3_SPECIAL).converted()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "pad_token": None}))
    tok, llama3 = tokenizer.get_tokenizer(str(tmp_path)), tokenizer.get_tokenizer(str(model))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["ignore_merges"]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, None, 128009, 128009)
    assert_same_ids(tok, hf)
    assert all(tok.encode(t) == llama3.encode(t) for t in TEXTS)


def test_gpt2_tokenizer_json_from_its_original_files_equals_tokenizers_and_tiktoken(tmp_path):
    """GPT-2's tokenizer.json as Hugging Face publishes it (encoder.json as the vocabulary, vocab.bpe's merges,
    ByteLevel with GPT-2's regex), built here from OpenAI's files in the tiktoken cache: tokenizers' ids and tiktoken's
    own gpt2 encoding's."""
    cache = shared_path("tiktoken_cache")
    vocab = json.loads((cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_text())  # encoder.json
    merges = [tuple(line.split()) for line in (cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_text(
        encoding="utf-8").splitlines()[1:] if line]  # vocab.bpe after its "#version" line
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok, gpt2 = tokenizer.get_tokenizer(str(tmp_path)), tokenizer.get_tokenizer("gpt2")
    assert (len(merges), tok.n_vocab, tok.bos_id, tok.eos_id) == (50000, 50257, None, 50256)
    assert_same_ids(tok, hf)
    assert all(tok.encode(t) == gpt2.encode(t) for t in TEXTS)


def test_real_sentencepiece_tokenizer_json_ids_equal_tokenizers():
    """Mistral 7B Instruct's tokenizer.json (Metaspace with prepend_scheme first, byte fallback, 32,000 pieces) in
    sentencepiece_bpe's rank space: the same ids as tokenizers; BOS <s> as its post-processor adds it."""
    directory = shared_path("models", "mistral-7b-instruct-v0.1")
    tok = tokenizer.get_tokenizer(str(directory / "tokenizer.json"))
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id, tok.end_ids) == (32000, 1, 2, 2, [2])
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>") and "[INST]" in tok.chat_template
    assert not tok.prefix_every_segment  # prepend_scheme "first": only the text that starts the input
    assert_same_ids(tok, hf)
    assert hf.encode("Hi").ids == [tok.bos_id] + tok.encode("Hi")
    for text in TEXTS:
        assert tok.decode(tok.encode(text)).replace("\u2581", " ") == (text if text[:1] in ("", " ", "\u2581") else
                                                                       " " + text).replace("\u2581", " ")
    assert 2 not in tok.encode("</s>") and tok.decode(tok.encode("</s>")) == " </s>"  # text stays text


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


def test_llama2_tokenizer_bin_ids_equal_llama2c_encode():
    """llama2.c's tokenizer.bin of Llama 2 (32,000 pieces; its 15 runs of spaces share the score -1e9, and they come
    first in the file): run.c's ids on every text, and on runs of 1-70 spaces (the ties)."""
    path = shared_path("models", "llama2c-llama2-tokenizer", "tokenizer.bin")
    tok = tokenizer.get_tokenizer(str(path))
    pieces, scores = read_llama2c(path)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.end_ids) == (32000, 1, 2, [2])
    for text in TEXTS[:300] + [" " * n for n in range(1, 70)] + [f"a{' ' * n}b" for n in range(1, 40)]:
        ids = tok.encode(text)
        assert ids == llama2c_encode(pieces, scores, text), repr(text)
        assert tok.decode(ids) == (" " + text if text else "")


STORY_CASES = ["Tom has 3 cats and 12 dogs; he was 7 (or 8?) years old!", "Wait... what?! \"No,\" she said - then ran.",
               "Line one.\nLine two.\n\n  Indented\tline", "Café “naïve” résumé – 5€ ™ 日本語 🤖 ñ",
               "", " ", "a", "  leading and trailing  "]


def test_llama2c_stories260K_ids_equal_llama2c_encode():
    import data
    model_dir = shared_path("models", "stories260K")
    ref = json.loads((model_dir / "reference.json").read_text())
    tok = tokenizer.get_tokenizer(str(model_dir / "tok512.bin"))
    assert tokenizer.get_tokenizer(str(model_dir)).enc.name == tok.enc.name == "tok512.bin"  # found in the directory
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (512, 1, 2) == (512, ref["bos_id"], ref["eos_id"])
    pieces, scores = read_llama2c(model_dir / "tok512.bin")
    assert tok.encode(ref["greedy_text"]) == ref["greedy_from_bos"][1:] == llama2c_encode(pieces, scores,
                                                                                        ref["greedy_text"])
    for text in STORY_CASES + TEXTS[:100]:
        assert tok.encode(text) == llama2c_encode(pieces, scores, text), text
        assert tok.decode(tok.encode(text)) == (" " + text if text else "")  # the dummy prefix is a real space
    rec = {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " it rained."}
    item = data.tokenize(data.from_records([rec]), tok, "pairs", max_length=64).items[0]
    assert item.prompt == [1] + llama2c_encode(pieces, scores, "Once upon a time")  # the prefix starts the sequence
    assert item.response == tok.encode(" there was a cat.", start=False) + [2]  # a response continues it
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


def test_llama2c_scores_in_any_order_and_ties_match_the_reference(tmp_path):
    """run.c picks the best score wherever the piece is in the file: merges written in shuffled order, some with
    equal scores (runs of one character, as Llama 2's spaces), give run.c's ids."""
    merges = [b"ab", b"ba", b"aa", b"aaa", b"aaaa", b"  ", b"   ", b"    ", b" a", b"bab", b"abab"]
    scores = [-3.0, -1.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0, -2.0, -4.0, -5.0]
    chars = [b" ", b"a", b"b"]
    order = list(range(len(merges)))
    random.Random(2).shuffle(order)
    write_llama2c(tmp_path / "tokenizer.bin", [merges[i] for i in order] + chars,
                  [scores[i] for i in order] + [-20.0] * len(chars))
    tok = tokenizer.get_tokenizer(str(tmp_path / "tokenizer.bin"))
    pieces, scores_read = read_llama2c(tmp_path / "tokenizer.bin")
    rng = random.Random(3)
    for _ in range(1000):
        text = "".join(rng.choice("aab  ") for _ in range(rng.randrange(16)))
        assert tok.encode(text) == llama2c_encode(pieces, scores_read, text), repr(text)


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
    assert tok.encode_batch(["中国", "丢"]) == [tok.encode("中国", start=False), [3 + b for b in "丢".encode()]]


def test_llama2c_bad_files_fail_with_the_file_named(tmp_path):
    write_llama2c(tmp_path / "tok.bin", [b"ab", b"a", b"b"])
    good = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-1])
    with pytest.raises(sentencepiece_bpe.Llama2cError, match="cut.bin: byte .*: truncated record of token 261"):
        tokenizer.get_tokenizer(str(tmp_path / "cut.bin"))
    (tmp_path / "x.bin").write_bytes(good.replace(b"<0x41>", b"<0x99>"))
    with pytest.raises(sentencepiece_bpe.Llama2cError, match="x.bin: not a llama2.c tokenizer"):
        tokenizer.get_tokenizer(str(tmp_path / "x.bin"))
    (tmp_path / "tokenizer.bin").write_bytes(good)
    with pytest.raises(ValueError, match="2 llama2.c tokenizers"):
        tokenizer.get_tokenizer(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no tokenizer in this directory"):
        tokenizer.get_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing.bin: cannot read"):
        tokenizer.get_tokenizer(str(tmp_path / "missing.bin"))


# ---------------------------------------------------------------------------------------------------------------------
# Llama 3's tokenizer.model, the byte tokenizer, tiktoken's named encodings

def test_llama3_golden_ids_and_specials():
    llama3 = tokenizer.get_tokenizer(str(shared_path("models", "llama3-tokenizer", "tokenizer.model")))
    assert [llama3.bos_id] + llama3.encode("This is a test sentence.") + [llama3.eos_id] == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.n_vocab == 128256 and (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    assert [llama3.special(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == \
        [128006, 128007, 128009]
    assert llama3.special("<|reserved_special_token_250|>") == 128255 and llama3.end_ids == [128001, 128009]
    typed = "a user typed <|eot_id|> and <|begin_of_text|>"
    ids = llama3.encode(typed)
    assert max(ids) < 128000 and llama3.decode(ids) == typed  # text stays text


def test_byte_tokenizer():
    byte = tokenizer.get_tokenizer("byte")
    text = "héllo 🤖 <|eos|>"
    assert byte.encode(text) == list(text.encode()) and byte.decode(byte.encode(text)) == text
    assert (byte.n_vocab, byte.bos_id, byte.eos_id, byte.pad_id, byte.end_ids) == (259, 256, 257, 258, [257])
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        tokenizer.get_tokenizer("nope")
    with pytest.raises(tokenizer.TokenizerError, match="no special token '<x>'"):
        byte.special("<x>")


def test_named_tiktoken_encodings():
    shared_path("tiktoken_cache")
    for name in ("gpt2", "r50k_base", "cl100k_base", "o200k_base"):
        tok = tokenizer.get_tokenizer(name)
        assert tok.bos_id == tok.eos_id == tok.special("<|endoftext|>") and tok.decode(tok.encode("Hi <|x|>")) == \
            "Hi <|x|>"
    assert tokenizer.get_tokenizer("gpt2").encode("<|endoftext|>") != [50256]


# ---------------------------------------------------------------------------------------------------------------------
# synthetic tokenizer.json files, trained here with tokenizers, one for each supported component

CORPUS = texts(300, seed=7) + ["The cat sat on the mat. It's 2024 and they've 365 days; we'll count 1234567."] * 20


def byte_level(tmp_path, pre_tokenizer, normalizer=None, vocab_size=600, edit=None, config=None) -> tuple:
    """Train a byte-level BPE with tokenizers; write tokenizer.json (edited by edit(json)) and tokenizer_config.json;
    return (our Tokenizer, tokenizers' Tokenizer of the same file)."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizer, decoders.ByteLevel()
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|eos|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return write_pair(tmp_path, json.loads(hf.to_str()), edit, config or {"eos_token": "<|eos|>"})


def write_pair(tmp_path, tj: dict, edit, config: dict) -> tuple:
    if edit:
        edit(tj)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return (tokenizer.get_tokenizer(str(tmp_path / "tokenizer.json")),
            tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")))


SPLIT = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's


def permute_merged_ids(tj):
    """Reverse the ids of the merged tokens: they no longer grow in merge order (no longer tiktoken's ranks)."""
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    merged = sorted({vocab["".join(m)] for m in merges})
    back = dict(zip(merged, reversed(merged)))
    tj["model"]["vocab"] = {t: back.get(i, i) for t, i in vocab.items()}


def drop_bytes(tj):
    """Take four byte tokens (and every merge using them) out of the vocabulary: tokenizers drops those bytes."""
    gone = {c for c, b in tokenizer.bytes_to_unicode().items() if b in (0x04, 0x06, ord("~"), 0xF5)}
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if not set(t) & gone}
    tj["model"]["vocab"] = {t: k for k, t in enumerate(sorted(vocab, key=vocab.get))}
    tj["model"]["merges"] = [m for m in tj["model"]["merges"] if not set("".join(m)) & gone]
    for t in tj["added_tokens"]:
        t["id"] = tj["model"]["vocab"][t["content"]]


@pytest.mark.parametrize("kind", ["gpt2 regex", "digits", "split", "split nfc", "split nfkc", "ignore_merges",
                                  "ids not in merge order", "bytes missing", "bytes missing, ids not in merge order"])
def test_synthetic_byte_level_components_equal_tokenizers(tmp_path, kind):
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(SPLIT, behavior="isolated"), level])
    pre, normalizer, edit = {
        "gpt2 regex": (pre_tokenizers.ByteLevel(add_prefix_space=False), None, None),
        "digits": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False)]), None, None),
        "split": (split, None, None),
        "split nfc": (split, normalizers.NFC(), None),
        "split nfkc": (split, normalizers.NFKC(), None),
        "ignore_merges": (split, None, lambda tj: tj["model"].update(ignore_merges=True)),
        "ids not in merge order": (split, None, permute_merged_ids),
        "bytes missing": (split, None, drop_bytes),
        "bytes missing, ids not in merge order": (split, None, lambda tj: (drop_bytes(tj), permute_merged_ids(tj))),
    }[kind]
    tok, hf = byte_level(tmp_path, pre, normalizer, edit=edit)
    assert tok.bos_id is None and tok.eos_id == 0 and tok.n_vocab == hf.get_vocab_size()
    assert isinstance(tok.enc, sentencepiece_bpe.RankSpaceEncoding) == ("merge order" in kind)
    assert tok.decode(tok.encode("a\x04b~")) == ("ab" if "missing" in kind else "a\x04b~")
    assert_same_ids(tok, hf, [t for t in TEXTS if "missing" not in kind or not any(  # see the SmolLM2 test
        c in t for c in "\x04\x06~")] + (["a\x04b\x06", "~ 4 ~"] if "missing" in kind else []))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == hf.decode(tok.encode(text), skip_special_tokens=False)
    if "nf" in kind:  # the normalisation changes these texts: without it the ids would differ
        changed = [t for t in TEXTS if hf.normalizer.normalize_str(t) != t]
        assert len(changed) > 10 and any(tok.enc.encode_ordinary(t) != tok.encode(t) for t in changed)


def sentencepiece_style(tmp_path, normalized: str, edit=None) -> tuple:
    """Train a sentencepiece-style BPE (Metaspace, byte fallback, a limited alphabet so that byte fallback happens),
    then lay its vocabulary out as Llama 2's and Mistral's: <unk>, <s>, </s>, <0x00>..<0xFF>, the pieces."""
    hf = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                                       limit_alphabet=70, show_progress=False))
    tj = json.loads(hf.to_str())
    pieces = sorted((i, t) for t, i in tj["model"]["vocab"].items() if i >= 3)
    tj["model"]["vocab"] = ({"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
                            | {t: 259 + k for k, (_, t) in enumerate(pieces)})
    tj["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]).__getstate__())
    if normalized == "prepend":  # older Llama 2 / TinyLlama files: the normalizers do what Metaspace does
        tj["normalizer"] = json.loads(normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                            normalizers.Replace(" ", "\u2581")]).__getstate__())
        tj["pre_tokenizer"] = None
    elif normalized == "always":
        tj["pre_tokenizer"]["prepend_scheme"] = "always"
    return write_pair(tmp_path, tj, edit, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None})


@pytest.mark.parametrize("normalized", ["metaspace", "always", "prepend"])
def test_synthetic_sentencepiece_style_equals_tokenizers(tmp_path, normalized):
    tok, hf = sentencepiece_style(tmp_path, normalized)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_vocab) == (1, 2, 2, hf.get_vocab_size())
    assert tok.prefix_every_segment == (normalized != "metaspace")
    assert_same_ids(tok, hf)
    assert any(3 <= i < 259 for t in TEXTS for i in tok.encode(t))  # byte fallback happened
    assert hf.encode("hello there").ids == [1] + tok.encode("hello there")


def test_refusals_name_the_file_and_the_component(tmp_path):
    """What the conversion cannot reproduce exactly is refused in one line naming the file and the component."""
    def refused(match: str, pre=None, normalizer=None, edit=None, config=None):
        with pytest.raises(tokenizer.TokenizerError, match=match) as e:
            byte_level(tmp_path, pre or pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer, 300, edit,
                       config)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)

    for model in (models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), models.Unigram([("a", -1.0)]),
                  models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")):
        (tmp_path / "tokenizer.json").write_text(tokenizers.Tokenizer(model).to_str())
        with pytest.raises(tokenizer.TokenizerError, match=f"tokenizer.json: model {type(model).__name__}: only BPE"):
            tokenizer.get_tokenizer(str(tmp_path / "tokenizer.json"))
    refused("normalizer Lowercase: only one of NFC", normalizer=normalizers.Lowercase())
    refused("normalizer NFD\\+StripAccents", normalizer=normalizers.Sequence([normalizers.NFD(),
                                                                           normalizers.StripAccents()]))
    refused("pre_tokenizer BertPreTokenizer: a BPE model needs", pre=pre_tokenizers.BertPreTokenizer())
    refused("pre_tokenizer Whitespace\\+ByteLevel: supported", pre=pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    refused("pre_tokenizer ByteLevel add_prefix_space=true", pre=pre_tokenizers.ByteLevel(add_prefix_space=True))
    refused("pre_tokenizer Split behavior=Removed", pre=pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel(False, use_regex=False)]))
    refused("model option dropout=0.1", edit=lambda tj: tj["model"].update(dropout=0.1))
    refused("model option continuing_subword_prefix='##'",
            edit=lambda tj: tj["model"].update(continuing_subword_prefix="##"))
    refused("post_processor BertProcessing", edit=lambda tj: tj.update(post_processor=json.loads(
        processors.BertProcessing(("<|eos|>", 0), ("<|im_end|>", 1)).__getstate__())))
    refused("token 'zzzq': 1 token\\(s\\) neither a byte nor made by a merge",
            edit=lambda tj: tj["model"]["vocab"].update(zzzq=len(tj["model"]["vocab"])))
    refused("no eos_token in .*tokenizer_config.json", config={"bos_token": "<|eos|>"})
    refused("eos_token '<x>' is not an added token", config={"eos_token": "<x>"})
    with pytest.raises(tokenizer.TokenizerError, match="model option byte_fallback=false"):
        sentencepiece_style(tmp_path, "metaspace", edit=lambda tj: tj["model"].update(byte_fallback=False))
    with pytest.raises(tokenizer.TokenizerError, match="pre_tokenizer Metaspace"):
        sentencepiece_style(tmp_path, "metaspace", edit=lambda tj: tj["pre_tokenizer"].update(split=True))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.json: line 1: Expecting property name"):
        tokenizer.get_tokenizer(str(tmp_path))


def test_chat_template_sources_and_end_ids(tmp_path):
    """chat_template: tokenizer_config.json's string, its list's "default", or chat_template.jinja; end_ids: EOS, the
    template's end-of-turn token, generation_config.json's eos_token_id (an int or a list)."""
    conf = {"eos_token": {"content": "<|eos|>"}, "pad_token": "<|im_end|>", "chat_template": "{{ '<|im_end|>' }}"}
    tok, _ = byte_level(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), config=conf)
    assert (tok.eos_id, tok.pad_id, tok.end_ids, tok.chat_template) == (0, 1, [0, 1], "{{ '<|im_end|>' }}")
    conf["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = tokenizer.get_tokenizer(str(tmp_path))
    assert (tok.chat_template, tok.end_ids) == ("y", [0])
    del conf["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    tok = tokenizer.get_tokenizer(str(tmp_path))
    assert (tok.chat_template, tok.end_ids) == ("{{ messages }}<|im_end|>", [0, 1, 5])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert tokenizer.get_tokenizer(str(tmp_path)).end_ids == [0, 1, 7]


def test_auto_tokenizer_takes_the_model_directorys_own(tmp_path):
    """--tokenizer=auto: the model directory's tokenizer.json, then a llama2.c tok*.bin, then the one its run recorded;
    a directory with none of these is a one-line error (never the byte tokenizer in silence); byte from scratch."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    auto = lambda: config.auto_tokenizer(config.TrainConfig(init_from=str(model)))  # noqa: E731
    with pytest.raises(ValueError, match="model: no tokenizer.json, llama2.c tok\\*.bin or train_config.json"):
        auto()
    with pytest.raises(config.ConfigError):
        config.parse_config([f"--init_from={model}", "--data=x.jsonl"], world_size=1)
    (model / "train_config.json").write_text(json.dumps({"tokenizer": "gpt2"}))
    assert auto() == "gpt2"
    write_llama2c(model / "tok512.bin", [b"ab", b"a", b"b"])
    assert auto() == str(model / "tok512.bin")
    (model / "tokenizer.json").write_text("{}")
    assert auto() == str(model / "tokenizer.json")
    assert config.auto_tokenizer(config.TrainConfig()) == "byte"  # from scratch
    assert config.auto_tokenizer(config.TrainConfig(init_from=str(model), tokenizer="gpt2")) == "gpt2"


def test_data_tokenize_normalizes_and_keeps_no_bos_when_there_is_none():
    """data.tokenize encodes through the Tokenizer: Qwen's NFC applies (the decomposed é becomes the composed one's
    ids), no BOS is invented, and a cut prompt keeps its end."""
    import data
    tok = tokenizer.get_tokenizer(str(shared_path("models", "qwen2.5-0.5b-instruct")))
    rec = {"prompt": "Cafe\u0301 " * 20 + "end", "chosen": " re\u0301sume\u0301", "rejected": " no"}
    item = data.tokenize(data.from_records([rec]), tok, "pairs", max_length=64).items[0]
    assert item.prompt == tok.encode("Café " * 20 + "end") != tok.enc.encode_ordinary(rec["prompt"])
    assert item.response == tok.encode(" résumé", start=False) + [tok.eos_id]
    cut = data.tokenize(data.from_records([rec]), tok, "pairs", max_length=64, max_prompt_length=5).items[0]
    assert cut.prompt == item.prompt[-5:]
    empty = data.tokenize(data.from_records([rec, {**rec, "prompt": ""}]), tok, "pairs", max_length=64)
    assert len(empty.items) == 1 and empty.report["dropped"] == {"empty prompt and no BOS": 1}

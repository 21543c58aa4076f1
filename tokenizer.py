"""Tokenizers: every kind becomes a tiktoken Encoding, wrapped in a Tokenizer that knows the ids the pipeline needs
(BOS, EOS, pad, the ids that end a response) and how a chat is rendered.

    get_tokenizer('byte' | tiktoken name | tokenizer.json | Llama 3 tokenizer.model | llama2.c tok*.bin | model dir)
        ──► Tokenizer

Text is always encoded as plain text (encode_ordinary), so a user who types "<|eot_id|>" gets the characters, never
the control token: special tokens come only from code (BOS, EOS) or a chat template's own markup (chat.py renders
chat templates).
"""
import base64
import re
import unicodedata
from pathlib import Path
from typing import Iterable

import regex
import tiktoken

import chat
import inputs
import sentencepiece_bpe


class TokenizerError(ValueError):
    """A bad tokenizer file; the message names the file (and the line or token)."""


LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 in all, ids 128000..128255
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}  # the plain chat format is HH's


class Tokenizer:
    """A tiktoken Encoding plus what the pipeline needs: bos_id (put before a sequence when the tokenizer's own
    post-processor does so; None when it does not, as Qwen's), eos_id (ends a response), pad_id (masked out of every
    loss), end_ids (the ids that end a response: EOS, the chat template's end of turn, generation_config.json's
    eos_token_id), special_tokens (name -> id: the added tokens, encodable only by code and templates), chat_template
    (the jinja source, or None: the plain HH format), bos_token / eos_token / pad_token (their strings, the
    template's variables).

    Text is normalized (Qwen's NFC) and, for sentencepiece-style tokenizers, given the dummy prefix " " when it starts
    a sequence, before tiktoken encodes it: every encode goes through encode / encode_batch so neither is skipped.
    prefix_every_segment: the prefix also starts a text that follows a special token (a chat template's rendering:
    tokenizers' Prepend normalizer, Metaspace "always"), not only the sequence's first text."""

    def __init__(self, enc: tiktoken.Encoding, bos: str | None, eos: str, pad: str | None = None, prefix: str = "",
                 normalize: str | None = None, chat_template: str | None = None, end: Iterable[int] = (),
                 n_vocab: int | None = None, bos_token: str | None = None,
                 unk_token: str | None = None, prefix_every_segment: bool = False):
        self.enc, self.name, self.chat_template = enc, enc.name, chat_template
        # the model's ids; a byte-level rank space may hold a few more (bytes the vocabulary lacks), which encode drops
        self.n_vocab = n_vocab or enc.n_vocab
        self.special_tokens = dict(enc._special_tokens)
        # the template's variables: bos_token even if never added (SmolLM2's), unk_token only from tokenizer_config
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token or bos, eos, pad, unk_token
        self.bos_id = None if bos is None else self.special(bos)
        self.eos_id = self.special(eos)
        self.pad_id = self.eos_id if pad is None else self.special(pad)  # pads are never seen: masked, right-padded
        self.end_ids = list(dict.fromkeys([self.eos_id, *end]))
        # prefix: "" (none), "always" (llama2.c: " " before any text that starts a sequence) or "unless space"
        # (Metaspace: " " unless the text starts with one); normalize: a unicodedata form, "metaspace" or None
        self.prefix, self.normalize = prefix, normalize
        self.prefix_every_segment = prefix_every_segment

    def _text(self, text: str, start: bool = False) -> str:
        if self.normalize in NORMALIZERS:
            text = unicodedata.normalize(self.normalize, text)
        elif self.normalize == "metaspace":  # tokenizers reads sentencepiece's ▁ as the space it stands for
            text = text.replace("\u2581", " ")
        if start and text and (self.prefix == "always" or self.prefix == "unless space" and text[0] != " "):
            text = " " + text
        return text

    def _ids(self, ids: list[int]) -> list[int]:
        # ids past the model's vocabulary: bytes the vocabulary lacks (tokenizers drops them too)
        if self.enc.n_vocab <= self.n_vocab or not ids or max(ids) < self.n_vocab:
            return ids
        return [i for i in ids if i < self.n_vocab]

    def encode(self, text: str, start: bool = True) -> list[int]:
        """The text as plain text (never a special token); start: it starts a sequence (after BOS, if any), which
        gives it a sentencepiece tokenizer's dummy prefix."""
        return self._ids(self.enc.encode_ordinary(self._text(text, start)))

    def encode_batch(self, texts: list[str], start: bool = False) -> list[list[int]]:
        """encode for many texts; start=False: they continue a sequence. One call each: tiktoken's threaded
        encode_ordinary_batch costs a thread-pool future per text, more than encoding a short chat segment costs."""
        return [self.encode(t, start) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def special(self, token: str) -> int:
        if token not in self.special_tokens:
            raise TokenizerError(f"tokenizer {self.name}: no special token {token!r}")
        return self.special_tokens[token]

    def ids(self, *segments: list) -> list[list[int]]:
        """Token ids of render's segment lists: text encoded as text continuing the sequence (render has put the
        dummy prefix where it goes), special ids as they are."""
        texts = iter(self.encode_batch([s for seg in segments for s in seg if isinstance(s, str)]))
        return [[i for s in seg for i in (next(texts) if isinstance(s, str) else (s,))] for seg in segments]

    def render(self, prompt: str | list, responses: Iterable = ()) -> list[list]:
        """[prompt segments, segments of each response]: a segment is text (str, encoded as text) or a special id
        (int). A string prompt is raw text after BOS and a string response ends with EOS. Chat messages go through
        the chat template (chat.render_chat) or, without one, the plain HH format: "\\n\\nHuman: ..\\n\\nAssistant:"
        after BOS and the response " content" EOS."""
        bos = [] if self.bos_id is None else [self.bos_id]
        if isinstance(prompt, str):
            return [[*bos, self.with_prefix(prompt)], *([r, self.eos_id] for r in responses)]
        if self.chat_template is not None:
            return chat.render_chat(self, prompt, responses)
        text = "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in prompt) + "\n\nAssistant:"
        return [[*bos, self.with_prefix(text)], *([" " + r[0]["content"], self.eos_id] for r in responses)]

    def with_prefix(self, text: str) -> str:
        """text with the dummy prefix a sequence's first text gets (render's segments are encoded with start=False)."""
        return self._text(text, start=True) if self.prefix else text


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'byte' (built in, no file), a tiktoken encoding name (gpt2, r50k_base, cl100k_base, o200k_base; their
    <|endoftext|> serves as BOS, EOS and pad), or a path: a Hugging Face tokenizer.json (tokenizer_config.json and
    generation_config.json beside it are read too), a llama2.c tokenizer .bin, a Llama 3 tokenizer.model, or a model
    directory holding a tokenizer.json (preferred) or a llama2.c tok*.bin."""
    if name_or_path == "byte":  # 256 byte tokens and no merges: for offline demos and tests
        specials = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}
        enc = tiktoken.Encoding("byte", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                special_tokens=specials)
        return Tokenizer(enc, *specials)
    if name_or_path in tiktoken.list_encoding_names():
        try:
            enc = tiktoken.get_encoding(name_or_path)
        except Exception as e:  # tiktoken downloads its files on first use: say where they are looked for
            raise RuntimeError(f"tiktoken could not load {name_or_path!r} ({type(e).__name__}); offline, point "
                               f"TIKTOKEN_CACHE_DIR at a directory holding its files (e.g. ../shared/tiktoken_cache)")
        return Tokenizer(enc, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    path = Path(name_or_path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise ValueError(f"{path}: no tokenizer in this directory (tokenizer.json or a llama2.c tok*.bin)")
        path = found
    if path.suffix == ".json":
        return tokenizer_json(path)
    if path.suffix == ".bin":
        enc, bos, eos = sentencepiece_bpe.llama2c_encoding(path)
        return Tokenizer(enc, bos, eos, prefix="always")  # run.c's dummy prefix: " " before any text
    if not path.is_file():
        if path.exists():  # a FIFO or a device: named as such
            inputs.check_regular(path, TokenizerError)
        raise ValueError(f"unknown tokenizer {name_or_path!r}: 'byte', one of {tiktoken.list_encoding_names()}, "
                         "the path of a tokenizer.json, a llama2.c tokenizer .bin, a Llama 3 tokenizer.model, or a "
                         "model directory holding one")
    ranks, tokens = {}, {}  # tiktoken's BPE file: "<base64 token> <rank>" per line; not read through its URL cache
    for line_no, line in enumerate(inputs.read_text(path, inputs.TOKENIZER_LIMIT, TokenizerError).splitlines(), 1):
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{line_no}: expected '<base64 token> <rank>' ({e})") from None
        if token in ranks or rank in tokens or rank < 0:  # ranks are ids: one token each, or decoding loses text
            raise TokenizerError(f"{path}:{line_no}: token {token!r} rank {rank}: each token and each rank (>= 0) "
                                 f"must appear once")
        ranks[token], tokens[rank] = rank, token
    special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=special)
    return Tokenizer(enc, "<|begin_of_text|>", "<|end_of_text|>", chat_template=chat.LLAMA3_CHAT_TEMPLATE,
                     end=[special["<|eot_id|>"]])


def find_tokenizer(directory: str | Path) -> Path | None:
    """A model directory's own tokenizer: its tokenizer.json, else a llama2.c tok*.bin, else None."""
    if (Path(directory) / "tokenizer.json").is_file():
        return Path(directory) / "tokenizer.json"
    return sentencepiece_bpe.find_llama2c(directory)


def tokenizer_files(name: str) -> dict[str, Path]:
    """The files a checkpoint copies to carry its tokenizer: a tokenizer.json with the configs beside it (transformers
    and --tokenizer=auto find them there); none for the other kinds (train_config.json records their name or path)."""
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix != ".json" or not path.is_file():
        return {}
    beside = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja", "special_tokens_map.json")
    return {"tokenizer.json": path} | {f: path.parent / f for f in beside if (path.parent / f).is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json. Two kinds of BPE model are converted, and everything else is refused in one line:
#   byte-level (GPT-2, Llama 3, Qwen, SmolLM2): text split by the pre-tokenizer's regex, each piece's UTF-8 bytes
#     merged. tiktoken does exactly this, so the regex becomes pat_str and the merges the ranks: the tokens are
#     written in GPT-2's byte-to-unicode alphabet (mapped back to bytes), and a token's rank is the position of the
#     first merge that makes it. When the ids grow in merge order (all real files) the id is the rank; otherwise
#     sentencepiece_bpe's rank space maps ranks to ids. tokenizers merges the adjacent *pair* listed first in the
#     merges, tiktoken the adjacent pair whose concatenation has the lowest rank (and takes a piece that is itself a
#     token whole): the same on BPE as trained, checked against tokenizers on the real files in the tests.
#   sentencepiece-style (Llama 2, TinyLlama, Mistral: Metaspace or the Prepend/Replace normalizers, byte fallback):
#     the pieces in sentencepiece_bpe's rank space, the merges list giving the priority.

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) before GPT-2's regex: every digit is a piece of its own, and the text between digits is
# split by GPT-2's regex as if it ended there (so a run of spaces before a digit stays whole)
GPT2_DIGITS_PAT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}  # unicodedata.normalize's forms
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")  # chat templates' ends


def bytes_to_unicode() -> dict[str, int]:
    """GPT-2's alphabet: each byte as a printable character (the byte itself when printable, else 256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + n): b for n, b in enumerate(moved)}


def _read_json(path: Path, limit: int = inputs.JSON_LIMIT) -> dict:
    """A JSON object from a regular file of at most limit bytes (inputs.read_json), or TokenizerError naming it."""
    return inputs.read_json(path, limit, TokenizerError)


def _check_tokenizer_json(path: Path, tj: dict):
    """The shape tokenizer_json reads, as tokenizers' own parser requires it: a BPE model's vocab (token -> id, every
    id once: two tokens with one id lose text when decoded), merges of two tokens each, added tokens with content and
    id, and each normalizer / pre-tokenizer / post-processor an object with a type. TokenizerError naming the key."""
    def bad(key: str, want: str, value):
        raise TokenizerError(f"{path}: {key} must be {want}, got {inputs.shown(value)}")

    def component(spec, key: str, where: str):
        if spec is None:
            return
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            bad(where, "null or an object with a 'type'", spec)
        if spec["type"] == "Sequence":
            parts = spec.get(key)
            if not isinstance(parts, list):
                bad(f"{where}.{key}", "a list", parts)
            for i, part in enumerate(parts):
                component(part, key, f"{where}.{key}[{i}]")
        if spec["type"] == "Split" and not (isinstance(spec.get("pattern"), dict) and len(spec["pattern"]) == 1 and
                                            isinstance(next(iter(spec["pattern"].items()))[1], str)
                                            and next(iter(spec["pattern"])) in ("Regex", "String")):
            bad(f"{where}.pattern", "{\"Regex\": str} or {\"String\": str}", spec.get("pattern"))
        if spec["type"] == "TemplateProcessing":
            single = spec.get("single")
            def part(x) -> bool:  # {"Sequence": {...}} ($A) or {"SpecialToken": {"id": "<s>", ...}}
                return isinstance(x, dict) and ("Sequence" in x or isinstance(x.get("SpecialToken"), dict)
                                                and isinstance(x["SpecialToken"].get("id"), str))
            if not isinstance(single, list) or not all(part(x) for x in single):
                bad(f"{where}.single", "a list of {\"SpecialToken\": {\"id\": str}} and {\"Sequence\": ...}",
                    single)

    model = tj.get("model")
    if not isinstance(model, dict):
        bad("model", "an object", model)
    if model.get("type") != "BPE":  # refused by tokenizer_json, naming the model type
        return
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        bad("model.vocab", "an object of token -> id", vocab)
    holder = {}
    for token, i in vocab.items():
        if not inputs.NATURAL[0](i):
            bad(f"model.vocab[{inputs.shown(token)}]", "an id (an integer >= 0)", i)
        if i in holder:
            raise TokenizerError(f"{path}: model.vocab: tokens {inputs.shown(holder[i])} and {inputs.shown(token)} "
                                 f"have the same id {i} (each id must be one token's, or decoding loses text)")
        holder[i] = token
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        bad("model.merges", "a list", merges)
    for k, m in enumerate(merges):
        if not (isinstance(m, str) and len(m.split(" ")) == 2
                or isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)):
            bad(f"model.merges[{k}]", "\"a b\" or [\"a\", \"b\"] (two tokens)", m)
    added = tj.get("added_tokens") or []
    if not isinstance(added, list):
        bad("added_tokens", "a list", added)
    seen = {}
    for k, t in enumerate(added):
        if not (isinstance(t, dict) and isinstance(t.get("content"), str) and inputs.NATURAL[0](t.get("id"))):
            bad(f"added_tokens[{k}]", "an object with content (a string) and id (an integer >= 0)", t)
        other = seen.get(t["id"], holder.get(t["id"], t["content"]))
        if other != t["content"] or seen.get(t["content"], t["id"]) != t["id"]:
            raise TokenizerError(f"{path}: added_tokens[{k}] {inputs.shown(t['content'])} id {t['id']}: each id "
                                 f"must be one token's and each token have one id")
        seen[t["id"]], seen[t["content"]] = t["content"], t["id"]
    for key, parts in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers"),
                       ("post_processor", "processors")):
        component(tj.get(key), parts, key)


def _check_split_regex(path: Path, pat: str):
    """Refuse a pre-tokenizer split regex that can match the empty string: tokenizers skips empty matches, tiktoken
    drops the text after one ('ab' encodes as 'a') or panics. Tried on sample texts with the regex module (the syntax
    tiktoken's engine reads); a pattern it cannot compile is left to tiktoken's own refusal."""
    try:
        compiled = regex.compile(pat)
    except regex.error:
        return
    for text in EMPTY_MATCH_PROBES:
        if any(m.start() == m.end() for m in compiled.finditer(text)):
            raise TokenizerError(f"{path}: pre_tokenizer Split pattern {inputs.shown(pat)} can match the empty string "
                                 f"(in {text!r}): tiktoken would drop text; tokenizers' split regexes never match it")


EMPTY_MATCH_PROBES = ("", "a", "ab", " ", "a b!", "12 345", "\n", "\t x\n\n  y", "é ü", "it's", "A.B,c;d")


def _token(value) -> str | None:
    """tokenizer_config.json's token fields: a string or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_json(path: Path) -> Tokenizer:
    """A Hugging Face tokenizer.json with the tokenizer_config.json (BOS, EOS, pad, chat template), chat_template.jinja
    and generation_config.json (eos_token_id) beside it, as a Tokenizer whose ids are tokenizers' own."""
    tj = _read_json(path, inputs.TOKENIZER_LIMIT)
    _check_tokenizer_json(path, tj)
    model = tj["model"]

    def refuse(component: str, why: str = "not supported"):
        raise TokenizerError(f"{path}: {component}: {why}")

    if model.get("type") != "BPE":
        refuse(f"model {model.get('type')}", "only BPE models are converted (WordPiece, Unigram, WordLevel are not)")
    for option, ok in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                       ("end_of_word_suffix", (None, ""))):
        if model.get(option) not in ok:
            refuse(f"model option {option}={model[option]!r}")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
    normalizers = _components(tj.get("normalizer"), "normalizers")
    pre = _components(tj.get("pre_tokenizer"), "pretokenizers")
    sentencepiece_style = (any(p["type"] == "Metaspace" for p in pre)
                           or any(n["type"] in ("Prepend", "Replace") for n in normalizers))
    if sentencepiece_style:
        enc, prefix, every = _sentencepiece_json(path, model, normalizers, pre, added, refuse)
        normalize = "metaspace"
    else:
        enc, normalize = _byte_level_json(path, model, normalizers, pre, added, refuse)
        prefix, every = "", False
    bos = _post_processor_bos(tj.get("post_processor"), refuse)
    config_path = path.parent / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    token = (lambda v: v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str),
             "null, a string or an object with a content string")
    templates = (lambda v: v is None or isinstance(v, str) or isinstance(v, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in v),
        "null, a string or a list of {\"name\": str, \"template\": str}")
    inputs.check_fields(config, {"bos_token": token, "eos_token": token, "pad_token": token, "unk_token": token,
                                 "chat_template": templates}, config_path, TokenizerError)
    eos, pad = _token(config.get("eos_token")), _token(config.get("pad_token"))
    if eos is None:
        raise TokenizerError(f"{path}: no eos_token in {config_path} (the token that ends a response)")
    for name, token in (("eos_token", eos), ("pad_token", pad), ("the post-processor's BOS", bos)):
        if token is not None and token not in added:
            raise TokenizerError(f"{config_path}: {name} {token!r} is not an added token of {path}")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one, which transformers requires
        names = [t["name"] for t in template]
        if "default" not in names:
            raise TokenizerError(f"{config_path}: chat_template lists the templates {names} but none named 'default' "
                                 f"(transformers refuses such a list too): name one 'default'")
        template = next(t["template"] for t in template if t["name"] == "default")
    if template is None and (jinja := path.parent / "chat_template.jinja").exists():
        template = inputs.read_text(jinja, inputs.JSON_LIMIT, TokenizerError)
    end = [added[t] for t in END_OF_TURN if t in added and template and t in template]
    gen_path = path.parent / "generation_config.json"
    if gen_path.exists():
        gen = _read_json(gen_path)
        inputs.check_fields(gen, {"eos_token_id": inputs.nullable(inputs.TOKEN_IDS)}, gen_path, TokenizerError)
        ids = gen.get("eos_token_id")
        end += [ids] if isinstance(ids, int) else list(ids or [])
    n_vocab = max([*model["vocab"].values(), *added.values()]) + 1
    return Tokenizer(enc, bos, eos, pad, prefix=prefix, normalize=normalize, chat_template=template, end=end,
                     n_vocab=n_vocab, bos_token=_token(config.get("bos_token")),
                     unk_token=_token(config.get("unk_token")), prefix_every_segment=every)


def _components(spec: dict | None, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer spec as a flat list (a Sequence's parts)."""
    if spec is None:
        return []
    return [c for part in spec[key] for c in _components(part, key)] if spec["type"] == "Sequence" else [spec]


def _normalize_form(normalizers: list[dict], refuse) -> str | None:
    forms = [n["type"] for n in normalizers]
    if any(f not in NORMALIZERS for f in forms) or len(forms) > 1:
        refuse(f"normalizer {'+'.join(forms)}", "only one of NFC, NFD, NFKC, NFKD is applied (others change the "
                                               "text in ways tiktoken cannot)")
    return forms[0] if forms else None


def _byte_level_json(path: Path, model: dict, normalizers: list[dict], pre: list[dict], added: dict, refuse):
    """Byte-level BPE: (tiktoken Encoding, normalization form). Bytes the vocabulary lacks get ranks past every id,
    which Tokenizer.encode drops (its n_vocab)."""
    normalize = _normalize_form(normalizers, refuse)
    types = [p["type"] for p in pre]
    level = pre[-1] if types and types[-1] == "ByteLevel" else None
    if level is None:
        refuse(f"pre_tokenizer {'+'.join(types) or 'none'}", "a BPE model needs the ByteLevel pre-tokenizer "
                                                                "(byte-level) or Metaspace (sentencepiece-style)")
    if level.get("add_prefix_space"):
        refuse("pre_tokenizer ByteLevel add_prefix_space=true")
    if types == ["ByteLevel"] and level.get("use_regex", True):
        pat = GPT2_PAT
    elif types == ["Digits", "ByteLevel"] and pre[0].get("individual_digits") and level.get("use_regex", True):
        pat = GPT2_DIGITS_PAT
    elif types == ["Split", "ByteLevel"] and not level.get("use_regex", True):
        split = pre[0]
        if split.get("behavior") != "Isolated" or split.get("invert"):
            refuse(f"pre_tokenizer Split behavior={split.get('behavior')} invert={split.get('invert')}",
                   "only Isolated, not inverted (tiktoken's split)")
        pattern = split["pattern"]
        pat = pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"])
        _check_split_regex(path, pat)
    else:
        refuse(f"pre_tokenizer {'+'.join(types)}", "supported: ByteLevel, Digits(individual_digits)+ByteLevel, "
                                                   "Split(regex)+ByteLevel(use_regex=false)")
    if model.get("byte_fallback"):
        refuse("model option byte_fallback=true with a ByteLevel pre-tokenizer")
    alphabet = bytes_to_unicode()
    to_latin1 = str.maketrans({c: chr(b) for c, b in alphabet.items()})
    foreign = re.compile("[^" + re.escape("".join(alphabet)) + "]")

    def as_bytes(token: str) -> bytes:
        if bad := foreign.search(token):
            raise TokenizerError(f"{path}: token {token!r}: {bad[0]!r} is not in the byte-level alphabet")
        return token.translate(to_latin1).encode("latin-1")

    added_ids = set(added.values())
    vocab = {t: i for t, i in model["vocab"].items() if i not in added_ids}
    merged = _first_merges(path, model, vocab.get)  # id -> the position of the first merge giving it
    if unreachable := [t for t, i in vocab.items() if len(t) > 1 and i not in merged]:
        refuse(f"token {unreachable[0]!r}", f"{len(unreachable)} token(s) neither a byte nor made by a merge "
                                            "(tiktoken could make them, tokenizers does not)")
    token_bytes = {i: as_bytes(t) for t, i in vocab.items()}
    byte_id = {v[0]: i for i, v in token_bytes.items() if len(v) == 1}
    # bytes the vocabulary lacks (SmolLM2: a few control characters) are dropped, as tokenizers drops them
    missing = [b for b in range(256) if b not in byte_id]
    order = sorted(merged, key=merged.get)  # the merged ids by priority
    try:
        if all(x < y for x, y in zip(order, order[1:])):  # the ids grow in merge order: they serve as the ranks
            ranks = {token_bytes[i]: i for i in vocab.values()}
            if missing:  # ranks past every id, which Tokenizer.encode drops
                past = max([*ranks.values(), *added.values()]) + 1
                ranks |= {bytes([b]): past + k for k, b in enumerate(missing)}
            enc = tiktoken.Encoding(str(path), pat_str=pat, mergeable_ranks=ranks, special_tokens=added)
        else:  # sentencepiece_bpe's rank space: the 256 bytes, then the merges in order, each mapped to its id
            id_bytes = _id_bytes(model, added, token_bytes)
            ranks = {bytes([b]): b for b in range(256)} | {token_bytes[i]: 256 + k for k, i in enumerate(order)}
            rank_ids = [[byte_id[b]] if b in byte_id else [] for b in range(256)] + [[i] for i in order]
            enc = sentencepiece_bpe.RankSpaceEncoding(str(path), ranks, rank_ids, id_bytes, added, pat_str=pat)
    except ValueError as e:
        refuse(f"pre_tokenizer regex {pat!r}", f"tiktoken's regex engine rejects it ({e})")
    return enc, normalize


def _sentencepiece_json(path: Path, model: dict, normalizers: list[dict], pre: list[dict], added: dict, refuse):
    """Sentencepiece-style BPE: (RankSpaceEncoding, the dummy prefix rule, whether a text after a special token gets
    it too: Tokenizer.prefix_every_segment). Two spellings of sentencepiece's normalisation are read: the Metaspace
    pre-tokenizer (" " -> ▁, and ▁ before the text unless it starts with one) or the normalizers Prepend(▁) +
    Replace(" ", ▁) (▁ before any text). The pieces are stored with " " for ▁, as llama2.c's are."""
    norm = [(n["type"], n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
            for n in normalizers]
    if pre == [] and norm == [("Prepend", "\u2581", None, None), ("Replace", None, " ", "\u2581")]:
        prefix, every = "always", True  # a normalizer: every text tokenizers normalizes, after a special token too
    elif len(pre) == 1 and not normalizers and pre[0].get("replacement") == "\u2581" and not pre[0].get("split"):
        scheme = pre[0].get("prepend_scheme") or ("always" if pre[0].get("add_prefix_space", True) else "never")
        prefix, every = ("" if scheme == "never" else "unless space"), scheme == "always"
    else:
        refuse(f"normalizer {'+'.join(n[0] for n in norm) or 'none'} with pre_tokenizer "
               f"{'+'.join(p['type'] for p in pre) or 'none'}", "sentencepiece-style BPE is read as Metaspace(▁, "
               "split=false) alone, or the normalizers Prepend(▁) + Replace(' ', ▁) with no pre-tokenizer")
    if not model.get("byte_fallback"):
        refuse("model option byte_fallback=false", "sentencepiece-style BPE is read with byte fallback only")

    def as_text(token: str) -> bytes:
        return token.replace("\u2581", " ").encode()

    added_ids = set(added.values())
    byte_ids, pieces = [None] * 256, {}
    for token, i in model["vocab"].items():
        if i in added_ids:
            continue
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            byte_ids[int(token[3:5], 16)] = i
        elif (text := as_text(token)) in pieces:
            raise TokenizerError(f"{path}: tokens {token!r} and {pieces[text]} are the same text")
        else:
            pieces[text] = i
    if None in byte_ids:
        refuse(f"byte fallback without the token <0x{byte_ids.index(None):02X}>")
    merges = _first_merges(path, model, lambda t: as_text(t) if as_text(t) in pieces else None)  # in merge order
    tokens = {i: text for text, i in pieces.items()} | {i: bytes([b]) for b, i in enumerate(byte_ids)}
    id_bytes = _id_bytes(model, added, tokens)
    return sentencepiece_bpe.rank_space(str(path), id_bytes, byte_ids, pieces, list(merges), added), prefix, every


def _first_merges(path: Path, model: dict, made) -> dict:
    """What each of the model's merges makes (made(a + b): the token's id or text; None if it is not in the vocabulary,
    a broken file) -> the position of its first merge, in merge order (a later merge making it too never applies)."""
    first = {}
    for k, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge  # "a b" or ["a", "b"]
        if missing := [t for t in (a, b) if t not in model["vocab"]]:  # tokenizers refuses these too
            raise TokenizerError(f"{path}: merge {k} {a!r} {b!r}: {missing[0]!r} is not in the vocabulary")
        if (token := made(a + b)) is None:
            raise TokenizerError(f"{path}: merge {k} {a!r} {b!r}: {a + b!r} is not in the vocabulary")
        first.setdefault(token, k)
    return first


def _id_bytes(model: dict, added: dict[str, int], tokens: dict[int, bytes]) -> list[bytes]:
    """Each id's bytes, for decoding: the vocabulary's tokens (id -> bytes), then the added tokens' text."""
    id_bytes = [b""] * (max([*model["vocab"].values(), *added.values()]) + 1)
    for i, b in [*tokens.items(), *((i, t.encode()) for t, i in added.items())]:
        id_bytes[i] = b
    return id_bytes


def _post_processor_bos(spec: dict | None, refuse) -> str | None:
    """The special token tokenizers puts before a text (TemplateProcessing's single: [<s>, $A]), or None. Tokens it
    puts after the text are not added: a prompt is followed by its response, and a response ends with EOS here."""
    if spec is None or spec["type"] == "ByteLevel":  # ByteLevel: offsets only
        return None
    if spec["type"] == "Sequence":
        found = [b for p in spec["processors"] if (b := _post_processor_bos(p, refuse)) is not None]
        return found[0] if found else None
    if spec["type"] != "TemplateProcessing":
        refuse(f"post_processor {spec['type']}")
    before = []
    for part in spec["single"]:
        if "Sequence" in part:
            break
        before.append(part["SpecialToken"]["id"])
    if len(before) > 1:
        refuse(f"post_processor TemplateProcessing {before} before the text", "one BOS at most")
    return before[0] if before else None

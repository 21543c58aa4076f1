"""Tokenizers: every kind becomes a tiktoken Encoding, wrapped in a Tokenizer that knows the ids the pipeline needs
(BOS, EOS, pad, the ids that end a response) and how a chat is rendered.

    get_tokenizer('byte' | tiktoken name | Llama 3 tokenizer.model | llama2.c tok*.bin | model directory) ──► Tokenizer

Text is always encoded as plain text (encode_ordinary), so a user who types "<|eot_id|>" gets the characters, never
the control token: special tokens come only from code (BOS, EOS) or a chat format's own markup.
"""
import base64
from pathlib import Path
from typing import Iterable

import tiktoken

import llama2c


class TokenizerError(ValueError):
    """A bad tokenizer file; the message names the file (and the line or token)."""



LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 in all, ids 128000..128255
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}  # the plain chat format is HH's


class Tokenizer:
    """A tiktoken Encoding plus the ids the pipeline needs: every sequence starts with bos_id, a response ends with
    eos_id (Llama 3 chat responses with <|eot_id|>), pads are pad_id (masked out of every loss)."""

    def __init__(self, enc: tiktoken.Encoding, bos: str, eos: str, pad: str, chat: str = "plain", prefix: str = ""):
        self.enc, self.name, self.n_vocab, self.chat = enc, enc.name, enc.n_vocab, chat
        self.bos_id, self.eos_id, self.pad_id = (enc.encode_single_token(t) for t in (bos, eos, pad))
        self.prefix = prefix  # sentencepiece's dummy prefix: " " before the text that starts a sequence

    def encode(self, text: str) -> list[int]:
        """The text as the start of a sequence (after BOS): with the dummy prefix, if any, when text is not empty."""
        return self.enc.encode_ordinary(self.prefix + text if text else text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def special(self, token: str) -> int:
        return self.enc.encode_single_token(token)

    def render(self, x, response: bool) -> list:
        """A prompt or response (a string, or chat messages) as segments: str (encoded as text) or int (special id).
        Llama 3 chat: <|begin_of_text|> then per message
        <|start_header_id|>role<|end_header_id|>"\\n\\n" content.strip()
        <|eot_id|>, the prompt ending with the assistant header; the response is content.strip() <|eot_id|>.
        Plain chat (other tokenizers): HH-style text "\\n\\nHuman: ..\\n\\nAssistant:" and the response " content"."""
        if isinstance(x, str):
            return [x, self.eos_id] if response else [self.bos_id, self.prefix + x]
        if self.chat == "llama3":
            if response:
                return [x[0]["content"].strip(), self.special("<|eot_id|>")]
            segs = [self.bos_id]
            for m in [*x, {"role": "assistant", "content": None}]:
                segs += [self.special("<|start_header_id|>"), m["role"], self.special("<|end_header_id|>"), "\n\n"]
                if m["content"] is not None:
                    segs += [m["content"].strip(), self.special("<|eot_id|>")]
            return segs
        if response:
            return [" " + x[0]["content"], self.eos_id]
        return [self.bos_id, self.prefix + "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in x)
                + "\n\nAssistant:"]


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'byte' (built in, no file), a tiktoken encoding name (gpt2, r50k_base, cl100k_base, o200k_base; their
    <|endoftext|> serves as BOS, EOS and pad), the path of a Llama 3 tokenizer.model, or a llama2.c tokenizer: its
    .bin file or a model directory holding one (llama2c_tokenizer)."""
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
    if path.suffix == ".bin" or path.is_dir():
        enc, bos, eos = llama2c.llama2c_encoding(path)
        # pad: EOS (what pads hold never matters: right padding, causal attention, loss_mask 0)
        return Tokenizer(enc, bos, eos, eos, prefix=" ")
    if not path.is_file():
        raise ValueError(f"unknown tokenizer {name_or_path!r}: 'byte', one of {tiktoken.list_encoding_names()}, "
                         "the path of a Llama 3 tokenizer.model, or a llama2.c tokenizer .bin (or its directory)")
    ranks = {}  # tiktoken's BPE file: "<base64 token> <rank>" per line; read here, not through tiktoken's URL cache
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{line_no}: expected '<base64 token> <rank>' ({e})") from None
    special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=special)
    # pad: end_of_text (what pads hold never matters: right padding, causal attention, loss_mask 0)
    return Tokenizer(enc, "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", chat="llama3")


def response_end_ids(tok) -> list[int]:
    """The ids that end a response in tokenize (generation stops on them): EOS, and Llama 3 chat's <|eot_id|>."""
    return [tok.eos_id] + ([tok.special("<|eot_id|>")] if getattr(tok, "chat", "") == "llama3" else [])

"""Sentencepiece-style BPE in a tiktoken rank space: one mechanism for llama2.c's tokenizer.bin (stories260K's tok512,
Llama 2's 32,000 pieces) and Hugging Face tokenizer.json files of that kind (Llama 2, TinyLlama, Mistral: Metaspace,
byte fallback). tokenizer.get_tokenizer reads the files' other parts and builds a Tokenizer around the Encoding.

Sentencepiece's encode: the text (with its dummy prefix " ", added by the caller) split into characters, each its own
piece or else its UTF-8 bytes as byte tokens (<0x00>..<0xFF>, which never merge); then the adjacent pair whose
concatenation is the highest-priority piece is merged, the leftmost one on ties, until no pair is a piece. The priority
is llama2.c's score (run.c: the best-scoring piece) or the order of tokenizer.json's merges list."""
import struct
from pathlib import Path

import tiktoken

import inputs


class Llama2cError(ValueError):
    """A bad tokenizer.bin; the message names the file and the token."""


class RankSpaceEncoding(tiktoken.Encoding):
    """Sentencepiece BPE as tiktoken's BPE, in a rank space of its own, with the model's ids outside it.

    tiktoken merges from bytes, lowest rank first; sentencepiece starts from characters. So the ranks are: the 256
    bytes; then every non-ASCII character that has a piece, built from its bytes through its UTF-8 prefixes, so that
    all characters exist before any merge happens; then the merges by priority. Each rank maps to model ids
    (rank_ids): a byte to its character's piece or its byte token, a character or a merge to its piece, and a prefix
    left over (a character with no piece) to its byte tokens. The special tokens take the ranks after those, each
    mapped to its id. Decoding reads the pieces by id, byte tokens included. (tokenizer.py also puts a byte-level BPE
    whose ids do not grow in merge order in a rank space: its pat_str splits the text, and a byte the vocabulary lacks
    maps to no id.)"""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], rank_ids: list[list[int]], id_bytes: list[bytes],
                 specials: dict[str, int], pat_str: str = r"[\s\S]+"):
        rank_specials = {t: len(rank_ids) + k for k, t in enumerate(specials)}
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=rank_specials)
        self.rank_ids, self.id_bytes = rank_ids + [[i] for i in specials.values()], id_bytes
        self._special_tokens = dict(specials)  # what callers read: the specials under the model's ids
        self.max_token_value = len(id_bytes) - 1  # n_vocab: the model's vocabulary, not the rank space

    def _ids(self, ranks: list[int]) -> list[int]:
        return [i for r in ranks for i in self.rank_ids[r]]

    def encode_ordinary(self, text: str) -> list[int]:  # (tiktoken's batch and with-specials paths call these two)
        return self._ids(super().encode_ordinary(text))

    def encode(self, text: str, **kwargs) -> list[int]:
        return self._ids(super().encode(text, **kwargs))

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        (token,) = self.rank_ids[super().encode_single_token(text_or_bytes)]
        return token

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.id_bytes[token]

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self.id_bytes[t] for t in tokens)

    def decode(self, tokens: list[int], errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


def rank_space(name: str, id_bytes: list[bytes], byte_ids: list[int], pieces: dict[bytes, int], merges: list[bytes],
               specials: dict[str, int]) -> RankSpaceEncoding:
    """The Encoding of a sentencepiece BPE model. id_bytes: each id's text (decoding); byte_ids: the id of byte b's
    token <0xbb>; pieces: text -> id of the single characters and the merges (" " for sentencepiece's ▁); merges:
    the multi-character pieces, highest priority first; specials: name -> id (never produced by encode_ordinary)."""
    chars = [p for p in pieces if len(p) > 1 and len(p.decode("utf-8")) == 1]
    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [[pieces.get(bytes([b]), byte_ids[b])] for b in range(256)]  # (a byte >= 0x80 has no piece)
    for c in chars:  # a character from its bytes: its prefixes, then itself, all before the first merge
        for k in range(2, len(c) + 1):
            if c[:k] not in ranks:
                ranks[c[:k]] = len(rank_ids)
                rank_ids.append([pieces[c]] if k == len(c) else [byte_ids[b] for b in c[:k]])
    for m in merges:
        if m not in ranks and all(ch.encode() in pieces for ch in m.decode()):  # else unreachable: a character of
            ranks[m] = len(rank_ids)                                            # it has no piece
            rank_ids.append([pieces[m]])
    return RankSpaceEncoding(name, ranks, rank_ids, id_bytes, specials)


# llama2.c's tokenizer.bin (karpathy/llama2.c's export of a sentencepiece BPE model): int32 max token length, then per
# token float32 score, int32 byte length, the bytes. Ids 0-2 are <unk>, BOS "\n<s>\n", EOS "\n</s>\n"; ids 3-258 the
# byte-fallback tokens <0x00>..<0xFF>; then the pieces (merges and single characters, sentencepiece's ▁ written as " ").
BYTE_TOKENS = 3  # id of <0x00>


def find_llama2c(directory: str | Path) -> Path | None:
    """The llama2.c tokenizer in a model directory (tokenizer.bin, tok512.bin, ...: llama2.c's names), or None."""
    found = sorted(Path(directory).glob("tok*.bin"))
    if len(found) > 1:
        raise ValueError(f"{directory}: {len(found)} llama2.c tokenizers ({', '.join(p.name for p in found)}): "
                         "name the file")
    return found[0] if found else None


def llama2c_encoding(path: str | Path) -> tuple[RankSpaceEncoding, str, str]:
    """A llama2.c tokenizer .bin as a tiktoken Encoding whose ids are run.c's encode's, for any vocabulary; with its
    BOS and EOS names (tokenizer.get_tokenizer finds the file in a model directory).

    run.c merges the best-scoring pair, the leftmost among equal scores. The merges are ranked by score, and pieces
    of equal score longest first: Llama 2's tied pieces are its 15 runs of spaces (score -1e9), and within a run of
    spaces run.c's leftmost-first merging grows the leftmost run as long as it can, which is what longest-first does."""
    path = Path(path)
    raw = inputs.read_bytes(path, inputs.TOKENIZER_LIMIT, Llama2cError, what="llama2.c tokenizer ")  # a FIFO: refused
    pieces, scores, at = [], [], 4
    while at < len(raw):
        if at + 8 > len(raw) or at + 8 + (n := struct.unpack_from("<i", raw, at + 4)[0]) > len(raw) or n < 0:
            raise Llama2cError(f"{path}: byte {at}: truncated record of token {len(pieces)}")
        scores.append(struct.unpack_from("<f", raw, at)[0])
        pieces.append(raw[at + 8:at + 8 + n])
        at += 8 + n
    byte_names = [f"<0x{b:02X}>".encode() for b in range(256)]
    if len(raw) < 4 or pieces[BYTE_TOKENS:BYTE_TOKENS + 256] != byte_names:
        raise Llama2cError(f"{path}: not a llama2.c tokenizer: ids {BYTE_TOKENS}-{BYTE_TOKENS + 255} must be the byte "
                           "tokens <0x00>..<0xFF>")
    first = BYTE_TOKENS + 256
    piece_id: dict[bytes, int] = {}
    for i in range(first, len(pieces)):
        p = pieces[i]
        try:
            p.decode("utf-8")
        except UnicodeDecodeError:
            raise Llama2cError(f"{path}: token {i} {p!r} is not UTF-8") from None
        if p in piece_id:
            raise Llama2cError(f"{path}: token {i} {p!r} repeats token {piece_id[p]}")
        piece_id[p] = i
    merges = sorted((p for p in piece_id if len(p.decode()) > 1),
                    key=lambda p: (-scores[piece_id[p]], -len(p), piece_id[p]))
    unk, bos, eos = (p.decode().strip() for p in pieces[:BYTE_TOKENS])  # "\n<s>\n" is llama2.c's print form of <s>
    id_bytes = [t.encode() for t in (unk, bos, eos)] + [bytes([b]) for b in range(256)] + pieces[first:]
    enc = rank_space(path.name, id_bytes, [BYTE_TOKENS + b for b in range(256)], piece_id, merges,
                     {unk: 0, bos: 1, eos: 2})
    return enc, bos, eos

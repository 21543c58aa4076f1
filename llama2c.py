"""llama2.c's tokenizer.bin as a tiktoken Encoding with llama2.c's own ids (tokenizer.get_tokenizer dispatches a .bin
file or a model directory holding one here)."""
import struct
from pathlib import Path

import tiktoken


# llama2.c's tokenizer.bin (karpathy/llama2.c's export of a sentencepiece BPE model, e.g. stories260K's tok512.bin,
# Llama 2's tokenizer.bin): int32 max token length, then per token float32 score, int32 byte length, the bytes. Ids 0-2
# are <unk>, BOS "\n<s>\n", EOS "\n</s>\n"; ids 3-258 the byte-fallback tokens <0x00>..<0xFF>; then the pieces (merges
# and single characters, sentencepiece's ▁ written as " "). llama2.c's encode: " " + text (the dummy prefix) split into
# characters, each its own piece or else its UTF-8 bytes as byte tokens (which never merge), then the adjacent pair
# whose concatenation is the highest-scoring piece is merged, the leftmost on ties, until no pair is a piece.
BYTE_TOKENS = 3  # id of <0x00>


class Llama2cError(ValueError):
    """A bad tokenizer.bin; the message names the file and the token."""


def find_llama2c(directory: str | Path) -> Path | None:
    """The llama2.c tokenizer in a model directory (tokenizer.bin, tok512.bin, ...: llama2.c's names), or None."""
    found = sorted(Path(directory).glob("tok*.bin"))
    if len(found) > 1:
        raise ValueError(f"{directory}: {len(found)} llama2.c tokenizers ({', '.join(p.name for p in found)}): "
                         "name the file")
    return found[0] if found else None


class Llama2cEncoding(tiktoken.Encoding):
    """llama2.c's encode as tiktoken's BPE, in a rank space of its own, with llama2.c's ids outside it.

    tiktoken merges from bytes, lowest rank first; llama2.c starts from characters. So the ranks are: the 256 bytes;
    then every non-ASCII character that has a piece, built from its bytes through its UTF-8 prefixes, so that all
    characters exist before any merge happens; then the merges in descending score. Each rank maps to llama2.c ids
    (rank_ids): a byte to its character's piece or its byte token, a character or a merge to its piece, and a prefix
    left over (a character with no piece) to its byte tokens. Decoding reads the pieces by id, byte tokens included."""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 rank_ids: list[list[int]], id_bytes: list[bytes]):
        super().__init__(name, pat_str=r"[\s\S]+", mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self.rank_ids, self.id_bytes = rank_ids, id_bytes
        self.max_token_value = len(id_bytes) - 1  # n_vocab: llama2.c's vocabulary, not the rank space

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


def llama2c_encoding(path: str | Path) -> tuple[Llama2cEncoding, str, str]:
    """A llama2.c tokenizer .bin (or the model directory holding it) as a tiktoken Encoding whose ids are llama2.c's
    encode's, for any vocabulary (tok512, Llama 2's 32000 pieces with their non-ASCII merges); with its BOS and EOS."""
    path = Path(path)
    if path.is_dir() and (path := find_llama2c(directory := path)) is None:
        raise ValueError(f"{directory}: no llama2.c tokenizer (tok*.bin) in this directory")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"llama2.c tokenizer {path}: cannot read ({e.strerror})") from None
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
    chars, merges = [], []
    last_merge = None
    for i in range(first, len(pieces)):
        p = pieces[i]
        try:
            n_chars = len(p.decode("utf-8"))
        except UnicodeDecodeError:
            raise Llama2cError(f"{path}: token {i} {p!r} is not UTF-8") from None
        if p in piece_id:
            raise Llama2cError(f"{path}: token {i} {p!r} repeats token {piece_id[p]}")
        piece_id[p] = i
        if n_chars > 1:
            if last_merge is not None and not scores[i] < scores[last_merge]:
                raise Llama2cError(f"{path}: token {i} {p!r}: merges must be in descending score order "
                                f"(score {scores[i]} after token {last_merge}'s {scores[last_merge]})")
            last_merge = i
            merges.append(p)
        elif len(p) > 1:
            chars.append(p)
    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [[piece_id.get(bytes([b]), BYTE_TOKENS + b)] for b in range(256)]  # (a byte >= 0x80 has no piece)
    for c in chars:  # a character from its bytes: its prefixes, then itself, all before the first merge
        for k in range(2, len(c) + 1):
            if c[:k] not in ranks:
                ranks[c[:k]] = len(rank_ids)
                rank_ids.append([piece_id[c]] if k == len(c) else [BYTE_TOKENS + b for b in c[:k]])
    for m in merges:
        if all(ch.encode() in piece_id for ch in m.decode()):  # else unreachable: a character of it has no piece
            ranks[m] = len(rank_ids)
            rank_ids.append([piece_id[m]])
    unk, bos, eos = (p.decode().strip() for p in pieces[:BYTE_TOKENS])  # "\n<s>\n" is llama2.c's print form of <s>
    specials = {t: len(rank_ids) + i for i, t in enumerate((unk, bos, eos))}
    rank_ids += [[0], [1], [2]]
    id_bytes = [t.encode() for t in (unk, bos, eos)] + [bytes([b]) for b in range(256)] + pieces[first:]
    return Llama2cEncoding(path.name, ranks, specials, rank_ids, id_bytes), bos, eos

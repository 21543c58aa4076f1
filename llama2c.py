"""llama2.c's tokenizer.bin as a tiktoken Encoding with llama2.c's own ids (data.get_tokenizer dispatches a .bin file or
a model directory holding one here)."""
import struct
from pathlib import Path

import tiktoken

from data import DataError, Tokenizer

# llama2.c's tokenizer.bin (karpathy/llama2.c's export of a sentencepiece BPE model, e.g. stories260K's tok512.bin,
# Llama 2's tokenizer.bin): int32 max token length, then per token float32 score, int32 byte length, the bytes. Ids 0-2
# are <unk>, BOS "\n<s>\n", EOS "\n</s>\n"; ids 3-258 the byte-fallback tokens <0x00>..<0xFF>; then the pieces (merges
# and single characters, sentencepiece's ▁ written as " "). llama2.c's encode: " " + text (the dummy prefix) split into
# characters, each its own piece or else its UTF-8 bytes as byte tokens, then the adjacent pair whose concatenation is
# the highest-scoring piece is merged, the leftmost on ties, until no pair is a piece. As a tiktoken Encoding: a piece's
# rank is its id (tiktoken merges the lowest rank first, so the merges must be in descending score order, checked), a
# byte's rank is its character piece, or its byte token when it has none.
BYTE_TOKENS = 3  # id of <0x00>


def find_llama2c(directory: str | Path) -> Path | None:
    """The llama2.c tokenizer in a model directory (tokenizer.bin, tok512.bin, ...: llama2.c's names), or None."""
    found = sorted(Path(directory).glob("tok*.bin"))
    if len(found) > 1:
        raise ValueError(f"{directory}: {len(found)} llama2.c tokenizers ({', '.join(p.name for p in found)}): "
                         "name the file")
    return found[0] if found else None


class Llama2cEncoding(tiktoken.Encoding):
    """A tiktoken Encoding that also decodes the byte tokens whose byte has a character piece of its own (<0x65> beside
    "e"): tiktoken keeps one rank per byte string, the character's, so these ids are decoded here. Encoding never
    produces them (llama2.c does not either); a sampling model can."""

    def __init__(self, name: str, *, byte_tokens: dict[int, bytes], **kwargs):
        super().__init__(name, **kwargs)
        self.byte_tokens = byte_tokens

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.byte_tokens[token] if token in self.byte_tokens else super().decode_single_token_bytes(token)

    def decode_bytes(self, tokens: list[int]) -> bytes:
        if self.byte_tokens.keys().isdisjoint(tokens):
            return super().decode_bytes(tokens)
        return b"".join(map(self.decode_single_token_bytes, tokens))

    def decode(self, tokens: list[int], errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)


def llama2c_tokenizer(path: str | Path) -> Tokenizer:
    """A llama2.c tokenizer .bin (or the model directory holding it) as a tiktoken Encoding with llama2.c's ids.

    Equal to llama2.c's encode when no merged piece holds a non-ASCII character (stories260K's tok512.bin: its
    non-ASCII pieces are single characters): the pre-split pattern keeps ASCII runs whole and gives every other
    character its own piece, since tiktoken forms a character only from its bytes. In a vocabulary that merges non-ASCII
    characters (Llama 2's) those merges are not made: such text gets more, shorter tokens than llama2.c gives it."""
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
            raise DataError(f"{path}: byte {at}: truncated record of token {len(pieces)}")
        scores.append(struct.unpack_from("<f", raw, at)[0])
        pieces.append(raw[at + 8:at + 8 + n])
        at += 8 + n
    byte_names = [f"<0x{b:02X}>".encode() for b in range(256)]
    if len(raw) < 4 or pieces[BYTE_TOKENS:BYTE_TOKENS + 256] != byte_names:
        raise DataError(f"{path}: not a llama2.c tokenizer: ids {BYTE_TOKENS}-{BYTE_TOKENS + 255} must be the byte "
                        "tokens <0x00>..<0xFF>")
    first = BYTE_TOKENS + 256
    ranks = {bytes([b]): BYTE_TOKENS + b for b in range(256)}
    last_merge = None
    for i in range(first, len(pieces)):
        p = pieces[i]
        try:
            n_chars = len(p.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: token {i} {p!r} is not UTF-8") from None
        if p in ranks and ranks[p] >= first:
            raise DataError(f"{path}: token {i} {p!r} repeats token {ranks[p]}")
        if n_chars > 1:
            if last_merge is not None and not scores[i] < scores[last_merge]:
                raise DataError(f"{path}: token {i} {p!r}: merges must be in descending score order for tiktoken "
                                f"(score {scores[i]} after token {last_merge}'s {scores[last_merge]})")
            last_merge = i
        ranks[p] = i
    byte_tokens = {BYTE_TOKENS + b: bytes([b]) for b in range(256) if ranks[bytes([b])] != BYTE_TOKENS + b}
    unk, bos, eos = (p.decode().strip() for p in pieces[:BYTE_TOKENS])  # "\n<s>\n" is llama2.c's print form of <s>
    enc = Llama2cEncoding(path.name, pat_str=r"[\x00-\x7f]+|[^\x00-\x7f]", mergeable_ranks=ranks,
                          special_tokens={unk: 0, bos: 1, eos: 2}, byte_tokens=byte_tokens)
    # pad: EOS (what pads hold never matters: right padding, causal attention, loss_mask 0)
    return Tokenizer(enc, bos, eos, eos, prefix=" ")

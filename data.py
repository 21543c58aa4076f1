"""Preference data: the formats people have (HH's transcripts, TRL's standard and conversational ones), tokenisation
with a drop/truncation report, batches.

    read_examples(file | dataset dir, split) ──► [Pair | Completion] ──► tokenize(..., kind) ──► Dataset(items, report)
    (the files: datafiles.py)                                                  ──► Batches (sharded, resumable)
Nothing is lost silently: bad input raises DataError naming file, line or row, and field; every dropped example and
every truncation is counted by reason in the report. `python data.py FILE_OR_DIR --show 3` prints a summary and the
first tokenised examples.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from datafiles import DataError, choose_split, records, splits
from tokenizer import PLAIN_ROLES, Tokenizer, get_tokenizer

# ----------------------------------------------------------------------------------------------------------------------
# formats: each record becomes a Pair or a Completion; the format is detected from a record's fields, or forced

class Pair(NamedTuple):
    prompt: str | list  # a string, or chat messages [{"role", "content"}]
    chosen: str | list  # a string, or [one assistant message]
    rejected: str | list


class Completion(NamedTuple):
    prompt: str | list
    completion: str | list
    label: bool | None  # KTO: desirable or not; None for SFT data


FORMATS = {"hh": ("chosen", "rejected"), "implicit": ("chosen", "rejected"), "pairs": ("prompt", "chosen", "rejected"),
           "kto": ("prompt", "completion", "label"), "sft": ("prompt", "completion")}
COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "messages")  # every field a format reads
NATURAL_KIND = {"hh": "pairs", "implicit": "pairs", "pairs": "pairs", "kto": "kto", "sft": "sft"}
HH_TURN = "\n\nAssistant:"


class Examples(list):
    """A list of Pair or Completion that knows its format and source."""

    def __init__(self, items, format: str, source: str):
        super().__init__(items)
        self.format, self.source = format, source

    def __getitem__(self, i):
        """An item, or for a slice Examples of the same format and source (a held-out part reports them too)."""
        got = super().__getitem__(i)
        return Examples(got, self.format, self.source) if isinstance(i, slice) else got


def _shared(a: str, b: str) -> int:
    """The length of the common prefix of two strings: a binary search on slice equality, at C speed (HH's
    transcripts share ~1,000 characters; os.path.commonprefix steps through them one by one in Python)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[lo:mid] == b[lo:mid] else (lo, mid - 1)
    return lo


def detect_format(rec: dict, where: str) -> str:
    """The format of a record from its fields (other fields, such as scores and ids, are ignored). chosen and rejected
    make a pair whatever else the record holds (ultrafeedback's messages too). As in TRL's maybe_extract_prompt, a
    prompt is kept only when it is of the responses' kind (both strings, or both message lists); otherwise the prompt
    is implicit, the part chosen and rejected share: HH's transcripts when that part holds "\\n\\nAssistant:"."""
    if "chosen" in rec and "rejected" in rec:
        chosen, rejected = rec["chosen"], rec["rejected"]
        if "prompt" in rec and isinstance(rec["prompt"], list) == isinstance(chosen, list):
            return "pairs"
        strings = isinstance(chosen, str) and isinstance(rejected, str)
        return "hh" if strings and HH_TURN in chosen[:_shared(chosen, rejected)] else "implicit"
    for fmt in ("kto", "sft"):  # kto ⊃ sft's fields
        if all(k in rec for k in FORMATS[fmt]):
            return fmt
    if "messages" in rec:
        return "sft"
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(rec)}; expected "
                    + ", ".join(f"{f} {{{', '.join(k)}}}" for f, k in FORMATS.items() if f != "hh")
                    + " or sft {messages}")


def _field(rec: dict, key: str, where: str, types: tuple = (str,)):
    if key not in rec:
        raise DataError(f"{where}: field {key!r} is missing")
    if not isinstance(rec[key], types):
        raise DataError(f"{where}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, got "
                        f"{type(rec[key]).__name__}")
    return rec[key]


def _messages(rec: dict, key: str, where: str, prompt: str | list | None = None):
    """A string, or a chat message list. A response (given its prompt) has the prompt's type, and as a list holds
    exactly one assistant message."""
    value, response = _field(rec, key, where, (str, list)), prompt is not None
    if response and isinstance(value, str) != isinstance(prompt, str):
        raise DataError(f"{where}: field {key!r} must be a string exactly when 'prompt' is")
    if isinstance(value, str):
        return value
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {key!r}[{i}] must be {{'role': system|user|assistant, 'content': str}}")
    if response and (len(value) != 1 or value[0]["role"] != "assistant"):
        raise DataError(f"{where}: field {key!r} must hold exactly one assistant message, got {len(value)}")
    if not response and not value:
        raise DataError(f"{where}: field {key!r} is an empty message list")
    return value


def _implicit(rec: dict, where: str) -> Pair:
    """TRL's implicit prompt (trl.data_utils.extract_prompt): the longest common prefix of chosen and rejected (of
    messages, or of characters with a space before the difference left to the responses); identical ones keep their
    last message (character) as responses, which tokenize then drops as chosen == rejected. As messages, the prompt
    must end with a user turn and each response be one assistant message."""
    chosen, rejected = _messages(rec, "chosen", where), _messages(rec, "rejected", where)
    text = isinstance(chosen, str)
    if text != isinstance(rejected, str):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    n = min(len(chosen), len(rejected))
    same = _shared(chosen, rejected) if text else next((i for i in range(n) if chosen[i] != rejected[i]), n)
    cut = n - 1 if same == n else same - (text and same > 0 and chosen[same - 1] == " ")  # TRL's loop, exactly
    if cut < 1:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' share no prompt (they differ from the start)")
    if not text and chosen[cut - 1]["role"] != "user":
        raise DataError(f"{where}: the {cut} leading message(s) chosen and rejected share, the prompt, must end with "
                        f"a user turn, not {chosen[cut - 1]['role']}")
    for key, rest in (("chosen", chosen[cut:]), ("rejected", rejected[cut:])):
        if not text and (len(rest) != 1 or rest[0]["role"] != "assistant"):
            raise DataError(f"{where}: field {key!r} must continue the {cut} shared message(s) with exactly one "
                            f"assistant message, got roles {[m['role'] for m in rest]}")
    return Pair(chosen[:cut], chosen[cut:], rejected[cut:])


def parse_record(rec: dict, fmt: str, where: str) -> Pair | Completion:
    if fmt == "hh":  # full transcripts: the prompt is the common prefix up to its last "\n\nAssistant:"
        chosen, rejected = _field(rec, "chosen", where), _field(rec, "rejected", where)
        cut = chosen.rfind(HH_TURN, 0, _shared(chosen, rejected))
        if cut < 0:
            raise DataError(f"{where}: field 'chosen': no {HH_TURN!r} in the part common to chosen and rejected")
        cut += len(HH_TURN)
        return Pair(chosen[:cut], chosen[cut:], rejected[cut:])  # prompt + chosen == the original transcript
    if fmt == "implicit":
        return _implicit(rec, where)
    if fmt == "pairs":
        prompt = _messages(rec, "prompt", where)
        return Pair(prompt, _messages(rec, "chosen", where, prompt), _messages(rec, "rejected", where, prompt))
    if fmt == "sft" and "messages" in rec and "completion" not in rec:
        msgs = _messages(rec, "messages", where)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages' must end with an assistant message after the prompt")
        return Completion(msgs[:-1], msgs[-1:], None)
    prompt = _messages(rec, "prompt", where)
    label = _field(rec, "label", where, (bool,)) if fmt == "kto" else None
    return Completion(prompt, _messages(rec, "completion", where, prompt), label)


def from_records(records: Iterable, format: str = "auto", source: str = "<records>") -> Examples:
    """In-memory dicts (e.g. a synthetic task) through the same parsing as files; `where` counts records from 1."""
    return _parse(((f"{source}:{i}", r) for i, r in enumerate(records, 1)), format, source, f"{source}:1")


def _parse(located: Iterable, format: str, source: str, start: str) -> Examples:
    """Examples of (where, record)s; start: where the first record would be (for an empty source)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: auto or one of {list(FORMATS)}")
    out, first, detect = [], None, format == "auto"
    for where, rec in located:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if detect and first is None:
            format, first = detect_format(rec, where), where
        elif detect:  # every record, not only the first: a kto line after sft lines would lose its label silently
            try:
                fmt = detect_format(rec, where)
            except DataError:  # no format's fields: parse_record names the missing one
                fmt = format
            if fmt != format:
                raise DataError(f"{where}: a record of format {fmt} among records of format {format} (from {first}); "
                                f"data holds one format: split it")
        out.append(parse_record(rec, format, where))
    if not out:
        raise DataError(f"{start}: empty, no records")
    return Examples(out, format, source)


def read_examples(path: str | Path, format: str = "auto", split: str = "auto") -> Examples:
    """Examples of a .jsonl, .jsonl.gz, .json or .parquet file, or of one split of a dataset directory (a Hub
    snapshot: datafiles.choose_split; 'auto' is its train split), every file of the split in path order.
    format: auto (detected from the records' fields) or forced."""
    path = Path(path)
    if not path.is_dir():
        where = f"{path}: row [0]" if path.name.endswith(".parquet") else f"{path}:1"
        return _parse(records(path, COLUMNS), format, str(path), where)
    name = choose_split(path, split)
    files = splits(path)[name]
    located = (r for f in files for r in records(f, COLUMNS))
    return _parse(located, format, f"{path} (split {name}: {len(files)} file{'s' * (len(files) > 1)})",
                  f"{path} (split {name})")


# ----------------------------------------------------------------------------------------------------------------------
# tokenisation: prompt | response | EOS, loss on the response only. Truncation policy (TRL's): a prompt longer than
# max_prompt_length keeps BOS and its last tokens (the turn being answered); then each response is cut at the end to
# fit max_length (a cut response loses its EOS). Dropped: empty responses, chosen == rejected (before or after the
# cut: such a pair has no gradient), prompts that leave no room for a response token.

class Item(NamedTuple):
    prompt: list[int]
    response: list[int]  # pairs: chosen; kto, sft: the completion (ends with EOS unless cut)
    rejected: list[int] | None  # pairs only
    desirable: bool | None  # kto only
    group: int  # items of one group stay adjacent when shuffled (a pair unrolled into KTO: desirable, undesirable)


@dataclass
class Dataset:
    kind: str  # pairs | kto | sft
    items: list[Item]
    report: dict  # what tokenize kept, dropped and truncated, and why
    pad_id: int
    max_length: int

    def __len__(self):
        return len(self.items)


def _units(examples: list, kind: str, drop) -> list[tuple]:
    """(prompt, responses, desirable, group) in the kind's units: a pair for pairs, one completion for kto/sft.
    Paired data unrolled into KTO gives chosen (desirable) then rejected (undesirable) of each pair, one group; a pair
    with chosen == rejected would be both, so both are dropped."""
    if kind not in ("pairs", "kto", "sft"):
        raise ValueError(f"unknown kind {kind!r}: pairs, kto or sft")
    units = []
    for g, ex in enumerate(examples):
        if isinstance(ex, Pair) and kind == "pairs":
            units.append((ex.prompt, (ex.chosen, ex.rejected), None, g))
        elif isinstance(ex, Pair) and kind == "kto" and ex.chosen == ex.rejected:
            drop("chosen == rejected", 2)
        elif isinstance(ex, Pair) and kind == "kto":
            units += [(ex.prompt, (ex.chosen,), True, g), (ex.prompt, (ex.rejected,), False, g)]
        elif isinstance(ex, Pair):  # sft on paired data: the preferred response
            units.append((ex.prompt, (ex.chosen,), None, g))
        elif kind == "pairs" or (kind == "kto" and ex.label is None):
            raise ValueError(f"{getattr(examples, 'source', 'examples')}: {kind} needs "
                             f"{'paired' if kind == 'pairs' else 'labelled (kto) or paired'} data")
        else:
            units.append((ex.prompt, (ex.completion,), ex.label, g))
    return units


def _stats(lengths: list[int]) -> dict:
    a = np.array(lengths or [0])
    return {"mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)),
            "max": int(a.max())}


def tokenize(examples: list, tok: Tokenizer, kind: str, max_length: int,
             max_prompt_length: int | None = None) -> Dataset:
    """Tokenised items of `kind` (pairs | kto | sft) and the report: format, rows (in the kind's units: a pair
    unrolled into KTO is two), examples kept, dropped {reason: n}, truncated {prompt, response: n}, token lengths."""
    if max_length < 2 or not (max_prompt_length is None or 1 <= max_prompt_length < max_length):
        raise ValueError(f"need max_length >= 2 and 1 <= max_prompt_length < max_length, got {max_length}, "
                         f"{max_prompt_length}")
    dropped, truncated = {}, {"prompt": 0, "response": 0}

    def drop(reason: str, n: int = 1):
        dropped[reason] = dropped.get(reason, 0) + n

    units, kept = _units(examples, kind, drop), []
    rows = len(units) + sum(dropped.values())
    for u in units:  # drops visible in the text
        if any(not r.strip() if isinstance(r, str) else not r[0]["content"].strip() for r in u[1]):
            drop("empty response")
        elif len(u[1]) == 2 and u[1][0] == u[1][1]:
            drop("chosen == rejected")
        else:
            kept.append(u)
    # the prompt and responses as segments (text, special ids: Tokenizer.render), then their ids in one batched call
    segs = []
    for prompt, responses, _, group in kept:
        try:
            segs += tok.render(prompt, responses)
        except ValueError as e:  # a chat template's refusal: name the example
            raise ValueError(f"{getattr(examples, 'source', 'examples')}: example {group + 1}: {e}") from None
    ids = iter(tok.ids(*segs))
    items, seq_lengths = [], []
    for prompt, responses, desirable, group in kept:
        p, rs = next(ids), [next(ids) for _ in responses]
        if not p:  # a tokenizer without BOS (Qwen's) and an empty prompt: nothing predicts the first response token
            drop("empty prompt and no BOS")
            continue
        cut_prompt = max_prompt_length is not None and len(p) > max_prompt_length
        if cut_prompt:  # keep BOS (if the tokenizer adds one) and the end of the prompt
            keep = int(tok.bos_id is not None and p[:1] == [tok.bos_id])
            p = p[:keep] + p[len(p) - max_prompt_length + keep:]
        room = max_length - len(p)
        if room < 1:
            drop("prompt leaves no room for a response")
            continue
        cut_response = any(len(r) > room for r in rs)
        rs = [r[:room] for r in rs]
        if len(rs) == 2 and rs[0] == rs[1]:
            drop("chosen == rejected after truncation")
            continue
        truncated["prompt"] += cut_prompt
        truncated["response"] += cut_response
        items.append(Item(p, rs[0], rs[1] if len(rs) == 2 else None, desirable, group))
        seq_lengths += [len(p) + len(r) for r in rs]
    report = {"format": getattr(examples, "format", None), "kind": kind, "rows": rows,
              "examples": len(items), "dropped": dropped, "truncated": truncated, "tokenizer": tok.name,
              "max_length": max_length, "max_prompt_length": max_prompt_length,
              "tokens": {"prompt": _stats([len(it.prompt) for it in items]), "sequence": _stats(seq_lengths)}}
    if kind == "kto":
        report["desirable"] = sum(it.desirable for it in items)
    return Dataset(kind, items, report, tok.pad_id, max_length)


def split_eval(examples: list, n: int) -> tuple[list, list]:
    """(train, eval): the first n examples are held out, before tokenisation so both halves of a pair stay together."""
    if not 0 < n < len(examples):
        raise ValueError(f"cannot hold out {n} of {len(examples)} examples for evaluation (need 0 < n < examples)")
    return examples[n:], examples[:n]  # Examples stay Examples: format and source for the report


# ----------------------------------------------------------------------------------------------------------------------
# batches: dicts of right-padded tensors; loss_mask 1 on response tokens (EOS included), 0 on prompt and pad

def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, response) token rows -> right-padded input_ids and loss_mask (1 on the response), both (n, T)."""
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1
    return ids, mask


def collate(items: list[Item], kind: str, pad_id: int, kl_completions: list[list[int]] | None = None) -> dict:
    """pairs: input_ids (2b, T) = [chosen_1..b ; rejected_1..b]; kto: + desirable (b,), kl_input_ids / kl_loss_mask
    (b, T') = prompt_i with the mismatched kl_completions[i]; sft: input_ids (b, T)."""
    rows = [(it.prompt, it.response) for it in items]
    if kind == "pairs":
        rows += [(it.prompt, it.rejected) for it in items]
    ids, mask = pad(rows, pad_id)
    batch = {"input_ids": ids, "loss_mask": mask}
    if kind == "kto":
        batch["desirable"] = torch.tensor([it.desirable for it in items], dtype=torch.bool)
        batch["kl_input_ids"], batch["kl_loss_mask"] = pad(
            [(it.prompt, c) for it, c in zip(items, kl_completions, strict=True)], pad_id)
    return batch


def _kl_completions(items: list[Item], max_length: int) -> list[list[int]]:
    """KTO's KL estimate z_ref scores mismatched pairs: prompt i with the completion of item (i+1) mod b of the same
    list (TRL shifts completions within the batch likewise), cut to fit max_length after prompt i."""
    b = len(items)
    return [items[(i + 1) % b].response[:max_length - len(items[i].prompt)] for i in range(b)]


class Batches:
    """Training batches: each next() is one optimizer step, this rank's list of micro batches (dicts).

    The global batch of step s in epoch e is items order_e[s·B : (s+1)·B], order_e a permutation of the groups seeded
    by (seed, e); rank r takes its contiguous B/world_size slice, cut into micro batches. So the union over ranks and
    micro steps is the same for any world size or accumulation split (the last B-incomplete part of an epoch is
    left for later epochs, which reshuffle). KTO KL completions are paired within the global batch, so they too do
    not depend on the split. state_dict() is the step counter; load_state_dict() resumes exactly."""

    def __init__(self, data: Dataset, batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if batch_size % (world_size * micro_batch_size):
            raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size} × "
                             f"micro_batch_size {micro_batch_size}")
        if data.kind == "kto" and batch_size < 2:
            raise ValueError("kto needs batch_size >= 2: the KL completions come from other examples of the batch")
        self.steps_per_epoch = len(data) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the {len(data)} training examples")
        self.data, self.B, self.micro, self.rank, self.world, self.seed = (data, batch_size, micro_batch_size, rank,
                                                                           world_size, seed)
        self.groups: dict[int, list[int]] = {}
        for i, it in enumerate(data.items):
            self.groups.setdefault(it.group, []).append(i)
        self.step, self._epoch, self._order = 0, None, None

    def order(self, epoch: int) -> list[int]:
        """Item indices of an epoch: the groups shuffled by (seed, epoch), each group's items kept together."""
        groups = list(self.groups.values())
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(groups))
        return [i for g in perm for i in groups[g]]

    def __iter__(self):
        return self

    def next_items(self) -> tuple[list[Item], list]:
        """The next step's global batch (every rank's items, rank 0's first) and its KTO KL completions (else Nones);
        advances the step. packing.PackedBatches packs these instead of padding them."""
        epoch, s = divmod(self.step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        items = [self.data.items[i] for i in self._order[s * self.B:(s + 1) * self.B]]
        kl = _kl_completions(items, self.data.max_length) if self.data.kind == "kto" else [None] * self.B
        self.step += 1
        return items, kl

    def __next__(self) -> list[dict]:
        items, kl = self.next_items()
        per_rank = self.B // self.world
        lo = self.rank * per_rank
        return [collate(items[j:j + self.micro], self.data.kind, self.data.pad_id, kl[j:j + self.micro])
                for j in range(lo, lo + per_rank, self.micro)]

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.B, "seed": self.seed}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        changed = [k for k in ("steps_per_epoch", "batch_size", "seed") if state[k] != mine[k]]
        if changed:
            raise ValueError(f"cannot resume the data position: {', '.join(changed)} changed "
                             f"({ {k: state[k] for k in changed} } → { {k: mine[k] for k in changed} })")
        self.step = state["step"]


def eval_batches(data: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Fixed-order micro batches of this rank's share items[rank::world_size] (KTO KL completions paired within the
    share). Raises unless every rank gets the same number of micro batches: FSDP forwards are collectives."""
    counts = {-(-len(range(r, len(data), world_size)) // micro_batch_size) for r in range(world_size)}
    if len(counts) != 1:
        raise ValueError(f"{len(data)} eval examples give the {world_size} ranks different numbers of micro batches "
                         f"of {micro_batch_size}; choose an eval size that divides evenly")
    items = data.items[rank::world_size]
    kl = _kl_completions(items, data.max_length) if data.kind == "kto" else [None] * len(items)
    return [collate(items[j:j + micro_batch_size], data.kind, data.pad_id, kl[j:j + micro_batch_size])
            for j in range(0, len(items), micro_batch_size)]


# ----------------------------------------------------------------------------------------------------------------------

def show(ds: Dataset, tok: Tokenizer, n: int) -> list[dict]:
    """The first n tokenised examples, as `--show` prints them: the ids of each part under its name and their text
    as decoded (special tokens as their names: what the model sees)."""
    names = {"pairs": ("chosen", "rejected"), "kto": ("completion",), "sft": ("completion",)}[ds.kind]
    out = []
    for it in ds.items[:n]:
        parts = {"prompt": it.prompt, **dict(zip(names, (it.response, it.rejected)))}
        row = {"example": it.group, **({"label": it.desirable} if ds.kind == "kto" else {}), **parts}
        out.append({**row, "text": {k: tok.decode(v) for k, v in parts.items()}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="data.py", description="Summarise a preference / SFT data file or dataset "
                                 "directory: formats, drops, truncation; --show N prints the first N tokenised "
                                 "examples.")
    ap.error = lambda message: ap.exit(2, f"data.py: error: {message}\n")  # one line, without the usage block
    ap.add_argument("path", help=".jsonl, .jsonl.gz, .json or .parquet file, or a dataset directory")
    ap.add_argument("--split", default="auto", help="a dataset directory's split (auto: its train split)")
    ap.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    ap.add_argument("--tokenizer", default="gpt2", help="byte, a tiktoken name, or the path of a tokenizer.json, "
                    "a Llama 3 tokenizer.model, a llama2.c .bin or a model directory")
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--max_prompt_length", type=int, default=512)
    ap.add_argument("--show", type=int, default=0, metavar="N",
                    help="first print the first N tokenised examples, one JSON object a line: the ids of prompt, "
                    "chosen, rejected or completion, and their decoded text")
    args = ap.parse_args(argv)
    try:  # bad input is one line naming the option, or the file, line and field; exit status 2
        if args.show < 0:
            raise ValueError(f"--show={args.show}: need N >= 0 examples")
        if args.max_length < 2 or not 1 <= args.max_prompt_length < args.max_length:
            raise ValueError(f"--max_length={args.max_length}, --max_prompt_length={args.max_prompt_length}: need "
                             f"max_length >= 2 and 1 <= max_prompt_length < max_length")
        if args.split != "auto" and not Path(args.path).is_dir():
            raise ValueError(f"--split={args.split}: {args.path} is a file, not a dataset directory")
        try:  # the tokenizer first: it is quick to refuse, a large file is not
            tok = get_tokenizer(args.tokenizer)
        except (ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"--tokenizer={args.tokenizer}: {e}") from None
        examples = read_examples(args.path, args.format, args.split)
        ds = tokenize(examples, tok, NATURAL_KIND[examples.format], args.max_length, args.max_prompt_length)
    except (ValueError, RuntimeError, OSError) as e:  # DataError is a ValueError
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    for row in show(ds, tok, args.show):
        print(json.dumps(row, ensure_ascii=False))
    r = ds.report
    print(f"{examples.source}: {r['rows']} rows of format {r['format']} as {r['kind']}, tokenizer {r['tokenizer']}, "
          f"max_length {r['max_length']}, max_prompt_length {r['max_prompt_length']}")
    print(f"kept {r['examples']}, dropped {sum(r['dropped'].values())}"
          + "".join(f"\n  dropped {n}: {reason}" for reason, n in r["dropped"].items()))
    print(f"truncated: {r['truncated']['prompt']} prompts (start cut), {r['truncated']['response']} examples' "
          "responses (end cut)")
    for name, stats in r["tokens"].items():
        print(f"{name} tokens: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--show 5 | head -3`: the reader took what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(0)

"""Packed rows: no padding, and a pair's prompt computed once.

A padded batch (data.collate) gives every sequence its own row, right-padded to the longest, and repeats a pair's
prompt in its chosen and its rejected row. Here examples are laid end to end in rows sized to what they hold:

    row:     [ p1 p1 p1 c1 c1 r1 r1 r1 | p2 p2 c2 c2 c2 r2 | p3 ... | pad ]
    pos:       0  1  2  3  4  3  4  5    0  1  2  3  4  2    0 ...
    branch:    0  0  0  1  1  2  2  2    0  0  1  1  1  2    0 ...

One segment per pair is [prompt | chosen | rejected] (shared=True): positions restart at 0 in each segment, and the
rejected tokens continue from the prompt's end, so each response sees exactly the positions it sees in its padded
row. The attention mask is the tree: query i sees key j iff both are in the same segment, j is not after i, and j is
a prompt token or in i's own branch (rejected tokens never see the chosen ones). Every log-prob therefore equals the
padded path's up to float rounding (tests/test_packing.py). KTO packs [prompt | completion | KL completion] the same
way (the KL completion is the mismatched one of data._kl_completions), SFT [prompt | response]; shared=False makes
one segment per sequence ([prompt | chosen], [prompt | rejected]), for comparison.

Only the positions that predict a response token get logits: their flat indices go to Llama.forward(logits_index=),
and losses.gathered_logps sums each example's log-probs, so a batch yields the same per-example vectors as the padded
path: pairs [chosen_1..b ; rejected_1..b], KTO [completions_1..b ; KL completions_1..b], SFT [responses_1..b].

Micro batches are filled to a token budget, whole examples each (a pair's two responses stay together); every rank
gets the same number of micro batches (FSDP2's forwards are collectives), and each carries the weight that makes the
sum of micro-batch losses the mean over the global batch (see `weight`), so an optimizer step means what it means
unpacked, for any world size and any split. On CUDA the tree mask is a FlexAttention BlockMask, once compiled
FlexAttention has passed a check against SDPA (check_flex); else the boolean mask SDPA takes.
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import data
import losses
import memory
import model as model_lib
import reference as ref_lib


@dataclass
class Segment:
    """One tree: tokens, positions and branch ids (0 prompt, 1.. responses), the scored tokens as (offset of the
    position whose logits predict it, target token, example id), and each response's last token as (offset, example
    id): where a reward model reads its score."""
    tokens: list[int]
    pos: list[int]
    branch: list[int]
    scored: list[tuple[int, int, int]]
    ends: list[tuple[int, int]] = field(default_factory=list)


def segment(prompt: list[int], responses: list[tuple[list[int], int]]) -> Segment:
    """[prompt | response_1 | response_2 ...], each response continuing the prompt's positions (example id given)."""
    P = len(prompt)
    seg = Segment(list(prompt), list(range(P)), [0] * P, [])
    for b, (response, example) in enumerate(responses, start=1):
        parent = P - 1  # the first response token is predicted by the prompt's last position
        for k, t in enumerate(response):
            seg.scored.append((parent, t, example))
            parent = len(seg.tokens)
            seg.tokens.append(t), seg.pos.append(P + k), seg.branch.append(b)
        seg.ends.append((parent, example))
    return seg


def responses(item: data.Item, kind: str, kl: list[int] | None) -> list[list[int]]:
    """The sequences that follow an item's prompt: pairs (chosen, rejected), kto (completion, KL completion), sft
    (response,)."""
    return {"pairs": [item.response, item.rejected], "kto": [item.response, kl], "sft": [item.response]}[kind]


def segments(items: list[data.Item], kind: str, kl: list, shared: bool) -> list[list[Segment]]:
    """Each item's segments, with example ids in the padded path's order: response j of item i is example j·b + i."""
    b, out = len(items), []
    for i, (it, k) in enumerate(zip(items, kl, strict=True)):
        branches = [(r, j * b + i) for j, r in enumerate(responses(it, kind, k))]
        out.append([segment(it.prompt, branches)] if shared else [segment(it.prompt, [br]) for br in branches])
    return out


def segment_lengths(item: data.Item, kind: str, kl: list[int] | None, shared: bool) -> list[int]:
    rs = [len(r) for r in responses(item, kind, kl)]
    return [len(item.prompt) + sum(rs)] if shared else [len(item.prompt) + r for r in rs]


def row_capacity(kind: str, max_length: int, shared: bool) -> int:
    """The longest segment tokenize allows (prompt + each response <= max_length): one always fits in a row."""
    return 2 * max_length - 1 if shared and kind != "sft" else max_length


def token_budget(kind: str, micro_batch_size: int, max_length: int, micro_batch_tokens: int = 0) -> int:
    """Tokens per packed micro batch: micro_batch_tokens, or by default what micro_batch_size padded examples hold at
    most (pairs and KTO: two sequences of max_length each; SFT: one)."""
    return micro_batch_tokens or micro_batch_size * max_length * (1 if kind == "sft" else 2)


def first_fit(lengths: list[list[int]], capacity: int, max_rows: int | None = None) -> list[list[int]] | None:
    """Row fill of each segment (rows of `capacity` tokens, first fit in order), as the row index per segment; None
    if that takes more than max_rows rows."""
    fill, where = [], []
    for lens in lengths:
        where.append([])
        for n in lens:
            r = next((r for r, f in enumerate(fill) if f + n <= capacity), len(fill))
            if r == len(fill):
                fill.append(0)
            fill[r] += n
            where[-1].append(r)
    return None if max_rows is not None and len(fill) > max_rows else where


def group(lengths: list[list[int]], capacity: int, rows: int) -> list[list[int]]:
    """Consecutive examples into micro batches of at most `rows` rows of `capacity` tokens (an example that fits in
    no fewer rows gets a micro batch of its own)."""
    groups: list[list[int]] = []
    for i in range(len(lengths)):
        if groups and first_fit([lengths[j] for j in groups[-1] + [i]], capacity, rows) is not None:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def equalize(groups: list[list[int]], n: int) -> list[list[int]]:
    """Split the largest micro batches in two until there are n (each rank must run the same number)."""
    groups = [list(g) for g in groups]
    while len(groups) < n:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups[k]
        groups[k:k + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


ROW_QUANTUM = 32  # row lengths are multiples of this: a fixed set of shapes (docs/packing.md measures the padding)


def layout(lengths: list[int], capacity: int) -> tuple[list[int], int]:
    """(row of each segment, row length T): the rows that hold these segments in the fewest positions R·T, T a
    multiple of ROW_QUANTUM from the longest segment up to the capacity (ties: the shorter rows, less attention work),
    each filled first fit, longest segment first. Rows sized to what they hold leave little padding (docs/packing.md),
    where rows of the full capacity would leave their unfilled ends."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: deterministic for exact resume

    def rows_of(T: int) -> list[int]:  # first fit, longest first, given back in the segments' order
        where = [0] * len(lengths)
        for i, (r,) in zip(order, first_fit([[lengths[i]] for i in order], T)):
            where[i] = r
        return where

    q = ROW_QUANTUM
    fits = [(rows_of(T), T) for T in range(-(-max(lengths) // q) * q, -(-capacity // q) * q + 1, q)]
    return min(fits, key=lambda f: (1 + max(f[0])) * f[1])  # min keeps the first (shortest T) of ties


def collate(items: list[data.Item], kind: str, kl: list, pad_id: int, capacity: int, shared: bool) -> dict:
    """One packed micro batch: input_ids, pos, seg (segment id per token, 0 on padding), branch (R, T); index,
    targets, example (N,) for the N scored tokens; counts (E,) scored tokens per example; last (E,) the flat index of
    each example's last token (a reward model's logits_index); kto also desirable (b,)."""
    flat = [s for ss in segments(items, kind, kl, shared) for s in ss]
    where, T = layout([len(s.tokens) for s in flat], capacity)
    rows = [[] for _ in range(1 + max(where))]
    for s, r in zip(flat, where):
        rows[r].append(s)
    R = len(rows)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos, seg_id, branch = (torch.zeros(R, T, dtype=torch.long) for _ in range(3))
    index, targets, example = [], [], []
    n_examples = len(items) * len(responses(items[0], kind, kl[0]))
    last = [0] * n_examples
    n_seg = 0
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            n_seg += 1
            sl = slice(offset, offset + len(s.tokens))
            ids[r, sl], pos[r, sl], branch[r, sl] = (torch.tensor(x) for x in (s.tokens, s.pos, s.branch))
            seg_id[r, sl] = n_seg
            for parent, t, e in s.scored:
                index.append(r * T + offset + parent), targets.append(t), example.append(e)
            for end, e in s.ends:
                last[e] = r * T + offset + end
            offset += len(s.tokens)
    example_t = torch.tensor(example)
    batch = {"input_ids": ids, "pos": pos, "seg": seg_id, "branch": branch, "index": torch.tensor(index),
             "targets": torch.tensor(targets), "example": example_t,
             "counts": torch.bincount(example_t, minlength=n_examples).float(), "last": torch.tensor(last)}
    if kind == "kto":
        batch["desirable"] = torch.tensor([it.desirable for it in items], dtype=torch.bool)
    return batch


def tree_mask_mod(seg: torch.Tensor, branch: torch.Tensor):
    """The tree mask as FlexAttention's mask_mod (row b, head h, query q, key kv) -> may q see kv."""
    def tree(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv) & ((branch[b, kv] == 0) | (branch[b, q] == branch[b, kv]))
    return tree


def attention_mask(seg: torch.Tensor, branch: torch.Tensor, flex: bool = False) -> torch.Tensor | BlockMask:
    """The tree mask: same segment, causal, and the key is a prompt token or in the query's branch. Padding
    (segment 0) attends causally among itself, so no query row is empty (a NaN softmax). A boolean (R, 1, T, T)
    tensor for SDPA, or with flex the same mask as a FlexAttention BlockMask (CUDA, see model.Attention), which
    records per 128 × 128 block whether it is empty, full or partial so that the kernel skips the empty ones."""
    if flex:
        R, T = seg.shape
        return create_block_mask(tree_mask_mod(seg, branch), R, None, T, T, device=seg.device)
    i = torch.arange(seg.shape[1], device=seg.device)
    same = seg[:, :, None] == seg[:, None, :]
    tree = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (same & tree & (i[:, None] >= i))[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# CUDA's kernel. Compiled FlexAttention skips the tree's empty blocks, but a compiler may fail or miscompile on a GPU,
# torch build or head shape nobody tested. So the first packed micro batch a process sees on CUDA (per dtype and head
# shape) checks it against SDPA with the boolean mask; if it raises or disagrees, packed rows use SDPA's boolean mask
# (the memory-efficient kernel: it takes a mask and has a backward, but computes every block) for the rest of the run.

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}  # max |flex − sdpa| / max |sdpa|
FLEX_VERDICTS: dict[tuple, bool] = {}  # (device, dtype, heads) -> FlexAttention passed its check in this process


def check_flex(seg: torch.Tensor, branch: torch.Tensor, heads: tuple[int, int, int], dtype: torch.dtype,
               rows: int = 2, length: int = 256) -> str | None:
    """None if compiled FlexAttention (model.compiled_flex_attention) gives SDPA's outputs and q, k, v gradients
    under the tree mask of the first `rows` × `length` tokens of a micro batch, with random q, k, v of the model's
    heads (n_heads, n_kv_heads, head_dim) in `dtype`, within TOLERANCE[dtype]; else the reason, in a few words."""
    seg, branch = seg[:rows, :length], branch[:rows, :length]
    (R, T), (h, kv_h, d), tol = seg.shape, heads, TOLERANCE[dtype]
    g = torch.Generator(seg.device).manual_seed(0)
    shapes = ((R, h, T, d), (R, kv_h, T, d), (R, kv_h, T, d))
    q, k, v = (torch.randn(s, generator=g, device=seg.device, dtype=dtype, requires_grad=True) for s in shapes)
    w = torch.randn(R, h, T, d, generator=g, device=seg.device, dtype=dtype)  # any loss of the output

    def with_grads(y: torch.Tensor) -> tuple:  # (under the caller's autocast: q, k, v are already in dtype)
        return (y, *torch.autograd.grad((y.float() * w).sum(), (q, k, v)))

    try:
        flex = with_grads(model_lib.compiled_flex_attention()(
            q, k, v, block_mask=attention_mask(seg, branch, flex=True), enable_gqa=kv_h != h))
        sdpa = with_grads(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(seg, branch),
                                                         enable_gqa=kv_h != h))
    except Exception as e:  # a compiler or kernel error of any kind: the run goes on with SDPA
        return f"it raised {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    for name, a, b in zip(("output", "dq", "dk", "dv"), flex, sdpa):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()
        if not err <= tol:  # NaN fails too
            return f"its {name} differs from SDPA's by {err:.3g} of the largest value (tolerance {tol:g} in {dtype})"
    return None


def flex_passes(seg: torch.Tensor, branch: torch.Tensor, heads: tuple[int, int, int], dtype: torch.dtype) -> bool:
    """Whether packed rows may use FlexAttention here: check_flex, run once per process, device, dtype and head shape.
    A failure is said in one line (every rank that fails says it): the reason, and the cost of SDPA instead."""
    key = (str(seg.device), dtype, heads)
    if key not in FLEX_VERDICTS:
        reason = check_flex(seg, branch, heads, dtype)
        FLEX_VERDICTS[key] = reason is None
        if reason is not None:
            blocks = attention_mask(seg, branch, flex=True)
            (bq, bk), rank = blocks.BLOCK_SIZE, os.environ.get("RANK", "0")
            print(f"{'' if rank == '0' else f'rank {rank}: '}attention: compiled FlexAttention failed its check "
                  f"against SDPA on {seg.device} in {dtype} ({reason}): packed rows use SDPA with the boolean tree "
                  f"mask for the rest of the run, which also computes the {blocks.sparsity():.0f}% of {bq} x {bk} "
                  f"score blocks that the block mask skips in this micro batch (--attention=flex forces "
                  f"FlexAttention)", flush=True)
    return FLEX_VERDICTS[key]


def attention_heads(model: torch.nn.Module) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of a Llama, wrapped (DDP, torch.compile) or not."""
    a = next(m for m in model.modules() if isinstance(m, model_lib.Attention))
    return a.n_heads, a.n_kv_heads, a.head_dim


def batch_mask(batch: dict, model: torch.nn.Module, attention: str = "auto") -> torch.Tensor | BlockMask:
    """A packed micro batch's tree mask in the form its kernel wants: a BlockMask for FlexAttention (CUDA, unless
    attention='sdpa', or 'auto' and FlexAttention failed its check here), else the boolean mask for SDPA. Call it
    where the forward runs (under autocast): the check runs in the dtype the attention will see."""
    seg, branch = batch["seg"], batch["branch"]
    flex = seg.is_cuda and attention != "sdpa"
    if flex and attention == "auto":
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else next(model.parameters()).dtype
        flex = flex_passes(seg, branch, attention_heads(model), dtype)
    return attention_mask(seg, branch, flex=flex)


def packed_logps(model: torch.nn.Module, batch: dict, reference: bool = False,
                 mask: torch.Tensor | BlockMask | None = None, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x) per example, scored tokens per example), both (E,) fp32, of one packed micro batch: one forward
    (the reference's without autograd), logits only at the scored positions. mask: batch_mask(batch, ...), if the
    caller already has it (train.compute_loss builds it once for the policy and the reference, with its --attention).
    chunk > 0 (--logps_chunk): the LM head runs chunk scored tokens at a time (memory.chunked_logps)."""
    ids = batch["input_ids"]
    mask = batch_mask(batch, model) if mask is None else mask
    if chunk:
        return memory.chunked_logps(model, ids, batch, chunk, reference, pos=batch["pos"], mask=mask)
    kwargs = {"pos": batch["pos"], "mask": mask, "logits_index": batch["index"]}
    logits = ref_lib.reference_logits(model, ids, **kwargs) if reference else model(ids, **kwargs)
    return losses.gathered_logps(logits, batch["targets"], batch["example"], batch["counts"])


def real_tokens(items: list[data.Item], kind: str) -> int:
    """Distinct real tokens of a batch's examples: each prompt once, every response (KTO's KL rows not counted)."""
    return sum(len(it.prompt) + sum(len(r) for r in responses(it, kind, []) if r is not None) for it in items)


def pack_step(items: list[data.Item], kl: list, kind: str, pad_id: int, max_length: int, budget: int,
              shared: bool = True, rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's packed micro batches of one optimizer step's global batch `items` (rank r's share is its r-th
    contiguous slice, as in data.Batches), at most budget // row_capacity rows each, as many on every rank. Each dict
    also has `weight` (a float): the factor of its mean loss in the step's loss, so that the step's gradient is the
    global batch mean's after DDP/FSDP average over ranks (pairs, KTO: its examples / examples per rank; SFT, whose
    loss is a token mean: its response tokens × world / the global batch's)."""
    capacity = row_capacity(kind, max_length, shared)
    rows = max(1, budget // capacity)
    per = len(items) // world
    shares = [(items[r * per:(r + 1) * per], kl[r * per:(r + 1) * per]) for r in range(world)]
    lengths = [[segment_lengths(it, kind, k, shared) for it, k in zip(*share)] for share in shares]
    groups = [group(ls, capacity, rows) for ls in lengths]
    mine = equalize(groups[rank], max(map(len, groups)))  # every rank computes every rank's count
    my_items, my_kl = shares[rank]
    global_tokens = sum(len(it.response) for it in items)
    out = []
    for g in mine:
        batch = collate([my_items[i] for i in g], kind, [my_kl[i] for i in g], pad_id, capacity, shared)
        tokens = sum(len(my_items[i].response) for i in g)
        batch["weight"] = tokens * world / global_tokens if kind == "sft" else len(g) / per
        out.append(batch)
    return out


class PackedBatches:
    """data.Batches' optimizer steps (the same global batches, sharded the same way, resumable the same way), each as
    this rank's packed micro batches (pack_step)."""

    def __init__(self, batches: data.Batches, budget: int, shared: bool = True):
        self.batches, self.budget, self.shared = batches, budget, shared
        self.capacity = row_capacity(batches.data.kind, batches.data.max_length, shared)
        self.rows = max(1, budget // self.capacity)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        b, ds = self.batches, self.batches.data
        items, kl = b.next_items()
        return pack_step(items, kl, ds.kind, ds.pad_id, ds.max_length, self.budget, self.shared, b.rank, b.world)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state)

"""Memory: the two ways a run holds less, and a model of what it holds (docs/performance.md's memory table).

- Activation checkpointing (--activation_checkpointing): each Block's forward runs without keeping its activations
  and is run again in the backward (torch.utils.checkpoint, non-reentrant), so the autograd graph holds one (B, T, dim)
  input per block instead of ~30 dim-sized vectors per token and layer. The blocks' math is model.py's, untouched.
- Chunked log-probs (--logps_chunk): the model returns its final hidden states at the scored positions, and
  losses.head_logps runs the LM head, log-softmax and gather over chunks of them, made again in the backward, so the
  [tokens x vocabulary] logits and their gradient never exist at once.
"""
import argparse
import functools
import json
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import losses
import reference as ref_lib
from model import ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# activation checkpointing


def _recomputed(forward, x, cos, sin, mask=None, cache=None):
    """A Block's forward whose activations are made again in the backward. Generation (a KV cache) and forwards
    without autograd (the reference's, evaluation) have no backward: they run as they are."""
    if cache is not None or not torch.is_grad_enabled():
        return forward(x, cos, sin, mask, cache)
    return checkpoint(forward, x, cos, sin, mask, cache, use_reentrant=False)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute every block of a Llama in the backward; call on the plain policy before DDP/FSDP2 wrap it (the
    references are copies made before, and take no gradient). Parameter names and the state dict do not change."""
    for block in model.layers:
        block.forward = functools.partial(_recomputed, block.forward)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return all(isinstance(block.__dict__.get("forward"), functools.partial) for block in model.layers)


# ----------------------------------------------------------------------------------------------------------------------
# chunked log-probs


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight of a Llama, plain, DDP-wrapped, torch.compile'd or FSDP2-sharded (after a forward, when
    the FSDP2 root, which holds the head, is unsharded)."""
    return ref_lib.unwrap(getattr(model, "_orig_mod", model)).lm_head.weight


def chunked_logps(model: nn.Module, input_ids: torch.Tensor, scored: dict, chunk: int, reference: bool = False,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x), scored tokens) per example, both (E,) fp32, with the LM head run chunk positions at a time:
    scored holds index, targets, example, counts (losses.scored_positions for padded rows, a packed batch's own).
    reference: without autograd, the FSDP2 root resharded after the head has used its weight. kwargs go to the
    forward (packed rows: pos, mask)."""
    with torch.no_grad() if reference else nullcontext():
        hidden = model(input_ids, logits_index=scored["index"], return_hidden=True, **kwargs)
        out = losses.head_logps(hidden, head_weight(model), scored["targets"], scored["example"], scored["counts"],
                                chunk)
    if reference:
        ref_lib.reshard(model)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the memory model: bytes of a TR run's peak, part by part (docs/performance.md checks it against measured peaks)

GIB = 2 ** 30
# Shapes from each model's config.json on the Hub (parameter counts: 8.03B, 7.62B, 0.49B)
MODELS = {
    "Llama-3-8B": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                              tie_embeddings=False, rope_theta=500000.0),
    "Qwen2.5-7B": ModelConfig(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                              tie_embeddings=False, model_type="qwen2", qkv_bias=True),
    "Qwen2.5-0.5B": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                                tie_embeddings=True, model_type="qwen2", qkv_bias=True),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a block."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"q_proj": (c.dim, q), "k_proj": (c.dim, kv), "v_proj": (c.dim, kv), "o_proj": (q, c.dim),
            "gate_proj": (c.dim, c.hidden_dim), "up_proj": (c.dim, c.hidden_dim), "down_proj": (c.hidden_dim, c.dim)}


def param_count(c: ModelConfig) -> dict[str, int]:
    """Exact parameter counts: matmul weights of the blocks (what autocast casts), everything else (embedding, head,
    norms, biases), and their sum, which equals Llama(c).num_params()."""
    shapes = linear_shapes(c)
    matmul = c.n_layers * sum(i * o for i, o in shapes.values())
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    biases = (q + 2 * kv) * c.qkv_bias + c.dim * c.o_bias + (2 * c.hidden_dim + c.dim) * c.mlp_bias
    per_layer = 2 * c.dim + biases + 2 * c.head_dim * c.qk_norm
    other = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim + c.n_layers * per_layer
    return {"matmul": matmul, "other": other, "head": c.vocab_size * c.dim, "total": matmul + other}


def lora_param_count(c: ModelConfig, rank: int, targets: tuple[str, ...] = LINEARS) -> int:
    """Adapter parameters: r * (in + out) for A (r, in) and B (out, r) of each targeted linear layer of each block."""
    return c.n_layers * sum(rank * (i + o) for name, (i, o) in linear_shapes(c).items() if name in targets)


def activation_bytes(c: ModelConfig, tokens: int, dtype: str, checkpointed: bool, lora_rank: int = 0) -> int:
    """Bytes autograd keeps from the policy's forward for its backward, for `tokens` tokens (the hidden states up to
    the final norm; the LM head's logits are logits_bytes'). Per token and block, counted from the tensors the
    blocks of model.py save (tests/test_memory.py measures them with saved-tensor hooks): fp32
    24·dim + 16·hidden + 8·(q + kv) + 4·heads + 8 bytes, bf16 autocast 26·dim + 8·hidden + 4·(q + kv) + 4·heads + 8
    (the residual stream and the norms stay fp32), q = heads·head_dim, kv = kv_heads·head_dim; outside the blocks the
    final norm's 4·(2·dim + 1) and the token ids' 8 per token, and 8·head_dim for RoPE's cos/sin (per position of a
    row; counted per token, an upper bound). Checkpointed blocks keep their fp32 input, 4·dim per token and block, and
    one block's activations exist again while it is recomputed in the backward.
    LoRA (frozen W0 and norms): the norms' outputs are not kept for their weights' gradients (8·dim fp32, 14·dim bf16
    fewer per block; measured exactly in fp32, fitted in bf16), nothing outside the blocks but RoPE's, and each of the 7
    adapters keeps its r-wide x·Aᵀ (4·r or 2·r bytes)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    fp32 = dtype == "float32"
    if fp32:
        block = 24 * c.dim + 16 * c.hidden_dim + 8 * (q + kv) + 4 * c.n_heads + 8
    else:
        block = 26 * c.dim + 8 * c.hidden_dim + 4 * (q + kv) + 4 * c.n_heads + 8
    outside = 4 * (2 * c.dim + 1) + 8 + 8 * c.head_dim
    if lora_rank:
        block += len(LINEARS) * lora_rank * (4 if fp32 else 2) - (8 if fp32 else 14) * c.dim
        outside = 8 * c.head_dim
    kept = c.n_layers * (4 * c.dim if checkpointed else block)
    return tokens * (outside + kept + (block if checkpointed else 0))


def logits_bytes(c: ModelConfig, positions: int, dtype: str, chunk: int) -> int:
    """The LM head's peak: positions (B · logits_to_keep, or the scored tokens when chunked) x vocabulary logits.
    Unchunked, fp32: the policy's logits kept for the backward (4 B each) and their gradient (4), or the reference's
    logits made while the policy's are kept: 8 bytes per element; bf16 autocast: 2 + 2. Chunked: one chunk's bf16/fp32
    logits (4 or 2 B), its fp32 log-softmax or softmax (4) and, bf16, the gradient cast back (2): 8 bytes per element
    of chunk x vocabulary."""
    if chunk:
        return 8 * min(chunk, positions) * c.vocab_size
    return (8 if dtype == "float32" else 4) * positions * c.vocab_size


def estimate(c: ModelConfig, pairs: int, prompt_len: int, response_len: int, dtype: str = "bfloat16",
             checkpointed: bool = False, chunk: int = 0, lora_rank: int = 0, lora_ref_rank: int = 0,
             base_dtype: str = "bfloat16", initial: bool = True, world: int = 1, accumulating: bool = True) -> dict:
    """Peak bytes of one process in a TR-DPO step of `pairs` padded pairs (2·pairs rows of prompt_len + response_len
    tokens), part by part, and their peak:

    full: policy weights fp32 (4 B/param), gradients (4), AdamW's two moments (8), the reference (4) and, for TR runs'
    evaluation, the initial policy (4); bf16 autocast caches a bf16 copy of every matmul weight of the policy for the
    whole forward (2 B/matmul param; kept for the backward). FSDP2 (world > 1) shards these by world, and keeps the
    root's parameters (embedding, head, final norm: a forward root stays unsharded) and two blocks (one computing, one
    prefetched) whole, in fp32.
    LoRA: one frozen W0 (base_dtype: 2 or 4 B/param) shared by policy, reference and initial policy; adapters fp32
    with gradients and moments (16 B/adapter param); the reference's factors (4 B per r_ref·(in + out)); with an fp32
    W0 under autocast, the bf16 copies of W0 that the backward keeps (2 B/matmul param).
    Activations and logits: activation_bytes and logits_bytes. Peak = the persistent parts + the largest of (what the
    forward keeps: activations, logits, autocast copies; plus the gradients while accumulating micro batches, else the
    head's weight gradient, the first one the backward makes) and (the gradients at the end of the backward, after
    the activations are freed; with a tied head, the embedding's dense gradient before it is added to the head's).
    """
    p = param_count(c)
    rows, length = 2 * pairs, prompt_len + response_len
    tokens, keep = rows * length, rows * (response_len + 1)
    parts = {}
    if lora_rank:
        adapters = lora_param_count(c, lora_rank)
        parts["base W0 (shared)"] = p["total"] * (2 if base_dtype == "bfloat16" else 4)
        parts["adapters + grads + AdamW"] = 16 * adapters
        parts["reference factors"] = 4 * lora_param_count(c, lora_ref_rank or 8 * lora_rank)  # config's default cap
        grads = 4 * adapters
        casts = 2 * p["matmul"] if dtype == "bfloat16" and base_dtype == "float32" else 0
    else:
        shard = world if world > 1 else 1
        parts["policy weights"] = 4 * p["total"] // shard
        parts["AdamW moments"] = 8 * p["total"] // shard
        parts["reference"] = 4 * p["total"] // shard
        if initial:
            parts["initial policy"] = 4 * p["total"] // shard
        if world > 1:  # whole while in use: the roots (policy, reference or initial: one at a time) and two blocks
            root = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim
            parts["FSDP2 gathered"] = 4 * (root + 2 * p["total"] // c.n_layers)
        grads = 4 * p["total"] // shard
        casts = 2 * p["matmul"] if dtype == "bfloat16" else 0
    acts = activation_bytes(c, tokens, dtype, checkpointed, lora_rank)
    logits = logits_bytes(c, rows * response_len if chunk else keep, dtype, chunk)
    forward = acts + logits + casts + (grads if accumulating else 0)
    if not lora_rank and not accumulating:  # the backward starts at the head: its weight's gradient is made while
        forward += 4 * c.vocab_size * c.dim // (world if world > 1 else 1)  # every activation is still kept
    if not lora_rank and c.tie_embeddings:  # the embedding's dense gradient, made whole before it is added to the
        parts["tied embedding's gradient"] = 4 * c.vocab_size * c.dim  # head's at the end of the backward
        grads += parts["tied embedding's gradient"]
    parts.update({"gradients" + (" (accumulated)" if accumulating else ""): grads, "activations": acts,
                  "logits": logits, "autocast bf16 copies": casts})
    transient = ("activations", "logits", "autocast bf16 copies", "tied embedding's gradient")
    persistent = sum(v for k, v in parts.items() if k not in transient and not k.startswith("gradients"))
    return {"parts": parts, "persistent": persistent, "peak": persistent + max(forward, grads), "tokens": tokens}


def largest_micro_batch(c: ModelConfig, budget_bytes: float, limit: int = 64, **kwargs) -> int:
    """The most pairs per micro batch whose estimated peak fits budget_bytes (0: not even one)."""
    best = 0
    for pairs in range(1, limit + 1):
        if estimate(c, pairs, **kwargs)["peak"] > budget_bytes:
            break
        best = pairs
    return best


# ----------------------------------------------------------------------------------------------------------------------
# python memory.py --measure: the model against peak memory measured on this machine; python memory.py: the table

MEASURED = "Qwen2.5-0.5B"
MEASURE_SHAPE = ["--dim", "896", "--n_layers", "24", "--n_heads", "14", "--n_kv_heads", "2", "--hidden_dim", "4864",
                 "--vocab_size", "151936", "--model_type", "qwen2"]
TINY_SHAPE = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "1000"]
SETTINGS = {"plain": [], "checkpointing": ["--activation_checkpointing"], "chunked": ["--logps_chunk", "128"],
            "checkpointing + chunked": ["--activation_checkpointing", "--logps_chunk", "128"]}
SETTINGS.update({f"LoRA r16 {k}": v + ["--lora_rank", "16"] for k, v in SETTINGS.items()})


def bench_peak(args: list[str]) -> dict:
    """bench.py's JSON result of one configuration, in a process of its own (its peak RSS is its own)."""
    out = subprocess.run([sys.executable, "bench.py", *args, "--json"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    if out.returncode:
        raise SystemExit(f"memory.py: bench.py {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(a) -> list[dict]:
    """Peak RSS of TR-DPO steps (bench.py: policy + reference, fp32, one micro batch of a.pairs pairs, two optimizer
    steps) of a Qwen2.5-0.5B-shaped random model at the recipe's lengths, one process per setting, next to the model
    (plus the runtime: the peak RSS of the same bench at a tiny shape)."""
    lengths = ["--pairs", str(a.pairs), "--prompt_len", str(a.prompt_len), "--response_len", str(a.response_len),
               "--warmup", "1", "--steps", "1", "--dtype", "float32"]
    shape = MEASURE_SHAPE + ["--n_layers", str(a.n_layers)]
    c = replace(MODELS[MEASURED], n_layers=a.n_layers)
    runtime = bench_peak(TINY_SHAPE + ["--pairs", "1", "--prompt_len", "8", "--response_len", "8", "--steps", "1"])
    runtime_bytes = runtime["peak_mem_mb"] * 2 ** 20
    rows = []
    for name in a.settings.split(","):
        r = bench_peak(shape + lengths + SETTINGS[name])
        rank = 16 if "--lora_rank" in SETTINGS[name] else 0
        e = estimate(c, a.pairs, a.prompt_len, a.response_len, dtype="float32",
                     checkpointed="--activation_checkpointing" in SETTINGS[name],
                     chunk=128 if "--logps_chunk" in SETTINGS[name] else 0, lora_rank=rank, lora_ref_rank=2 * rank,
                     base_dtype="float32", initial=False, accumulating=False)  # (bench: τ = 1, two soft updates)
        modelled = e["peak"] + runtime_bytes
        measured = r["peak_mem_mb"] * 2 ** 20
        rows.append({"setting": name, "measured_gib": measured / GIB, "model_gib": modelled / GIB,
                     "off": modelled / measured - 1, "runtime_gib": runtime_bytes / GIB, "step_ms": r["step_ms"],
                     "parts_gib": {k: v / GIB for k, v in e["parts"].items()}})
        print(json.dumps(rows[-1]), flush=True)
    print(f"| {MEASURED} widths, {a.n_layers} layers, fp32, {a.pairs} pair(s) of {a.prompt_len} + {a.response_len} "
          "tokens | measured peak RSS "
          "(GiB) | model + runtime (GiB) | model off by |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['measured_gib']:.2f} | {r['model_gib']:.2f} | {r['off']:+.1%} |")
    return rows


GPUS = {"1 x 24 GB": (1, 24), "1 x 80 GB": (1, 80), "8 x 80 GB": (8, 80)}


def table(a) -> str:
    """The largest micro batch (pairs of the recipe's lengths, bf16 autocast) per model, GPU and setting, and the
    peak it needs, from estimate(); 0 = does not fit. A GPU's usable share is a.usable of its memory (CUDA context,
    allocator fragmentation)."""
    lines = ["| model | GPUs | training | activation checkpointing | chunked log-probs | largest micro batch "
             "(pairs) | peak at 1 pair (GiB) |", "|---|---|---|---|---|---|---|"]
    for model_name, c in MODELS.items():
        if model_name == MEASURED:
            continue
        for gpus, (world, gb) in GPUS.items():
            budget = a.usable * gb * 1e9
            for kind in ("full", "LoRA"):
                if kind == "full" and world == 1 and estimate(c, 1, a.prompt_len, a.response_len, checkpointed=True,
                                                              chunk=a.chunk)["peak"] > budget:
                    lines.append(f"| {model_name} | {gpus} | full | any | any | 0 | "
                                 f"{estimate(c, 1, a.prompt_len, a.response_len)['peak'] / GIB:.0f} |")
                    continue
                if kind == "LoRA" and world > 1:
                    continue
                for ckpt, chunk in ((False, 0), (True, 0), (True, a.chunk)):
                    kw = dict(prompt_len=a.prompt_len, response_len=a.response_len, checkpointed=ckpt, chunk=chunk,
                              world=world if kind == "full" else 1,
                              lora_rank=a.lora_rank if kind == "LoRA" else 0, lora_ref_rank=a.lora_ref_rank)
                    n = largest_micro_batch(c, budget, limit=a.limit, **kw)
                    lines.append(f"| {model_name} | {gpus} | {kind}{' FSDP2' if world > 1 else ''} | "
                                 f"{'yes' if ckpt else 'no'} | {chunk or 'no'} | {n if n < a.limit else f'>= {n}'} | "
                                 f"{estimate(c, 1, **kw)['peak'] / GIB:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="The memory model's table (default) or its check against measured peaks")
    p.add_argument("--measure", action="store_true", help="measure peak RSS on this CPU (bench.py, one process each)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="with --measure: comma-separated among "
                   + ", ".join(SETTINGS))
    p.add_argument("--pairs", type=int, default=1, help="with --measure: pairs per micro batch")
    p.add_argument("--n_layers", type=int, default=24, help="with --measure: blocks of the Qwen2.5-0.5B shape")
    p.add_argument("--prompt_len", type=int, default=256, help="configs/hh_rlhf.json's max_prompt_length")
    p.add_argument("--response_len", type=int, default=256, help="max_length - max_prompt_length")
    p.add_argument("--chunk", type=int, default=256, help="the table's --logps_chunk")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lora_ref_rank", type=int, default=64)
    p.add_argument("--usable", type=float, default=0.9, help="share of a GPU's memory a run may plan for")
    p.add_argument("--limit", type=int, default=32, help="the largest micro batch tried")
    a = p.parse_args(argv)
    if a.measure:
        return measure(a)
    print(table(a))


if __name__ == "__main__":
    main()

"""Time real training steps of this code (train.compute_loss, backward, clip, AdamW, TR update) on random tokens.

    python bench.py                                  # TR-DPO, soft τ=1, fp32, Llama dim 256 x 4 layers, 8 pairs 64+192
    python bench.py --ref_update static --precompute_ref      # static reference, log-probs computed once
    python bench.py --dim 512 --n_layers 8 --n_heads 8 --prompt_len 128 --response_len 384 --dtype bfloat16
    python bench.py ... --json                       # the last line is one JSON object
    python bench.py --lora_rank 8 --lora_alpha 16    # LoRA TR-DPO: adapters trained, reference = W0 + low-rank delta

Reported, each the median over the timed steps (after --warmup untimed ones):
- step_ms: one optimizer step, from the batch to the updated reference (forward, reference forward, loss, backward,
  gradient clipping, AdamW, TR update); tokens_per_s = tokens of the trained rows (2 * pairs * (prompt + response),
  prompts included; KTO's mismatched KL rows not counted) / step time — bench_trl.py counts the same tokens.
- ref_forward_ms: the reference forward(s) inside that step (hooks on the reference module), and its share.
- tr_update_ms: one TR update of the reference (reference.ReferenceUpdater.after_step) on the steps that update.
- peak_mem_mb: on CUDA torch.cuda.max_memory_allocated over the timed steps; on CPU the process's maximum resident
  set size (resource.getrusage ru_maxrss, the whole process since it started, Python and torch included).
- mfu: model FLOPs per second / the peak matmul FLOP/s measured in this process on the same device and dtype: the
  best n x n x n matmul for n in 256..2048 (CPU) or 1024..8192 (CUDA), n <= max(4·dim, 512 CPU / 2048 CUDA).
  Model FLOPs per step = 3·F_π + F_ref (forward + backward ≈ 3 forwards; F_ref = 0 with --precompute_ref), plus for
  KTO the no-grad policy and reference forwards of the KL rows. A forward's F = model.flops_per_token(T) per token
  (2 per weight of every matmul, LM head included, plus attention's QK^T and AV over the full T), less the LM head's
  2·dim·vocab at the prompt positions that get no logits (train.batch_logps). Elementwise work (norms, RoPE,
  softmax) is not counted.
- compiles: graphs torch.compile built during the run (torch._dynamo's unique_graphs: --compile's, and on CUDA the
  packed path's FlexAttention); attention: packed rows' kernel (flex, or sdpa: forced, on CPU, or after a failed check).
- cpu: torch's CPU capability and whether /proc/cpuinfo lists AVX-512 BF16 or AMX (fast bf16 matmuls on CPU).
- n_trainable: parameters the optimizer updates (with --lora_rank: the adapters; MFU still counts 3 forwards for the
  policy, though a LoRA backward skips W0's weight gradients: compare LoRA runs by tokens/s).
On CUDA every interval is timed with CUDA events; on CPU with time.perf_counter.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import config
import data
import lora
import losses
import memory
import packing
import tokenizer
import reference as ref_lib
import train
from model import Llama, ModelConfig

ROOT = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=None, help="default: n_heads")
    p.add_argument("--hidden_dim", type=int, default=None, help="SwiGLU inner size (default: llama2.c's rule)")
    p.add_argument("--model_type", choices=("llama", "qwen2"), default="llama",
                   help="qwen2: biases on q, k, v (Qwen2.5-0.5B: --dim 896 --n_layers 24 --n_heads 14 --n_kv_heads 2 "
                   "--hidden_dim 4864 --vocab_size 151936)")
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--response_len", type=int, default=192)
    p.add_argument("--pairs", type=int, default=8, help="pairs per step (kto: 2*pairs completions, same tokens)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="bfloat16 = autocast over fp32 weights, as train.py does")
    p.add_argument("--loss", choices=("dpo", "ipo", "kto"), default="dpo")
    p.add_argument("--ref_update", choices=ref_lib.MODES, default="soft")
    p.add_argument("--alpha", type=float, default=0.6, help="soft update weight α")
    p.add_argument("--tau", type=int, default=1, help="τ, steps between reference updates")
    p.add_argument("--precompute_ref", action="store_true", help="static reference: log-probs computed once")
    p.add_argument("--compile", action="store_true", help="torch.compile policy and reference")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute the policy's blocks in the backward (train.py's option)")
    p.add_argument("--logps_chunk", type=int, default=0,
                   help="scored tokens per chunk of the LM head and log-softmax, 0: off (train.py's option)")
    p.add_argument("--attention", choices=("auto", "flex", "sdpa"), default="auto",
                   help="packed rows' kernel on CUDA (train.py's --attention)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one more step")
    p.add_argument("--profile_rows", type=int, default=25, help="rows of that table")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: LoRA policy and low-rank reference (train.py's)")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator, s = lora_alpha / lora_rank")
    p.add_argument("--lora_targets", default=lora.DEFAULT_TARGETS, help="comma-separated linear-layer names")
    p.add_argument("--lora_ref_rank", type=int, default=0, help="rank cap of the reference delta (0: 8 x lora_rank)")
    p.add_argument("--lora_base_dtype", choices=tuple(DTYPES), default="float32", help="storage of the frozen W0")
    p.add_argument("--compare", default="", help="with --data: comma-separated runs among off, rows, shared "
                   "(--packing), trl (bench_trl.py), fixed (random tokens of --prompt_len + --response_len, the "
                   "file's vocabulary), each in a fresh process, interleaved --repeat times; prints their table")
    p.add_argument("--repeat", type=int, default=3, help="rounds of --compare")
    real = p.add_argument_group("real data (--data): batches drawn from a preference file, as train.py draws them")
    real.add_argument("--data", default="", help="a preference JSONL(.gz); --vocab_size and the lengths come from it")
    real.add_argument("--tokenizer", default="gpt2", help="byte, a tiktoken name or a tokenizer path")
    real.add_argument("--max_length", type=int, default=512)
    real.add_argument("--max_prompt_length", type=int, default=256)
    real.add_argument("--micro_batch_size", type=int, default=4, help="pairs per padded forward (--packing off)")
    real.add_argument("--packing", choices=("off", "rows", "shared"), default="shared",
                      help="off: padded rows; rows: one packed segment per sequence; shared: [prompt|chosen|rejected]")
    real.add_argument("--micro_batch_tokens", type=int, default=0,
                      help="packed tokens per forward (0: micro_batch_size x 2 x max_length, train.py's default)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.pairs < 1 or args.prompt_len < 1 or args.response_len < 1:
        p.error("--steps, --pairs, --prompt_len and --response_len must be >= 1, --warmup >= 0")
    if args.vocab_size < 2:
        p.error(f"--vocab_size {args.vocab_size} must be >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    if args.precompute_ref and args.ref_update != "static":
        p.error(f"--precompute_ref needs --ref_update static (a {args.ref_update} reference changes during training)")
    if args.data and (args.precompute_ref or args.loss == "kto" or args.pairs % args.micro_batch_size):
        p.error("--data: --pairs must be a multiple of --micro_batch_size; no --precompute_ref, no kto")
    return args


def data_batches(args):
    """(tokenizer, data.Batches of --pairs pairs per step from the file, in train.py's seeded order); bench_trl.py
    feeds TRL the same steps."""
    tok = tokenizer.get_tokenizer(args.tokenizer)
    ds = data.tokenize(data.read_examples(args.data), tok, "pairs", args.max_length, args.max_prompt_length)
    return tok, data.Batches(ds, args.pairs, args.micro_batch_size, seed=args.seed)


def data_steps(args, device: torch.device):
    """(vocab size, steps): per optimizer step, its micro batches (train.py's, on device) and its items, for
    warmup + steps steps."""
    tok, batches = data_batches(args)
    steps = []
    for _ in range(args.warmup + args.steps):
        items, _ = batches.next_items()
        if args.packing == "off":
            micro = [data.collate(items[j:j + args.micro_batch_size], "pairs", tok.pad_id)  # train.py's padded ones
                     for j in range(0, len(items), args.micro_batch_size)]
        else:
            budget = packing.token_budget("pairs", args.micro_batch_size, args.max_length, args.micro_batch_tokens)
            micro = packing.pack_step(items, [None] * len(items), "pairs", tok.pad_id, args.max_length, budget,
                                      shared=args.packing == "shared")
        steps.append(([{k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()} for mb in micro], items))
    return tok.n_vocab, steps


def useful_flops(model: Llama, items: list) -> int:
    """Forward FLOPs of the work a pair needs: every distinct real token (the prompt once) through the layers, with
    attention counted over its own sequence (prompt tokens: the prompt; response tokens: prompt + that response;
    nanoGPT's full-length convention, as flops_per_token), and the LM head only where a response token is scored."""
    head = 2 * model.config.dim * model.config.vocab_size

    def body(T: int) -> int:
        return model.flops_per_token(T) - head

    total = 0
    for it in items:
        P, C, R = len(it.prompt), len(it.response), len(it.rejected)
        total += P * body(P) + C * body(P + C) + R * body(P + R) + head * (C + R)
    return total


class Clock:
    """Marks on the device's timeline: CUDA events (no sync while marking) or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (synchronises on CUDA)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return 1000 * (end - start)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], reps: int = 5) -> float:
    """Best FLOP/s of n x n x n matmuls in `dtype` over `sizes` (2 n^3 FLOPs each, random inputs). Each product is
    timed on its own and the fastest counts, so a moment of contention from other processes does not lower the peak
    (which would inflate MFU)."""
    clock, best = Clock(device), 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2):  # warm-up: kernel selection, allocator, caches
            a @ b
        for _ in range(reps):
            start = clock.mark()
            a @ b
            best = max(best, 2 * n ** 3 / (clock.ms(start, clock.mark()) / 1000))
    return best


def cpu_features() -> dict:
    """torch's CPU capability (DEFAULT, AVX2, AVX512, ...), the CPU's name, and whether it has AVX-512 BF16 or AMX
    (bf16 matmuls in hardware; without them a bf16 matmul runs ~100x slower than fp32, see docs/packing.md)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        info = ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return {"capability": torch.backends.cpu.get_cpu_capability(), "name": name,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def environment(device: torch.device) -> dict:
    """Where a run ran: the device's name, torch's and CUDA's versions, the CPU (cpu_features) and the 1-minute load
    average at the end (others' work too). gpu_check.py's report starts from it."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_features(),
            "load_avg": os.getloadavg()[0]}


def random_batch(args, device: torch.device, g: torch.Generator) -> dict:
    """Random tokens in train.py's batch layout (data.py's contract), no padding: prompt_len + response_len per row.

    dpo/ipo: rows [chosen_1..P ; rejected_1..P] sharing their prompts. kto: 2P completions (half desirable) and as many
    mismatched KL rows (each prompt with the next row's response)."""
    P, L, R = args.pairs, args.prompt_len, args.response_len
    prompts = torch.randint(0, args.vocab_size, (P, L), generator=g)
    responses = torch.randint(0, args.vocab_size, (2 * P, R), generator=g)
    mask = torch.cat([torch.zeros(2 * P, L), torch.ones(2 * P, R)], 1).long()
    batch = {"input_ids": torch.cat([prompts.repeat(2, 1), responses], 1), "loss_mask": mask}
    if args.loss == "kto":
        batch["desirable"] = torch.arange(2 * P) < P
        batch["kl_input_ids"] = torch.cat([prompts.repeat(2, 1), responses.roll(1, 0)], 1)
        batch["kl_loss_mask"] = mask.clone()
    return {k: v.to(device) for k, v in batch.items()}


def forward_flops(model: Llama, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> int:
    """Model FLOPs of one forward of train.batch_logps: every token through the layers, and the LM head only over the
    positions it keeps (losses.logits_to_keep), since the prompt positions before them get no logits."""
    B, T = input_ids.shape
    skipped = T - losses.logits_to_keep(loss_mask)
    return model.flops_per_token(T) * B * T - 2 * model.config.dim * model.config.vocab_size * B * skipped


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    dtype = DTYPES[args.dtype]
    graphs_before = counters["stats"]["unique_graphs"]  # the process's count: earlier runs' graphs are not this run's
    train.keep_freed_memory(device)  # as train.py does
    if args.data:
        args.vocab_size, steps = data_steps(args, device)
    torch.manual_seed(args.seed)
    model_config = ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                               n_kv_heads=args.n_kv_heads, hidden_dim=args.hidden_dim, model_type=args.model_type,
                               qkv_bias=args.model_type == "qwen2",
                               max_seq_len=2 * args.max_length if args.data else args.prompt_len + args.response_len)
    with torch.device(device):  # initialise in place: a 1B model is slow to init on the CPU and copy over
        policy = Llama(model_config)
    cfg = config.TrainConfig(loss=args.loss, ref_update=args.ref_update, alpha=args.alpha, tau=args.tau,
                             dtype=args.dtype, device=device.type, dim=args.dim, n_layers=args.n_layers,
                             n_heads=args.n_heads, attention=args.attention, logps_chunk=args.logps_chunk,
                             activation_checkpointing=args.activation_checkpointing, lora_rank=args.lora_rank,
                             lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                             lora_ref_rank=args.lora_ref_rank, lora_base_dtype=args.lora_base_dtype)
    config.validate(cfg, world_size=1)
    if args.lora_rank:  # as train.py: one frozen W0 under policy and reference, each with its own delta
        lora.apply(policy, args.lora_rank, args.lora_alpha, args.lora_targets, DTYPES[args.lora_base_dtype],
                   seed=args.seed)
        reference = lora.make_reference(policy)
    else:
        reference = ref_lib.make_reference(policy)
    if args.activation_checkpointing:  # as train.py: the policy only, after the reference is copied
        memory.checkpoint_blocks(policy)
    updater = ref_lib.ReferenceUpdater(args.ref_update, args.alpha, args.tau, config.lora_ref_rank(cfg))
    trained = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=cfg.weight_decay, fused=True)
    if not args.data:  # the same random batch at every step, one micro batch
        batch = random_batch(args, device, torch.Generator().manual_seed(args.seed))
        steps = [([batch], None)] * (args.warmup + args.steps)
    run_policy, run_ref = (torch.compile(policy), torch.compile(reference)) if args.compile else (policy, reference)

    ref_logps = None
    if args.precompute_ref:
        updater.check_precompute()
        with torch.no_grad(), train.autocast(cfg, device):
            ref_logps, _ = train.batch_logps(run_ref, batch["input_ids"], batch["loss_mask"], chunk=args.logps_chunk)

    clock = Clock(device)
    ref_marks: list = []  # (start, end) of every reference forward of the current step
    run_ref.register_forward_pre_hook(lambda *_: ref_marks.append([clock.mark()]))
    run_ref.register_forward_hook(lambda *_: ref_marks[-1].append(clock.mark()))

    def one_step(step: int):
        """One optimizer step and the TR update; returns its (start, computed, stepped, end) marks (forward and
        backward done; clip and AdamW done; TR update done) and whether it updated."""
        ref_marks.clear()
        micro = steps[min(step, len(steps)) - 1][0]  # (the --profile step repeats the last one)
        start = clock.mark()
        for mb in micro:  # train.py's loop: each micro batch's share of the step's mean loss
            weight = mb.get("weight", 1 / len(micro))
            loss, _ = train.compute_loss(run_policy, run_ref, {k: v for k, v in mb.items() if k != "weight"}, cfg,
                                         ref_logps)
            (loss * weight).backward()
        computed = clock.mark()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = clock.mark()
        updated = updater.after_step(step, reference, policy)
        return start, computed, stepped, clock.mark(), updated

    step_ms, ref_ms, update_ms, optim_ms = [], [], [], []
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start, computed, stepped, end, updated = one_step(step)
        if step > args.warmup:
            step_ms.append(clock.ms(start, end))
            optim_ms.append(clock.ms(computed, stepped))
            ref_ms.append(sum(clock.ms(a, b) for a, b in ref_marks))
            if updated:
                update_ms.append(clock.ms(stepped, end))
    if args.profile:  # one more step under torch.profiler: which ops take the time
        cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
        with torch.profiler.profile(activities=activities) as prof:
            start, _, _, end, _ = one_step(args.warmup + args.steps + 1)
            clock.ms(start, end)  # on CUDA: wait for the step's kernels before the profiler stops
        print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=args.profile_rows, max_name_column_width=60))

    timed = steps[args.warmup:]
    if args.data:  # per step, averaged over the timed steps (each has its own data)
        tokens = statistics.mean(sum(mb["input_ids"].numel() for mb in micro) for micro, _ in timed)
        real = statistics.mean(packing.real_tokens(items, "pairs") for _, items in timed)
        # positions holding a token (not padding): padded and "rows" repeat each prompt, "shared" does not
        filled = statistics.mean(sum(int(mb["seg"].gt(0).sum()) for mb in micro) if args.packing != "off" else
                                 sum(2 * len(it.prompt) + len(it.response) + len(it.rejected) for it in items)
                                 for micro, items in timed)
        forward = statistics.mean(useful_flops(policy, items) for _, items in timed)
        flops_per_step = 4 * forward  # policy forward + backward (3), reference forward (1): useful work only
        ms = sum(step_ms) / len(step_ms)  # the steps differ in data: rates from the total time
    else:
        batch = steps[0][0][0]
        tokens = real = filled = batch["input_ids"].numel()
        forward = forward_flops(policy, batch["input_ids"], batch["loss_mask"])
        flops_per_step = 3 * forward + (0 if args.precompute_ref else forward)  # policy forward + backward, reference
        if args.loss == "kto":  # KL rows: a no-grad forward of the policy and one of the reference
            flops_per_step += 2 * forward_flops(policy, batch["kl_input_ids"], batch["kl_loss_mask"])
        ms = statistics.median(step_ms)
    ladder, floor = ((1024, 2048, 4096, 8192), 2048) if device.type == "cuda" else ((256, 512, 1024, 2048), 512)
    peak = matmul_peak(device, dtype, tuple(n for n in ladder if n <= max(floor, 4 * args.dim)))
    if device.type == "cuda":
        peak_mem_mb, peak_mem_kind = torch.cuda.max_memory_allocated() / 2 ** 20, "cuda_max_allocated"
    else:
        peak_mem_mb, peak_mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
    tr_ms = statistics.median(update_ms) if update_ms else 0.0
    ref_fwd = statistics.median(ref_ms)
    flex = device.type == "cuda" and args.attention != "sdpa" and all(packing.FLEX_VERDICTS.values())
    return {
        **environment(device), "dtype": args.dtype, "compiles": counters["stats"]["unique_graphs"] - graphs_before,
        "attention": None if not args.data or args.packing == "off" else "flex" if flex else "sdpa",
        "loss": args.loss, "ref_update": args.ref_update, "alpha": args.alpha, "tau": args.tau,
        "precompute_ref": args.precompute_ref, "compile": args.compile, "n_params": policy.num_params(),
        "n_trainable": sum(p.numel() for p in trained), "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha if args.lora_rank else None,
        "lora_targets": args.lora_targets if args.lora_rank else None,
        "lora_ref_rank": config.lora_ref_rank(cfg) if args.lora_rank else None, "lora_base_dtype": args.lora_base_dtype,
        "activation_checkpointing": args.activation_checkpointing, "logps_chunk": args.logps_chunk,
        "shape": {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "model_type",
                                                  "vocab_size", "prompt_len", "response_len", "pairs")},
        "data": args.data, "packing": args.packing if args.data else None,
        "micro_batches_per_step": statistics.mean(len(micro) for micro, _ in timed),
        "timed_steps": args.steps, "tokens_per_step": tokens, "step_ms": ms, "tokens_per_s": tokens / (ms / 1000),
        "real_tokens_per_step": real, "real_tokens_per_s": real / (ms / 1000), "padding_fraction": 1 - filled / tokens,
        "ref_forward_ms": ref_fwd, "ref_forward_share": ref_fwd / ms, "tr_update_ms": tr_ms,
        "tr_update_share": tr_ms / ms, "optimizer_ms": statistics.median(optim_ms),
        "optimizer_share": statistics.median(optim_ms) / ms, "flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / (ms / 1000) / 1e12, "matmul_peak_tflops": peak / 1e12,
        "mfu": flops_per_step / (ms / 1000) / peak, "peak_mem_mb": peak_mem_mb, "peak_mem_kind": peak_mem_kind,
        "step_ms_all": step_ms,
    }


DATA_OPTIONS = {"--data", "--tokenizer", "--max_length", "--max_prompt_length", "--micro_batch_size",
                "--micro_batch_tokens"}
BENCH_ONLY = {"--micro_batch_tokens", "--ref_update", "--loss", "--compile", "--device", "--precompute_ref",
              "--profile", "--profile_rows", "--attention", "--activation_checkpointing", "--logps_chunk",
              "--lora_ref_rank", "--lora_base_dtype"}  # what bench_trl.py does not take (it takes the other --lora_*)
FLAGS = {"--json", "--compile", "--precompute_ref", "--profile", "--activation_checkpointing"}
COMPARE_KEYS = ("tokens_per_s", "real_tokens_per_s", "mfu", "peak_mem_mb", "padding_fraction", "optimizer_share",
                "tr_update_share", "compiles")


def compare(argv: list[str], args) -> dict:
    """Run each of args.compare in its own process (peak memory is per process), round-robin args.repeat times, and
    print a Markdown table of each column's median [min, max]. TRL's MFU counts our useful FLOPs per step over its
    step time, against our runs' median matmul peak. Returns {run: [result of each round]}."""
    base = strip_options(argv, {"--compare", "--repeat", "--packing", "--json"})
    runs = {name: [] for name in args.compare.split(",")}
    for _ in range(args.repeat):
        for name in runs:
            cmd = {"trl": ["bench_trl.py", *strip_options(base, BENCH_ONLY)],
                   "fixed": ["bench.py", *strip_options(base, DATA_OPTIONS), "--vocab_size", str(args.vocab_size)]}.get(
                name, ["bench.py", *base, "--packing", name])
            out = subprocess.run([sys.executable, *cmd, "--json"], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"bench.py --compare: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: " + " ".join(f"{k} {runs[name][-1].get(k)}" for k in COMPARE_KEYS), flush=True)
    # One peak for every row: each process's own matmul peak swings with the load on a shared machine, so MFU ratios
    # between rows would mix its noise in. TRL does our runs' useful FLOPs per step.
    ours = [r for name, rs in runs.items() if name != "trl" for r in rs]
    peak = statistics.median(r["matmul_peak_tflops"] for r in ours) * 1e12
    real_flops = next((r["flops_per_step"] for name, rs in runs.items() if name not in ("trl", "fixed") for r in rs),
                      None)
    for name, rs in runs.items():
        for r in rs:
            flops = real_flops if name == "trl" else r["flops_per_step"]
            r["mfu"] = None if flops is None else flops / (r["step_ms"] / 1000) / peak
    c, loads = ours[0]["cpu"], [r["load_avg"] for r in ours]
    print(f"MFU against the median matmul peak of the runs, {peak / 1e12:.3f} TFLOP/s | {ours[0]['device']}, CPU "
          f"{c['name']} ({c['capability']}, AVX-512 BF16 {c['avx512_bf16']}, AMX {c['amx_bf16']}) | 1-min load average "
          f"at the end of each run {min(loads):.2f}..{max(loads):.2f}")
    print("| run | " + " | ".join(COMPARE_KEYS) + " |\n|---|" + "---|" * len(COMPARE_KEYS))
    for name, rs in runs.items():
        cells = []
        for k in COMPARE_KEYS:
            v = [r[k] for r in rs if r.get(k) is not None]
            cells.append(f"{statistics.median(v):.4g} [{min(v):.4g}, {max(v):.4g}]" if v else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps(runs))
    return runs


def strip_options(argv: list[str], names: set[str]) -> list[str]:
    """argv without the options in names and their values (--key value or --key=value; FLAGS take none)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.split("=")[0] in names:
            skip = "=" not in a and a not in FLAGS
        else:
            out.append(a)
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        args.vocab_size = tokenizer.get_tokenizer(args.tokenizer).n_vocab
        return compare(argv, args)
    try:
        r = run(args)
    except ValueError as e:  # a model or option the code refuses (train.ConfigError, ModelConfig): one line
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    ref = "precomputed" if r["precompute_ref"] else f"{r['ref_forward_ms']:.0f} ms ({r['ref_forward_share']:.1%})"
    lora_note = (f" | LoRA r={r['lora_rank']} alpha={r['lora_alpha']:g} ({r['n_trainable'] / 1e6:.2f}M trained), "
                 f"reference delta rank <= {r['lora_ref_rank']}" if r["lora_rank"] else "")
    print(f"{r['loss']} ref={r['ref_update']} tau={r['tau']} {r['dtype']} {r['device']}"
          f"{' compiled' if r['compile'] else ''}: {r['n_params'] / 1e6:.1f}M params{lora_note}, "
          f"{r['tokens_per_step']} "
          f"tokens/step | torch {r['torch']} | {r['compiles']} compiled graph(s)"
          + (f" | packed attention {r['attention']}" if r["attention"] else ""))
    c = r["cpu"]
    print(f"CPU {c['name'] or '?'}: capability {c['capability']}, AVX-512 BF16 {'yes' if c['avx512_bf16'] else 'no'}, "
          f"AMX {'yes' if c['amx_bf16'] else 'no'} | load average {r['load_avg']:.2f}")
    if r["data"]:
        print(f"{r['data']} packing={r['packing']}: {r['micro_batches_per_step']:.1f} micro batches/step | "
              f"{r['real_tokens_per_step']:.0f} real tokens/step ({r['real_tokens_per_s']:.0f}/s) | padding "
              f"{r['padding_fraction']:.1%} of {r['tokens_per_step']:.0f} positions/step")
    print(f"step {r['step_ms']:.1f} ms | {r['tokens_per_s']:.0f} tokens/s | reference forward {ref} | "
          f"TR update {r['tr_update_ms']:.2f} ms ({r['tr_update_share']:.2%}) | clip + AdamW "
          f"{r['optimizer_ms']:.1f} ms ({r['optimizer_share']:.1%}) | {r['achieved_tflops']:.3f} TFLOP/s "
          f"= MFU {r['mfu']:.1%} of a measured {r['matmul_peak_tflops']:.3f} TFLOP/s matmul peak | "
          f"peak memory {r['peak_mem_mb']:.0f} MB ({r['peak_mem_kind']})")
    if args.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()

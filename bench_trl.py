"""The baseline side of bench.py: TRL's DPOTrainer doing TR-DPO (sync_ref_model=True) on the same Llama shape, batch
and precision, on random tokens, reporting tokens/s on the same definition as bench.py.

    python bench_trl.py [--dim 256 --n_layers 4 --n_heads 4 --vocab_size 50257 --prompt_len 64 --response_len 192
                         --pairs 8 --dtype float32 --alpha 0.6 --tau 1 --warmup 2 --steps 5] [--json]
    python bench_trl.py --lora_rank 8 --lora_alpha 16 [--lora_targets q_proj,v_proj]   # TRL's DPO with peft LoRA

transformers and trl are dev-only dependencies (requirements-dev.txt); nothing in the runtime imports this file.

How the work is matched to bench.py:
- model: transformers' LlamaForCausalLM, random init, the shape of model.ModelConfig (same SwiGLU width rule, tied
  embedding/head, eps, RoPE theta), SDPA attention (transformers' default);
- data: random token ids rendered as text through a word-level tokenizer whose every word is one token ("t123"), so
  TRL's own text pipeline (EOS appended, prompt/completion split, collator) runs unchanged and each pair becomes
  exactly prompt_len + response_len tokens per sequence (response_len - 1 random tokens + EOS), as in bench.py;
- training: per-device batch = pairs, no gradient accumulation, fp32 or bf16 (TrainingArguments.bf16, i.e. autocast),
  sync_ref_model=True with ref_model_mixup_alpha = alpha and ref_model_sync_steps = tau; TRL's default optimizer
  (fused AdamW), no logging, evaluation, saving or progress bar;
- --lora_rank r > 0: TRL's own LoRA path instead, DPOTrainer(peft_config=peft.LoraConfig(r, lora_alpha, the
  --lora_targets layers)) with no ref_model: the reference is the policy with its adapters disabled, i.e. static DPO
  (TRL refuses sync_ref_model with a PEFT model, so --alpha / --tau do not apply); compare with bench.py --lora_rank;
- timing: wall time between consecutive optimizer-step ends (the reference sync included), median over the timed
  steps after the warm-up; tokens/s = 2 * pairs * (prompt_len + response_len) / step time, bench.py's definition.
"""
import argparse
import json
import logging
import os
import resource
import statistics
import time
import warnings

import torch

import train

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=None)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--response_len", type=int, default=192)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step (the batch size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.6, help="ref_model_mixup_alpha")
    p.add_argument("--tau", type=int, default=1, help="ref_model_sync_steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: peft LoRA of this rank, static reference (adapter "
                   "disabled), TRL's PEFT path")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator: s = lora_alpha / lora_rank")
    p.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linear-layer names (peft's target_modules)")
    real = p.add_argument_group("real data: bench.py --data's optimizer steps, fed to TRL in the same order")
    real.add_argument("--data", default="", help="a preference JSONL(.gz)")
    real.add_argument("--tokenizer", default="gpt2")
    real.add_argument("--max_length", type=int, default=512)
    real.add_argument("--max_prompt_length", type=int, default=256)
    real.add_argument("--micro_batch_size", type=int, default=4, help="per-device batch; --pairs / it accumulation")
    args = p.parse_args(argv)
    if args.response_len < 2 or args.prompt_len < 1:
        p.error("--response_len must be >= 2 (random tokens + EOS) and --prompt_len >= 1")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (a timed step runs from the end of the previous one)")
    if args.data and args.pairs % args.micro_batch_size:
        p.error("--pairs must be a multiple of --micro_batch_size")
    if args.lora_rank < 0 or (args.lora_rank and not args.lora_targets.strip(",")):
        p.error("--lora_rank must be >= 0, and a LoRA run needs --lora_targets")
    return args


def real_preference_dataset(args):
    """(dataset, vocab size, distinct real tokens per timed step, [items of each step]) of bench.py --data's steps:
    our token ids as words, each response without its final EOS (TRL appends its own, so an uncut response keeps its
    length; one cut at max_length gains one token)."""
    from datasets import Dataset

    import bench
    import packing

    tok, batches = bench.data_batches(args)
    steps = [batches.next_items()[0] for _ in range(args.warmup + args.steps)]

    def text(ids: list[int], lead: str = "") -> str:
        ids = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        return lead + " ".join(f"t{i}" for i in ids)

    rows = [{"prompt": text(it.prompt), "chosen": text(it.response, " "), "rejected": text(it.rejected, " ")}
            for items in steps for it in items]
    real = sum(packing.real_tokens(items, "pairs") for items in steps[args.warmup:]) / args.steps
    return Dataset.from_list(rows), tok.n_vocab + 1, real


def word_tokenizer(vocab_size: int):
    """A fast tokenizer with one token per whitespace-separated word t0..t{V-2} plus an EOS, so that text made of
    those words round-trips exactly (what we need to feed chosen token ids through TRL's text pipeline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<eos>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def random_preference_dataset(args, n_rows: int):
    """n_rows prompt/chosen/rejected texts of random words; the chosen/rejected texts start with a space so that
    tokenize(prompt + chosen) = tokenize(prompt) + tokenize(chosen), the split TRL looks for."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(args.seed)

    def text(n: int) -> str:
        return " ".join(f"t{i}" for i in torch.randint(0, args.vocab_size - 1, (n,), generator=g).tolist())

    rows = [{"prompt": text(args.prompt_len), "chosen": " " + text(args.response_len - 1),
             "rejected": " " + text(args.response_len - 1)} for _ in range(n_rows)]
    return Dataset.from_list(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    real = None
    if args.data:  # word t<i> is our token i; the word tokenizer's EOS is one more id
        train_dataset, args.vocab_size, real = real_preference_dataset(args)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renames, not ours to fix
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    # the same allocator setting as bench.py, so the comparison is of the trainers, not of malloc
    train.keep_freed_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    hidden = 32 * -(-int(2 * 4 * args.dim / 3) // 32)  # model.ModelConfig's llama2.c rule for the SwiGLU width
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=hidden,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads or args.n_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=max(2048, args.prompt_len + args.response_len),
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=args.vocab_size - 1,
                         pad_token_id=args.vocab_size - 1, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    peft_config, ref_model = None, None
    if args.lora_rank:  # TRL's PEFT path: no reference model, the adapter disabled is the (static) reference
        from peft import LoraConfig
        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                                 target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")
    else:
        ref_model = LlamaForCausalLM(config)
        ref_model.load_state_dict(model.state_dict())

    n_steps = args.warmup + args.steps
    train_config = DPOConfig(
        output_dir="/tmp/bench_trl", per_device_train_batch_size=args.micro_batch_size if args.data else args.pairs,
        gradient_accumulation_steps=args.pairs // args.micro_batch_size if args.data else 1,
        max_steps=n_steps, learning_rate=1e-6, beta=args.beta, loss_type=["sigmoid"], max_length=None,
        sync_ref_model=not args.lora_rank, ref_model_mixup_alpha=args.alpha, ref_model_sync_steps=args.tau,
        bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(), seed=args.seed,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True)

    ends: list[float] = []

    class StepClock(TrainerCallback):  # added last, so it runs after TRL's SyncRefModelCallback
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    if not args.data:
        train_dataset = random_preference_dataset(args, args.pairs * n_steps)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=train_config, processing_class=word_tokenizer(
        args.vocab_size), train_dataset=train_dataset, peft_config=peft_config)
    trainer.add_callback(StepClock())
    if args.data:  # bench.py's steps in bench.py's order, not reshuffled
        from torch.utils.data import SequentialSampler
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
        micro = list(trainer.get_train_dataloader())
        per_step = args.pairs // args.micro_batch_size
        # the positions TRL computes (padded [chosen; rejected] rows) per timed step
        tokens = sum(b["input_ids"].numel() for b in micro[args.warmup * per_step:]) / args.steps
    else:
        batch = next(iter(trainer.get_train_dataloader()))
        tokens = batch["input_ids"].numel()  # the [chosen; rejected] rows TRL trains on, prompts included
        expected = 2 * args.pairs * (args.prompt_len + args.response_len)
        if tokens != expected:
            raise RuntimeError(f"bench_trl.py: TRL's batch has {tokens} tokens, expected {expected}: the tokenizer "
                               f"split the random text differently")
    trainer.train()
    gaps = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])]
    step_s = sum(gaps) / len(gaps) if args.data else statistics.median(gaps)  # real steps differ: the mean
    model = trainer.model  # the PeftModel with --lora_rank
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak_mem_mb = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20  # as bench.py
    result = {"impl": "trl.DPOTrainer", "peak_mem_mb": peak_mem_mb, "trl": __import__("trl").__version__,
              "tokens_per_step": tokens,
              "step_ms": 1000 * step_s, "tokens_per_s": tokens / step_s, "n_params": n_params, "dtype": args.dtype,
              "data": args.data, "real_tokens_per_step": real, "real_tokens_per_s": real and real / step_s,
              "alpha": args.alpha, "tau": args.tau, "timed_steps": args.steps, "n_trainable": n_trainable,
              "ref_update": "static" if args.lora_rank else "soft", "lora_rank": args.lora_rank,
              "lora_alpha": args.lora_alpha if args.lora_rank else None,
              "lora_targets": args.lora_targets if args.lora_rank else None,
              "peft": __import__("peft").__version__ if args.lora_rank else None}
    how = (f"peft LoRA r={args.lora_rank}, alpha={args.lora_alpha:g}, reference = adapter disabled" if args.lora_rank
           else f"sync_ref_model, alpha={args.alpha}, tau={args.tau}")
    print(f"TRL DPOTrainer ({how}): {n_params / 1e6:.1f}M params ({n_trainable / 1e6:.2f}M trained), "
          f"{tokens} tokens/step, {result['step_ms']:.0f} ms/step, {result['tokens_per_s']:.0f} tokens/s")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

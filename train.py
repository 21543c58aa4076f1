"""Train a Llama with SFT, then DPO / IPO / KTO against a static or trust-region (TR) reference, on 1 CPU to N GPUs.

    python train.py                                   # the embedded demo: SFT, DPO, TR-DPO on a synthetic task
    python train.py --config=configs/hh_rlhf.json --loss=dpo --ref_update=soft
    torchrun --standalone --nproc_per_node=8 train.py --config=... [--fsdp=true]

TR alignment (Gorbatovski et al. 2024, arXiv 2404.09656) updates the reference of DPO/IPO/KTO during training:
soft   θ_ref ← α·θ + (1−α)·θ_ref   every τ steps        (TR-DPO^α)
hard   θ_ref ← θ                   every τ steps        (TR-DPO^τ)
The flow below is nanoGPT's: config (config.py), setup, model, data, then one loop of
forward/backward/step/log/eval/checkpoint.
"""
import ctypes
import gc
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

import checkpoint
import data
import inputs
import lora
import losses
import memory
import packing
import judge as judge_lib
import tokenizer
import reference as ref_lib
import synthetic
from config import (ConfigError, TrainConfig, auto_tokenizer, data_splits, fail, help_text, lora_ref_rank,
                    parse_config, schedule_warning, truncation_warnings)
from model import Llama, ModelConfig, check_context, check_pretrained, read_json


# ----------------------------------------------------------------------------------------------------------------------
# the loss of one micro batch (bench.py times exactly this)


def batch_logps(model: torch.nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor, reference: bool = False,
                keep: int | None = None, chunk: int = 0):
    """(log π(y|x) summed over response tokens, response token counts), both (B,) fp32: one forward (the reference's,
    without autograd, if reference). Logits are made only for the last keep = losses.logits_to_keep(loss_mask)
    positions (pass it when known: on GPU it costs a sync), so the LM head and the log-softmax over the vocabulary
    skip the prompt part that every row has. chunk > 0 (--logps_chunk): only the scored positions, their LM head run
    chunk tokens at a time (memory.chunked_logps)."""
    if chunk:
        return memory.chunked_logps(model, input_ids, losses.scored_positions(input_ids, loss_mask), chunk, reference)
    keep = losses.logits_to_keep(loss_mask) if keep is None else keep
    logits = ref_lib.reference_logits(model, input_ids, keep) if reference else model(input_ids, logits_to_keep=keep)
    return losses.sequence_logps(logits, input_ids[:, -keep:], loss_mask[:, -keep:])


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast (CPU or GPU) or nothing; sequence_logps upcasts the logits to fp32 before its log-softmax."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def compute_loss(policy, reference, batch: dict, cfg: TrainConfig, ref_logps: torch.Tensor | None = None):
    """(loss, metrics) of one micro batch: the mean over its examples (sft: over its response tokens).

    Rewards are β·(log π − log π_ref) per sequence; kl_ref is Σ(log π − log π_ref) / Σ tokens on the chosen responses,
    a per-token estimate of KL(π‖π_ref) on the data (on-policy estimates are made at eval time).
    """
    ids, packed = batch["input_ids"], "pos" in batch
    if cfg.loss == "rm":
        return reward_model_loss(policy, batch, cfg)
    with autocast(cfg, ids.device):
        if packed:  # packing.py's rows: one forward gives every example's log-probs (KTO: and its KL row's)
            tree = packing.batch_mask(batch, policy, cfg.attention)  # once for both forwards, checked in their dtype

            def forward_logps(model, reference=False):
                return packing.packed_logps(model, batch, reference, tree, cfg.logps_chunk)
        else:
            mask = batch["loss_mask"]
            keep = losses.logits_to_keep(mask)  # once for the policy and the reference forward

            def forward_logps(model, reference=False):
                return batch_logps(model, ids, mask, reference, keep, cfg.logps_chunk)
        logps, n = forward_logps(policy)
        if cfg.loss == "sft":  # next-token cross-entropy on the response tokens
            loss = -logps.sum() / n.sum().clamp(min=1)
            return loss, {"loss": loss.item()}
        if ref_logps is None:
            with torch.no_grad():
                ref_logps, _ = forward_logps(reference, reference=True)
        if cfg.loss == "kto" and packed:  # [completions ; KL completions]; z_ref takes no gradient
            b = len(batch["desirable"])
            logps, policy_kl, ref_logps, ref_kl, n = logps[:b], logps[b:].detach(), ref_logps[:b], ref_logps[b:], n[:b]
        elif cfg.loss == "kto":  # z_ref from the mismatched KL rows; detached, so the policy side needs no gradient
            kl_ids, kl_mask = batch["kl_input_ids"], batch["kl_loss_mask"]
            kl_keep = losses.logits_to_keep(kl_mask)
            with torch.no_grad():
                policy_kl, _ = batch_logps(policy, kl_ids, kl_mask, keep=kl_keep, chunk=cfg.logps_chunk)
                ref_kl, _ = batch_logps(reference, kl_ids, kl_mask, reference=True, keep=kl_keep,
                                        chunk=cfg.logps_chunk)
        if cfg.loss == "kto":
            good = batch["desirable"]
            per_example, rewards, z_ref = losses.kto_loss(logps, ref_logps, good, policy_kl, ref_kl, cfg.beta)
            good_f = good.float()
            chosen, rejected = masked_mean(rewards, good_f), masked_mean(rewards, 1 - good_f)
            acc = ((rewards > 0) == good).float().mean()
            extra = {"chosen_logp": masked_mean(logps.detach(), good_f),
                     "rejected_logp": masked_mean(logps.detach(), 1 - good_f), "kto_z_ref": z_ref,
                     "kl_ref": ((logps.detach() - ref_logps) * good_f).sum() / (n * good_f).sum().clamp(min=1)}
        else:
            b = logps.shape[0] // 2  # examples are [chosen_1..b ; rejected_1..b]
            pol, ref = (logps / n, ref_logps / n) if cfg.loss == "ipo" else (logps, ref_logps)  # IPO: length-averaged
            args = (pol[:b], pol[b:], ref[:b], ref[b:], cfg.beta)
            per_example, chosen_r, rejected_r = (losses.ipo_loss(*args) if cfg.loss == "ipo"
                                                 else losses.dpo_loss(*args, cfg.label_smoothing))
            if cfg.loss == "ipo":  # the rewards (metrics) stay β·(summed log-ratio), as for DPO and in TRL's logs
                chosen_r, rejected_r = (cfg.beta * (logps.detach() - ref_logps)).split(b)
            chosen, rejected, acc = chosen_r.mean(), rejected_r.mean(), (chosen_r > rejected_r).float().mean()
            extra = {"chosen_logp": logps[:b].detach().mean(), "rejected_logp": logps[b:].detach().mean(),
                     "kl_ref": (logps[:b].detach() - ref_logps[:b]).sum() / n[:b].sum().clamp(min=1)}
        loss = per_example.mean()
    return loss, pair_metrics(loss, acc, chosen, rejected, extra)


def pair_metrics(loss: torch.Tensor, acc, chosen, rejected, extra: dict | None = None) -> dict[str, float]:
    """A micro batch's metrics as floats, read back in one device sync for all of them."""
    metrics = {"loss": loss.detach(), "reward_acc": acc, "margin": chosen - rejected, "chosen_reward": chosen,
               "rejected_reward": rejected, **(extra or {})}
    values = torch.stack([v.float() for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def reward_model_loss(policy, batch: dict, cfg: TrainConfig):
    """(loss, metrics) of a micro batch of pairs for loss=rm: the policy is a reward model (a score head), r(x, y) its
    score at each response's last token, read through logits_index: packed rows carry those positions (packing's
    `last`), padded rows end each response at its last loss_mask = 1. Bradley–Terry: losses.rm_loss."""
    ids = batch["input_ids"]
    with autocast(cfg, ids.device):
        if "pos" in batch:
            kwargs = {"pos": batch["pos"], "mask": packing.batch_mask(batch, policy, cfg.attention),
                      "logits_index": batch["last"]}
        else:  # right-padded [chosen_1..b ; rejected_1..b]: causal attention never sees the pads after a response
            B, T = ids.shape
            last = (torch.arange(T, device=ids.device) * batch["loss_mask"]).argmax(-1)
            kwargs = {"logits_index": torch.arange(B, device=ids.device) * T + last}
        rewards = policy(ids, **kwargs)[:, 0].float()
    b = rewards.shape[0] // 2
    per_pair, chosen, rejected = losses.rm_loss(rewards[:b], rewards[b:])
    loss = per_pair.mean()
    return loss, pair_metrics(loss, (chosen > rejected).float().mean(), chosen.mean(), rejected.mean())


# ----------------------------------------------------------------------------------------------------------------------
# schedule, distributed setup, models


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / linear decay to 0, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress) if cfg.schedule == "linear" else cfg.lr


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); a process group (nccl on GPU, gloo on CPU) when launched by torchrun."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but torch sees no GPU")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU with glibc, make malloc keep freed memory for reuse instead of handing it back to the kernel.

    glibc returns every freed block over 32 MB to the kernel (munmap) and trims the heap behind it, so each training
    step maps its (B, T, V) logits and activations afresh and page-faults them in, 4 KB at a time, zeroed by the
    kernel: on the README's 2-core CPU that was ~600k faults and a third of a bf16 step. The price is a heap that
    never shrinks (bench.py's fp32 run: max RSS 2.7 -> 3.3 GB). Returns whether the setting was applied."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))  # no mmap, no trim


def load_model(cfg: TrainConfig, tok, dtype: torch.dtype = torch.float32) -> Llama:
    """The initial policy: from scratch (seeded identically on every rank), or a Hugging Face / our checkpoint, its
    weights read in dtype (LoRA's bf16 base: a bf16 checkpoint is never held in fp32)."""
    if cfg.init_from == "scratch":
        torch.manual_seed(cfg.seed)
        # the context: every sequence this run may hold, with or without eval samples (num_samples may change on
        # --resume, and the model's config comes from its checkpoint then)
        context = max(cfg.max_length, cfg.max_prompt_length + cfg.max_new_tokens)
        return Llama(ModelConfig(vocab_size=tok.n_vocab, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                 max_seq_len=context, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 reward_model=cfg.loss == "rm", pad_id=tok.pad_id if cfg.loss == "rm" else None))
    try:
        model = Llama.from_pretrained(checkpoint.model_dir(cfg.init_from), dtype=dtype)
        check_length(cfg, model.config, f"init_from={cfg.init_from}")
        check_context(model.config, longest_sequence(cfg))  # a sliding window that would cut this run's sequences
    except ConfigError:  # check_length's, complete
        raise
    except (ValueError, OSError, SafetensorError) as e:  # a bad config.json or weights file: its message names it
        fail(f"init_from={cfg.init_from}: {e}")
    if model.is_reward_model and cfg.loss != "rm":
        fail(f"init_from={cfg.init_from} is a reward model (a score head, no LM head): loss={cfg.loss} trains a "
             "causal LM")
    if cfg.loss == "rm" and not model.is_reward_model:  # a new score head, seeded: identical on every rank
        model.add_score_head(torch.Generator().manual_seed(cfg.seed))
    if cfg.loss == "rm" and model.config.pad_id is None:  # transformers' classes need it to find a row's last token
        model.config.pad_id = tok.pad_id
    return model


def check_length(cfg: TrainConfig, config: ModelConfig, where: str):
    """Before any work: the run's longest sequence fits the model's context (its max_position_embeddings)."""
    n = longest_sequence(cfg)
    if n > config.max_seq_len:
        options = (f"max_length={cfg.max_length}" if n == cfg.max_length else
                   f"max_prompt_length + max_new_tokens = {cfg.max_prompt_length} + {cfg.max_new_tokens} = {n}")
        fail(f"{options} tokens is longer than the context of {where}, max_position_embeddings {config.max_seq_len} "
             f"(config.json): use at most {config.max_seq_len} tokens")


def lora_models(cfg: TrainConfig, tok, ckpt: Path | None, device: torch.device):
    """(policy W0 + s·B·A, reference W0 + ΔW_ref or None for sft, initial policy W0 for TR runs' eval KL or None), all
    on one frozen W0 storage: the initial model's weights, or on resume the checkpoint's base/, adapters and
    reference factors (lora.load_checkpoint)."""
    base_dtype = getattr(torch, cfg.lora_base_dtype)
    base = load_model(cfg, tok, base_dtype) if ckpt is None else Llama.from_pretrained(ckpt / "base", dtype=None)
    try:
        policy = lora.apply(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base_dtype, seed=cfg.seed,
                            trainable=("score",) if cfg.loss == "rm" else ()).to(device)  # a reward model's new head
    except ValueError as e:  # trains in full; the base is cast to its dtype before it reaches the GPU
        fail(str(e))
    reference = lora.make_reference(policy) if cfg.loss not in ("sft", "rm") else None
    initial = lora.make_reference(policy) if cfg.ref_update != "static" else None  # W0 itself: ΔW = 0, no copy
    if ckpt is not None:  # before FSDP2 shards the adapters
        try:
            lora.load_checkpoint(ckpt, policy, reference)
        except ValueError as e:
            fail(f"--resume: {e}")
    adapters = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"LoRA: rank {cfg.lora_rank} on {len(lora.layers(policy, lora.LoRALinear))} layers ({cfg.lora_targets}): "
        f"{adapters / 1e6:.3f}M trained parameters; base W0 frozen in {cfg.lora_base_dtype}, "
        + ("each model's own shards under FSDP2" if cfg.fsdp else "one copy under policy, reference and initial"))
    return policy, reference, initial


def longest_sequence(cfg: TrainConfig) -> int:
    """The most tokens one sequence of this run holds: a training example (prompt + response, data.tokenize's
    max_length) or an eval prompt (at most max_prompt_length) with its max_new_tokens generated ones."""
    generates = cfg.num_samples and cfg.loss != "rm"  # a reward model generates nothing
    return max(cfg.max_length, cfg.max_prompt_length + cfg.max_new_tokens if generates else 0)


def check_vocab(cfg: TrainConfig, tok):
    """Before any work: refuse a model vocabulary smaller than the tokenizer's (its ids would index past the
    embedding), and a config.json the weights' headers contradict. A larger vocabulary is fine: evaluate's generate
    never samples the ids the tokenizer cannot decode."""
    if cfg.init_from == "scratch":
        return
    file = checkpoint.model_dir(cfg.init_from) / "config.json"
    try:  # read_json: a regular file of at most 64 MiB holding an object; vocab_size an integer >= 1
        vocab = read_json(file)["vocab_size"]
        inputs.check_fields({"vocab_size": vocab}, {"vocab_size": inputs.POSITIVE_INT}, file)
    except (ValueError, KeyError) as e:
        fail(f"init_from={cfg.init_from}: cannot read vocab_size from {file} ({type(e).__name__}: {e})")
    if vocab < tok.n_vocab:
        fail(f"init_from={cfg.init_from}: vocab_size {vocab} ({file}) < the {tok.n_vocab} ids of tokenizer="
             f"{cfg.tokenizer}; choose the tokenizer the model was trained with")
    try:  # config.json against the weights' headers (no tensor read): a bad model is named before the data is read
        check_pretrained(file.parent)
    except (ValueError, OSError) as e:
        fail(f"init_from={cfg.init_from}: {e}")


def distribute(models: list, cfg: TrainConfig, world: int, device: torch.device) -> list:
    """FSDP2: every block, then the root (tied embedding/head in one group), on an explicit 1-D mesh, for the policy
    and the references alike so TR updates run shard by shard. DDP: the policy only (references take no gradient)."""
    models = [m if m is None else m.to(device) for m in models]
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for m in filter(None, models):
            for block in m.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
    elif world > 1:
        models[0] = torch.nn.parallel.DistributedDataParallel(models[0],
                                                              device_ids=[device] if device.type == "cuda" else None)
    return models


def grad_sync(policy, cfg: TrainConfig, last_micro_step: bool):
    """Gradient accumulation: reduce gradients across ranks only on the last micro step of an optimizer step."""
    if cfg.fsdp:
        policy.set_requires_gradient_sync(last_micro_step)
        return nullcontext()
    if isinstance(policy, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
        return policy.no_sync()
    return nullcontext()


# options a resume may change: run length, bookkeeping, where the run lives, and how (not what) is computed
RESUMABLE = ("max_steps", "eval_every", "ckpt_every", "keep_last", "log_every", "resume", "num_samples", "out_dir",
             "fsdp", "device", "compile", "attention", "max_bad_steps", "wandb_project", "overwrite")


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """With cfg.resume, the newest usable checkpoint of out_dir (complete, undamaged, finite: checkpoint.verify),
    passing over damaged newer ones with a warning, after checking it was made with the same options. A different
    max_steps is refused unless schedule=constant: it would move the decaying learning rate at the resume step."""
    if not cfg.resume:
        return None
    ckpt = checkpoint.resumable(cfg.out_dir, log)
    saved = json.loads((ckpt / "train_config.json").read_text())
    resolved = asdict(replace(cfg, tokenizer=auto_tokenizer(cfg)))  # saved configs hold the resolved tokenizer
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # an option newer than the checkpoint was not there
    changed = [k for k, v in resolved.items() if k not in RESUMABLE and saved.get(k, defaults[k]) != v]  # to change
    if changed:
        fail(f"--resume: {ckpt} was trained with other values of {', '.join(changed)}")
    step = json.loads((ckpt / "state.json").read_text())["step"]
    if saved["max_steps"] != cfg.max_steps and cfg.schedule != "constant":
        was, now = get_lr(step, replace(cfg, max_steps=saved["max_steps"])), get_lr(step, cfg)
        fail(f"--resume: max_steps={cfg.max_steps} differs from the run's {saved['max_steps']}: the {cfg.schedule} "
             f"learning rate at step {step + 1} would jump from {was:.3g} to {now:.3g}; keep max_steps="
             f"{saved['max_steps']}, or train on in a new run and schedule: --init_from={cfg.out_dir} "
             f"--out_dir={cfg.out_dir.rstrip('/')}-2")
    if step >= cfg.max_steps and evaluated(Path(cfg.out_dir) / "metrics.jsonl", step):
        fail(f"--resume: {ckpt} is at step {step} of max_steps={cfg.max_steps}: the run is complete")
    return ckpt  # (at max_steps without the final eval: a run killed after its last checkpoint; resume evaluates)


def eval_due(step: int, cfg: TrainConfig) -> bool:
    return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps


def evaluated(metrics_file: Path, step: int) -> bool:
    """Whether metrics.jsonl holds the eval row of this step. The checkpoint is written before the eval, so a run
    killed in between has a checkpoint of an eval step without its eval: --resume runs it first."""
    return metrics_file.exists() and any(
        line.endswith("\n") and (r := json.loads(line))["step"] == step and r["split"] == "eval"
        for line in metrics_file.read_text().splitlines(keepends=True))


def make_data(cfg: TrainConfig, tok, rank: int, world: int):
    """(train batches: next() gives this rank's micro batches of one optimizer step, this rank's eval batches, the
    token ids of the fixed eval prompts, the same prompts as the data has them: text or chat messages, for a judge).
    Held-out data: eval_data, or the first eval_size examples of data."""
    kind = {"sft": "sft", "kto": "kto"}.get(cfg.loss, "pairs")
    train_split, held_out = data_splits(cfg)
    if cfg.data == "synthetic":
        records = synthetic.make_records(synthetic.TRAIN_EXAMPLES + cfg.eval_size, cfg.seed, sft=cfg.loss == "sft")
        examples = data.from_records(records, source="synthetic")
    else:
        examples = data.read_examples(cfg.data, split=train_split or "auto")
    try:  # data.py's ValueErrors (too few examples, a kind the data cannot give) become one-line errors
        if held_out:
            train_ex, eval_ex = examples, data.read_examples(held_out[0], split=held_out[1] or "auto")[:cfg.eval_size]
        else:
            train_ex, eval_ex = data.split_eval(examples, cfg.eval_size)
        log(f"train data: {train_ex.source}; eval data: "
            + (eval_ex.source if held_out else f"the first {len(eval_ex)} examples of {examples.source}"))
        train_set, eval_set = (data.tokenize(ex, tok, kind, cfg.max_length, cfg.max_prompt_length)
                               for ex in (train_ex, eval_ex))
        for name, ds in (("train", train_set), ("eval", eval_set)):
            r = ds.report
            log(f"{name} data: {r['examples']} {kind} of {r['rows']} rows | dropped {r['dropped']} | truncated "
                f"{r['truncated']} | sequence tokens {r['tokens']['sequence']}")
            for warning in truncation_warnings(name, r, cfg):
                log(warning)
        if not train_set.items:
            fail(f"data={cfg.data}: every one of its {train_set.report['rows']} training rows was dropped "
                 f"({train_set.report['dropped']}); check max_length / max_prompt_length")
        if len(eval_set.items) % world:  # equal shares: every rank must run the same number of (FSDP) forwards
            log(f"eval data: the last {len(eval_set.items) % world} example(s) left out to split over {world} ranks")
            eval_set.items = eval_set.items[:len(eval_set.items) - len(eval_set.items) % world]
        train_batches = data.Batches(train_set, cfg.batch_size, cfg.micro_batch_size, rank, world, cfg.seed)
        if cfg.packing:
            budget = packing.token_budget(kind, cfg.micro_batch_size, cfg.max_length, cfg.micro_batch_tokens)
            train_batches = packing.PackedBatches(train_batches, budget)
    except data.DataError:
        raise
    except ValueError as e:
        fail(f"data={cfg.data}: {e}")
    if not eval_set.items:  # valid, e.g. an eval set of pairs with chosen == rejected: train on, evaluate nothing
        log("eval data: no examples left: held-out metrics and generations are skipped")
    elif cfg.num_samples == 0:
        log("num_samples=0: no generations at eval (held-out metrics only)")
    elif cfg.loss == "rm":
        log("loss=rm: a reward model generates nothing: no generations at eval (held-out pair accuracy and margin)")
    generated = [] if cfg.loss == "rm" else eval_set.items[:cfg.num_samples]
    prompts = [it.prompt for it in generated]
    texts = [eval_ex[it.group].prompt for it in generated]  # an item's group is its example's index
    return train_batches, data.eval_batches(eval_set, cfg.micro_batch_size, rank, world), prompts, texts


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: held-out loss and rewards, plus on-policy generations from fixed prompts


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(policy, reference, initial, eval_batches: list[dict], prompts: list[list[int]], cfg: TrainConfig,
             tok, device: torch.device, judge=None, prompt_texts: list | None = None) -> dict:
    """Held-out metrics (mean over all ranks' eval batches) with the *initial* policy as reference, so that rewards
    and accuracies of static and TR runs share one scale; then generations from the fixed prompts (identical on every
    rank, as FSDP2 needs all ranks in each forward) and on-policy KL estimates per response (nats):
    kl_ref = E_{y~π}[log π(y|x) − log π_ref(y|x)], kl_init the same against the initial policy. judge (judge.py):
    judge_score, its mean score of the sampled responses (decoded without their end token) to prompt_texts."""
    initial = reference if initial is None else initial
    sums: dict[str, float] = {}
    for batch in eval_batches:
        _, m = compute_loss(policy, initial, {k: v.to(device) for k, v in batch.items()}, cfg)
        sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
    keys = sorted(sums)
    totals = all_reduce_sum([sums[k] for k in keys] + [len(eval_batches)], device)
    out = {k: v / totals[-1] for k, v in zip(keys, totals)}
    if not prompts:  # no eval examples or num_samples=0 (make_data said so)
        ref_lib.reshard(policy)
        out.pop("kl_ref", None)  # an eval row's kl_ref is the on-policy estimate below, never the one on the data
        return out
    gen_model = policy if cfg.fsdp else ref_lib.unwrap(policy)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # same samples on every rank and every resume
    # the tokenizer's end of a response stops a row; ids past its vocabulary (a larger model vocab) are never drawn
    stop, n_vocab = tok.end_ids, tok.n_vocab
    with autocast(cfg, device):
        greedy = gen_model.generate(prompts, cfg.max_new_tokens, temperature=0.0, stop_ids=stop, n_vocab=n_vocab)
        sampled = gen_model.generate(prompts, cfg.max_new_tokens, temperature=1.0, generator=gen, stop_ids=stop,
                                     n_vocab=n_vocab)
        ids, mask = data.pad(list(zip(prompts, sampled)), tok.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        keep = losses.logits_to_keep(mask)
        logp, _ = batch_logps(gen_model, ids, mask, keep=keep, chunk=cfg.logps_chunk)
        for name, model in (("kl_ref", reference), ("kl_init", initial)):
            if model is not None:
                other, _ = batch_logps(model, ids, mask, reference=True, keep=keep, chunk=cfg.logps_chunk)
                out[name] = (logp - other).mean().item()
    ref_lib.reshard(policy)  # an FSDP2 root stays gathered after a forward without backward
    if cfg.data == "synthetic":
        for name, rows in (("gold_greedy", greedy), ("gold_sampled", sampled)):
            out[name] = float(np.mean([synthetic.gold_reward(tok.decode(r)) for r in rows]))
    if judge is not None:  # decoded here, encoded again by the judge's own tokenizer and chat template
        cut = judge.truncated
        texts = [tok.decode(r[:-1] if r and r[-1] in stop else r) for r in sampled]
        out["judge_score"] = float(np.mean(judge.score(prompt_texts, texts)))
        if judge.truncated > cut:
            log(f"  judge {judge.name}: {judge.truncated - cut} of {len(texts)} conversations cut from the left (the "
                f"prompt first) to fit its context")
    for p, r in list(zip(prompts, greedy))[:2]:
        log(f"  sample | {tok.decode(p)!r} -> {tok.decode(r)!r}")
    return out


def start_wandb(cfg: TrainConfig, rank: int):
    """Optional experiment tracking, as in nanoGPT: a W&B run on rank 0 when wandb_project is set, else None."""
    if not cfg.wandb_project or rank != 0:
        return None
    import wandb  # only here: the package is optional
    return wandb.init(project=cfg.wandb_project, name=Path(cfg.out_dir).name, config=asdict(cfg), dir=cfg.out_dir)


def log(msg: str):
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# the non-finite guard: a step whose gradient norm is NaN or inf (a huge lr, bf16 overflow, a NaN β) would put NaN in
# every weight and every later checkpoint. The norm is all-reduced (every rank sees the same), so all ranks skip
# together: no optimizer step, no TR update, the step retried on the next batch; max_bad_steps in a row stop the run.


def guard(norm: float, loss: float, bad_steps: int, step: int, cfg: TrainConfig, run_dir: checkpoint.RunDir,
          record) -> int:
    """0 if the gradient norm of step + 1 is finite; else the non-finite steps in a row so far (this one logged and
    recorded as split 'skipped'), or ConfigError naming the newest finite checkpoint at cfg.max_bad_steps. A
    non-finite loss or norm at the first forward of a fresh run (no optimizer step yet: lr played no part) is the
    initial model's: ConfigError naming init_from."""
    if step == 0 and not (math.isfinite(norm) and math.isfinite(loss)):
        fail(f"the first forward is non-finite (loss {loss}, gradient norm {norm}), before any optimizer step: "
             f"the model of init_from={cfg.init_from} gives NaN/inf (check its weights and config.json, e.g. "
             "rope_theta)" + (" or use dtype=float32" if cfg.dtype != "float32" else ""))
    if math.isfinite(norm):
        return 0
    bad_steps += 1
    log(f"step {step + 1}: non-finite gradient norm {norm} (loss {loss}): skipped, no optimizer step or TR update "
        f"({bad_steps} in a row; {cfg.max_bad_steps} stop the run)")
    record({"step": step + 1, "split": "skipped", "loss": loss, "grad_norm": norm, "in_a_row": bad_steps})
    if bad_steps >= cfg.max_bad_steps:
        fail(f"{bad_steps} non-finite steps in a row at step {step + 1} (gradient norm {norm}): stopped; the newest "
             f"finite checkpoint is {run_dir.newest() or 'none (none was due yet: see ckpt_every)'}; lower "
             f"lr={cfg.lr:g}" + (" or use dtype=float32" if cfg.dtype != "float32" else ""))
    return bad_steps


# ----------------------------------------------------------------------------------------------------------------------
# the training run


def train(cfg: TrainConfig) -> dict:
    """One run (sft, or a preference loss with a static / soft / hard reference); returns the last train and eval
    metrics. Writes out_dir/train_config.json, metrics.jsonl and checkpoints, holding out_dir/.lock throughout."""
    cfg = replace(cfg, tokenizer=auto_tokenizer(cfg))  # resolved first: train_config.json and --resume see it
    setup_distributed(cfg)
    with checkpoint.lock(cfg.out_dir):  # one run per out_dir: a second one stops here, naming the first's pid
        return run(cfg)


def run(cfg: TrainConfig) -> dict:
    """train's body, with out_dir locked."""
    rank, world, device = setup_distributed(cfg)
    keep_freed_memory(device)
    out = Path(cfg.out_dir)
    # a fresh run refuses an out_dir holding a run (unless overwrite) and links planted there, before any work
    run_dir = checkpoint.claim(out, cfg.resume, cfg.overwrite, {k: getattr(cfg, k) for k in
                                                               ("init_from", "tokenizer", "data", "eval_data")})
    if run_dir.old:
        log(f"--overwrite: the run in {out} ({checkpoint.earlier_run(out)}) is replaced at this run's first "
            f"checkpoint; until then it stays, and this run's rows go to {run_dir.path('metrics.jsonl')}")
    ckpt = resume_checkpoint(cfg)
    log(f"config: {json.dumps(asdict(cfg))}")
    if warning := schedule_warning(cfg):
        log(warning)
    try:
        tok = tokenizer.get_tokenizer(cfg.tokenizer)
    except (ValueError, RuntimeError) as e:
        fail(f"tokenizer={cfg.tokenizer}: {e}")
    check_vocab(cfg, tok)
    train_loader, eval_batches, prompts, prompt_texts = make_data(cfg, tok, rank, world)
    micro_steps = (f"packed micro steps of <= {train_loader.rows} x {train_loader.capacity} tokens" if cfg.packing else
                   f"{cfg.batch_size // (cfg.micro_batch_size * world)} micro step(s) of {cfg.micro_batch_size}")
    try:  # the eval's judge (--judge), on rank 0, which writes metrics.jsonl
        scorer = judge_lib.load_judge(cfg.judge, device) if cfg.judge and rank == 0 and prompts else None
    except ValueError as e:
        fail(str(e))

    # models: the policy π_θ, the reference π_ref (a frozen copy, TR-updated), the initial policy for KL at eval time
    if cfg.lora_rank:  # LoRA: one frozen W0 under all three, each with its own low-rank delta (lora.py)
        policy, reference, initial = lora_models(cfg, tok, ckpt, device)
    else:
        init = load_model(cfg, tok).to(device)
        policy = init if ckpt is None else Llama.from_pretrained(ckpt).to(device)
        reference = None
        if cfg.loss not in ("sft", "rm"):
            reference = ref_lib.make_reference(init if ckpt is None else Llama.from_pretrained(ckpt / "reference")
                                               .to(device))
        initial = ref_lib.make_reference(init) if cfg.ref_update != "static" else None  # static: the reference is it
    if cfg.activation_checkpointing:  # the policy's blocks recomputed in its backward (the references take none)
        memory.checkpoint_blocks(policy)
    n_params = policy.num_params()
    policy, reference, initial = distribute([policy, reference, initial], cfg, world, device)
    # fused: one kernel over all tensors (~6x faster than the default on CPU at 16M parameters)
    trained = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    updater = ref_lib.ReferenceUpdater(cfg.ref_update, cfg.alpha, cfg.tau, lora_ref_rank(cfg))

    # exact resume: weights (above), optimizer, data position, RNG states, step; otherwise a fresh run directory
    start = 0
    random.seed(cfg.seed + rank), np.random.seed(cfg.seed + rank), torch.manual_seed(cfg.seed + rank)
    if ckpt is not None:
        state = checkpoint.load(ckpt, policy, optimizer)
        start = state["step"]
        try:
            train_loader.load_state_dict(state["data"])
        except ValueError as e:  # the data file changed under the run (another number of examples)
            fail(f"--resume: {ckpt}: {e}; data={cfg.data} is not the data the run trained on")
    metrics_file = out / "metrics.jsonl"
    # killed between a checkpoint and its eval: the eval runs first (read by every rank before rank 0 rewrites the file)
    eval_first = ckpt is not None and eval_due(start, cfg) and not evaluated(metrics_file, start)
    checkpoint.barrier()  # every rank has read the checkpoint and metrics before rank 0 renames or rewrites
    if rank == 0:
        for d in [] if ckpt is None else checkpoint.set_aside(out, ckpt):
            log(f"warning: --resume: the damaged {d.name.removesuffix('.damaged')} renamed to {d.name}")
        kept = [] if ckpt is None or not metrics_file.exists() else [
            line for line in metrics_file.read_text().splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["step"] <= start]  # drop what ran after the checkpoint
        run_dir.start(asdict(cfg), "".join(kept))  # train_config.json and metrics.jsonl, atomically
    log(f"{n_params / 1e6:.2f}M parameters | {world} process(es) on {device} | {micro_steps} per process per optimizer "
        "step" + (f" | resuming {ckpt}" if ckpt else ""))

    tracker = start_wandb(cfg, rank)

    def record(row: dict):
        if rank == 0:  # strict JSON: a non-finite number is written as null
            run_dir.append(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                       for k, v in row.items()}) + "\n")
        if tracker is not None:  # the same row, as "train/loss", "eval/kl_init", ... at its step
            tracker.log({f"{row['split']}/{k}": v for k, v in row.items() if k not in ("step", "split")},
                        step=row["step"])

    run_policy, run_ref = policy, reference
    if cfg.compile:  # the training step's forwards only: evaluation, generation, TR updates and checkpoints use the
        run_policy = torch.compile(policy)  # modules themselves (the compiled ones read the same parameters)
        run_ref = reference if reference is None else torch.compile(reference)

    step, result, t0 = start, {}, time.time()

    def evaluate_and_record(step: int):
        row = {"step": step, "split": "eval", **evaluate(policy, reference, initial, eval_batches, prompts, cfg, tok,
                                                          device, scorer, prompt_texts)}
        record(row)
        log(f"eval {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "split")))
        result["eval"] = row

    if eval_first:
        evaluate_and_record(start)  # the same row as the run's: evaluate draws from its own generator
    t_log, tokens, bad_steps = t0, 0, 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        micro_batches = next(train_loader)
        for i, batch in enumerate(micro_batches):
            # padded: the mean over micro steps; packed: each micro batch's share (packing.PackedBatches). Then
            # DDP/FSDP average over ranks: the global batch mean
            weight = batch.pop("weight", 1 / len(micro_batches))
            batch = {k: v.to(device) for k, v in batch.items()}
            with grad_sync(policy, cfg, i == len(micro_batches) - 1):
                loss, m = compute_loss(run_policy, run_ref, batch, cfg)
                (loss * weight).backward()
            sums = {k: sums.get(k, 0.0) + v * weight for k, v in m.items()}
            tokens += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        norm = grad_norm.item()  # the one host sync of the guard, reused by the log line
        if bad_steps := guard(norm, sums["loss"], bad_steps, step, cfg, run_dir, record):
            optimizer.zero_grad(set_to_none=True)  # skipped: no optimizer step, no TR update, the step is retried
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if updater.after_step(step, reference, policy) and cfg.lora_rank:  # TR: θ_ref ← α·θ + (1−α)·θ_ref (soft)
            record({"step": step, "split": "reference", "compression_error": updater.compression_error,  # or θ (hard)
                    "ref_rank": max(m.delta_U.shape[1] for m in lora.layers(reference, lora.DeltaLinear).values())})

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            keys = sorted(sums)
            totals = all_reduce_sum([sums[k] for k in keys] + [tokens], device)
            now = time.time()
            row = {"step": step, "split": "train", **{k: v / world for k, v in zip(keys, totals)},
                   "grad_norm": norm, "lr": lr, "tokens_per_s": totals[-1] / (now - t_log)}
            record(row)
            eta = (now - t0) / (step - start) * (cfg.max_steps - step)
            log(f"step {step}/{cfg.max_steps} | loss {row['loss']:.4f} | "
                + "".join(f"{k} {row[k]:.3f} | " for k in ("reward_acc", "margin", "kl_ref") if k in row)
                + f"gnorm {row['grad_norm']:.2f} | lr {lr:.2e} | {row['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s")
            result["train"], t_log, tokens = row, now, 0
        # the checkpoint before the evaluation: training is never lost to a failing evaluation
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
            checkpoint.save(out, step, policy, reference, optimizer, {"data": train_loader.state_dict()},
                            asdict(cfg), cfg.keep_last, tokenizer.tokenizer_files(cfg.tokenizer), run_dir)
        if eval_due(step, cfg):
            evaluate_and_record(step)
    if tracker is not None:
        tracker.finish()
    return result


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_config(argv or ["--demo=true"])
        synthetic.demo(cfg, train) if cfg.demo else train(cfg)
    except (ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk error outside a checkpoint write (metrics.jsonl, train_config.json): name the file
        print(f"train.py: error: {f'{e.filename}: {e.strerror}' if e.filename else e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            # A DDP module still alive (in a reference cycle) when the group goes, freed at interpreter exit, aborts
            # the process now and then ("terminate called without an active exception"): collect it first.
            gc.collect()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""train.py's options: one dataclass, TrainConfig, whose every field has a default and a one-line meaning (what
--help prints and docs/training.md's table shows); parsing from --config=FILE.json and --key=value; every check that
can fail before a model or a file is loaded; and the start-up warnings a user needs."""
import importlib.util
import json
import math
import os
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

import checkpoint
import datafiles
import inputs
import lora
import tokenizer
import judge


def opt(default, help: str, choices: tuple = ()):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # run and model
    out_dir: str = opt("out", "run directory: train_config.json, metrics.jsonl, checkpoints ckpt-<step>/")
    init_from: str = opt("scratch", "'scratch' (a new model from dim/n_layers/n_heads), a Hugging Face Llama, Qwen2, "
                         "Qwen3 or Mistral directory, or one of our run directories / checkpoints (its newest ckpt-*)")
    dim: int = opt(64, "from-scratch model width")
    n_layers: int = opt(2, "from-scratch model depth")
    n_heads: int = opt(4, "from-scratch attention heads")
    # LoRA (lora.py): π_θ = W0 + s·B·A, π_ref = the same W0 + its own low-rank delta (docs/method.md)
    lora_rank: int = opt(0, "r of the LoRA adapters on the lora_targets layers (0: off, full-parameter training)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: ΔW = (lora_alpha / lora_rank)·B·A")
    lora_targets: str = opt(lora.DEFAULT_TARGETS, "comma-separated names of the linear layers that get adapters")
    lora_ref_rank: int = opt(0, "cap on the rank of the soft-updated reference delta ΔW_ref (compressed by SVD past "
                             "it, exact while its rank fits; 0: 8 x lora_rank)")
    lora_base_dtype: str = opt("float32", "storage of the frozen base weights W0, shared by policy and reference "
                               "(bfloat16 needs dtype=bfloat16); adapters and optimizer stay fp32",
                               ("float32", "bfloat16"))
    # data
    data: str = opt("synthetic", "'synthetic' (the built-in task of synthetic.py), a .jsonl(.gz), .json or .parquet "
                    "file, or a dataset directory (a Hub snapshot: docs/data.md)")
    data_split: str = opt("auto", "the split of a dataset directory data trains on: auto (train, else train_prefs, "
                          "else the one split whose name holds 'train') or its name")
    eval_data: str = opt("", "held-out file or dataset directory; empty: eval_split of data")
    eval_split: str = opt("auto", "the held-out split of a dataset directory (eval_data, else data): auto "
                          "(data_split's twin such as test_prefs, else test, test_prefs, validation, val, dev, else "
                          "the one split whose name holds 'test'; if none, as none), none (hold out the first "
                          "eval_size examples of data) or its name")
    eval_size: int = opt(128, "number of held-out examples evaluated (pairs, or examples for sft): the first of the "
                         "held-out file or split")
    tokenizer: str = opt("auto", "'auto' (init_from's own: its tokenizer.json, else a llama2.c tok*.bin beside its "
                         "weights, else the one its run recorded; byte from scratch), 'byte', a tiktoken name (gpt2), "
                         "or the path of a tokenizer.json, a Llama 3 tokenizer.model or a llama2.c tokenizer .bin")
    max_length: int = opt(64, "max tokens of prompt + response (longer examples are truncated, see data.py)")
    max_prompt_length: int = opt(32, "max prompt tokens (prompts are cut from the left)")
    # objective
    loss: str = opt("sft", "training objective (rm: a reward model, Bradley-Terry on pairs, a score head on the "
                    "model; docs/models.md)", ("sft", "dpo", "ipo", "kto", "rm"))
    ref_update: str = opt("static", "how π_ref follows π_θ every τ steps: never, soft θ_ref ← α·θ + (1−α)·θ_ref, "
                          "hard θ_ref ← θ", ("static", "soft", "hard"))
    alpha: float = opt(0.6, "α, soft-update weight of the policy, in (0, 1]")
    tau: int = opt(512, "τ, optimizer steps between reference updates")
    beta: float = opt(0.1, "β, strength of the implicit KL penalty")
    label_smoothing: float = opt(0.0, "DPO label smoothing ε in [0, 0.5) (conservative DPO)")
    # optimisation
    batch_size: int = opt(32, "global pairs (dpo/ipo), examples (sft/kto) per optimizer step, for any world size")
    micro_batch_size: int = opt(16, "pairs/examples per process per forward; the rest is gradient accumulation")
    packing: bool = opt(True, "pack training examples into rows, no padding, a pair's prompt computed once "
                        "(docs/packing.md); false: padded rows of micro_batch_size examples")
    micro_batch_tokens: int = opt(0, "with packing: tokens per forward (0: what micro_batch_size padded examples "
                                  "hold at most, micro_batch_size x max_length x 2 for pairs and kto, x 1 for sft)")
    attention: str = opt("auto", "packed rows' attention kernel on CUDA: flex (compiled FlexAttention, skips the "
                         "tree mask's empty blocks), sdpa (SDPA with the boolean mask), auto (flex if it passes its "
                         "check against sdpa at the first micro batch, else sdpa); CPU always runs sdpa",
                         ("auto", "flex", "sdpa"))
    max_steps: int = opt(200, "optimizer steps")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = opt(10, "linear warmup steps from 0 to lr")
    schedule: str = opt("cosine", "after warmup: cosine or linear decay to 0, or constant",
                        ("cosine", "linear", "constant"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: no clipping, the norm is still logged)")
    max_bad_steps: int = opt(3, "consecutive non-finite steps (NaN/inf gradient norm: skipped, no optimizer step, no "
                             "TR update) after which the run stops, its last finite checkpoint intact")
    dtype: str = opt("float32", "compute dtype: float32, or bfloat16 autocast (weights and log-probs stay fp32)",
                     ("float32", "bfloat16"))
    device: str = opt("auto", "auto (cuda if available), cpu or cuda", ("auto", "cpu", "cuda"))
    fsdp: bool = opt(False, "shard policy and reference with FSDP2 (fully_shard) instead of DDP")
    compile: bool = opt(False, "torch.compile the policy and reference forwards of the training step "
                        "(docs/performance.md)")
    activation_checkpointing: bool = opt(False, "recompute each block of the policy in the backward instead of "
                                         "keeping its activations: less memory, one more forward of the blocks "
                                         "(docs/performance.md)")
    logps_chunk: int = opt(0, "run the LM head, log-softmax and gather over chunks of this many scored tokens, made "
                           "again in the backward, so the [tokens x vocabulary] logits never exist at once (0: off, "
                           "the head over all scored tokens at once; 1024 suits a 128k vocabulary)")
    seed: int = opt(1337, "seed: model init and data order identical on all ranks")
    # logging, evaluation, checkpoints
    log_every: int = opt(1, "optimizer steps between metrics.jsonl lines and progress lines")
    eval_every: int = opt(50, "optimizer steps between evaluations on held-out data (0: only at the end)")
    num_samples: int = opt(64, "held-out prompts continued at each eval (greedy and sampled) for on-policy KL and, on "
                           "synthetic data, the gold reward; the first 2 are printed")
    max_new_tokens: int = opt(32, "tokens generated per sample")
    judge: str = opt("", "score each eval's sampled responses with this judge, judge_score in metrics.jsonl: a "
                     "reward-model directory (its own tokenizer and chat template: judge.py), or 'gold' (the synthetic "
                     "task's gold reward); empty: none")
    wandb_project: str = opt("", "log metrics.jsonl's rows and the config to this Weights & Biases project too "
                             "(empty: off; wandb is imported only when set)")
    ckpt_every: int = opt(0, "optimizer steps between checkpoints (0: only at the end)")
    keep_last: int = opt(2, "checkpoints kept in out_dir (older ones are deleted)")
    resume: bool = opt(False, "continue from the newest checkpoint in out_dir (exactly, same config)")
    overwrite: bool = opt(False, "replace the run in out_dir (its checkpoints, metrics.jsonl, train_config.json), "
                          "which stays until this run's first checkpoint is written; without it, a fresh run into an "
                          "out_dir holding a run is refused")
    demo: bool = opt(False, "the embedded demo: SFT, then DPO and TR-DPO from it, and a comparison table "
                            "(what train.py runs when given no arguments)")


class ConfigError(ValueError):
    """A bad option, file or checkpoint: main() prints its message alone, with no traceback."""


def fail(msg: str):
    raise ConfigError(msg)


BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_value(name: str, value, typ: type, where: str):
    """One option's value from a string (command line) or a JSON value (config file), checked against its type."""
    if typ is bool and (isinstance(value, bool) or str(value).lower() in BOOLS):
        return value if isinstance(value, bool) else BOOLS[str(value).lower()]
    if typ is str and isinstance(value, str):
        return value
    if typ in (int, float) and not isinstance(value, bool) and not (typ is int and isinstance(value, float)):
        try:
            return typ(value)
        except (TypeError, ValueError):
            pass
    fail(f"{where}: {name} must be {typ.__name__}, got {value!r}")


def shown(value) -> str:
    """A default as it is typed on the command line."""
    return json.dumps(value) if isinstance(value, bool) or value == "" else str(value)


def meaning(f) -> str:
    return f.metadata["help"] + (f" (one of {', '.join(f.metadata['choices'])})" if f.metadata["choices"] else "")


def help_text(width: int = 100) -> str:
    """`--key=default  meaning` for every option, generated from TrainConfig, wrapped for a terminal."""
    rows = [("--config=FILE.json", "JSON file of options (keys = the names below); later --key=value override it")]
    rows += [(f"--{f.name}={shown(f.default)}", meaning(f)) for f in fields(TrainConfig)]
    indent = 2 + max(len(key) for key, _ in rows if len(key) <= 24) + 2
    lines = ["usage: [torchrun ...] train.py [--config=FILE.json] [--key=value ...]",
             "no arguments: the embedded demo (--demo=true)", ""]
    for key, text in rows:
        first = f"  {key}".ljust(indent - 2) + "  "
        if len(first) > indent:  # a long default: its meaning starts on the next line
            lines.append(first.rstrip())
            first = " " * indent
        lines.append(textwrap.fill(text, width, initial_indent=first, subsequent_indent=" " * indent))
    return "\n".join(lines)


def options_table() -> str:
    """The Markdown table of every option, generated from TrainConfig: docs/training.md pastes it (a test checks)."""
    rows = ["| option | default | meaning |", "|---|---|---|",
            "| `config` | | JSON file of options (keys = the names below); later `--key=value` override it |"]
    rows += [f"| `{f.name}` | `{json.dumps(f.default)}` | {meaning(f)} |" for f in fields(TrainConfig)]
    return "\n".join(rows)


def parse_config(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """TrainConfig from `--config=file.json` then `--key=value` overrides; ValueError naming the culprit on any bad
    key or value. world_size (default: $WORLD_SIZE or 1) checks that batches split evenly over the processes."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    values, args = {}, []
    for a in argv:  # a bool option may be given bare: --resume means --resume=true
        if not a.startswith("--") or "=" not in a and kinds.get(a[2:]) is not bool:
            fail(f"argument {a!r}: expected --key=value (see --help)")
        key, _, val = a[2:].partition("=")
        args.append((key, val if "=" in a else "true"))
    for key, val in [kv for kv in args if kv[0] == "config"]:
        try:  # a regular file of at most 64 MiB holding an object (a FIFO or /dev/zero is refused before reading)
            raw = inputs.read_json(val, error=ConfigError, what="--config=", want=None)
        except ConfigError as e:
            fail(str(e))
        if not isinstance(raw, dict):
            fail(f"{val}: expected a JSON object of options")
        for k, v in raw.items():
            if k not in kinds:
                fail(f"{val}: unknown option {k!r} (see --help)")
            values[k] = parse_value(k, v, kinds[k], val)
    for key, val in args:
        if key == "config":
            continue
        if key not in kinds:
            fail(f"unknown option --{key} (see --help)")
        values[key] = parse_value(key, val, kinds[key], "command line")
    cfg = TrainConfig(**values)
    validate(cfg, world_size_from_env() if world_size is None else world_size)
    return cfg


def world_size_from_env() -> int:
    """$WORLD_SIZE (1 when unset), with $RANK and $LOCAL_RANK, as torchrun sets them: integers, 0 <= rank < world."""
    env = {k: os.environ.get(k, d) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))}
    for k, v in env.items():
        if not v.strip().isdigit():
            fail(f"{k}={v!r} must be an integer >= {int(k == 'WORLD_SIZE')} (torchrun sets it)")
    world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    if world < 1 or rank >= world:
        fail(f"WORLD_SIZE={world} and RANK={rank}: need WORLD_SIZE >= 1 and RANK < WORLD_SIZE (torchrun sets them)")
    return world


def validate(cfg: TrainConfig, world_size: int):
    """Every check that can fail before a model or a file is loaded."""
    for f in fields(cfg):
        if f.metadata["choices"] and getattr(cfg, f.name) not in f.metadata["choices"]:
            fail(f"{f.name}={getattr(cfg, f.name)!r}: expected one of {', '.join(f.metadata['choices'])}")
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):  # NaN passes every < and > check below
            fail(f"{f.name}={getattr(cfg, f.name)} must be a finite number")
    for name in ("dim", "n_layers", "n_heads", "eval_size", "max_length", "max_prompt_length", "tau", "batch_size",
                 "micro_batch_size", "max_steps", "log_every", "keep_last", "max_new_tokens", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            fail(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "num_samples", "weight_decay", "grad_clip",
                 "micro_batch_tokens", "logps_chunk"):
        if getattr(cfg, name) < 0:
            fail(f"{name}={getattr(cfg, name)} must be >= 0")
    if not 0 < cfg.alpha <= 1:
        fail(f"alpha={cfg.alpha} must be in (0, 1]")
    if cfg.beta <= 0 or cfg.lr <= 0:
        fail(f"beta={cfg.beta} and lr={cfg.lr} must be > 0")
    if not 0 <= cfg.label_smoothing < 0.5:
        fail(f"label_smoothing={cfg.label_smoothing} must be in [0, 0.5)")
    if cfg.dim % cfg.n_heads:
        fail(f"dim={cfg.dim} must be a multiple of n_heads={cfg.n_heads}")
    if (cfg.dim // cfg.n_heads) % 2:
        fail(f"dim={cfg.dim} / n_heads={cfg.n_heads} = head_dim {cfg.dim // cfg.n_heads} must be even: RoPE rotates "
             f"pairs of features")
    if not 0 <= cfg.seed <= 2 ** 32 - world_size:  # numpy seeds each rank with seed + rank, a 32-bit number
        fail(f"seed={cfg.seed} must be in [0, {2 ** 32 - world_size}] (numpy seeds rank r with seed + r, < 2^32)")
    if cfg.max_prompt_length >= cfg.max_length:
        fail(f"max_prompt_length={cfg.max_prompt_length} must be < max_length={cfg.max_length}")
    if cfg.loss in ("sft", "rm") and cfg.ref_update != "static":
        fail(f"ref_update={cfg.ref_update} needs a reference, but loss={cfg.loss} has none")
    if cfg.loss == "rm" and cfg.lora_rank:
        fail(f"lora_rank={cfg.lora_rank} with loss=rm: LoRA on a reward model is not supported (its new score head "
             "would stay frozen); train it in full (lora_rank=0)")
    if cfg.judge and cfg.loss == "rm":
        fail(f"judge={cfg.judge} scores the policy's generations, but loss=rm trains a reward model, which generates "
             "none")
    if cfg.judge and cfg.num_samples == 0:
        fail(f"judge={cfg.judge} scores the eval's sampled responses, but num_samples=0 samples none")
    if cfg.judge == "gold" and cfg.data != "synthetic":
        fail(f"judge=gold is the synthetic task's gold reward, but data={cfg.data}")
    if cfg.judge and cfg.judge != "gold" and not Path(cfg.judge).exists():
        fail(f"judge={cfg.judge}: no such file or directory")
    if cfg.judge:
        try:  # a directory that is no reward model, or lacks its tokenizer: said now, before any work
            judge.check_judge(cfg.judge)
        except (ValueError, RuntimeError) as e:
            fail(str(e))
    if cfg.batch_size % (cfg.micro_batch_size * world_size):
        fail(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size={cfg.micro_batch_size} "
             f"x {world_size} process(es)")
    if cfg.lora_rank < 0 or cfg.lora_ref_rank < 0 or not cfg.lora_alpha > 0:
        fail(f"lora_rank={cfg.lora_rank} and lora_ref_rank={cfg.lora_ref_rank} must be >= 0, lora_alpha="
             f"{cfg.lora_alpha} > 0")
    try:
        lora.parse_targets(cfg.lora_targets)
    except ValueError as e:
        fail(str(e))
    if cfg.lora_rank and cfg.lora_ref_rank and cfg.lora_ref_rank < cfg.lora_rank:
        fail(f"lora_ref_rank={cfg.lora_ref_rank} must be >= lora_rank={cfg.lora_rank} (a hard update alone needs "
             f"rank lora_rank)")
    if cfg.lora_base_dtype != "float32" and (not cfg.lora_rank or cfg.dtype != "bfloat16"):
        fail(f"lora_base_dtype={cfg.lora_base_dtype} needs lora_rank > 0 and dtype=bfloat16 (a bf16 base is computed "
             f"under bf16 autocast)")
    if cfg.resume and cfg.overwrite:
        fail("resume=true continues the run in out_dir, overwrite=true replaces it: choose one")
    if cfg.fsdp and world_size < 2:
        fail("fsdp=true needs torchrun with at least 2 processes")
    for name in ("data", "eval_data", "init_from"):
        path = getattr(cfg, name)
        if path and path not in ("synthetic", "scratch") and not Path(path).exists():
            fail(f"{name}={path}: no such file or directory")
        if path and path not in ("synthetic", "scratch") and not Path(path).is_dir():  # stat only: a FIFO never opened
            inputs.check_regular(path, ConfigError, what=f"{name}=")
    try:
        data_splits(cfg)
    except datafiles.DataError as e:
        fail(str(e))
    if cfg.init_from != "scratch":
        try:
            checkpoint.model_dir(cfg.init_from)
        except ValueError as e:
            fail(f"init_from={e}")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        fail(f"wandb_project={cfg.wandb_project} needs the wandb package (pip install wandb)")
    try:
        resolved = auto_tokenizer(cfg)
    except ValueError as e:
        fail(f"tokenizer=auto: {e}")
    if cfg.data == "synthetic" and resolved != "byte":
        fail(f"data=synthetic is a byte-level task: tokenizer must be 'byte', not {resolved!r}")


def lora_ref_rank(cfg: TrainConfig) -> int:
    """The rank cap of ΔW_ref: lora_ref_rank, or 8 x lora_rank when 0 (the exact history of 8 soft updates)."""
    return cfg.lora_ref_rank or 8 * cfg.lora_rank


def data_splits(cfg: TrainConfig) -> tuple[str, tuple[str, str] | None]:
    """(the split of data to train on ('' when data is a file or synthetic), where the held-out examples come from:
    (path, split) with split '' for a file, or None for the first eval_size examples of data). A split that is not
    there, or an auto choice that is not obvious, is a one-line error listing the splits found."""
    data_dir, eval_dir = (p not in ("", "synthetic") and Path(p).is_dir() for p in (cfg.data, cfg.eval_data))
    if cfg.data_split != "auto" and not data_dir:
        fail(f"data_split={cfg.data_split}: data={cfg.data} is not a dataset directory")
    train = datafiles.choose_split(Path(cfg.data), cfg.data_split, "train", option="--data_split") if data_dir else ""
    if cfg.eval_data and not eval_dir:
        if cfg.eval_split != "auto":
            fail(f"eval_split={cfg.eval_split}: eval_data={cfg.eval_data} is a file, not a dataset directory")
        return train, (cfg.eval_data, "")
    if cfg.eval_data:
        if cfg.eval_split == "none":
            fail(f"eval_split=none holds out examples of data, but eval_data={cfg.eval_data} is given")
        return train, (cfg.eval_data, datafiles.choose_split(Path(cfg.eval_data), cfg.eval_split, "eval",
                                                             option="--eval_split"))
    if cfg.eval_split == "none" or (cfg.eval_split == "auto" and not data_dir):
        return train, None
    if not data_dir:
        fail(f"eval_split={cfg.eval_split}: data={cfg.data} is not a dataset directory")
    split = datafiles.choose_split(Path(cfg.data), cfg.eval_split, "eval", train=train, option="--eval_split",
                                   required=False)
    if split == train:
        fail(f"eval_split={split} is the split data_split trains on: choose another or none")
    return train, (None if split is None else (cfg.data, split))


def auto_tokenizer(cfg: TrainConfig) -> str:
    """cfg.tokenizer, or for 'auto' the one that came with the initial model: its directory's tokenizer.json, else a
    llama2.c tok*.bin (stories260K's tok512.bin), else the one its run recorded (train_config.json); byte for a model
    from scratch. A model directory with none of these is an error: the byte tokenizer is never guessed for it."""
    if cfg.tokenizer != "auto" or cfg.init_from == "scratch":
        return "byte" if cfg.tokenizer == "auto" else cfg.tokenizer
    model = checkpoint.model_dir(cfg.init_from)
    if (found := tokenizer.find_tokenizer(model)) is not None:
        return str(found)
    saved = model / "train_config.json"
    if saved.exists():
        name = inputs.read_json(saved).get("tokenizer")
        if not isinstance(name, str):
            raise ValueError(f"{saved}: tokenizer must be a string, got {inputs.shown(name)}")
        return name
    raise ValueError(f"{model}: no tokenizer.json, llama2.c tok*.bin or train_config.json beside the model to take "
                     "its tokenizer from; pass --tokenizer")


def schedule_warning(cfg: TrainConfig) -> str | None:
    """A TR run whose first reference update would come at or after its last step is the static method in disguise."""
    if cfg.ref_update != "static" and cfg.tau >= cfg.max_steps:
        return (f"warning: ref_update={cfg.ref_update} with tau={cfg.tau} >= max_steps={cfg.max_steps}: π_ref is "
                f"never updated before the run ends, so this is plain {cfg.loss.upper()} (lower --tau for TR)")
    return None


def truncation_warnings(name: str, report: dict, cfg: TrainConfig) -> list[str]:
    """One line for each length limit that cuts most of the examples kept (data.tokenize's report)."""
    n, lines = max(1, report["examples"]), []
    for part, limit in (("prompt", f"max_prompt_length={cfg.max_prompt_length}"),
                        ("response", f"max_length={cfg.max_length}")):
        if (cut := report["truncated"][part]) > n / 2:
            lines.append(f"warning: {name} data: {limit} cuts the {part} of {cut} of {n} examples ({cut / n:.0%}); "
                         f"raise it unless that is meant (a cut response is trained without its EOS)")
    return lines

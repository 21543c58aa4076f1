"""A training run's checkpoints: everything needed to continue exactly, written atomically, readable by anyone.

    out_dir/ckpt-<step>/  config.json + model.safetensors     the policy, Hugging Face layout (init_from can load it)
                          reference/                          π_ref, the same layout (TR runs change it)
      LoRA runs instead:  config.json + model.safetensors     the merged policy W0 + s·B·A (fp32), what transformers loads
                          base/                               the frozen W0 (HF layout, its storage dtype)
                          adapter/                            B and A in peft's format (PeftModel.from_pretrained(base))
                          reference_delta.safetensors         π_ref's ΔW_ref = U·V as factors (delta_U, delta_V)
                          optimizer.pt                        AdamW state: tensors and numbers only (weights_only load)
                          state.json                          step and data position
                          rng-rank<r>.json                    python / numpy / torch RNG states of each rank
                          train_config.json                   the resolved options
                          manifest.json                       every file's size and SHA-256, written last
    out_dir/.lock                                             held (flock) by the run writing into out_dir

Weights and optimizer state are gathered into full, parameter-name-keyed state dicts (FSDP2 shards included), so a
checkpoint does not depend on the world size or on DDP vs FSDP2. A checkpoint is written into a temp directory and
renamed into place: after a crash, even SIGKILL mid-write, the newest ckpt-* is always whole. Nothing is unpickled.
A checkpoint never holds a non-finite tensor (save refuses), and --resume takes the newest one whose manifest still
matches its files (resumable), so a checkpoint damaged after it was written (a truncated copy, a deleted reference/) is
passed over for the one before it.
"""
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

import lora

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory


class CheckpointError(RuntimeError):
    """A run directory or checkpoint the user must fix (busy, damaged, unwritable): train.py prints it in one line."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def agree(problem: str | None) -> str | None:
    """Rank 0's problem (or None) on every rank, so that all ranks raise together instead of waiting in a collective
    for one that has failed."""
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    return problem


# ----------------------------------------------------------------------------------------------------------------------
# one run per out_dir: an exclusive flock on out_dir/.lock. The kernel drops it when the process ends, however it
# ends (SIGKILL included), so a crashed run never leaves a stale lock behind; the file itself stays, holding a pid.

@contextmanager
def lock(out_dir: str | Path):
    """Hold out_dir/.lock (rank 0) for the body; CheckpointError on every rank naming the pid that holds it."""
    path, f, problem = Path(out_dir) / ".lock", None, None
    if rank() == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
        except OSError as e:
            problem = f"out_dir={out_dir}: cannot create {path}: {e.strerror}"
        if f is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                f.truncate(0)  # "a+" appends: the file now holds only this pid
                f.write(f"{os.getpid()}\n")
                f.flush()
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip() or "?"
                f.close()
                problem = (f"out_dir={out_dir} is in use by another run (pid {pid} holds {path}); wait for it to "
                           f"end or choose another out_dir")
            except OSError as e:  # a file system without flock (ENOLCK)
                f.close()
                problem = f"out_dir={out_dir}: cannot lock {path}: {e.strerror}"
    problem = agree(problem)
    if problem:
        raise CheckpointError(problem)
    try:
        yield
    finally:
        if f is not None:
            f.close()  # closing the file releases the flock


# ----------------------------------------------------------------------------------------------------------------------
# manifests and verification

def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path):
    """manifest.json: the size and SHA-256 of every other file, written last (without one, a checkpoint is
    incomplete)."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (ckpt / "manifest.json").write_text(json.dumps({"files": manifest}, indent=1))


def is_finite(t: torch.Tensor) -> bool:
    """All elements finite. A NaN or inf element makes the sum NaN or inf, so a finite sum settles it (one fast
    reduction, ~25x faster than isfinite().all() on CPU); only a sum that overflowed needs the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def nonfinite(tensors: dict, what: str) -> str | None:
    """The name of the first tensor (in a possibly nested state dict) holding NaN or inf, or None."""
    for k, v in tensors.items():
        if isinstance(v, dict):
            bad = nonfinite(v, f"{what}[{k}]")
            if bad:
                return bad
        elif torch.is_tensor(v) and v.is_floating_point() and not is_finite(v):
            return f"{what} {k}"
        elif isinstance(v, float) and not math.isfinite(v):
            return f"{what} {k}"
    return None


def verify(ckpt: Path) -> str | None:
    """None if ckpt is usable for --resume: its manifest matches every file, its JSON parses and its weights and
    optimizer state are finite; otherwise what is wrong, naming the file."""
    from safetensors.torch import load_file
    try:
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
    except FileNotFoundError:
        return f"{ckpt / 'manifest.json'} is missing (the checkpoint is incomplete)"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{ckpt / 'manifest.json'} is not a valid manifest ({e})"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or replaced)"
        if sha256(f) != want["sha256"]:
            return f"{f}: checksum differs from the manifest (damaged)"
    for name in ("state.json", "train_config.json"):
        try:
            json.loads((ckpt / name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"{ckpt / name}: {e}"
    for name in files:
        if name.endswith(".safetensors"):  # the policy and reference/, or LoRA's merged model, base, adapter, deltas
            bad = nonfinite(load_file(ckpt / name), str(ckpt / name))
            if bad:
                return f"non-finite values in {bad}"
    return nonfinite(torch.load(ckpt / "optimizer.pt", weights_only=True), str(ckpt / "optimizer.pt"))


def resumable(out_dir: str | Path, warn) -> Path:
    """The newest checkpoint of out_dir that verifies, for --resume; warn(message) for each newer one passed over;
    CheckpointError when there is none (none at all: a typo in out_dir, or a run that never reached a checkpoint)."""
    problems = []
    for ckpt in sorted(Path(out_dir).glob("ckpt-*[0-9]"), reverse=True):
        problem = verify(ckpt)
        if problem is None:
            for p in problems:
                warn(f"warning: --resume: passing over {p}; falling back to {ckpt}")
            return ckpt
        problems.append(problem)
    if problems:
        raise CheckpointError(f"--resume: no usable checkpoint in out_dir={out_dir}: " + "; ".join(problems))
    raise CheckpointError(f"--resume: no checkpoint (ckpt-*) in out_dir={out_dir}; drop --resume to start a fresh run")


def set_aside(out_dir: str | Path, after: Path) -> list[Path]:
    """Rename the checkpoints newer than `after` (damaged: a resume from `after` writes their steps anew) to
    ckpt-<step>.damaged, out of the way of --resume and init_from but not deleted; returns the new names."""
    moved = []
    for ckpt in sorted(Path(out_dir).glob("ckpt-*[0-9]")):
        if ckpt.name > after.name:
            dest = ckpt.with_name(ckpt.name + ".damaged")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(ckpt, dest)
            moved.append(dest)
    return moved


def newest(path: str | Path) -> Path | None:
    """The newest ckpt-<step> directory in a run directory, or None."""
    ckpts = sorted(Path(path).glob("ckpt-*[0-9]"))
    return ckpts[-1] if ckpts else None


def clear(path: str | Path) -> int:
    """Delete the checkpoints (and unfinished ones) of a run directory; returns how many. A fresh run owns its out_dir:
    an earlier run's ckpt-<step> would collide with one of its own, or, if newer, be the one a later init_from or
    --resume picks."""
    old = [*Path(path).glob("ckpt-*[0-9]"), *Path(path).glob("ckpt-*.damaged"), *Path(path).glob(".tmp-ckpt-*")]
    for d in old:
        shutil.rmtree(d)
    return len(old)


def model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory itself, or the newest checkpoint of a run directory (ValueError otherwise)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if newest(path) is None:
        raise ValueError(f"{path}: neither a model directory (config.json) nor a run directory with ckpt-* inside")
    return newest(path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save(out_dir: str | Path, step: int, policy, reference, optimizer, state: dict, config: dict, keep_last: int,
         files: dict | None = None):
    """Write ckpt-<step> (every rank calls this: the gathers are collectives), then keep the newest keep_last.
    files: {name: source} copied in beside the weights (the tokenizer's tokenizer.json and its configs: a checkpoint
    that a later run, sample.py or transformers loads brings its own tokenizer).

    Refused (CheckpointError, nothing written or deleted) if a weight or optimizer tensor is not finite, so the newest
    checkpoint is always the last finite state. A failed write (full disk, read-only or unwritable out_dir) removes
    its partial temp directory and raises CheckpointError naming the path."""
    policy_sd, optim_sd = get_model_state_dict(policy, options=FULL), get_optimizer_state_dict(policy, optimizer,
                                                                                                options=FULL)
    lora_run = lora.is_lora(policy)
    ref_sd = None if reference is None else get_model_state_dict(reference, options=FULL) if not lora_run else {
        k: v.detach().cpu() for k, v in reference.state_dict().items() if k.endswith((".delta_U", ".delta_V"))}
    out = Path(out_dir)
    tmp, dest = out / f".tmp-ckpt-{step:06d}", out / f"ckpt-{step:06d}"
    bad = None
    if rank() == 0:  # the full state dicts are on rank 0
        bad = (nonfinite(policy_sd, "policy weight") or nonfinite(ref_sd or {}, "reference weight")
               or nonfinite(optim_sd, "optimizer state"))
    bad = agree(bad)
    if bad:
        raise CheckpointError(f"refusing to write {dest}: non-finite values in {bad}; the newest finite checkpoint "
                              f"is {newest(out) or 'none'}")
    problem = None
    try:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash
            tmp.mkdir(parents=True)
        barrier()
        (tmp / f"rng-rank{rank()}.json").write_text(json.dumps(rng_state()))
        barrier()
        if rank() == 0:
            model = policy.module if isinstance(policy, DistributedDataParallel) else policy
            if lora_run:
                save_lora(tmp, dest, model, policy_sd, ref_sd, config)
            else:
                model.save_pretrained(tmp, policy_sd)
            if reference is not None and not lora_run:
                reference.save_pretrained(tmp / "reference", ref_sd)
            torch.save(optim_sd, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
            (tmp / "train_config.json").write_text(json.dumps(config, indent=2))
            for name, source in (files or {}).items():
                shutil.copyfile(source, tmp / name)
            write_manifest(tmp)
            if dest.exists():  # a step written again after a fall back past it (set_aside moves those): replace it
                shutil.rmtree(dest)
            os.replace(tmp, dest)  # atomic rename: a whole checkpoint or none
            for old in sorted(out.glob("ckpt-*[0-9]"))[:-keep_last]:  # the newest (finite, just written) stays
                shutil.rmtree(old)
    except (OSError, RuntimeError) as e:  # torch.save and safetensors raise RuntimeError on a full disk
        problem = write_error(e, tmp, dest)
    barrier()
    if problem:
        raise CheckpointError(problem)


def save_lora(tmp: Path, dest: Path, model, policy_sd: dict, ref_sd: dict | None, config: dict):
    """A LoRA run's weights: the merged policy as the checkpoint's model (transformers and init_from load it), the
    frozen base and the adapter in peft's format beside it, and the reference's factors (exact resume needs all)."""
    with torch.device("meta"):  # a plain model of the same config: save_pretrained checks the names against it
        plain = type(model)(model.config)
    scale = config["lora_alpha"] / config["lora_rank"]
    plain.save_pretrained(tmp, lora.merged_state_dict(policy_sd, scale))
    plain.save_pretrained(tmp / "base", {k: v for k, v in policy_sd.items() if not k.endswith((".lora_A", ".lora_B"))})
    lora.save_adapter(tmp / "adapter", {k: v for k, v in policy_sd.items() if k.endswith((".lora_A", ".lora_B"))},
                      config["lora_rank"], config["lora_alpha"], config["lora_targets"], str((dest / "base").resolve()))
    if ref_sd is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref_sd.items()}, tmp / "reference_delta.safetensors")


def load_lora(ckpt: Path, policy, reference):
    """Put a LoRA checkpoint's adapters into the policy (built on its base/) and its factors into the reference."""
    from safetensors.torch import load_file
    policy = policy.module if isinstance(policy, DistributedDataParallel) else policy
    adapters = lora.load_adapter(ckpt / "adapter")
    layers = lora.layers(policy, lora.LoRALinear)
    if set(adapters) != {f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B")}:
        raise CheckpointError(f"{ckpt / 'adapter'}: its adapters sit on other layers than lora_targets names")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(adapters[f"{name}.lora_A"])
            layer.lora_B.copy_(adapters[f"{name}.lora_B"])
    if reference is not None:
        factors = load_file(ckpt / "reference_delta.safetensors")
        for name, layer in lora.layers(reference, lora.DeltaLinear).items():
            layer.delta_U = factors[f"{name}.delta_U"].to(layer.weight.device)
            layer.delta_V = factors[f"{name}.delta_V"].to(layer.weight.device)


def write_error(e: Exception, tmp: Path, dest: Path) -> str:
    """Remove the partial temp checkpoint; a one-line reason naming the path (torch's own message names none)."""
    shutil.rmtree(tmp, ignore_errors=True)
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
    where = getattr(e, "filename", None) or tmp
    hint = ""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or not isinstance(e, OSError):
        hint = f"; {shutil.disk_usage(dest.parent).free / 2 ** 20:.0f} MiB free on that disk"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; choose a writable out_dir"
    return f"cannot write checkpoint {dest} ({where}: {reason}){hint}; the partial copy was removed"


def load(ckpt: Path, policy, optimizer) -> dict:
    """Restore the optimizer state (into a plain, DDP or FSDP2 policy) and this rank's RNG states (ranks new to the
    run keep their seeds); returns state.json. The weights themselves are loaded with Llama.from_pretrained."""
    optim_sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(policy, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    if (ckpt / f"rng-rank{rank()}.json").exists():
        set_rng_state(json.loads((ckpt / f"rng-rank{rank()}.json").read_text()))
    return json.loads((ckpt / "state.json").read_text())

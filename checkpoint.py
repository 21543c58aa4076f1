"""A training run's checkpoints: everything needed to continue exactly, written atomically, readable by anyone.

    out_dir/ckpt-<step>/  config.json + model.safetensors     the policy, Hugging Face layout (init_from can load it)
                          reference/                          π_ref, the same layout (TR runs change it)
      LoRA runs instead:  config.json + model.safetensors     merged policy W0 + s·B·A (fp32), transformers loads it
                          base/                               the frozen W0 (HF layout, its storage dtype)
                          adapter/                            B and A in peft's format (PeftModel.from_pretrained(base))
                          reference_delta.safetensors         π_ref's ΔW_ref = U·V as factors (delta_U, delta_V)
                          optimizer.pt                        AdamW state: tensors and numbers only (weights_only load)
                          state.json                          step and data position
                          rng-rank<r>.json                    python / numpy / torch RNG states of each rank
                          train_config.json                   the resolved options
                          manifest.json                       every file's size and SHA-256, written last
    out_dir/.lock                                             held (flock) by the run writing into out_dir
    out_dir/metrics.jsonl, train_config.json                  the run's rows and options (train.py, via RunDir)

Weights and optimizer state are gathered into full, parameter-name-keyed state dicts (FSDP2 shards included), so a
checkpoint does not depend on the world size or on DDP vs FSDP2. A checkpoint is written into a temp directory and
renamed into place: after a crash, even SIGKILL mid-write, the newest ckpt-* is always whole. Nothing is unpickled.
A checkpoint never holds a non-finite tensor (save refuses), and --resume takes the newest one whose manifest still
matches its files (resumable), so a checkpoint damaged after it was written (a truncated copy, a deleted reference/) is
passed over for the one before it.

A new run never destroys an earlier one (claim): an out_dir that holds a run is refused unless --overwrite, and then
the earlier run stays until the new one's first checkpoint is whole. Nothing in out_dir is written through a symbolic
link: files are created with O_NOFOLLOW (O_EXCL where new) and replaced atomically (write_file); a link planted where
the run writes is refused, naming it.
"""
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

import inputs
import lora

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory


class CheckpointError(RuntimeError):
    """A run directory or checkpoint the user must fix (busy, damaged, unwritable): train.py prints it in one line."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def share(obj):
    """Rank 0's obj (anything picklable) on every rank."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def agree(problem: str | None) -> str | None:
    """Rank 0's problem (or None) on every rank, so that all ranks raise together instead of waiting in a collective
    for one that has failed."""
    return share(problem)


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
            # never through a link planted there; O_NONBLOCK: a FIFO planted there must not block the open
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                f = os.fdopen(fd, "r+")
            else:
                os.close(fd)
                problem = f"out_dir={out_dir}: {path} is not a regular file; remove it"
        except OSError as e:
            problem = (link_problem(path) if path.is_symlink() else
                       f"out_dir={out_dir}: cannot create {path}: {e.strerror}")
        if f is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                f.truncate(0)  # the file now holds only this pid
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
    """None if ckpt is usable for --resume: its manifest matches every file, its JSON files have the shape a resume
    reads, its config.json and weights agree (model.check_pretrained: keys, shapes, float dtypes) and its weights and
    optimizer state are finite; otherwise what is wrong, naming the file (and key)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    import model
    if not (ckpt / "manifest.json").exists():
        return f"{ckpt / 'manifest.json'} is missing (the checkpoint is incomplete)"
    try:
        files = inputs.read_json(ckpt / "manifest.json").get("files")
    except ValueError as e:
        return str(e)
    if not isinstance(files, dict) or not all(isinstance(v, dict) and inputs.NATURAL[0](v.get("bytes"))
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        return (f"{ckpt / 'manifest.json'} is not a valid manifest (files must map each file name to its bytes and "
                f"sha256)")
    for name, want in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not name:
            return f"{ckpt / 'manifest.json'} names {inputs.shown(name)}, a file outside the checkpoint"
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or replaced)"
        if sha256(f) != want["sha256"]:
            return f"{f}: checksum differs from the manifest (damaged)"
    try:  # what a resume reads of the JSON files, with the types it needs
        state = inputs.read_json(ckpt / "state.json")
        inputs.check_fields(state, {"step": inputs.NATURAL, "data": inputs.OBJECT}, ckpt / "state.json")
        inputs.check_fields(state.get("data", {}), DATA_STATE, ckpt / "state.json", prefix="data.")
        missing = ([k for k in ("step", "data") if k not in state]
                   or [f"data.{k}" for k in DATA_STATE if k not in state["data"]])
        if missing:
            return f"{ckpt / 'state.json'}: no {missing[0]}"
        saved = inputs.read_json(ckpt / "train_config.json")
        inputs.check_fields(saved, {"max_steps": inputs.POSITIVE_INT, "tokenizer": inputs.STRING},
                            ckpt / "train_config.json")
        for f in sorted(ckpt.glob("rng-rank*.json")):
            rng = inputs.read_json(f)
            inputs.check_fields(rng, {k: inputs.LIST for k in ("python", "numpy", "torch")}, f)
            if problem := restorable(rng, f):
                return problem
        for sub in ("", "reference", "base"):  # base/: a LoRA run's frozen W0
            if sub == "" or (ckpt / sub).exists():
                model.check_pretrained(ckpt / sub)
    except ValueError as e:
        return str(e)
    try:
        for name in files:
            if name.endswith(".safetensors"):  # policy, reference/; LoRA: merged model, base, adapter, delta
                bad = nonfinite(load_file(ckpt / name), str(ckpt / name))
                if bad:
                    return f"non-finite values in {bad}"
        return nonfinite(torch.load(ckpt / "optimizer.pt", weights_only=True), str(ckpt / "optimizer.pt"))
    except (SafetensorError, RuntimeError, OSError, pickle.UnpicklingError) as e:  # what the manifest vouched for
        return f"{ckpt}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def restorable(rng: dict, file: Path) -> str | None:
    """None if set_rng_state accepts rng (tried, then this process's own states put back), else why not."""
    own = rng_state()
    try:
        set_rng_state(rng)
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        return f"{file}: not an RNG state a resume can restore ({type(e).__name__}: {inputs.shown(str(e))})"
    finally:
        set_rng_state(own)
    return None


DATA_STATE = {"step": inputs.NATURAL, "steps_per_epoch": inputs.POSITIVE_INT, "batch_size": inputs.POSITIVE_INT,
              "seed": inputs.NATURAL}  # data.Batches.state_dict's keys that load_state_dict reads


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
    held = earlier_run(out_dir)  # a run that stopped before its first checkpoint: a fresh run must replace it
    raise CheckpointError(f"--resume: no checkpoint (ckpt-*) in out_dir={out_dir}; drop --resume to start a fresh run"
                          + (f" (it holds a run, {held}: add --overwrite=true)" if held else ""))


def set_aside(out_dir: str | Path, after: Path) -> list[Path]:
    """Rename the checkpoints newer than `after` (damaged: a resume from `after` writes their steps anew) to
    ckpt-<step>.damaged, out of the way of --resume and init_from but not deleted; returns the new names."""
    moved = []
    for ckpt in sorted(Path(out_dir).glob("ckpt-*[0-9]")):
        if ckpt.name > after.name:
            dest = ckpt.with_name(ckpt.name + ".damaged")
            remove(dest)
            os.replace(ckpt, dest)
            moved.append(dest)
    return moved


def newest(path: str | Path) -> Path | None:
    """The newest ckpt-<step> directory in a run directory, or None."""
    ckpts = sorted(Path(path).glob("ckpt-*[0-9]"))
    return ckpts[-1] if ckpts else None


# ----------------------------------------------------------------------------------------------------------------------
# the run in out_dir. A fresh run refuses an out_dir that holds a run (a checkpoint, or metrics.jsonl with rows) before
# it touches anything, unless --overwrite; then the earlier run stays as it is until the new run's first checkpoint is
# whole: until then the new run's rows and options go to side files (.new-metrics.jsonl, .new-train_config.json), so a
# new run that fails early leaves the earlier one resumable. At that first checkpoint save() moves the earlier run's
# files into a .replaced-* directory, renames the checkpoint into place and the side files over metrics.jsonl and
# train_config.json, and deletes the .replaced-* directory (a crash in those milliseconds leaves it, refused as a run).

NEW = ".new-"  # the side files' prefix
RUN_FILES = ("metrics.jsonl", "train_config.json")


def entries(out: Path) -> list[Path]:
    """What runs leave in out_dir: checkpoints (whole, damaged or unfinished), metrics.jsonl, train_config.json, side
    files and .replaced-* directories of an --overwrite."""
    found = [*out.glob("ckpt-*"), *out.glob(".tmp-ckpt-*"), *out.glob(".replaced-*"),
             *(out / name for name in (*RUN_FILES, *(NEW + n for n in RUN_FILES)))]
    return sorted(p for p in found if os.path.lexists(p))


def link_problem(path: Path) -> str:
    return (f"{path} is a symbolic link (to {os.readlink(path)}): train.py writes only files of its own in out_dir; "
            "remove the link")


def written(path: Path) -> str:
    return time.strftime("written %Y-%m-%d %H:%M UTC", time.gmtime(path.lstat().st_mtime))


def earlier_run(out: str | Path) -> str | None:
    """What the run in out_dir is (its newest checkpoint's step of max_steps and when it was written), or None when
    out_dir holds no run (leftovers without value, such as an empty metrics.jsonl or an unfinished checkpoint, are
    none)."""
    out = Path(out)
    ckpt, metrics = newest(out), out / "metrics.jsonl"
    if ckpt is not None:
        try:
            max_steps = json.loads((ckpt / "train_config.json").read_text())["max_steps"]
        except (OSError, ValueError, KeyError, TypeError):
            max_steps = "?"
        return f"{ckpt.name}: step {ckpt.name.removeprefix('ckpt-').lstrip('0') or 0} of max_steps={max_steps}, " \
               f"{written(ckpt)}"
    others = [p for p in entries(out) if p.name.startswith(("ckpt-", ".replaced-"))]
    if others:
        return f"{', '.join(p.name for p in others)}, {written(others[-1])}"
    if metrics.is_file() and metrics.stat().st_size:
        try:
            last = json.loads(metrics.read_bytes().splitlines()[-1])["step"]
        except (ValueError, KeyError, TypeError, IndexError):
            last = "?"
        return f"no checkpoint; metrics.jsonl to step {last}, {written(metrics)}"
    return None


class RunDir:
    """out_dir as a run holds it (claim): where its metrics rows and train_config.json go, which checkpoints are its
    own, and the earlier run it replaces (--overwrite), whose files stay until its first checkpoint (save)."""

    def __init__(self, out: Path, old: list[Path], stale: list[Path]):
        self.out, self.old, self.stale = out, old, stale

    def path(self, name: str) -> Path:
        """Where this run writes metrics.jsonl or train_config.json now: beside the earlier run's until it goes."""
        return self.out / (NEW + name if self.old else name)

    def newest(self) -> Path | None:
        """This run's newest checkpoint: none while the earlier run it replaces is still there."""
        return None if self.old else newest(self.out)

    def start(self, config: dict, metrics: str = ""):
        """(rank 0, before the first step) Remove the leftovers of no value, then write train_config.json and
        metrics.jsonl (the rows a resume keeps), each atomically."""
        for p in self.stale:
            remove(p)
        self.stale = []
        write_file(self.path("train_config.json"), json.dumps(config, indent=2))
        write_file(self.path("metrics.jsonl"), metrics)

    def append(self, line: str):
        """(rank 0) Append a row to metrics.jsonl, never through a link."""
        fd = os.open(self.path("metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "a") as f:
            f.write(line)

    def retire(self, keep: Path) -> Path | None:
        """(rank 0, this run's first checkpoint whole in keep) Move the earlier run's files into a new .replaced-*
        directory, out of the way of the checkpoint's name and of keep_last; returns that directory."""
        if not self.old:
            return None
        trash = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.out))
        for i, p in enumerate(self.old):
            if p != keep and os.path.lexists(p):
                os.replace(p, trash / f"{i}-{p.name}")
        return trash

    def settle(self, trash: Path | None):
        """(rank 0, the first checkpoint in place) This run's side files become metrics.jsonl and train_config.json;
        the earlier run's files are deleted."""
        if trash is not None:
            for name in RUN_FILES:
                os.replace(self.out / (NEW + name), self.out / name)
            shutil.rmtree(trash)


def claim(out_dir: str | Path, resume: bool, overwrite: bool, reads: dict[str, str]) -> RunDir:
    """(every rank, out_dir locked, before any work) The RunDir of this run, or CheckpointError on every rank (rank 0
    decides): a symbolic link where the run writes; a fresh run into an out_dir holding a run, unless overwrite; a
    fresh run replacing the files it reads (reads: {option: path}, e.g. {"init_from": "out"})."""
    out, problem, old, stale = Path(out_dir), None, [], []
    if rank() == 0:
        found = entries(out)
        links = [p for p in found if p.is_symlink()]
        odd = [out / n for n in RUN_FILES if os.path.lexists(out / n) and not (out / n).is_file()]
        held = None if resume or links or odd else earlier_run(out)
        read = [f"{k}={v}" for k, v in reads.items() if held and inside(v, found)]
        if links:
            problem = link_problem(links[0])
        elif odd:
            problem = f"{odd[0]} is not a regular file; remove it or choose another out_dir"
        elif read:
            problem = (f"{read[0]} is read from the run in out_dir={out} ({held}), which a new run there would "
                       f"replace: choose another --out_dir (e.g. --out_dir={str(out).rstrip('/')}-2)")
        elif held and not overwrite:
            problem = (f"out_dir={out} holds a run ({held}): " + ("continue it with --resume, " if newest(out) else "")
                       + "choose another --out_dir, or replace it with --overwrite=true (it stays until the new "
                       "run's first checkpoint)")
        elif held:
            old = [p for p in found if not p.name.startswith(NEW)]
        elif not resume:
            stale = found  # an empty metrics.jsonl, an unfinished checkpoint: no run, nothing of value
        elif not any(p.name.startswith(".replaced-") for p in found):  # side files of an --overwrite that failed
            stale = [p for p in found if p.name.startswith(NEW)]  # before its first checkpoint
    problem, old, stale = share((problem, old, stale))
    if problem:
        raise CheckpointError(problem)
    return RunDir(out, old, stale)


def inside(value: str, found: list[Path]) -> bool:
    """Whether the path value (a run directory standing for its newest checkpoint) is one of found or inside one."""
    path = Path(value)
    if not value or not path.exists():
        return False  # scratch, synthetic, byte, gpt2
    if path.is_dir() and not (path / "config.json").exists() and newest(path) is not None:
        path = newest(path)
    path = path.resolve()
    return any(path == f.resolve() or f.resolve() in path.parents for f in found)


def remove(path: Path):
    """Delete a file, a link (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write_file(path: Path, text: str):
    """Replace the file at path with text atomically: written to a new temp file beside it (O_EXCL and O_NOFOLLOW:
    never through a link planted there), then renamed over it. A link at path itself is refused (CheckpointError); an
    OSError names path."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(link_problem(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a crash
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise OSError(e.errno, e.strerror, str(path)) from None


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
         files: dict | None = None, run_dir: RunDir | None = None):
    """Write ckpt-<step> (every rank calls this: the gathers are collectives), then keep the newest keep_last.
    files: {name: source} copied in beside the weights (the tokenizer's tokenizer.json and its configs: a checkpoint
    that a later run, sample.py or transformers loads brings its own tokenizer). run_dir (claim): at the run's first
    checkpoint, the earlier run it replaces goes, just before the new checkpoint is renamed into place.

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
                              f"is {(run_dir.newest() if run_dir else newest(out)) or 'none'}")
    problem = None
    try:
        if rank() == 0:
            remove(tmp)  # a leftover of a crash
            tmp.mkdir(parents=True)  # new: what is written inside is this run's own
        barrier()
        (tmp / f"rng-rank{rank()}.json").write_text(json.dumps(rng_state()))
        barrier()
        if rank() == 0:
            model = policy.module if isinstance(policy, DistributedDataParallel) else policy
            if lora_run:
                lora.save_checkpoint(tmp, dest, model, policy_sd, ref_sd, config)
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
            trash = run_dir.retire(tmp) if run_dir else None  # --overwrite: the earlier run goes only now
            remove(dest)  # a step written again after a fall back past it (set_aside moves those): replace it
            os.replace(tmp, dest)  # atomic rename: a whole checkpoint or none
            if run_dir:
                run_dir.settle(trash)
            for old in sorted(out.glob("ckpt-*[0-9]"))[:-keep_last]:  # the newest (finite, just written) stays
                remove(old)
    except (OSError, RuntimeError) as e:  # torch.save and safetensors raise RuntimeError on a full disk
        problem = write_error(e, tmp, dest)
    barrier()
    if problem:
        raise CheckpointError(problem)
    if run_dir is not None:
        run_dir.old = []  # on every rank: from now on the newest checkpoint is this run's


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

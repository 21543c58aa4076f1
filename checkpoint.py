"""A training run's checkpoints: everything needed to continue exactly, written atomically, readable by anyone.

    out_dir/ckpt-<step>/  config.json + model.safetensors     the policy, Hugging Face layout (init_from can load it)
                          reference/                          π_ref, the same layout (TR runs change it)
                          optimizer.pt                        AdamW state: tensors and numbers only (weights_only load)
                          state.json                          step and data position
                          rng-rank<r>.json                    python / numpy / torch RNG states of each rank
                          train_config.json                   the resolved options

Weights and optimizer state are gathered into full, parameter-name-keyed state dicts (FSDP2 shards included), so a
checkpoint does not depend on the world size or on DDP vs FSDP2. A checkpoint is written into a temp directory and
renamed into place: after a crash, even SIGKILL mid-write, the newest ckpt-* is always whole. Nothing is unpickled.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory


def newest(path: str | Path) -> Path | None:
    """The newest ckpt-<step> directory in a run directory, or None."""
    ckpts = sorted(Path(path).glob("ckpt-*[0-9]"))
    return ckpts[-1] if ckpts else None


def clear(path: str | Path) -> int:
    """Delete the checkpoints (and unfinished ones) of a run directory; returns how many. A fresh run owns its out_dir:
    an earlier run's ckpt-<step> would collide with one of its own, or, if newer, be the one a later init_from or
    --resume picks."""
    old = [*Path(path).glob("ckpt-*[0-9]"), *Path(path).glob(".tmp-ckpt-*")]
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


def save(out_dir: str | Path, step: int, policy, reference, optimizer, state: dict, config: dict, keep_last: int):
    """Write ckpt-<step> (every rank calls this: the gathers are collectives), then keep the newest keep_last."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    policy_sd, optim_sd = get_model_state_dict(policy, options=FULL), get_optimizer_state_dict(policy, optimizer,
                                                                                                options=FULL)
    ref_sd = None if reference is None else get_model_state_dict(reference, options=FULL)
    out = Path(out_dir)
    tmp = out / f".tmp-ckpt-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash
        tmp.mkdir(parents=True)
    barrier()
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    barrier()
    if rank == 0:
        model = policy.module if isinstance(policy, DistributedDataParallel) else policy
        model.save_pretrained(tmp, policy_sd)
        if reference is not None:
            reference.save_pretrained(tmp / "reference", ref_sd)
        torch.save(optim_sd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        (tmp / "train_config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, out / f"ckpt-{step:06d}")  # atomic rename: a whole checkpoint or none
        for old in sorted(out.glob("ckpt-*[0-9]"))[:-keep_last]:
            shutil.rmtree(old)
    barrier()


def load(ckpt: Path, policy, optimizer) -> dict:
    """Restore the optimizer state (into a plain, DDP or FSDP2 policy) and this rank's RNG states (ranks new to the
    run keep their seeds); returns state.json. The weights themselves are loaded with Llama.from_pretrained."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    optim_sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(policy, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    if (ckpt / f"rng-rank{rank}.json").exists():
        set_rng_state(json.loads((ckpt / f"rng-rank{rank}.json").read_text()))
    return json.loads((ckpt / "state.json").read_text())

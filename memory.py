"""Memory: the two ways a run holds less, and a model of what it holds (docs/performance.md's memory table).

- Activation checkpointing (--activation_checkpointing): each Block's forward runs without keeping its activations
  and is run again in the backward (torch.utils.checkpoint, non-reentrant), so the autograd graph holds one (B, T, dim)
  input per block instead of ~30 dim-sized vectors per token and layer. The blocks' math is model.py's, untouched.
- Chunked log-probs (--logps_chunk): the model returns its final hidden states at the scored positions, and
  losses.head_logps runs the LM head, log-softmax and gather over chunks of them, made again in the backward, so the
  [tokens x vocabulary] logits and their gradient never exist at once.
"""
import functools
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import losses
import reference as ref_lib


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

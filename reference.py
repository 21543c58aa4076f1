"""The reference policy π_ref and the trust-region (TR) rule that updates it during training.

Offline alignment (DPO, IPO, KTO) keeps π_ref frozen. TR-DPO/IPO/KTO (Gorbatovski et al., arXiv 2404.09656) let it
follow the policy π_θ, once every τ optimizer steps:

    soft:  θ_ref ← α·θ + (1 − α)·θ_ref      (α weights the policy; α = 1 is a copy)
    hard:  θ_ref ← θ

The paper's best settings were α ≈ 0.5–0.6 and τ ≈ 512; the defaults here (α = 0.6, τ = 512) are TRL's
(DPOConfig.ref_model_mixup_alpha, ref_model_sync_steps). Only parameters are updated; buffers are constants here.

The policy may be a plain module, DDP-wrapped (the reference never is: DDP refuses a module without trainable
parameters, and a reference needs no gradient sync) or FSDP2-sharded, in which case the reference must be sharded the
same way, so that the update runs on the local shards with no communication.
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

MODES = ("static", "soft", "hard")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modifies the module in place, so it needs no unwrapping)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def _is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def make_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of the policy: requires_grad False, eval mode, identical on every rank.

    For FSDP2, call this on the unsharded policy before sharding, then shard both the same way. Under
    torch.distributed, rank 0's parameters and buffers are broadcast (they live on the process group's device).
    """
    policy = unwrap(policy)
    if _is_sharded(policy):
        raise ValueError("reference.py make_reference: the policy is already FSDP2-sharded; build the reference from "
                         "the unsharded policy, then fully_shard both the same way")
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    reference.eval()
    if dist.is_available() and dist.is_initialized():
        for t in [*reference.parameters(), *reference.buffers()]:
            dist.broadcast(t.data, src=0)
    return reference


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of `module` back to its sharded state (a no-op for plain modules and sharded units)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def reference_logits(reference: nn.Module, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs) -> torch.Tensor:
    """The reference forward, without autograd: logits of the last logits_to_keep positions (a Llama's option; 0, all
    of them, works for any module); kwargs go to the forward too (packed rows: pos, mask, logits_index). An FSDP2 root
    keeps its all-gathered parameters after a forward (it expects a backward that never comes for π_ref), so the
    reference is resharded before returning."""
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    logits = reference(input_ids, **kwargs)
    reshard(reference)
    return logits


def _paired_params(reference: nn.Module, policy: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Matching (θ_ref, θ) tensors by parameter name: local shards for FSDP2 modules, full tensors otherwise. Tensors
    the policy does not train (LoRA's frozen W0, which the reference shares) are left out, as are the policy's LoRA
    factors (see _lora_pairs)."""
    policy = unwrap(policy)
    reshard(reference)
    reshard(policy)
    ref_params = dict(reference.named_parameters())
    pol_params = {n: p for n, p in policy.named_parameters() if not n.endswith((".lora_A", ".lora_B"))}
    if ref_params.keys() != pol_params.keys():
        raise ValueError(f"reference.py: reference and policy parameter names differ: "
                         f"{sorted(ref_params.keys() ^ pol_params.keys())[:5]}")
    refs, pols = [], []
    for name, r in ref_params.items():
        p = pol_params[name]
        if not p.requires_grad:  # a weight the policy does not train (LoRA's frozen base W0): θ_ref = θ from the start
            continue
        if isinstance(r, DTensor) != isinstance(p, DTensor):
            raise ValueError(f"reference.py: {name} is FSDP2-sharded in only one of reference and policy; shard both")
        r, p = (r.to_local(), p.to_local()) if isinstance(r, DTensor) else (r, p)
        if r.shape != p.shape or r.dtype != p.dtype:
            raise ValueError(f"reference.py: {name} is {tuple(r.shape)} {r.dtype} in the reference but "
                             f"{tuple(p.shape)} {p.dtype} in the policy")
        refs.append(r.data)
        pols.append(p.data)
    return refs, pols


def _lora_pairs(reference: nn.Module, policy: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """LoRA (lora.py): (reference layer holding ΔW_ref = U·V as delta_U, delta_V; policy layer with ΔW = s·B·A as
    lora_B, lora_A and scale) for every adapted linear layer, by module name; [] for full models."""
    ref = {n: m for n, m in reference.named_modules() if hasattr(m, "delta_U")}
    pol = {n: m for n, m in unwrap(policy).named_modules() if hasattr(m, "lora_A")}
    if ref.keys() != pol.keys():
        raise ValueError(f"reference.py: the reference's low-rank deltas and the policy's adapters sit on different "
                         f"layers: {sorted(ref.keys() ^ pol.keys())[:5]}")
    return [(ref[n], pol[n]) for n in pol]


@torch.no_grad()
def soft_update(reference: nn.Module, policy: nn.Module, alpha: float, max_rank: int = 2 ** 31) -> float:
    """θ_ref ← α·θ + (1 − α)·θ_ref in place, one fused lerp over all tensors: θ_ref + α·(θ − θ_ref); for LoRA models
    the same rule on the deltas, ΔW_ref ← α·ΔW + (1 − α)·ΔW_ref, as factors of rank <= max_rank. Returns the largest
    relative Frobenius error of a compression to max_rank (0.0: none, or exact).

    A bf16/fp16 reference is refused for α < 1: α·(θ − θ_ref) below half a unit in the last place of θ_ref (~0.4% of
    |θ_ref| in bf16) rounds back to θ_ref, so small drifts would never reach the reference. Keep fp32 parameters
    (autocast computes in bf16 anyway) or use hard updates.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"reference.py soft_update: alpha must lie in (0, 1], got {alpha}")
    refs, pols = _paired_params(reference, policy)
    low = sorted({str(r.dtype) for r in refs if r.dtype in (torch.bfloat16, torch.float16)})
    if alpha < 1.0 and low:
        raise ValueError(f"reference.py soft_update: the reference holds {low} parameters; a soft update with "
                         f"alpha={alpha} would be lost to rounding. Keep fp32 parameters or use mode 'hard'")
    if refs:
        torch._foreach_lerp_(refs, pols, alpha)
    # LoRA: ΔW_ref ← α·s·B·A + (1−α)·ΔW_ref, exactly, on the factors: with ΔW_ref = U·V,
    #   α·s·B·A + (1−α)·U·V = [α·s·B, (1−α)·U] · [A; V]
    # so U gains r columns and V r rows per update; above max_rank, lora.compress keeps the best rank-max_rank delta
    # (exact while the true rank fits). Mixing A and B separately instead would drop α(1−α)(B − B_r)(A − A_r).
    errors = [0.0]
    for ref, pol in _lora_pairs(reference, policy):
        (A, B), U, V = _full(pol.lora_A, pol.lora_B), ref.delta_U, ref.delta_V
        if alpha < 1.0 and U.shape[1]:
            U, V = torch.cat([alpha * pol.scale * B, (1 - alpha) * U], 1), torch.cat([A, V], 0)
        else:  # α = 1 or ΔW_ref = 0 so far: ΔW_ref ← α·s·B·A, rank r
            U, V = alpha * pol.scale * B, A.clone()
        errors.append(ref.set_delta(U, V, max_rank))
    return max(errors)


def _full(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Whole fp32 copies of LoRA factors; an FSDP2-sharded one is all-gathered (every rank then holds the same, as the
    reference's factors are replicated buffers)."""
    return [(t.full_tensor() if isinstance(t, DTensor) else t).detach().float() for t in tensors]


@torch.no_grad()
def hard_update(reference: nn.Module, policy: nn.Module) -> float:
    """θ_ref ← θ, in place (LoRA: ΔW_ref ← s·B·A, a copy of the factors). Returns 0.0 (no compression error)."""
    refs, pols = _paired_params(reference, policy)
    if refs:
        torch._foreach_copy_(refs, pols)
    for ref, pol in _lora_pairs(reference, policy):
        A, B = _full(pol.lora_A, pol.lora_B)
        ref.set_delta(pol.scale * B, A.clone(), pol.rank)
    return 0.0


class ReferenceUpdater:
    """When and how π_ref follows π_θ: "static" never, "soft"/"hard" after every τ-th optimizer step."""

    def __init__(self, mode: str, alpha: float = 0.6, tau: int = 512, max_rank: int = 2 ** 31):
        if mode not in MODES:
            raise ValueError(f"reference.py ReferenceUpdater: mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"reference.py ReferenceUpdater: alpha must lie in (0, 1] (the policy's weight in "
                             f"θ_ref ← α·θ + (1−α)·θ_ref), got {alpha}")
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"reference.py ReferenceUpdater: tau (optimizer steps between updates) must be an "
                             f"int >= 1, got {tau!r}")
        self.mode, self.alpha, self.tau = mode, alpha, tau
        self.max_rank = max_rank  # LoRA: the cap on the rank of ΔW_ref's factors (--lora_ref_rank)
        self.compression_error = 0.0  # LoRA: of the last update, the largest relative error of a compression

    def after_step(self, step: int, reference: nn.Module, policy: nn.Module) -> bool:
        """Call after optimizer step `step` (1-based); updates π_ref iff step % τ == 0 (and not static). Returns
        whether it did."""
        if step < 1:
            raise ValueError(f"reference.py ReferenceUpdater.after_step: step is 1-based, got {step}")
        if self.mode == "static" or step % self.tau:
            return False
        if self.mode == "soft":
            self.compression_error = soft_update(reference, policy, self.alpha, self.max_rank)
        else:
            self.compression_error = hard_update(reference, policy)
        return True

    def check_precompute(self) -> None:
        """Reference log-probs may be computed once per dataset only if π_ref never changes."""
        if self.mode != "static":
            raise ValueError(f"reference.py: reference log-probs cannot be precomputed with a {self.mode!r} "
                             f"trust-region reference, which changes every tau={self.tau} steps; use mode 'static'")

    def __repr__(self) -> str:
        return f"ReferenceUpdater(mode={self.mode!r}, alpha={self.alpha}, tau={self.tau}, max_rank={self.max_rank})"

"""LoRA, hand-written: the policy is a frozen base W0 plus a trained low-rank delta, and the reference (and the initial
policy that eval KL is measured against) is the same W0 storage plus a delta of its own.

    policy     π_θ    W = W0 + s·B·A        A (r × in), B (out × r) trained in fp32, s = lora_alpha / r (Hu et al. 2021)
    reference  π_ref  W = W0 + U·V          U (out × k), V (k × in): the TR-updated delta as factors (buffers)

A starts as peft initialises it (kaiming-uniform, a = sqrt(5), nn.Linear's own init) and B at zero, so the policy
starts exactly at W0. The chosen linear layers (named by their last component: q_proj, ..., down_proj, or any other
nn.Linear such as a reward model's score) are swapped for LoRALinear in the policy and DeltaLinear in the reference;
their weight and bias stay the same Parameter objects, so the state dict keeps transformers' names and model.py needs
to know nothing. A reference costs its factors, not a second model: make_reference shares every frozen tensor (on one
process and under DDP; FSDP2 gives each sharded model its own shards of W0).

The TR rule itself (which factors a soft or hard update writes) lives in reference.py; this file gives it the layers
and the exact compression of a delta whose factors grew past the rank cap (compress). Checkpoints: checkpoint.py
writes the merged model (transformers loads it), the base, the adapter in peft's format (save_adapter) and the
reference's factors.
"""
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Every linear layer of a block: DPO with LoRA trains better with adapters on the MLP too (QLoRA's finding, and what
# TRL's and the alignment-handbook's DPO recipes use, target_modules="all-linear"); peft's Llama default, q_proj and
# v_proj only, is a fine-tuning default from the LoRA paper's GPT-3 budget. The LM head (often tied) is never a default.
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_targets(spec: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'); ValueError for an empty list or an empty name."""
    names = tuple(n.strip() for n in spec.split(","))
    if not spec.strip() or not all(names):
        raise ValueError(f"lora_targets={spec!r}: expected comma-separated linear layer names such as q_proj,v_proj")
    return names


class LoRALinear(nn.Module):
    """y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ: the policy's layer. W0 and b are the original nn.Linear's Parameters, frozen."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.scale = rank, alpha / rank
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # peft's init_lora_weights=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A (out × in, fp32)."""
        return self.scale * self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


class DeltaLinear(nn.Module):
    """y = x·W0ᵀ + b + (x·Vᵀ)·Uᵀ: the reference's layer, ΔW_ref = U·V kept as factors of rank k (k = 0: ΔW_ref = 0).
    W0 and b are the policy's own Parameters (one storage); U and V are buffers (no gradient; checkpoint.py saves
    them)."""

    def __init__(self, layer: LoRALinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        device = layer.weight.device
        self.register_buffer("delta_U", torch.zeros(self.out_features, 0, device=device))
        self.register_buffer("delta_V", torch.zeros(0, self.in_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.delta_U.shape[1] == 0 else y + F.linear(F.linear(x, self.delta_V), self.delta_U)

    def delta(self) -> torch.Tensor:
        """ΔW_ref = U·V (out × in, fp32)."""
        return self.delta_U @ self.delta_V

    @torch.no_grad()
    def set_delta(self, U: torch.Tensor, V: torch.Tensor, max_rank: int) -> float:
        """ΔW_ref ← U·V, compressed to max_rank (compress) if U has more columns; returns the relative Frobenius error
        of that compression (0.0 when none was needed)."""
        err = 0.0
        if U.shape[1] > max_rank:
            U, V, err = compress(U, V, max_rank)
        self.delta_U, self.delta_V = U.contiguous(), V.contiguous()
        return err

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, delta_rank={self.delta_U.shape[1]}"


@torch.no_grad()
def compress(U: torch.Tensor, V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of U·V (Eckart-Young), without forming the out × in product:

        U = Q_u·R_u,  Vᵀ = Q_v·R_v   (thin QR)         so  U·V = Q_u·(R_u·R_vᵀ)·Q_vᵀ
        R_u·R_vᵀ = P·diag(S)·Hᵀ      (SVD of a k × k core)
        U' = Q_u·P[:, :c]·diag(S[:c]),  V' = H[:, :c]ᵀ·Q_vᵀ,  c = min(rank, k)

    Exact (to rounding) while the true rank of U·V is <= rank. Returns (U', V', ‖U·V − U'·V'‖_F / ‖U·V‖_F), the error
    read off the dropped singular values. Computed in float64, returned in U's dtype."""
    dtype = U.dtype
    Qu, Ru = torch.linalg.qr(U.double())
    Qv, Rv = torch.linalg.qr(V.double().T)
    P, S, Ht = torch.linalg.svd(Ru @ Rv.T)
    c = min(rank, S.numel())
    total = S.square().sum()
    err = (S[c:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return (Qu @ P[:, :c] * S[:c]).to(dtype), (Ht[:c] @ Qv.T).to(dtype), err


# ----------------------------------------------------------------------------------------------------------------------
# building the models


def apply(model: nn.Module, rank: int, alpha: float, targets: str = DEFAULT_TARGETS,
          base_dtype: torch.dtype = torch.float32, seed: int = 0, trainable: tuple[str, ...] = ()) -> nn.Module:
    """Turn `model` into a LoRA policy in place and return it: every parameter frozen (and stored in base_dtype), then
    each nn.Linear whose last name component is in `targets` swapped for a LoRALinear (adapters in fp32, A drawn from a
    generator seeded with `seed`, the same on every rank). Modules named in `trainable` (a reward model's score head,
    say) stay fully trainable in fp32. ValueError naming a target that matches no linear layer."""
    if rank < 1 or not alpha > 0:
        raise ValueError(f"lora: rank={rank} must be >= 1 and alpha={alpha} > 0")
    names = parse_targets(targets)
    found = {n: [] for n in names}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in found:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"lora_targets: {name} is a {type(module).__name__}, not a linear layer")
            found[last].append(name)
    if missing := [n for n, where in found.items() if not where]:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora_targets: {', '.join(missing)} matches no linear layer of the model (its linear layers: "
                         f"{', '.join(linear)})")
    tied = getattr(getattr(model, "lm_head", None), "weight", None) is getattr(
        getattr(model, "embed_tokens", None), "weight", 0)
    if tied and "lm_head" in names:
        raise ValueError("lora_targets: lm_head is tied to the embedding here; a delta on it would change the "
                         "embedding's rows too")
    keep = {id(p) for n in trainable for p in model.get_submodule(n).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        p.data = p.data.float() if id(p) in keep else p.data.to(base_dtype)  # trained weights in fp32
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name in sorted(n for where in found.values() for n in where):  # a fixed order: the same draws on every rank
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, LoRALinear(getattr(holder, child), rank, alpha, generator))
    return model


def layers(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """{module name: module} of every LoRALinear or DeltaLinear in model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def is_lora(model: nn.Module) -> bool:
    model = getattr(model, "module", model)  # DDP
    return any(isinstance(m, (LoRALinear, DeltaLinear)) for m in model.modules())


def make_reference(policy: nn.Module) -> nn.Module:
    """π_ref = W0 + ΔW_ref with ΔW_ref = 0: a module that shares every frozen tensor of the policy (same storage, so it
    costs no second copy of the model) and holds a DeltaLinear, with empty factors, where the policy has a LoRALinear.
    Parameters the policy trains in full (apply's `trainable`) are copied, as in a full-model reference."""
    policy = getattr(policy, "module", policy)
    shared = {id(p): p for p in policy.parameters() if not p.requires_grad}
    reference = copy.deepcopy(policy, memo=dict(shared))
    for name, layer in layers(reference, LoRALinear).items():
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent) if parent else reference, child, DeltaLinear(layer))
    reference.requires_grad_(False)
    return reference.eval()


@torch.no_grad()
def merged_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A policy's state dict (our names, full tensors) with each W0 replaced by W0 + s·B·A and the adapters dropped,
    all in fp32 (a bf16 base too: the delta would round away in bf16): a plain model that computes what the policy
    computes."""
    out = {k: v.float() for k, v in state_dict.items() if not k.endswith((".lora_A", ".lora_B"))}
    for k in state_dict:
        if k.endswith(".lora_A"):
            layer = k.removesuffix(".lora_A")
            A, B = state_dict[k].float(), state_dict[layer + ".lora_B"].float()
            out[layer + ".weight"] = out[layer + ".weight"] + scale * B @ A
    return out


# ----------------------------------------------------------------------------------------------------------------------
# peft's adapter format: adapter_config.json and adapter_model.safetensors, loadable with PeftModel.from_pretrained


def peft_name(name: str) -> str:
    """Our parameter name -> peft's key for it in adapter_model.safetensors (transformers' name under a PeftModel,
    without the adapter name): 'layers.0.self_attn.q_proj.lora_A' -> 'base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight', a module trained in full (modules_to_save) 'lm_head.weight' -> 'base_model.model.lm_head.
    weight'."""
    head = name.startswith(("lm_head.", "score."))
    return "base_model.model." + ("" if head else "model.") + name + (".weight" if name.endswith(".lora_A")
                                                                      or name.endswith(".lora_B") else "")


def save_adapter(path: Path, adapters: dict[str, torch.Tensor], rank: int, alpha: float, targets: str,
                 base: str | None, full: dict[str, torch.Tensor] | None = None, task_type: str = "CAUSAL_LM"):
    """Write the adapters (our names: '....lora_A', '....lora_B') as peft writes a LoRA adapter of a causal LM
    (task_type SEQ_CLS: of a reward model), with the parameters of modules trained in full (apply's `trainable`, our
    names) as its modules_to_save."""
    from safetensors.torch import save_file
    full = full or {}
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": rank,
              "lora_alpha": alpha, "target_modules": sorted(parse_targets(targets)), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in full}) or None,
              "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({peft_name(k): v.detach().cpu().contiguous() for k, v in {**adapters, **full}.items()},
              path / "adapter_model.safetensors", metadata={"format": "pt"})


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The adapters (lora_A, lora_B) of save_adapter's directory under our names."""
    from safetensors.torch import load_file
    return {k.removeprefix("base_model.model.").removeprefix("model.").removesuffix(".weight"): v
            for k, v in load_file(path / "adapter_model.safetensors").items() if ".lora_A." in k or ".lora_B." in k}


# ----------------------------------------------------------------------------------------------------------------------
# a LoRA run's checkpoint (checkpoint.save writes it, train.py's lora_models reads it): ckpt-N/ holds the merged model,
# base/, adapter/ (peft's format) and reference_delta.safetensors


def save_checkpoint(tmp: Path, dest: Path, model, policy_sd: dict, ref_sd: dict | None, config: dict):
    """A LoRA run's weights: the merged policy as the checkpoint's model (transformers and init_from load it), the
    base and the adapter in peft's format beside it, and the reference's factors (exact resume needs all). base/ holds
    every parameter but the adapters, so modules trained in full (a score head) are there, and in the adapter as its
    modules_to_save."""
    with torch.device("meta"):  # a plain model of the same config: save_pretrained checks the names against it
        plain = type(model)(model.config)
    scale = config["lora_alpha"] / config["lora_rank"]
    plain.save_pretrained(tmp, merged_state_dict(policy_sd, scale))
    plain.save_pretrained(tmp / "base", {k: v for k, v in policy_sd.items() if not k.endswith((".lora_A", ".lora_B"))})
    full = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".lora_A", ".lora_B"))}
    save_adapter(tmp / "adapter", {k: v for k, v in policy_sd.items() if k.endswith((".lora_A", ".lora_B"))},
                      config["lora_rank"], config["lora_alpha"], config["lora_targets"], str((dest / "base").resolve()),
                      {k: policy_sd[k] for k in full},
                      "SEQ_CLS" if getattr(model, "is_reward_model", False) else "CAUSAL_LM")
    if ref_sd is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ref_sd.items()}, tmp / "reference_delta.safetensors")


def load_checkpoint(ckpt: Path, policy, reference):
    """Put a LoRA checkpoint's adapters into the policy (built on its base/) and its factors into the reference
    (ValueError if its adapters sit on other layers)."""
    from safetensors.torch import load_file
    policy = getattr(policy, "module", policy)  # inside a DDP wrapper
    adapters = load_adapter(ckpt / "adapter")
    found = layers(policy, LoRALinear)
    if set(adapters) != {f"{n}.{ab}" for n in found for ab in ("lora_A", "lora_B")}:
        raise ValueError(f"{ckpt / 'adapter'}: its adapters sit on other layers than lora_targets names")
    with torch.no_grad():
        for name, layer in found.items():
            layer.lora_A.copy_(adapters[f"{name}.lora_A"])
            layer.lora_B.copy_(adapters[f"{name}.lora_B"])
    if reference is not None:
        factors = load_file(ckpt / "reference_delta.safetensors")
        for name, layer in layers(reference, DeltaLinear).items():
            layer.delta_U = factors[f"{name}.delta_U"].to(layer.weight.device)
            layer.delta_V = factors[f"{name}.delta_V"].to(layer.weight.device)

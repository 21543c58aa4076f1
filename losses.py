"""Preference losses as pure functions of tensors: DPO, IPO, SLiC hinge, KTO, and the per-sequence log-probs they need.

Notation (the paper's, after the DPO paper): π = π_θ the policy, π_ref the reference, y_w the chosen (winning) and y_l
the rejected (losing) response of a pair, log π(y) the summed log-probability of the response tokens given the prompt,
and the implicit reward r(y) = log π(y) − log π_ref(y). For a pair

    h = r(y_w) − r(y_l) = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)).

Every pair loss returns (losses, chosen_rewards, rejected_rewards), one value per pair; rewards = β·r detached (TRL's).
Conventions follow TRL 1.16 (trl/trainer/dpo_trainer.py and kto_trainer.py, DPOTrainer/KTOTrainer._compute_loss);
tests/test_losses.py runs TRL's own _compute_loss on the same inputs and compares. The one deliberate difference:
dpo_loss keeps conservative DPO's label smoothing ε, which TRL 1.16's "sigmoid" loss lacks (ε = 0, the default, is
identical; TRL's "robust" loss is a different, unbiased correction).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# Positions whose fp32 log-softmax is live at once, as logits elements (positions · V): memory O(chunk), not
# O(B · T · V). On CPU a cache-sized chunk (2^21 elements, 8 MB) runs the passes over the vocabulary 1.7x (forward)
# to 2.5x (forward + backward) faster than 1024 positions; on GPU the chunk only bounds memory (1024 positions of a
# 128k vocabulary, measured on an H100).
CHUNK_ELEMENTS = {"cpu": 2 ** 21, "cuda": 2 ** 27}


def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """log softmax(logits)[targets] over the last dim, computed in acc (fp32, or fp64 for gradcheck)."""
    # log_softmax with dtype= reads bf16 logits and writes fp32 in one kernel; logsumexp would take an fp32 copy and
    # run max, subtract, exp and sum as separate passes over it (3x the memory traffic)
    return torch.log_softmax(logits, -1, dtype=acc).gather(-1, targets[..., None]).squeeze(-1)


def _chunk_grad(logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d (g · log p(targets)) / d logits = g · (onehot(targets) − softmax(logits)); g has a trailing 1 dim."""
    return torch.softmax(logits, -1, dtype=g.dtype).mul_(-g).scatter_add_(-1, targets[..., None], g)


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits[:, t])[targets[:, t]] for t < T' (targets (B, T'), T' <= T), chunk by chunk over time, in
    (at least) fp32; positions t >= T' predict nothing and get no gradient. Next-token log-probs are targets =
    input_ids[:, 1:]; packed rows (packing.py) pass their gathered positions as one row, logits (1, N, V).

    Autograd through `logits.float().log_softmax(-1)` would keep an fp32 copy of every chunk for backward, i.e. the
    whole (B, T, V) tensor again; this Function keeps only the input logits and recomputes the softmax per chunk in
    backward: d log p(y) / d logits = onehot(y) − softmax(logits). It takes the full logits rather than the view
    logits[:, :-1], whose backward would allocate a second (B, T, V) gradient to scatter into.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        B, T = targets.shape
        out = torch.empty(B, T, dtype=acc, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):  # the dtype is chosen here, not by autocast
            for t0 in range(0, T, chunk):
                t = slice(t0, min(t0 + chunk, T))  # logits may have more positions than targets
                out[:, t] = _chunk_logps(logits[:, t], targets[:, t], acc)
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        T = targets.shape[1]
        grad = torch.empty_like(logits)
        grad[:, T:] = 0  # positions that predict nothing
        with torch.autocast(logits.device.type, enabled=False):
            for t0 in range(0, T, ctx.chunk):
                t = slice(t0, min(t0 + ctx.chunk, T))
                grad[:, t].copy_(_chunk_grad(logits[:, t], targets[:, t], grad_out[:, t, None]))
        return grad, None, None


def _chunk_positions(logits: torch.Tensor) -> int:
    """Positions per log-softmax chunk, from the device's element budget."""
    return max(1, CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["cuda"]) // logits.shape[-1])


def gathered_logps(logits: torch.Tensor, targets: torch.Tensor, example: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps for gathered positions: logits (N, V) of the N scored positions, targets (N,) the tokens they
    predict, example (N,) which of the E examples each belongs to, counts (E,) its scored tokens (float).
    Returns (logps, counts), both (E,): log π(y|x) = Σ over example e's positions of log p(target)."""
    token_logps = _TokenLogps.apply(logits[None], targets[None], _chunk_positions(logits))[0]
    return token_logps.new_zeros(counts.shape[0]).index_add(0, example, token_logps), counts.to(token_logps.dtype)


class _HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weight^T)[targets] for N positions, the LM head inside the chunk: hidden (N, D) final
    hidden states, weight (V, D) the head, targets (N,). Each chunk's logits (chunk, V) are made, reduced to log-probs
    and dropped; the backward makes them again, so neither the (N, V) logits nor their gradient ever exist, only one
    chunk's. The matmuls run in the dtype nn.Linear would use (the autocast dtype, else the weight's), the log-softmax
    in (at least) fp32, as in the unchunked path: lm_head, then _TokenLogps. The price: the head's matmul runs once
    more in the backward (4 instead of 3 head matmuls per trained token)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        acc = torch.promote_types(dtype, torch.float32)
        out = torch.empty(targets.shape[0], dtype=acc, device=hidden.device)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for i in range(0, targets.shape[0], chunk):
                c = slice(i, i + chunk)
                out[c] = _chunk_logps(hidden[c].to(dtype) @ w.T, targets[c], acc)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # summed over chunks in fp32; none for a frozen head (LoRA), which would cost a vocabulary x dim buffer
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for i in range(0, targets.shape[0], ctx.chunk):
                c = slice(i, i + ctx.chunk)
                h = hidden[c].to(ctx.dtype)
                # d log p / d logits = onehot − softmax, then the two matmuls of nn.Linear's backward
                g = _chunk_grad(h @ w.T, targets[c], grad_out[c, None].to(torch.promote_types(ctx.dtype,
                                                                                              torch.float32)))
                g = g.to(ctx.dtype)
                grad_hidden[c] = g @ w
                if grad_weight is not None:
                    grad_weight += g.T @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def head_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, example: torch.Tensor,
               counts: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gathered_logps with the LM head inside the chunk (_HeadLogps): hidden (N, D) the final hidden states of the N
    scored positions (Llama.forward(return_hidden=True)), weight (V, D) the LM head, chunk positions at a time.
    Returns (logps, counts), both (E,)."""
    token_logps = _HeadLogps.apply(hidden, weight, targets, chunk)
    return token_logps.new_zeros(counts.shape[0]).index_add(0, example, token_logps), counts.to(token_logps.dtype)


def scored_positions(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Padded rows (B, T) in packing.py's gathered form: index (N,) the flat positions b * T + t that predict a
    response token (loss_mask[b, t + 1] = 1), targets (N,) those tokens, example (N,) their row b, counts (B,) each
    row's scored tokens. With Llama.forward(logits_index=index) and head_logps this gives sequence_logps' values."""
    B, T = input_ids.shape
    predicts = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts[:, :-1] = loss_mask[:, 1:].bool()
    index = predicts.flatten().nonzero().squeeze(1)
    return {"index": index, "targets": input_ids.flatten()[index + 1], "example": index // T,
            "counts": predicts.sum(1).float()}


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs log π(y|x) = Σ_t mask[t] · log p(input_ids[t] | input_ids[:t]) and token counts.

    logits (B, T, V) in any float dtype (bf16 fine: the log-softmax runs in fp32), input_ids and loss_mask (B, T).
    Token t is scored by logits[:, t-1], so loss_mask[:, 0] is ignored (nothing predicts the first token); the mask is
    1 on response tokens (EOS included) and 0 on prompt and padding. Returns (logps, n_tokens), both (B,), fp32
    (fp64 for fp64 logits); logps is differentiable w.r.t. logits. Same as TRL's summed completion log-probs.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(f"losses.py sequence_logps: need logits (B, T, V), input_ids and loss_mask (B, T); got "
                         f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(loss_mask.shape)}")
    if not logits.is_floating_point() or input_ids.dtype != torch.long:
        raise ValueError(f"losses.py sequence_logps: need float logits and int64 input_ids, "
                         f"got {logits.dtype} and {input_ids.dtype}")
    if chunk_tokens is None:
        chunk_tokens = _chunk_positions(logits)
    chunk = max(1, chunk_tokens // logits.shape[0])  # time steps per chunk, so a chunk holds ~chunk_tokens positions
    token_logps = _TokenLogps.apply(logits, input_ids[:, 1:], chunk)
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def logits_to_keep(loss_mask: torch.Tensor) -> int:
    """How many final positions of a batch need logits for sequence_logps: from the one that predicts the batch's
    first scored token (the first column with any loss_mask[:, t] = 1, t >= 1) to the end; 1 if nothing is scored.
    Positions before it are prompt positions of every row. On GPU this reads one (T,) vector back to the host."""
    scored = loss_mask[:, 1:].any(0).nonzero()
    return loss_mask.shape[1] - int(scored[0]) if len(scored) else 1


def _pair_logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """h = r(y_w) − r(y_l) and the detached rewards β·r(y_w), β·r(y_l), after checking β and the shapes."""
    if beta <= 0:
        raise ValueError(f"losses.py: beta must be > 0, got {beta}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1:
        raise ValueError(f"losses.py: chosen/rejected policy/reference log-probs must share one shape, got {shapes}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen - rejected, beta * chosen.detach(), beta * rejected.detach()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """DPO: L = −log σ(β·h); with label smoothing ε (conservative DPO) L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h).

    ε is the assumed probability that a preference label is flipped (original DPO code, torchtune, OpenRLHF).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"losses.py dpo_loss: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float):
    """IPO (Azar et al., Eq. 17, with their τ = our β): L = (h − 1/(2β))².

    Pass length-averaged log-probs (logps / n_tokens, for policy and reference alike): the IPO authors' and TRL's
    convention, which keeps β meaningful across response lengths; summed log-probs make the square grow with length.
    """
    h, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, beta: float):
    """SLiC-style hinge on the DPO margin (TRL's "hinge"): L = max(0, 1 − β·h)."""
    h, chosen_rewards, rejected_rewards = _pair_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return torch.relu(1 - beta * h), chosen_rewards, rejected_rewards


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al., Eq. 7), per example, with r = log π(y|x) − log π_ref(y|x):

        z_ref = max(0, mean over the batch (and ranks) of log π(y'|x) − log π_ref(y'|x))   (detached)
        desirable:   L = w_D · (1 − σ(β·(r − z_ref)))
        undesirable: L = w_U · (1 − σ(β·(z_ref − r)))

    z_ref estimates KL(π‖π_ref) from mismatched pairs (x, y') of the same batch (the KL rows of a KTO batch); no
    gradient flows through it, so compute policy_kl_logps under torch.no_grad() as TRL does. Like
    TRL, each rank averages its KL rows, the ranks' means are averaged (all-reduce when torch.distributed is
    initialised, so every rank must call this), and the clamp at 0 comes last. Returns (losses, rewards = β·r detached,
    z_ref); losses.mean() equals TRL's loss, which concatenates desirable then undesirable losses before its mean.
    """
    if beta <= 0:
        raise ValueError(f"losses.py kto_loss: beta must be > 0, got {beta}")
    if not (policy_logps.shape == ref_logps.shape == desirable.shape) or desirable.dtype != torch.bool:
        raise ValueError(f"losses.py kto_loss: policy_logps, ref_logps and bool `desirable` must share one shape, got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(desirable.shape)} "
                         f"({desirable.dtype})")
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.numel() == 0:
        raise ValueError(f"losses.py kto_loss: policy_kl_logps and ref_kl_logps must share one non-empty shape, got "
                         f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
    kl = (policy_kl_logps - ref_kl_logps).detach().mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(kl)
        kl = kl / dist.get_world_size()
    kl = kl.clamp(min=0)
    r = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach(), kl


def rm_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor):
    """Reward-model training (Bradley–Terry, as in InstructGPT, Ouyang et al. 2022, Eq. 1, and TRL's RewardTrainer):
    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), and per pair

        L = −log σ(r(x, y_w) − r(x, y_l))

    with r the score head's output at each response's last token. Returns (losses, chosen_rewards, rejected_rewards),
    the rewards detached (metrics), like the pair losses above."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"losses.py rm_loss: chosen and rejected rewards must share one shape, got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()

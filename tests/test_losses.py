"""losses.py: closed forms, float64 gradchecks, bf16 log-probs against fp64, TRL's own loss code on the same inputs."""
import collections
import math
import types

import pytest
import torch

from losses import dpo_loss, hinge_loss, ipo_loss, kto_loss, logits_to_keep, rm_loss, sequence_logps

PAIR_LOSSES = (dpo_loss, ipo_loss, hinge_loss)


def naive_logps(logits, input_ids, loss_mask):
    """The textbook form in float64: log_softmax of the whole tensor, gather the next token, mask, sum."""
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * loss_mask[:, 1:]).sum(-1)


def batch(B=3, T=10, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.arange(T)
    prompt, length = torch.tensor([3, 1, 5])[:B], torch.tensor([10, 6, 8])[:B]
    loss_mask = ((pos >= prompt[:, None]) & (pos < length[:, None])).long()
    return logits, input_ids, loss_mask


def test_sequence_logps_matches_fp64_in_fp32_and_bf16_and_chunking_is_invisible():
    logits, ids, mask = batch()
    want = naive_logps(logits, ids, mask)
    for chunk_tokens in (1, 4, 10_000):  # 1 position per chunk, several chunks, one chunk
        got, n = sequence_logps(logits, ids, mask, chunk_tokens=chunk_tokens)
        assert got.dtype == n.dtype == torch.float32 and got.shape == n.shape == (3,)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert n.tolist() == mask[:, 1:].sum(-1).tolist() == [7, 5, 3]
    # bf16 logits: the log-softmax and the sum still run in fp32, so the only error is bf16's rounding of the inputs.
    lb = logits.bfloat16()
    got_bf16, _ = sequence_logps(lb, ids, mask, chunk_tokens=4)
    assert got_bf16.dtype == torch.float32
    torch.testing.assert_close(got_bf16.double(), naive_logps(lb, ids, mask), rtol=1e-6, atol=1e-5)
    # the same under CPU autocast, where log_softmax would otherwise stay bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_autocast, _ = sequence_logps(lb, ids, mask)
    torch.testing.assert_close(got_autocast, got_bf16)
    # mask column 0 is ignored: nothing predicts the first token
    mask0 = mask.clone()
    mask0[:, 0] = 1
    torch.testing.assert_close(sequence_logps(logits, ids, mask0)[0], sequence_logps(logits, ids, mask)[0])


def test_sequence_logps_gradients_and_saved_memory():
    logits, ids, mask = batch(B=2, T=6, V=9)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sequence_logps(t, ids, mask, chunk_tokens=4)[0], (x,))
    # bf16 logits get bf16 gradients close to the fp64 ones; no fp32 (B, T, V) tensor is kept for backward.
    saved = []
    lb = logits.bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logps, _ = sequence_logps(lb, ids, mask, chunk_tokens=4)
    logps.sum().backward()
    naive_logps(x, ids, mask).sum().backward()
    assert lb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lb.grad.double(), x.grad, rtol=0, atol=1e-2)
    fp32_copies = [tuple(t.shape) for t in saved if t.dtype != torch.bfloat16 and t.dim() == 3]
    assert fp32_copies == [], f"fp32 copies of (chunks of) the logits kept for backward: {fp32_copies}"


def test_logits_to_keep_starts_at_the_position_before_the_first_scored_token():
    _, _, mask = batch()  # responses start at columns 3, 1, 5 of 10
    assert logits_to_keep(mask) == 10 and logits_to_keep(mask[[0, 2]]) == 10 - 2  # logits from position 2 on
    assert logits_to_keep(mask[2:]) == 10 - 4
    first_col = mask[2:].clone()
    first_col[:, 0] = 1  # column 0 is never scored (nothing predicts it), so it does not widen the window
    assert logits_to_keep(first_col) == 10 - 4
    assert logits_to_keep(torch.zeros(2, 7, dtype=torch.long)) == 1  # nothing scored: one position, no log-probs
    # the window's log-probs are the full ones: the logits before it only score tokens with mask 0
    logits, ids, mask = batch()
    k = logits_to_keep(mask[[0, 2]])
    torch.testing.assert_close(sequence_logps(logits[[0, 2], -k:], ids[[0, 2], -k:], mask[[0, 2], -k:]),
                               sequence_logps(logits[[0, 2]], ids[[0, 2]], mask[[0, 2]]))


def test_sequence_logps_rejects_bad_shapes():
    logits, ids, mask = batch()
    with pytest.raises(ValueError, match="losses.py sequence_logps"):
        sequence_logps(logits, ids[:, 1:], mask)
    with pytest.raises(ValueError, match="int64"):
        sequence_logps(logits, ids.int(), mask)


def pair(h, requires_grad=False):
    """Log-probs with margin h: policy chosen = h, everything else arbitrary but cancelling."""
    pc = torch.tensor([h - 11.0], dtype=torch.float64, requires_grad=requires_grad)
    return pc, torch.tensor([-7.0], dtype=torch.float64), torch.tensor([-11.0], dtype=torch.float64), \
        torch.tensor([-7.0], dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_closed_form_at_h0(beta):
    pc, pr, rc, rr = pair(0.0, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-beta / 2)  # dL/dh = −β·σ(−βh) = −β/2 at h = 0
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # conservative DPO: same value at h = 0, slope −β(1 − 2ε)/2
    pc.grad = None
    eps = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    losses.sum().backward()
    assert losses.item() == pytest.approx(math.log(2))
    assert pc.grad.item() == pytest.approx(-beta * (1 - 2 * eps) / 2)


def test_rewards_and_margins():
    beta = 0.3
    pc, pr, rc, rr = (torch.tensor([-5.0, -9.0]), torch.tensor([-8.0, -4.0]), torch.tensor([-6.0, -8.0]),
                      torch.tensor([-7.0, -6.0]))
    for fn in PAIR_LOSSES:
        _, chosen_rewards, rejected_rewards = fn(pc, pr, rc, rr, beta)
        torch.testing.assert_close(chosen_rewards, beta * torch.tensor([1.0, -1.0]))
        torch.testing.assert_close(rejected_rewards, beta * torch.tensor([-1.0, 2.0]))
    h = torch.tensor([2.0, -3.0])
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta)[0], -torch.nn.functional.logsigmoid(beta * h))
    torch.testing.assert_close(hinge_loss(pc, pr, rc, rr, beta)[0], torch.relu(1 - beta * h))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_minimum_at_half_inverse_beta(beta):
    pc, pr, rc, rr = pair(1 / (2 * beta), requires_grad=True)
    losses, _, _ = ipo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.0, abs=1e-12) and pc.grad.item() == pytest.approx(0.0, abs=1e-9)
    for h in (0.0, 1 / beta):  # symmetric around the minimum: (±1/(2β))²
        assert ipo_loss(*pair(h), beta)[0].item() == pytest.approx(1 / (4 * beta ** 2))


def test_kto_z_ref_clamped_and_weighted():
    beta, r = 0.5, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref = torch.tensor([-10.0, -20.0, -30.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    kl_pol = torch.tensor([-5.0, -6.0], dtype=torch.float64)
    # mean KL-row log-ratio −1 < 0: z_ref clamps at 0
    losses, rewards, kl = kto_loss(ref + r, ref, desirable, kl_pol, kl_pol + 1, beta, 2.0, 0.5)
    assert kl.item() == 0.0
    want = torch.stack([2.0 * (1 - torch.sigmoid(beta * r[0])), 0.5 * (1 - torch.sigmoid(-beta * r[1])),
                        2.0 * (1 - torch.sigmoid(beta * r[2]))])
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(rewards, beta * r)
    # mean log-ratio (3 + 1) / 2 = 2 > 0: z_ref = 2 shifts both sides
    losses, _, kl = kto_loss(ref + r, ref, desirable, kl_pol, kl_pol - torch.tensor([3.0, 1.0]).double(), beta)
    assert kl.item() == 2.0
    torch.testing.assert_close(losses[:2], torch.stack([1 - torch.sigmoid(beta * (r[0] - 2)),
                                                        1 - torch.sigmoid(beta * (2 - r[1]))]))
    with pytest.raises(ValueError, match="bool"):
        kto_loss(ref + r, ref, desirable.long(), kl_pol, kl_pol, beta)


def test_gradcheck_every_loss_in_float64():
    g = torch.Generator().manual_seed(1)
    args = [(torch.randn(4, generator=g, dtype=torch.float64) * 3 - 10).requires_grad_() for _ in range(4)]
    for beta in (0.1, 1.0):
        assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta)[0], args)
        assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta, label_smoothing=0.1)[0], args)
        assert torch.autograd.gradcheck(lambda *a: ipo_loss(*a, beta)[0], args)
        assert torch.autograd.gradcheck(lambda *a: hinge_loss(*a, beta)[0], args)  # |1 − βh| stays away from the kink
        desirable = torch.tensor([True, False, True, False])
        kl_pol, kl_ref = torch.randn(4, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda p, r: kto_loss(p, r, desirable, kl_pol, kl_ref, beta)[0], args[:2])


def test_bad_hyperparameters_raise():
    pc, pr, rc, rr = pair(0.0)
    for fn in PAIR_LOSSES:
        with pytest.raises(ValueError, match="beta"):
            fn(pc, pr, rc, rr, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(pc, pr.expand(2), rc, rr, 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with TRL: run TRL 1.x's own DPOTrainer/KTOTrainer._compute_loss (unbound, on a stand-in `self` holding only
# the attributes it reads) with a tiny transformers Llama carrying TRL's fused LM head, and compare with our functions
# fed by sequence_logps on the same model's logits. This pins the shift, the masking, the sum, IPO's averaging and
# KTO's KL clamp to TRL's, not to our reading of its source.

def trl_self(**attrs):
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    base = dict(model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_weights=[1.0],
                label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
                _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    return types.SimpleNamespace(**{**base, **attrs})


@pytest.fixture(scope="module")
def trl_setup():
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    T, pos = 9, torch.arange(9)
    lens, prompt = torch.tensor([9, 7, 8, 6, 9, 5]), torch.tensor([3, 2, 4, 3, 2, 1])
    rows = dict(input_ids=torch.randint(0, 40, (6, T)), attention_mask=(pos < lens[:, None]).long(),
                completion_mask=((pos >= prompt[:, None]) & (pos < lens[:, None])).long())
    kl_rows = dict(input_ids=torch.randint(0, 40, (6, T)), attention_mask=rows["attention_mask"].roll(1, 0),
                   completion_mask=rows["completion_mask"].roll(1, 0))

    def ours(r):
        with torch.no_grad():
            logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        return sequence_logps(logits, r["input_ids"], r["completion_mask"])
    return model, rows, kl_rows, ours


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_pair_losses_match_trl(trl_setup, loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer
    model, rows, _, ours = trl_setup
    beta, b = 0.1, 3
    ref = torch.linspace(-25, -15, 6)
    trl_loss = DPOTrainer._compute_loss(trl_self(loss_types=[loss_type], beta=beta), model,
                                        dict(rows, ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:]), False)
    logps, n = ours(rows)
    with torch.no_grad():
        trl_logps = model(**rows, labels=rows["input_ids"].masked_fill(rows["completion_mask"] == 0, -100),
                          fused_lm_head=True).log_probs.sum(-1)
    torch.testing.assert_close(logps, trl_logps)
    if loss_type == "ipo":  # the caller's length averaging, for policy and reference alike
        logps, ref = logps / n, ref / n
    fn = {"sigmoid": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}[loss_type]
    losses, _, _ = fn(logps[:b], logps[b:], ref[:b], ref[b:], beta)
    torch.testing.assert_close(losses.mean(), trl_loss)


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # mean KL-row log-ratio ≈ −2 (clamped to 0) and ≈ +2
def test_kto_matches_trl(trl_setup, kl_shift):
    from trl.trainer.kto_trainer import KTOTrainer
    model, rows, kl_rows, ours = trl_setup
    beta, label = 0.1, torch.tensor([True, False, True, True, False, False])
    logps, _ = ours(rows)
    kl_logps, _ = ours(kl_rows)
    ref = torch.linspace(-25, -15, 6)
    ref_kl = kl_logps + kl_shift + 0.1 * torch.randn(6, generator=torch.Generator().manual_seed(0))
    fake = trl_self(calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=1.3, undesirable_weight=0.7)
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    trl_batch = dict(rows, **{f"KL_{k}": v for k, v in kl_rows.items()}, label=label, ref_logps=ref,
                     ref_KL_logps=ref_kl)
    trl_loss = KTOTrainer._compute_loss(fake, model, trl_batch, False)
    losses, _, kl = kto_loss(logps, ref, label, kl_logps, ref_kl, beta, 1.3, 0.7)
    torch.testing.assert_close(losses.mean(), trl_loss)
    assert kl.item() == pytest.approx(fake._metrics["train"]["kl"][0], abs=1e-5)
    assert (kl.item() == 0.0) == (kl_shift > 0)


def test_rm_loss_is_bradley_terry_and_matches_trls_reward_trainer(tmp_path):
    """rm_loss = −log σ(r_w − r_l) per pair: log 2 at a tie, → 0 as the margin grows; with our reward model's scores
    of a transformers LlamaForSequenceClassification (right-padded rows, TRL's layout), its mean is TRL 1.x's own
    RewardTrainer.compute_loss (unbound, on a stand-in self) on the same model and rows."""
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl.trainer.reward_trainer import RewardTrainer
    from model import Llama
    r = torch.tensor([0.0, 3.0, -2.0], dtype=torch.float64, requires_grad=True)
    losses, chosen, rejected = rm_loss(r, torch.zeros(3, dtype=torch.float64))
    assert losses[0].item() == pytest.approx(math.log(2))
    assert losses[1].item() == pytest.approx(math.log1p(math.exp(-3)))
    assert not chosen.requires_grad and torch.equal(rejected, torch.zeros(3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: rm_loss(a, b)[0], (r, torch.randn(3, dtype=torch.float64,
                                                                                      requires_grad=True)))
    with pytest.raises(ValueError, match="one shape"):
        rm_loss(torch.zeros(2), torch.zeros(3))
    torch.manual_seed(0)
    hf = LlamaForSequenceClassification(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    max_position_embeddings=32, pad_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    lens = torch.tensor([9, 5, 7, 8, 3, 9])  # [chosen_1..3 ; rejected_1..3]
    mask = (torch.arange(9) < lens[:, None]).long()
    ids = torch.randint(1, 40, (6, 9)) * mask  # pads are 0 = pad_token_id
    fake = trl_self(args=types.SimpleNamespace(center_rewards_coefficient=None))
    trl_loss = RewardTrainer.compute_loss(fake, hf, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        rewards = ours.rewards(ids, mask)
    torch.testing.assert_close(rm_loss(rewards[:3], rewards[3:])[0].mean(), trl_loss)
    assert fake._metrics["train"]["accuracy"] == [(rewards[:3] > rewards[3:]).float().mean().item()]

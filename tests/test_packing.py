"""packing.py: packed rows and shared-prompt trees give the padded path's log-probs and gradients; micro batches fill
a token budget, split over ranks evenly, and weigh to the global batch mean."""
import random

import pytest
import torch

import data
import losses
import packing
import train
from model import Llama, ModelConfig

V = 61


def make_items(kind: str, n: int, seed: int = 0, max_length: int = 24) -> list[data.Item]:
    """Random items of every length mix: prompts 1..10 tokens, responses 1..12, cut to max_length like tokenize."""
    rng = random.Random(seed)

    def toks(lo, hi):
        return [rng.randrange(V) for _ in range(rng.randint(lo, hi))]

    items = []
    for i in range(n):
        p = toks(1, 10)
        room = max_length - len(p)
        c, r = toks(1, 12)[:room], toks(1, 12)[:room]
        items.append(data.Item(p, c, r if kind == "pairs" else None, (i % 3 != 0) if kind == "kto" else None, i))
    return items


def kl_of(items, kind, max_length=24):
    return data._kl_completions(items, max_length) if kind == "kto" else [None] * len(items)


def padded_logps(model, items, kind):
    """The padded path's per-example log-probs and counts, in packing's example order."""
    kl = kl_of(items, kind)
    b = data.collate(items, kind, 0, kl if kind == "kto" else None)
    logps, n = losses.sequence_logps(model(b["input_ids"]), b["input_ids"], b["loss_mask"])
    if kind == "kto":
        kl_logps, kl_n = losses.sequence_logps(model(b["kl_input_ids"]), b["kl_input_ids"], b["kl_loss_mask"])
        logps, n = torch.cat([logps, kl_logps]), torch.cat([n, kl_n])
    return logps, n


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48))


@pytest.mark.parametrize("kind", ["pairs", "kto", "sft"])
@pytest.mark.parametrize("shared", [True, False])
def test_packed_logps_and_gradients_equal_the_padded_path(model, kind, shared):
    items = make_items(kind, 7, seed=1)
    want, want_n = padded_logps(model, items, kind)
    batch = packing.collate(items, kind, kl_of(items, kind), 0, capacity=packing.row_capacity(kind, 24, shared),
                            shared=shared)
    assert batch["input_ids"].shape[0] < len(want)  # fewer rows than sequences: several per row
    got, n = packing.packed_logps(model, batch)
    assert torch.equal(n, want_n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn(len(want), generator=torch.Generator().manual_seed(2))  # any loss of the log-probs
    grads = torch.autograd.grad((got * w).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * w).sum(), list(model.parameters()))
    for g, x in zip(grads, want_grads):
        assert (g - x).abs().max() <= 1e-5 * x.abs().max()


FAMILIES = {  # every bias and norm a family can have, random, so a packed path that skipped one would show
    "llama-biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "qwen3-biases": dict(model_type="qwen3", qkv_bias=True, o_bias=True, qk_norm=True, head_dim=16),
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_and_flex_logps_equal_the_padded_path_in_every_family(family):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                              **FAMILIES[family]))
    with torch.no_grad():  # weights 5x the init's: peaked attention, so q and k take gradients well above fp32's noise
        for name, p in model.named_parameters():
            p.mul_(5.0) if p.dim() == 2 else p.add_(0.5 * torch.randn_like(p))
    items = make_items("pairs", 7, seed=1)
    want, _ = padded_logps(model, items, "pairs")
    got, _ = packing.packed_logps(model, packing.collate(items, "pairs", kl_of(items, "pairs"), 0, 47, True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn(len(want), generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((got * w).sum(), list(model.parameters()))
    want_grads = torch.autograd.grad((want * w).sum(), list(model.parameters()))
    for g, x in zip(grads, want_grads):
        assert (g - x).abs().max() <= 1e-5 * x.abs().max()
    with torch.no_grad():
        out = flex_and_boolean_logps(model, flex_batch("pairs"))
    torch.testing.assert_close(out["flex"], out["boolean"], rtol=1e-5, atol=1e-5)


def test_bf16_packed_logps_are_within_bf16_rounding(model):
    """Under bf16 autocast, packed and padded log-probs stay within a few times bf16's measured rounding error of the
    fp32 ones, and of each other (a mask that lets a rejected token see the chosen ones moves them far more)."""
    items = make_items("pairs", 6, seed=3)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded, _ = padded_logps(model, items, "pairs")
            packed, _ = packing.packed_logps(model, packing.collate(items, "pairs", kl_of(items, "pairs"), 0, 47, True))
        fp32, _ = padded_logps(model, items, "pairs")
    # Measured (|log-probs| up to 42 nats, 12 tokens): |bf16 − fp32| 0.0015 here and <= 0.0031 over seeds 3..22;
    # |packed − padded| 0.00046 here, <= 0.00076 over those seeds. The same with oneDNN/ATen limited to AVX2 or
    # SSE4.1 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY: a CPU without AVX-512 BF16), so the bounds leave ~3x for
    # other kernels' accumulation orders.
    assert (packed - fp32).abs().max() <= 0.01 and (padded - fp32).abs().max() <= 0.01
    assert (packed - padded).abs().max() <= 0.003


def flex_batch(kind: str, device: str = "cpu") -> dict:
    """Rows of 300 tokens: three 128-token blocks each, so some blocks are empty, some full and some partial."""
    items = make_items(kind, 24, seed=4)
    batch = packing.collate(items, kind, kl_of(items, kind), 0, capacity=300, shared=True)
    assert batch["input_ids"].shape[1] > 256
    return {k: v.to(device) for k, v in batch.items()}


def flex_and_boolean_logps(model, batch: dict) -> dict:
    out = {}
    for name, flex in (("boolean", False), ("flex", True)):
        mask = packing.attention_mask(batch["seg"], batch["branch"], flex=flex)
        logits = model(batch["input_ids"], pos=batch["pos"], mask=mask, logits_index=batch["index"])
        out[name] = losses.gathered_logps(logits, batch["targets"], batch["example"], batch["counts"])[0]
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
@pytest.mark.parametrize("kind", ["pairs", "kto", "sft"])
def test_the_flex_block_mask_is_the_boolean_mask_and_gives_its_logps(model, kind):
    """CUDA's packed path, a FlexAttention BlockMask (run uncompiled here: FlexAttention's reference; CPU has no
    FlexAttention backward), is the boolean mask element for element and gives the same log-probs."""
    from torch.nn.attention.flex_attention import create_mask
    batch = flex_batch(kind)
    seg, branch = batch["seg"], batch["branch"]
    R, T = seg.shape
    mask_mod = packing.tree_mask_mod(seg, branch)
    assert torch.equal(create_mask(mask_mod, R, None, T, T, device="cpu"), packing.attention_mask(seg, branch))
    with torch.no_grad():
        out = flex_and_boolean_logps(model, batch)
    torch.testing.assert_close(out["flex"], out["boolean"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels and backward need CUDA")
@pytest.mark.parametrize("kind", ["pairs", "kto", "sft"])
def test_cuda_flex_logps_and_gradients_equal_the_boolean_masks(model, kind):
    m = Llama(model.config).cuda()
    m.load_state_dict(model.state_dict())
    out = flex_and_boolean_logps(m, flex_batch(kind, "cuda"))
    torch.testing.assert_close(out["flex"], out["boolean"], rtol=1e-4, atol=1e-4)  # TF32-free fp32, other kernels
    w = torch.randn(len(out["flex"]), device="cuda")
    grads = [torch.autograd.grad((out[k] * w).sum(), list(m.parameters()), retain_graph=True) for k in out]
    for g, x in zip(*grads):
        assert (g - x).abs().max() <= 1e-4 * x.abs().max()


def test_shared_segment_positions_and_tree_mask():
    seg = packing.segment([5, 6, 7], [([8, 9], 0), ([10], 1)])
    assert seg.tokens == [5, 6, 7, 8, 9, 10] and seg.pos == [0, 1, 2, 3, 4, 3] and seg.branch == [0, 0, 0, 1, 1, 2]
    assert seg.scored == [(2, 8, 0), (3, 9, 0), (2, 10, 1)]  # the rejected token is predicted by the prompt's end
    s = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 0]])
    b = torch.tensor([[0, 0, 0, 1, 1, 2, 0, 1, 0]])
    m = packing.attention_mask(s, b)[0, 0]
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0]  # rejected: prompt and itself, not the chosen tokens
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert m[7].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0]  # the next segment sees only itself
    assert m[8].tolist() == [0] * 8 + [1]  # padding sees itself: no empty softmax row


def test_logits_index_gathers_positions_of_the_full_forward(model):
    ids = torch.randint(0, V, (2, 9))
    index = torch.tensor([0, 4, 4, 17])
    torch.testing.assert_close(model(ids, logits_index=index), model(ids).flatten(0, 1)[index], rtol=0, atol=1e-6)


def test_the_default_token_budget_is_what_padded_micro_batches_hold():
    assert packing.token_budget("pairs", 4, 512) == packing.token_budget("kto", 4, 512) == 4 * 2 * 512
    assert packing.token_budget("sft", 4, 512) == 4 * 512 and packing.token_budget("pairs", 4, 512, 1000) == 1000


def test_micro_batches_fill_the_budget_and_split_evenly_over_ranks():
    lengths = [[10], [30], [25], [5], [40], [8]]
    groups = packing.group(lengths, capacity=40, rows=2)
    assert groups == [[0, 1, 2, 3], [4, 5]]  # 10+30 | 25+5, then a new micro batch: 40 | 8
    assert packing.equalize(groups, 4) == [[0], [1], [2, 3], [4, 5]]  # the largest (first of ties) halved
    assert packing.group([[50]], capacity=40, rows=1) == [[0]]  # too long for the budget: a micro batch of its own


def dataset(kind: str, n: int, max_length: int = 24) -> data.Dataset:
    return data.Dataset(kind, make_items(kind, n, seed=4, max_length=max_length), {}, 0, max_length)


@pytest.mark.parametrize("kind", ["pairs", "kto", "sft"])
def test_packed_batches_cover_the_global_batch_with_weights_summing_to_one(kind):
    ds, B = dataset(kind, 40), 8
    per_world = {}
    for world in (1, 2):
        steps = []
        for rank in range(world):
            pb = packing.PackedBatches(data.Batches(ds, B, 2, rank, world, seed=1), budget=60)
            steps.append([next(pb) for _ in range(3)])
        for s in range(3):
            assert len({len(st[s]) for st in steps}) == 1  # the same number of micro batches on every rank
        per_world[world] = steps
        total = [sum(mb["weight"] for st in steps for mb in st[s]) for s in range(3)]
        assert total == pytest.approx([world] * 3)  # DDP's mean over ranks then gives weight 1 per step
        # SFT: the weights are token shares; pairs/KTO: example shares
        if kind != "sft":
            assert all(mb["weight"] == pytest.approx(mb["counts"].numel() / (1 + (kind != "sft")) / (B // world))
                       for st in steps for mb in st[0])
    # the examples of each step (multisets of targets) do not depend on the world size
    for s in range(3):
        def targets(steps):
            return sorted(t for st in steps for mb in st[s] for t in mb["targets"].tolist())
        assert targets(per_world[1]) == targets(per_world[2])


def cfg_for(kind: str) -> train.TrainConfig:
    loss = {"pairs": "dpo", "kto": "kto", "sft": "sft"}[kind]
    return train.TrainConfig(loss=loss, ref_update="static" if loss == "sft" else "soft", beta=0.5)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "sft"])
def test_compute_loss_packed_equals_padded(model, loss):
    """The loss, metrics and gradients of one micro batch are the padded path's, for every objective."""
    kind = {"dpo": "pairs", "ipo": "pairs", "kto": "kto", "sft": "sft"}[loss]
    items = make_items(kind, 6, seed=5)
    kl = kl_of(items, kind)
    cfg = train.TrainConfig(loss=loss, beta=0.5)
    # π_ref: π_θ perturbed and sharper (its final norm weight x3): on KTO's KL rows, random tokens, log π − log π_ref
    # is then positive on average, so z_ref > 0 and the KL rows change the loss (asserted below)
    torch.manual_seed(1)
    reference = Llama(model.config)
    with torch.no_grad():
        for p, q in zip(reference.parameters(), model.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
        reference.norm.weight.mul_(3.0)
    reference.requires_grad_(False)
    padded = data.collate(items, kind, 0, kl if kind == "kto" else None)
    packed = packing.collate(items, kind, kl, 0, packing.row_capacity(kind, 24, True), True)
    results = []
    for batch in (padded, packed):
        loss_value, metrics = train.compute_loss(model, reference, batch, cfg)
        results.append((metrics, torch.autograd.grad(loss_value, list(model.parameters()))))
    (m1, g1), (m2, g2) = results
    if loss == "kto":
        assert m1["kto_z_ref"] > 0.1, m1  # the KL rows are exercised: z_ref is not clamped to 0
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()

"""packing.py: packed rows and shared-prompt trees give the padded path's log-probs and gradients; micro batches fill
a token budget, split over ranks evenly, and weigh to the global batch mean."""
import random

import pytest
import torch

import data
import losses
import model as model_lib
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
    "qwen3-biases": dict(model_type="qwen3", qkv_bias=True, o_bias=True, head_dim=16),
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
    """Rows of over 256 tokens (one example has a 260-token prompt): three 128-token blocks each, so some blocks are
    empty, some full and some partial."""
    items = make_items(kind, 24, seed=4)
    items[5] = items[5]._replace(prompt=[random.Random(5).randrange(V) for _ in range(260)])
    batch = packing.collate(items, kind, kl_of(items, kind, max_length=300), 0, capacity=599, shared=True)
    assert batch["input_ids"].shape[1] > 256 and batch["seg"].amax(1).min() > 1  # several segments in every row
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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels and backward need "
                          "CUDA (gpu_check.py runs these: pytest -m cuda)")


@pytest.mark.cuda
@cuda
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


# ----------------------------------------------------------------------------------------------------------------------
# CUDA's kernel: FlexAttention checked once against SDPA, SDPA for the rest of the run if it raises or disagrees

def sdpa_of_block_mask(calls: list, wrong: bool = False):
    """A stand-in for compiled FlexAttention, counting its calls: SDPA with the block mask's own mask (correct), or
    with a plain causal mask (wrong: tokens see other segments and the other response)."""
    from torch.nn.attention.flex_attention import create_mask

    def attend(q, k, v, block_mask, enable_gqa=False):
        calls.append(q.shape)
        R, _, T, _ = q.shape
        mask = None if wrong else create_mask(block_mask.mask_mod, R, None, T, T, device=q.device)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=wrong,
                                                                enable_gqa=enable_gqa)
    return attend


def raising(q, k, v, block_mask, enable_gqa=False):
    raise RuntimeError("InductorError: no kernel for this device\n(long traceback)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_check_passes_a_kernel_that_agrees_once_per_process(monkeypatch, capsys, dtype):
    calls = []
    monkeypatch.setattr(model_lib, "compiled_flex_attention", lambda: sdpa_of_block_mask(calls))
    monkeypatch.setattr(packing, "FLEX_VERDICTS", {})
    batch = flex_batch("pairs")
    assert packing.check_flex(batch["seg"], batch["branch"], (4, 2, 8), dtype) is None
    for _ in range(3):  # checked once: the verdict holds for the rest of the run
        assert packing.flex_passes(batch["seg"], batch["branch"], (4, 2, 8), dtype)
    assert calls == [(2, 4, 256, 8)] * 2 and capsys.readouterr().out == ""  # a 2-row, 256-token slice of the batch


@pytest.mark.parametrize("kernel, reason", [("raising", "it raised RuntimeError: InductorError: no kernel for this "
                                                        "device"),
                                            ("wrong", "its output differs from SDPA's by ")])
def test_a_kernel_that_raises_or_disagrees_falls_back_to_sdpa_with_one_line(monkeypatch, capsys, kernel, reason):
    calls = []
    stand_in = raising if kernel == "raising" else sdpa_of_block_mask(calls, wrong=True)
    monkeypatch.setattr(model_lib, "compiled_flex_attention", lambda: stand_in)
    monkeypatch.setattr(packing, "FLEX_VERDICTS", {})
    batch = flex_batch("pairs")
    assert reason in packing.check_flex(batch["seg"], batch["branch"], (4, 4, 8), torch.float32)
    assert not any(packing.flex_passes(batch["seg"], batch["branch"], (4, 4, 8), torch.float32) for _ in range(3))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "long traceback" not in lines[0] and reason in lines[0]
    assert "SDPA with the boolean tree mask for the rest of the run" in lines[0]
    assert "% of 128 x 128 score blocks that the block mask skips" in lines[0]
    assert len(calls) == 2 * (kernel == "wrong")  # once by check_flex, once by the first flex_passes: not again


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own imports
def test_batch_mask_picks_the_kernel(model, monkeypatch):
    """CPU: the boolean mask whatever --attention says (FlexAttention has no CPU backward); auto asks flex_passes
    only on CUDA, with the model's head shape (tests/test_packing.py's CUDA tests run the rest)."""
    monkeypatch.setattr(packing, "flex_passes", lambda *a: pytest.fail("checked on CPU"))
    batch = flex_batch("pairs")
    for attention in ("auto", "flex", "sdpa"):
        assert torch.equal(packing.batch_mask(batch, model, attention), packing.attention_mask(batch["seg"],
                                                                                               batch["branch"]))
    assert packing.attention_heads(torch.compile(model)) == (4, 2, 8)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_attention_checks_flex_and_uses_it(model, monkeypatch, dtype):
    monkeypatch.setattr(packing, "FLEX_VERDICTS", {})
    m = Llama(model.config).cuda()
    batch = flex_batch("pairs", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        mask = packing.batch_mask(batch, m, "auto")
    assert isinstance(mask, packing.BlockMask) and packing.FLEX_VERDICTS == {("cuda:0", dtype, (4, 2, 8)): True}
    assert isinstance(packing.batch_mask(batch, m, "sdpa"), torch.Tensor)


def mixed_micro_batches(n: int = 24) -> list[dict]:
    """Packed micro batches of varied rows and lengths, as a run of HH-RLHF-like steps makes them."""
    out = []
    for s in range(n):
        max_length = 24 + 31 * (s % 9)
        items = make_items("pairs", 2 + 5 * (s % 4), seed=s, max_length=max_length)
        for i, it in enumerate(items):  # long prompts now and then, so rows reach several 128-token blocks
            if (i + s) % 3 == 0:
                items[i] = it._replace(prompt=(it.prompt * max_length)[:max_length])
        out += packing.pack_step(items, [None] * len(items), "pairs", 0, max_length + 12, budget=4 * max_length)
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # torch's own imports
def test_mixed_micro_batches_compile_flex_attention_a_bounded_number_of_times():
    """model.compiled_flex_attention is compiled with dynamic shapes: a run of micro batches of many row counts and
    lengths compiles it a few times (specialising a row count and a block count of 1), not once per shape, which
    would pass dynamo's recompile limit and run the materialising reference for the rest of the run. Forward only:
    CPU FlexAttention has no backward (the CUDA test below runs the backward too)."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    attend = model_lib.compiled_flex_attention(backend=counter)
    shapes = set()
    for mb in mixed_micro_batches():
        R, T = mb["seg"].shape
        shapes.add((R, T))
        q, k, v = (torch.randn(R, 2, T, 8) for _ in range(3))
        with torch.no_grad():
            y = attend(q, k, v, block_mask=packing.attention_mask(mb["seg"], mb["branch"], flex=True))
        mask = packing.attention_mask(mb["seg"], mb["branch"])
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert len(shapes) > torch._dynamo.config.recompile_limit  # one compile per shape would pass the limit
    assert {R for R, _ in shapes} > {1, 2} and max(T for _, T in shapes) > 256
    assert counter.frame_count <= 5


@pytest.mark.cuda
@cuda
def test_cuda_mixed_micro_batches_compile_a_bounded_number_of_times(model):
    """The same on CUDA with inductor, forward and backward of the model's packed path."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    m = Llama(model.config).cuda()
    compiled = model_lib.compiled_flex_attention
    try:
        model_lib.compiled_flex_attention = lambda: compiled(backend=counter)
        for mb in mixed_micro_batches():
            mb = {k: v.cuda() for k, v in mb.items() if torch.is_tensor(v)}
            logps, _ = packing.packed_logps(m, mb, mask=packing.attention_mask(mb["seg"], mb["branch"], flex=True))
            logps.sum().backward()
    finally:
        model_lib.compiled_flex_attention = compiled
    assert 0 < counter.frame_count <= 5


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


def test_rows_are_sized_to_what_they_hold():
    """layout: rows of a multiple of ROW_QUANTUM tokens, in the fewest positions; on lengths like HH-RLHF's pairs at
    512/256 (prompt + chosen + rejected, 40..800 tokens) far less padding than full-capacity rows filled first fit."""
    q, capacity = packing.ROW_QUANTUM, 1023
    assert packing.layout([500, 300, 200, 100], capacity) == ([0, 1, 1, 0], 608)  # 2 x 608, not 2 x 1000
    assert packing.layout([40, 30], capacity) == ([0, 0], 96)
    rng = random.Random(0)
    used = {"layout": 0, "full rows": 0}
    real = 0
    for _ in range(50):
        lengths = [min(capacity, int(rng.lognormvariate(5.4, 0.6))) for _ in range(rng.randint(4, 16))]
        where, T = packing.layout(lengths, capacity)
        fills = [sum(n for n, r in zip(lengths, where) if r == row) for row in range(max(where) + 1)]
        assert T % q == 0 and max(fills) <= T and min(fills) > 0 and T <= -(-capacity // q) * q
        rows = packing.first_fit([[n] for n in lengths], capacity)  # full-capacity rows, first fit
        full = [sum(n for n, [r] in zip(lengths, rows) if r == row) for row in range(1 + max(r for [r] in rows))]
        used["layout"] += len(fills) * T
        used["full rows"] += len(full) * max(full)
        real += sum(lengths)
    assert 1 - real / used["layout"] < 0.05 < 0.1 < 1 - real / used["full rows"]


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

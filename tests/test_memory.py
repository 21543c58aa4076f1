"""memory.py: activation checkpointing and the chunked LM head change no value or gradient (fp32 tightly, bf16 autocast
within its rounding, fp64 gradcheck), on padded and packed rows, in whole runs on 1 and 2 processes (DDP, FSDP2); they
keep less for the backward; and the memory model's arithmetic."""
import copy
from dataclasses import replace
import math

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import data
import losses
import memory
import packing
import train
from model import Llama, ModelConfig
from test_train import TINY, assert_close, metrics, run, weights

V = 97


def tiny(tie: bool = True, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                             tie_embeddings=tie))


def pairs(n: int = 4, seed: int = 0) -> list[data.Item]:
    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(0, V, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [data.Item(toks(2, 8), toks(1, 9), toks(1, 9), None, i) for i in range(n)]


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rel: float):
    """Every gradient within rel of its tensor's largest entry (fp32: sums in another order round differently)."""
    assert got.keys() == want.keys()
    for k in want:
        worst, scale = (got[k] - want[k]).abs().max().item(), want[k].abs().max().item()
        assert worst <= rel * scale + 1e-12, f"{k}: max |difference| {worst:.3g} > {rel} x {scale:.3g}"


def padded_and_packed(items):
    padded = data.collate(items, "pairs", 0)
    packed = packing.collate(items, "pairs", [None] * len(items), 0, capacity=packing.row_capacity("pairs", 24, True),
                             shared=True)
    return padded, packed


def logps_and_grads(model, batch, chunk: int, dtype: str = "float32"):
    """The policy's log-probs of a padded or packed batch through train.py's path, and d(Σ logps · w)/dθ."""
    model.zero_grad(set_to_none=True)
    cfg = config.TrainConfig(dtype=dtype)
    with train.autocast(cfg, torch.device("cpu")):
        if "pos" in batch:
            logps, n = packing.packed_logps(model, batch, chunk=chunk)
        else:
            logps, n = train.batch_logps(model, batch["input_ids"], batch["loss_mask"], chunk=chunk)
    w = torch.linspace(-1, 1, len(logps))  # a fixed upstream gradient, different per example
    (logps * w).sum().backward()
    return logps.detach(), n, grads(model)


# ----------------------------------------------------------------------------------------------------------------------
# chunked log-probs

def test_head_logps_gradcheck_fp64():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets, example = torch.randint(0, 11, (7,)), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    counts = torch.bincount(example).double()
    fn = lambda h, w: losses.head_logps(h, w, targets, example, counts, chunk=3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    want = torch.zeros(3, dtype=torch.float64).index_add(0, example, torch.log_softmax(hidden @ weight.T, -1)
                                                         .gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(fn(hidden, weight), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_logps_and_gradients_equal_the_unchunked_path_fp32(tie, chunk):
    """Padded rows (train.batch_logps) and packed rows (packing.packed_logps): the same log-probs, counts and gradient
    of every parameter (the tied embedding/head's included), chunks smaller than, dividing and above N."""
    model = tiny(tie)
    for batch in padded_and_packed(pairs()):
        want, want_n, want_g = logps_and_grads(model, batch, chunk=0)
        got, got_n, got_g = logps_and_grads(model, batch, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert torch.equal(got_n, want_n)
        assert_grads_close(got_g, want_g, rel=1e-5)


def test_chunked_logps_and_gradients_equal_the_unchunked_path_under_bf16_autocast():
    """bf16 autocast: the head's matmuls run in bf16 both ways (the chunks sum the head's gradient in fp32, the
    unchunked path rounds it to bf16 once), so they agree to bf16 rounding."""
    model = tiny(False)
    for batch in padded_and_packed(pairs()):
        want, _, want_g = logps_and_grads(model, batch, chunk=0, dtype="bfloat16")
        got, _, got_g = logps_and_grads(model, batch, chunk=4, dtype="bfloat16")
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item() / 10)
        assert_grads_close(got_g, want_g, rel=2e-2)


def test_the_reference_forward_is_chunked_without_autograd():
    model = tiny().requires_grad_(False)
    padded, packed = padded_and_packed(pairs())
    ids, mask = padded["input_ids"], padded["loss_mask"]
    want, _ = train.batch_logps(model, ids, mask, reference=True)
    got, _ = train.batch_logps(model, ids, mask, reference=True, chunk=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got_packed, _ = packing.packed_logps(model, packed, reference=True, chunk=3)
    torch.testing.assert_close(got_packed, want, rtol=0, atol=1e-5)


def saved_shapes(fn) -> list[tuple]:
    """Shapes of the tensors autograd keeps for the backward while fn runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_the_chunked_head_keeps_no_tokens_by_vocabulary_tensor():
    model = tiny()
    batch = data.collate(pairs(), "pairs", 0)
    unchunked = saved_shapes(lambda: train.batch_logps(model, batch["input_ids"], batch["loss_mask"]))
    chunked = saved_shapes(lambda: train.batch_logps(model, batch["input_ids"], batch["loss_mask"], chunk=4))
    assert any(len(s) == 3 and s[-1] == V for s in unchunked)  # the (B, T', V) logits, kept for the backward
    assert [s for s in chunked if V in s] == [(V, 32)]  # only the head's weight itself


# ----------------------------------------------------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_fp32(loss):
    """train.compute_loss on padded and packed rows (packed: pos and the tree mask go through the checkpoint),
    with and without the chunked head: equal losses and gradients."""
    plain = tiny()
    recomputed = memory.checkpoint_blocks(copy.deepcopy(plain))
    assert memory.is_checkpointed(recomputed) and not memory.is_checkpointed(plain)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    reference = copy.deepcopy(plain).requires_grad_(False)
    items = pairs(4, seed=1)
    if loss == "kto":
        items = [data.Item(it.prompt, it.response, None, i % 2 == 0, i) for i, it in enumerate(items)]
        kl = data._kl_completions(items, 24)
        batches = [data.collate(items, "kto", 0, kl),
                   packing.collate(items, "kto", kl, 0, capacity=packing.row_capacity("kto", 24, True), shared=True)]
    else:
        batches = list(padded_and_packed(items))
    for batch in batches:
        for chunk in (0, 3):
            cfg = config.TrainConfig(loss=loss, beta=0.5, logps_chunk=chunk)
            out = {}
            for name, model in (("plain", plain), ("recomputed", recomputed)):
                model.zero_grad(set_to_none=True)
                loss_value, m = train.compute_loss(model, reference, dict(batch), cfg)
                loss_value.backward()
                out[name] = loss_value.item(), grads(model)
            assert out["recomputed"][0] == pytest.approx(out["plain"][0], abs=1e-6)
            assert_grads_close(out["recomputed"][1], out["plain"][1], rel=1e-6)


def test_activation_checkpointing_keeps_only_the_block_inputs():
    model = tiny()
    batch = data.collate(pairs(), "pairs", 0)
    B, T = batch["input_ids"].shape

    def forward():
        return model(batch["input_ids"]).sum()

    def kept() -> int:
        return sum(math.prod(s) for s in saved_shapes(forward))

    plain = kept()
    memory.checkpoint_blocks(model)
    recomputed = kept()
    assert recomputed < plain / 3
    with torch.no_grad():  # no autograd, no checkpoint: generation and the reference run as they are
        assert saved_shapes(forward) == []


# ----------------------------------------------------------------------------------------------------------------------
# whole runs: 1 process, DDP and FSDP2 on 2, with both options, match the straight run

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(TINY + [f"--out_dir={out}", "--max_steps=6", "--eval_every=3", "--ckpt_every=3"])
    return out


@pytest.mark.parametrize("nproc, fsdp", [(0, False), (2, False), (2, True)])
def test_runs_with_checkpointing_and_chunks_match_the_straight_run(straight_run, tmp_path, nproc, fsdp):
    run(TINY + [f"--out_dir={tmp_path}", "--max_steps=6", "--eval_every=3", "--ckpt_every=3",
                "--activation_checkpointing=true", "--logps_chunk=5", f"--fsdp={fsdp}"], nproc=nproc)
    for sub in ("", "reference"):
        assert_close(weights(tmp_path, sub), weights(straight_run, sub), atol=1e-5)
    for a, b in zip(metrics(tmp_path), metrics(straight_run), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


# ----------------------------------------------------------------------------------------------------------------------
# the memory model's arithmetic: exact parameter counts, and the activations autograd keeps, counted by saved-tensor hooks

SHAPES = [dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48),
          dict(vocab_size=V, dim=48, n_layers=3, n_heads=6, n_kv_heads=3, hidden_dim=80, head_dim=16,
               tie_embeddings=False),
          dict(vocab_size=V, dim=32, n_layers=1, n_heads=4, hidden_dim=64, model_type="qwen2", qkv_bias=True),
          dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, model_type="llama", qkv_bias=True,
               o_bias=True, mlp_bias=True),
          dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, head_dim=16,
               model_type="qwen3")]


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_are_exact(shape):
    c = ModelConfig(**shape)
    model = Llama(c)
    counts = memory.param_count(c)
    assert counts["total"] == model.num_params()
    assert counts["matmul"] == sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("proj.weight"))
    for name, c in memory.MODELS.items():  # the published sizes
        want = {"Llama-3-8B": 8_030_261_248, "Qwen2.5-7B": 7_615_616_512, "Qwen2.5-0.5B": 494_032_768}[name]
        assert memory.param_count(c)["total"] == want


def kept_bytes(model, ids, dtype: str) -> int:
    """Bytes of the distinct storages autograd keeps from a forward to the final hidden states, parameters excluded
    (the autocast bf16 copies of the weights included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            model(ids, return_hidden=True)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]])
def test_activation_bytes_match_what_autograd_keeps(shape, dtype):
    """One row of T tokens (RoPE's cos/sin per token, as the model counts them): the plain forward keeps exactly
    activation_bytes + the autocast copies; checkpointed blocks keep their inputs, and the model adds one block for the
    recompute."""
    c = ModelConfig(**shape)
    torch.manual_seed(0)
    model, T = Llama(c), 40
    ids = torch.randint(0, V, (1, T))
    casts = 2 * memory.param_count(c)["matmul"] if dtype == "bfloat16" else 0
    assert kept_bytes(model, ids, dtype) == memory.activation_bytes(c, T, dtype, checkpointed=False) + casts
    memory.checkpoint_blocks(model)
    one_block = (memory.activation_bytes(c, T, dtype, False) - memory.activation_bytes(replace(c, n_layers=0), T,
                                                                                        dtype, False)) // c.n_layers
    # checkpointed blocks keep only fp32 inputs (and no autocast copy for the backward)
    assert kept_bytes(model, ids, dtype) + one_block == memory.activation_bytes(c, T, dtype, checkpointed=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_activation_bytes_match_what_autograd_keeps(dtype):
    """A LoRA policy (frozen W0 and norms) keeps less than the full model for the norms, plus each adapter's r-wide
    x·Aᵀ: exactly in fp32; within 5% under bf16 autocast with a bf16 W0 (a fitted coefficient)."""
    import lora
    c = ModelConfig(**SHAPES[1])
    torch.manual_seed(0)
    model, T = lora.apply(Llama(c), 4, 8.0, base_dtype=getattr(torch, dtype)), 40
    ids = torch.randint(0, V, (1, T))
    want = memory.activation_bytes(c, T, dtype, False, lora_rank=4)
    casts = 2 * memory.lora_param_count(c, 4) if dtype == "bfloat16" else 0  # the adapters' bf16 copies
    got = kept_bytes(model, ids, dtype) - casts
    assert got == want if dtype == "float32" else abs(got / want - 1) < 0.05
    assert memory.lora_param_count(c, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_estimate_adds_its_parts_and_fits_the_table():
    c = memory.MODELS["Llama-3-8B"]
    e = memory.estimate(c, 1, 256, 256, accumulating=True)
    p = memory.param_count(c)["total"]
    assert e["parts"]["policy weights"] == 4 * p and e["parts"]["AdamW moments"] == 8 * p
    assert e["peak"] == sum(e["parts"].values())  # accumulating: everything at once
    lora_e = memory.estimate(c, 1, 256, 256, lora_rank=16, checkpointed=True, chunk=256)
    assert lora_e["peak"] < 24e9 * 0.9 < e["peak"]  # 8B full does not fit one GPU; LoRA fits 24 GB
    assert memory.largest_micro_batch(c, 80e9 * 0.9, lora_rank=16, checkpointed=True, chunk=256,
                                      prompt_len=256, response_len=256) > \
        memory.largest_micro_batch(c, 24e9 * 0.9, lora_rank=16, checkpointed=True, chunk=256, prompt_len=256,
                                   response_len=256) > 0


def test_a_frozen_head_gets_no_gradient_buffer():
    """LoRA freezes the head: the chunked backward makes no vocabulary x dim gradient for it, and the hidden states'
    gradient is the unchunked path's."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(V, 8)
    targets, example = torch.randint(0, V, (9,)), torch.zeros(9, dtype=torch.long)
    counts = torch.tensor([9.0])
    got, _ = losses.head_logps(hidden, weight, targets, example, counts, chunk=4)
    (g,) = torch.autograd.grad(got.sum(), hidden)
    want = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).sum()
    torch.testing.assert_close(g, torch.autograd.grad(want, hidden)[0], rtol=1e-5, atol=1e-6)
    ctx = type("Ctx", (), {"saved_tensors": (hidden.detach(), weight, targets), "chunk": 4, "dtype": torch.float32,
                           "needs_input_grad": (True, False, False, False)})()
    grads = losses._HeadLogps.backward(ctx, torch.ones(9))
    assert grads[1] is None
    torch.testing.assert_close(grads[0], g, rtol=1e-5, atol=1e-6)


def test_a_lora_run_with_checkpointing_and_chunks_matches_the_plain_lora_run(tmp_path):
    """LoRA freezes W0, the norms and the (tied) head: the recomputed blocks and the chunked head train the same
    adapters and reference factors."""
    args = TINY + ["--max_steps=4", "--eval_every=2", "--ckpt_every=2", "--lora_rank=4", "--lora_alpha=8"]
    run(args + [f"--out_dir={tmp_path / 'plain'}"])
    run(args + [f"--out_dir={tmp_path / 'options'}", "--activation_checkpointing=true", "--logps_chunk=5"])
    ckpt = {name: checkpoint.model_dir(tmp_path / name) for name in ("plain", "options")}
    for file in ("model.safetensors", "adapter/adapter_model.safetensors", "reference_delta.safetensors"):
        assert_close(load_file(ckpt["options"] / file), load_file(ckpt["plain"] / file), atol=1e-5)
    for a, b in zip(metrics(tmp_path / "options"), metrics(tmp_path / "plain"), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())

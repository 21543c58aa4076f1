"""model.py against transformers' LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM and a real
pretrained Llama (stories260K); sample.py end to end."""
import json
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import sample
from conftest import shared_path
from tokenizer import get_tokenizer
from model import (ARCHITECTURES, Llama, ModelConfig, RMSNorm, apply_rope, check_context, config_from_hf,
                   rope_cos_sin, rope_inv_freq, sample_next)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
FAMILIES = {  # ModelConfig flags of each family, with every bias and norm the family allows
    "llama": dict(),
    "llama-biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "qwen3-biases": dict(model_type="qwen3", qkv_bias=True, o_bias=True, head_dim=16),
    "mistral": dict(model_type="mistral", sliding_window=64),
}


def randomize_(named_parameters):
    """Non-trivial norm weights and non-zero biases, so a norm or a bias applied in the wrong place would show."""
    with torch.no_grad():
        for name, p in named_parameters:
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))


def random_llama(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**{**TINY, **overrides})).eval()
    randomize_(model.named_parameters())
    return model


def hf_logits(path, idx):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(idx).logits


HF_CASES = {  # random transformers configs; seq_len 80 > original_max_position_embeddings 64 in the llama3 case
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-rope-head_dim-4.x-layout": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, tmp_path):
    kw = dict(HF_CASES[case])
    rope = {"rope_theta": kw.pop("rope_theta", 10000.0), **kw.pop("rope_scaling", {"rope_type": "default"})}
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters=rope, **kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    if "4.x-layout" in case:  # what most Hub checkpoints carry: top-level rope_theta / rope_scaling / torch_dtype
        c = json.loads((tmp_path / "config.json").read_text())
        p = c.pop("rope_parameters")
        c.update(rope_theta=p.pop("rope_theta"), rope_scaling=p, torch_dtype=c.pop("dtype"))
        (tmp_path / "config.json").write_text(json.dumps(c))
    ours = Llama.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings == cfg.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == cfg.tie_word_embeddings
    if "llama3" in case:
        assert ours.config.rope_scaling["original_max_position_embeddings"] == 64 and ours.config.head_dim == 16
    idx = torch.randint(0, 97, (2, 80))
    with torch.no_grad():
        diff = (ours(idx) - hf_logits(tmp_path, idx)).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logits - transformers| = {diff}"


HF_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2)  # 0.2: a bias moved by 1e-3 shows
FAMILY_CASES = {  # transformers class prefix, config; seq_len 80 below, so Mistral's window 80 changes nothing
    "llama-biases-gqa-head_dim-tied": ("Llama", dict(num_key_value_heads=2, head_dim=16, attention_bias=True,
                                                     mlp_bias=True, tie_word_embeddings=True)),
    "llama-attention_bias-mha-untied": ("Llama", dict(num_key_value_heads=4, attention_bias=True)),
    "qwen2-gqa-tied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-head_dim-untied": ("Qwen2", dict(num_key_value_heads=1, head_dim=16)),
    "qwen3-biases-gqa-head_dim-untied": ("Qwen3", dict(num_key_value_heads=2, head_dim=16, attention_bias=True)),
    "qwen3-mha-tied": ("Qwen3", dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=True)),
    "mistral-null-gqa-head_dim-untied": ("Mistral", dict(num_key_value_heads=2, head_dim=16, sliding_window=None)),
    "mistral-window-80-tied": ("Mistral", dict(num_key_value_heads=2, sliding_window=80, tie_word_embeddings=True)),
}


def random_hf(family: str, seed=0, **kw):
    torch.manual_seed(seed)
    hf = getattr(transformers, family + "ForCausalLM")(getattr(transformers, family + "Config")(**HF_BASE, **kw))
    randomize_(hf.named_parameters())
    return hf.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_logits_and_gradients_match_transformers(case, tmp_path):
    """Each family's transformers class, written with save_pretrained: our logits and gradients are its own (fp32)."""
    family, kw = FAMILY_CASES[case]
    hf = random_hf(family, **kw)
    hf.save_pretrained(tmp_path)
    hf = getattr(transformers, family + "ForCausalLM").from_pretrained(tmp_path, dtype=torch.float32,
                                                                      attn_implementation="eager")
    hf.config.pad_token_id = None
    ours = Llama.from_pretrained(tmp_path)
    c = ours.config
    assert c.model_type == family.lower() and c.head_dim == kw.get("head_dim", 8)
    assert (c.qkv_bias, c.o_bias) == (kw.get("attention_bias", family == "Qwen2"), kw.get("attention_bias", False))
    assert c.qk_norm == (family == "Qwen3") and c.mlp_bias == kw.get("mlp_bias", False)
    assert c.sliding_window == kw.get("sliding_window") and c.tie_embeddings == kw.get("tie_word_embeddings", False)
    assert ours.num_params() == hf.num_parameters()
    linear = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    assert ours.flops_per_token(80) == 2 * linear + 2 * 2 * 2 * 80 * 4 * c.head_dim  # biases and norms: not matmuls
    idx = torch.randint(0, 97, (2, 80))
    logits, want = ours(idx), hf(idx).logits
    assert relative_error(logits, want) <= 1e-5, case
    w = torch.randn_like(want)  # any loss of the logits
    (logits * w).sum().backward()
    (want * w).sum().backward()
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():  # tied: one Parameter, named once (embed_tokens) in both
        g = grads["lm_head.weight" if name == "lm_head.weight" else "model." + name].grad
        assert relative_error(p.grad, g) <= 1e-5, f"{case}: {name}"
    with torch.no_grad():  # the biases and q/k norms matter: without them the logits are far off
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p))
        if c.qkv_bias or c.qk_norm or c.mlp_bias:
            assert relative_error(ours(idx), want) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_writes_the_family_and_transformers_reloads_it(family, tied, tmp_path):
    model = random_llama(tie_embeddings=tied, **FAMILIES[family])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    assert config["architectures"] == [ARCHITECTURES[model.config.model_type]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == ARCHITECTURES[model.config.model_type]
    assert getattr(hf.config, "sliding_window", None) == model.config.sliding_window
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert relative_error(model(idx), hf(idx).logits) <= 1e-5
    back = Llama.from_pretrained(tmp_path)
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_sliding_window_is_refused_where_it_would_cut_a_sequence(tmp_path):
    """transformers' window W lets a query see W keys (itself included): W >= the sequence length changes nothing,
    a shorter one does, and then check_context and generate refuse in one line naming both numbers."""
    hf = random_hf("Mistral", num_key_value_heads=2, sliding_window=79)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 80))
    with torch.no_grad():
        assert relative_error(ours(idx[:, :79]), hf(idx[:, :79]).logits) <= 1e-5
        assert relative_error(ours(idx), hf(idx).logits) > 1e-3  # what the refusal protects against
    check_context(ours.config, 79)
    with pytest.raises(ValueError, match=r"^sliding_window 79 \(config.json\) < 80, the longest sequence of this run"):
        check_context(ours.config, 80)
    assert len(ours.generate([[1] * 70], 9, stop_ids=())[0]) == 9
    with pytest.raises(ValueError, match="sliding_window 79"):
        ours.generate([[1] * 70, [2]], 10)


# What the Hub's config.json files say (Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen3-0.6B, mistralai/Mistral-7B-v0.1 and
# v0.3), shapes cut down: sliding-window keys as released, Qwen3 with head_dim 128 != 1024 / 16.
HUB_CONFIGS = {
    "qwen2.5": dict(model_type="qwen2", hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                    use_sliding_window=False, sliding_window=32768, max_window_layers=21, tie_word_embeddings=True,
                    rope_theta=1000000.0, hidden_act="silu", attention_dropout=0.0),
    "qwen3": dict(model_type="qwen3", hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=28,
                  rope_scaling=None, rope_theta=1000000, tie_word_embeddings=True),
    "mistral-v0.1": dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         sliding_window=4096, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral-v0.3": dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         sliding_window=None, rope_theta=1000000.0, tie_word_embeddings=False),
}


def test_hub_configs_and_the_sliding_window_keys_read_as_transformers_reads_them():
    shape = dict(vocab_size=97, intermediate_size=48, num_hidden_layers=2)
    read = {name: config_from_hf({**shape, **d}, "config.json") for name, d in HUB_CONFIGS.items()}
    assert [read[n].sliding_window for n in HUB_CONFIGS] == [None, None, 4096, None]
    assert read["qwen2.5"].qkv_bias and not read["qwen2.5"].o_bias and read["qwen2.5"].rope_theta == 1e6
    assert read["qwen3"].qk_norm and read["qwen3"].head_dim == 128
    without = {k: v for k, v in HUB_CONFIGS["qwen3"].items() if k != "head_dim"}  # Qwen3Config's default head_dim
    assert config_from_hf({**shape, **without}, "c").head_dim == 128 == transformers.Qwen3Config(**without).head_dim
    mistral = {k: v for k, v in HUB_CONFIGS["mistral-v0.1"].items() if k != "sliding_window"}  # MistralConfig's 4096
    default = transformers.MistralConfig().sliding_window
    assert config_from_hf({**shape, **mistral}, "c").sliding_window == 4096 == default
    qwen = {**shape, "model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4, "use_sliding_window": True,
            "sliding_window": 16}
    for extra, window, first in (({"max_window_layers": 2}, None, 0),  # no layer from 2 on: nothing slides
                                 ({"max_window_layers": 1}, 16, 1),
                                 ({"layer_types": ["full_attention"] * 2}, None, 0),
                                 ({"layer_types": ["sliding_attention"] * 2, "max_window_layers": 5}, 16, 0)):
        c = config_from_hf({**qwen, **extra}, "c")
        assert (c.sliding_window, c.max_window_layers) == (window, first), extra
    with pytest.raises(ValueError, match="c: layer_types .*only the last layers may use a sliding window"):
        config_from_hf({**qwen, "layer_types": ["sliding_attention", "full_attention"]}, "c")


def test_qwen_sliding_layers_round_trip_through_transformers(tmp_path):
    """A Qwen2 whose second layer slides: transformers reads our config.json with the same layer types."""
    model = random_llama(model_type="qwen2", qkv_bias=True, sliding_window=16, max_window_layers=1)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.layer_types == ["full_attention", "sliding_attention"] and hf.sliding_window == 16
    assert Llama.from_pretrained(tmp_path).config == model.config


def test_llama3_frequency_scaling_bands():
    """Short wavelengths kept, long ones divided by factor, the band between interpolated (Llama 3 paper's rule)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    plain = rope_inv_freq(ModelConfig(**{**TINY, "head_dim": 16}))
    scaled = rope_inv_freq(ModelConfig(**{**TINY, "head_dim": 16, "rope_scaling": scaling}))
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 16], plain[wavelen < 16])
    assert torch.allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8)
    mid = (wavelen > 16) & (wavelen < 64)
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_meta_interleaved_rope_equals_rotate_half_after_the_qk_permutation():
    """The comment in model.py: Meta's complex-pair RoPE on w x == our rotate-half RoPE on permuted(w) x, permuted."""
    h, d, dim, T = 2, 8, 16, 5
    w, x = torch.randn(h * d, dim), torch.randn(T, dim)
    inv_freq = rope_inv_freq(ModelConfig(dim=dim, n_heads=h))
    rotation = torch.polar(torch.ones(T, d // 2), torch.arange(T)[:, None] * inv_freq)  # e^{i pos theta_k}
    meta = torch.view_as_real(torch.view_as_complex((x @ w.T).view(T, h, d // 2, 2)) * rotation[:, None])
    w_hf = w.view(h, d // 2, 2, dim).transpose(1, 2).reshape(h * d, dim)
    ours = apply_rope((x @ w_hf.T).view(T, h, d).transpose(0, 1)[None], *rope_cos_sin(inv_freq, torch.arange(T)))
    assert torch.allclose(ours[0], meta.transpose(2, 3).reshape(T, h, d).transpose(0, 1), atol=1e-5)


def test_bf16_rope_and_rmsnorm_compute_in_fp32_like_transformers_under_autocast():
    """bf16 activations: RoPE's products and sum are fp32 (rounded once, at the end), and RMSNorm normalises in fp32,
    rounds to bf16, then scales by the weight: exactly the explicit-upcast formulas, bit for bit."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_heads=4, rope_theta=500000.0)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(300))
    x = torch.randn(2, 4, 300, 16).bfloat16()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).bfloat16())
    norm = RMSNorm(64, 1e-5).bfloat16()
    norm.weight.data.normal_(1.0, 0.1)
    h = torch.randn(2, 300, 64).bfloat16()
    hf = h.float()
    expected = norm.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert norm(h).dtype == torch.bfloat16 and torch.equal(norm(h), expected)


def stories():
    path = shared_path("models", "stories260K")
    return Llama.from_pretrained(path), json.loads((path / "reference.json").read_text())


def decode_pieces(pieces: list[str], ids: list[int]) -> str:
    """sentencepiece decoding: <0xNN> pieces are raw bytes, and the space put before the first word is dropped."""
    out = b"".join(bytes([int(pieces[i][3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", pieces[i])
                   else pieces[i].encode() for i in ids)
    return out.decode("utf-8", errors="replace").removeprefix(" ")


def test_stories260K_greedy_from_bos():
    model, ref = stories()
    ids = [ref["bos_id"]] + model.generate([[ref["bos_id"]]], len(ref["greedy_from_bos"]) - 1, stop_ids=())[0]
    assert ids == ref["greedy_from_bos"]
    text = decode_pieces(ref["pieces"], ids[1:])
    assert text == ref["greedy_text"]
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    with torch.no_grad():
        last = model(torch.tensor([ids]))[0, -1, :8]
    assert torch.allclose(last, torch.tensor(ref["logits_at_last_position_first8"]), atol=1e-4)


def test_stories260K_batch_of_different_lengths_cached_and_uncached():
    """Prompts of lengths 1, 6 and 23 from the reference story continue it exactly, with and without the KV cache."""
    model, ref = stories()
    story = ref["greedy_from_bos"]
    prompts = [story[:1], story[:6], story[:23]]
    for use_cache in (True, False):
        out = model.generate(prompts, 12, stop_ids=(), use_cache=use_cache)
        assert out == [story[len(p):len(p) + 12] for p in prompts], f"use_cache={use_cache}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_matches_recompute_and_rows_match_alone(family):
    model = random_llama(seed=1, **FAMILIES[family])
    with torch.no_grad():
        for p in model.parameters():  # larger weights: peaked logits, so greedy is decided by the model, not by noise
            p.mul_(4.0)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [4], [8, 8, 6, 1]]
    cached = model.generate(prompts, 20, stop_ids=())
    assert cached == model.generate(prompts, 20, stop_ids=(), use_cache=False)
    assert cached == [model.generate([p], 20, stop_ids=())[0] for p in prompts]
    assert cached == [model.generate(torch.tensor([p]), 20, stop_ids=())[0] for p in prompts]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_right_padding_leaves_real_token_logits_unchanged(family):
    model = random_llama(**FAMILIES[family])
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 6))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    with torch.no_grad():
        logits = model(padded)
        assert torch.allclose(logits[0], model(a)[0], atol=1e-5)
        assert torch.allclose(logits[1, :6], model(b)[0], atol=1e-5)


def test_logits_to_keep_is_the_tail_of_the_full_logits():
    model = random_llama()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        assert torch.equal(model(idx, logits_to_keep=0), full)
        for k in (1, 5, 12, 20):  # more than T: every position, as a slice would
            tail = model(idx, logits_to_keep=k)
            assert tail.shape == (2, min(k, 12), 97)
            torch.testing.assert_close(tail, full[:, -k:], rtol=0, atol=1e-5)


def test_stop_ids_and_sampling():
    model = random_llama()
    prompt = [[3, 1, 4]]
    greedy = model.generate(prompt, 10, stop_ids=())[0]
    stop = greedy[4]
    first = greedy.index(stop)
    assert model.generate(prompt, 10, stop_ids=[stop])[0] == greedy[:first + 1]  # the stop token ends the row
    assert model.generate(prompt, 10, temperature=1.0, top_k=1, stop_ids=())[0] == greedy
    assert model.generate(prompt, 10, temperature=1.0, top_p=1e-6, stop_ids=())[0] == greedy
    draws = [model.generate(prompt * 3, 10, temperature=1.0, top_k=20, top_p=0.9, stop_ids=(),
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0][0] != draws[0][1]  # seeded: reproducible; rows draw independently
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {2, 3}
    nucleus = sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))  # p(3)=.64, p(2)=.24
    assert set(nucleus.tolist()) == {2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


def test_generate_masks_only_the_new_positions_and_stays_in_the_context(monkeypatch):
    """With the KV cache a step's mask covers its own queries: (B, 1, P, P) for the prompt, then (B, 1, 1, t), so
    memory grows with the length, not its square (docs/performance.md measures it); without the cache each step
    recomputes (t, t). Pads stay masked: a left-padded row continues as it would alone. Past max_seq_len (64):
    refused in one line."""
    model, shapes = random_llama(), []
    forward = Llama.forward

    def spy(self, idx, pos=None, mask=None, *args, **kwargs):
        assert mask.untyped_storage().nbytes() == mask.numel()  # not a view into a larger (B, 1, L, L) mask
        shapes.append(tuple(mask.shape))
        return forward(self, idx, pos, mask, *args, **kwargs)

    monkeypatch.setattr(Llama, "forward", spy)
    prompts = [[5, 9, 2], [4]]
    rows = model.generate(prompts, 4, stop_ids=())
    assert shapes == [(2, 1, 3, 3), (2, 1, 1, 4), (2, 1, 1, 5), (2, 1, 1, 6)]
    shapes.clear()
    assert model.generate(prompts, 4, stop_ids=(), use_cache=False) == rows
    assert shapes == [(2, 1, t, t) for t in (3, 4, 5, 6)]
    assert rows[1] == model.generate([[4]], 4, stop_ids=())[0]
    assert len(model.generate([[1] * 60], 4, stop_ids=())[0]) == 4  # 64 positions: the whole context
    with pytest.raises(ValueError, match=r"^65 tokens exceed the model's context, max_position_embeddings 64"):
        model.generate([[1] * 60, [2]], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate([[1]], -1)


def test_generate_masks_ids_past_n_vocab():
    """A model vocabulary larger than the tokenizer's: n_vocab keeps the undecodable ids from being drawn."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2))
    with torch.no_grad():
        model.lm_head.weight[40:] += 5.0  # make the ids past 32 the likely ones
    prompts = [[1, 2, 3], [4, 5]]
    assert max(t for r in model.generate(prompts, 8, stop_ids=()) for t in r) >= 32
    for temperature in (0.0, 1.0):
        rows = model.generate(prompts, 8, temperature=temperature, stop_ids=(), n_vocab=32)
        assert all(len(r) == 8 and max(r) < 32 for r in rows)


def test_save_pretrained_loads_in_transformers(tmp_path):
    idx = torch.randint(0, 97, (2, 20))
    for tied in (True, False):
        model = random_llama(tie_embeddings=tied, head_dim=16)
        model.save_pretrained(tmp_path / str(tied))
        with torch.no_grad():
            diff = (model(idx) - hf_logits(tmp_path / str(tied), idx)).abs().max().item()
        assert diff <= 1e-5, f"tied={tied}: {diff}"
        back = Llama.from_pretrained(tmp_path / str(tied))
        assert back.config == model.config
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_save_pretrained_with_external_state_dict(tmp_path):
    """What train.py does with an FSDP2-sharded model: gather a full state dict in our names, save through any copy."""
    model, other = random_llama(seed=0), random_llama(seed=1)
    model.save_pretrained(tmp_path, state_dict={k: v.clone() for k, v in other.state_dict().items()})
    back = Llama.from_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="missing key model.norm.weight"):
        model.save_pretrained(tmp_path, state_dict={k: v for k, v in other.state_dict().items() if k != "norm.weight"})


def test_sharded_load_equals_single_file(tmp_path):
    model = random_llama(tie_embeddings=False)
    model.save_pretrained(tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old transformers saved these: ignored
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / "two" / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "two" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one, two = Llama.from_pretrained(tmp_path / "one"), Llama.from_pretrained(tmp_path / "two")
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(one(idx), two(idx))


def test_load_errors_name_the_key(tmp_path):
    random_llama(tie_embeddings=False).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    good = load_file(file)
    bad_cases = {
        "missing key model.layers.1.mlp.up_proj.weight":
            {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"},
        "unexpected key model.layers.2.mlp.up_proj.weight":
            {**good, "model.layers.2.mlp.up_proj.weight": good["model.layers.1.mlp.up_proj.weight"].clone()},
        r"model.norm.weight has shape \(31,\)": {**good, "model.norm.weight": torch.ones(31)},
    }
    for message, tensors in bad_cases.items():
        save_file(tensors, file)
        with pytest.raises(ValueError, match=message):
            Llama.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    save_file({**good, "lm_head.weight": good["model.embed_tokens.weight"] + 1}, file)
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
        Llama.from_pretrained(tmp_path)
    save_file({k: v for k, v in good.items() if k != "lm_head.weight"}, file)  # no head stored: it is the embedding
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    model = Llama.from_pretrained(tmp_path)
    assert model.config.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    with pytest.raises(ValueError, match="^config.json: model_type 'gpt2' is not supported"):
        config_from_hf({**config, "model_type": "gpt2"}, "config.json")
    with pytest.raises(ValueError, match="^config.json: field 'attention_dropout' is 0.1"):
        config_from_hf({**config, "attention_dropout": 0.1}, "config.json")
    with pytest.raises(ValueError, match="a qwen2 model cannot have qkv_bias=False"):
        ModelConfig(model_type="qwen2")
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "config.json")
    with pytest.raises(ValueError, match="config.json: .*original_max_position_embeddings"):
        config_from_hf({**config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "config.json")
    with pytest.raises(ValueError, match="^config.json: missing field 'intermediate_size'"):
        config_from_hf({k: v for k, v in config.items() if k != "intermediate_size"}, "config.json")
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 97,\n}')
    with pytest.raises(ValueError, match="config.json: line 3"):
        Llama.from_pretrained(tmp_path)


def test_param_and_flop_counts_and_init():
    model = random_llama(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=None, tie_embeddings=False)
    assert model.config.hidden_dim == 192  # llama2.c: 2/3 * 4 * 64 = 170, rounded up to a multiple of 32
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    assert model.num_params() == hf.num_parameters()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.flops_per_token(100) == 2 * linear + 2 * 2 * 4 * 100 * 64  # matmuls + QK^T and AV over 100 keys
    assert random_llama(tie_embeddings=True).num_params() == random_llama(tie_embeddings=False).num_params() - 97 * 32
    big = Llama(ModelConfig(vocab_size=97, dim=256, n_layers=8, n_heads=4))  # residual writers: 0.02 / sqrt(2 * 8)
    assert abs(big.layers[0].self_attn.o_proj.weight.std().item() - 0.005) < 0.0005
    assert abs(big.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    qwen3 = Llama(ModelConfig(**{**TINY, **FAMILIES["qwen3-biases"]}))  # scratch: biases 0, norms 1, as transformers
    attn = qwen3.layers[0].self_attn
    assert not attn.q_proj.bias.any() and not attn.o_proj.bias.any() and bool((attn.k_norm.weight == 1).all())


def test_bf16_autocast_and_bf16_weights():
    model = random_llama()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    # Measured on logits of std 0.13: max |bf16 − fp32| 0.0022 under autocast, 0.0025 with bf16 weights, the same
    # with oneDNN/ATen limited to AVX2 or SSE4.1 (no AVX-512 BF16); 0.01 leaves 4x for other kernels.
    assert logits.dtype == torch.bfloat16 and (logits.float() - ref).abs().max() < 0.01
    logits.float().sum().backward()
    assert model.layers[0].mlp.up_proj.weight.grad is not None
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32  # RoPE angles stay fp32 whatever the weights are
    with torch.no_grad():
        assert (model(idx).float() - ref).abs().max() < 0.01


def test_sample_script(tmp_path, capsys):
    tok = get_tokenizer("byte")
    model = random_llama(vocab_size=tok.n_vocab, bos_id=tok.bos_id, eos_id=tok.eos_id)
    model.save_pretrained(tmp_path)
    prompt = "Hello"
    sample.main(["--ckpt", str(tmp_path), "--tokenizer", "byte", "--prompt", prompt, "--max_new_tokens", "8",
                 "--temperature", "0"])
    printed = capsys.readouterr().out
    new = model.generate([[tok.bos_id] + tok.encode(prompt)], 8)[0]
    assert printed == prompt + tok.decode([t for t in new if t != tok.eos_id]) + "\n---------------\n"

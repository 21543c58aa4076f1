"""A from-scratch Llama (Llama 2/3, karpathy's tinyllamas, and the Qwen2/2.5, Qwen3 and Mistral families, which are
the same network with a few flags) that loads, runs, generates and saves Hugging Face checkpoints.

Top to bottom: token embedding -> n blocks of [RMSNorm -> causal self-attention with RoPE and grouped-query attention
-> residual, RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> LM head (tied to the embedding or not).
Module names follow transformers' LlamaForCausalLM minus its "model." prefix, so a checkpoint maps by name alone.
"""
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import inputs

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}  # config.json's model_type -> its transformers class
REWARD_MODEL = "ForSequenceClassification"  # a reward model's class: ARCHITECTURES' with this for "ForCausalLM"
SCORE_STD = 0.02  # a new score head's init, N(0, 0.02): transformers' _init_weights with its initializer_range default


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention, each K/V head serves n_heads/n_kv_heads queries
    hidden_dim: int | None = None  # SwiGLU inner size; None: llama2.c's rule, 2/3 of 4*dim rounded up to 32s
    head_dim: int | None = None  # None: dim // n_heads; Hugging Face configs may set it independently
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # transformers' llama3 keys: rope_type, factor, low/high_freq_factor, original_...
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2  # Llama 3 instruct configs list several end tokens
    # The families differ only in these flags; config_from_hf sets them from config.json as transformers reads it.
    model_type: str = "llama"  # llama | qwen2 | qwen3 | mistral: written back to config.json as it came
    qkv_bias: bool = False  # biases on q, k, v: always in Qwen2, with attention_bias in Llama and Qwen3
    o_bias: bool = False  # a bias on the output projection: with attention_bias in Llama and Qwen3, never in Qwen2
    mlp_bias: bool = False  # biases on the three SwiGLU projections (Llama's mlp_bias)
    sliding_window: int | None = None  # Mistral, Qwen: layers >= max_window_layers see only the last sliding_window
    max_window_layers: int = 0  # keys; not implemented here, so check_context refuses every run the window would change
    # A reward model (transformers' *ForSequenceClassification, num_labels 1): the same body with a score head, one
    # output, in place of the LM head. pad_id is config.json's pad_token_id, which transformers' classes need.
    reward_model: bool = False
    pad_id: int | None = None

    def __post_init__(self):
        if self.n_heads < 1 or (self.n_kv_heads or 1) < 1:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} and n_kv_heads={self.n_kv_heads} must be >= 1")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2:  # RoPE rotates pairs of features
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} (dim={self.dim} / n_heads={self.n_heads} unless "
                             f"set) must be even and >= 2: RoPE rotates pairs of features")
        if self.hidden_dim is None:
            self.hidden_dim = 32 * math.ceil(int(2 * 4 * self.dim / 3) / 32)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported (only {', '.join(ARCHITECTURES)})")
        fits = {  # what each family's config.json can say; any other combination would be saved as another model
            "llama": self.qkv_bias == self.o_bias and self.sliding_window is None,
            "qwen2": self.qkv_bias and not (self.o_bias or self.mlp_bias),
            "qwen3": self.qkv_bias == self.o_bias and not self.mlp_bias,
            "mistral": not (self.qkv_bias or self.o_bias or self.mlp_bias)}
        if not fits[self.model_type]:
            raise ValueError(f"ModelConfig: a {self.model_type} model cannot have qkv_bias={self.qkv_bias}, o_bias="
                             f"{self.o_bias}, mlp_bias={self.mlp_bias}, sliding_window={self.sliding_window}")
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if self.rope_scaling.get("rope_type") != "llama3" or missing:
                raise ValueError(f"ModelConfig.rope_scaling: need rope_type 'llama3' and {LLAMA3_ROPE_KEYS}, "
                                 f"got {self.rope_scaling}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 (and no other family): each head's q and k RMS-normalised over head_dim before RoPE."""
        return self.model_type == "qwen3"


def check_context(config: ModelConfig, length: int):
    """Refuse (ValueError) sequences of `length` tokens longer than the model's context (max_position_embeddings: the
    positions it was trained on) or that a sliding window would cut. transformers masks keys more than
    sliding_window - 1 positions back; this Llama always attends to every earlier key, so the two agree exactly
    when the window is null or >= the longest sequence. train.py and sample.py call this before any work."""
    if length > config.max_seq_len:
        raise ValueError(f"{length} tokens exceed the model's context, max_position_embeddings {config.max_seq_len} "
                         f"(config.json)")
    if config.sliding_window is not None and config.sliding_window < length:
        raise ValueError(f"sliding_window {config.sliding_window} (config.json) < {length}, the longest sequence of "
                         f"this run: sliding-window attention is not implemented; use sequences of at most "
                         f"{config.sliding_window} tokens")


# ----------------------------------------------------------------------------------------------------------------------
# RoPE. Hugging Face's "rotate-half" layout pairs feature i with feature i + head_dim/2 of each head and rotates the
# pair by angle pos * inv_freq[i]. Meta's original code (and llama2.c) pairs neighbours (2i, 2i+1) instead, treated as
# one complex number. The two are the same model up to a permutation of the rows of wq and wk inside each head;
# transformers' convert_llama_weights_to_hf.py applies, to wq (h = n_heads) and wk (h = n_kv_heads) of shape
# (h * head_dim, dim):   w.view(h, head_dim // 2, 2, dim).transpose(1, 2).reshape(h * head_dim, dim)
# so weights taken from a Meta/llama2.c checkpoint need that permutation before they run here (wv, wo need nothing).

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), with Llama 3's frequency scaling if cfg.rope_scaling says so (fp32, CPU)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3: wavelengths longer than original_len/low_freq_factor are slowed down by `factor` (so long contexts look
    # like the pretraining ones), those shorter than original_len/high_freq_factor (local detail) are kept, and the
    # band in between is interpolated smoothly. This is transformers' _compute_llama3_parameters.
    s = cfg.rope_scaling
    factor, low, high, old_len = (s[k] for k in LLAMA3_ROPE_KEYS)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(band, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, head_dim) in fp32 for positions pos (T,) or (B, T)."""
    freqs = pos.reshape(-1, pos.shape[-1])[:, None, :, None].float() * inv_freq  # fp32: bf16 angles drift at long T
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) pair of x (B, H, T, d) by its angle; computed in fp32, returned in x's dtype.
    A bf16 x times the fp32 cos/sin promotes to fp32 inside the multiply, so no fp32 copy of x is made."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The transformer

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 like transformers (then cast back before the weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm (no weight) is x * rsqrt(mean(x^2) + eps): one fused kernel on GPU, the same ops on CPU
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for one layer; only generate() makes these."""

    def __init__(self, max_len: int):
        self.max_len, self.len, self.k, self.v = max_len, 0, None, None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:  # allocated on first use, in the dtype the (possibly autocast) projections produce
            self.k = k.new_empty(*k.shape[:2], self.max_len, k.shape[3])
            self.v = v.new_empty(*v.shape[:2], self.max_len, v.shape[3])
        t = k.shape[2]
        self.k[:, :, self.len:self.len + t], self.v[:, :, self.len:self.len + t] = k, v
        self.len += t
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


@functools.cache
def compiled_flex_attention(backend: str = "inductor"):
    """FlexAttention compiled once per process (uncompiled, it materialises every score: a slow reference). Dynamic
    shapes: packed micro batches differ in rows and length, and a compile per shape would soon hit dynamo's recompile
    limit and fall back to that reference (tests/test_packing.py counts the compiles)."""
    return torch.compile(flex_attention, dynamic=True, backend=backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3: q and k of each head RMS-normalised (one weight of head_dim shared by the heads), so the scale of the
        # attention logits is set by the norm weights, not by how large the projections grow during training
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # before RoPE, as Qwen3 was trained
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        # softmax(q k^T / sqrt(head_dim)) v; without a mask (unpacked training rows) the kernel applies the causal mask
        # itself. With a boolean mask, CPU runs the same flash kernel. On CUDA, flash takes no mask, so packed rows
        # come with a FlexAttention BlockMask instead (packing.attention_mask): a compiled kernel that skips the
        # blocks the mask empties (other segments, the other response) rather than computing and masking them.
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):
            attend = compiled_flex_attention() if q.is_cuda else flex_attention  # eager: the reference, for tests
            y = attend(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if config.reward_model:  # r(x, y) = score · h at the last token; never tied (tie_embeddings: for config.json)
            self.score = nn.Linear(config.dim, 1, bias=False)
        else:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: model.to(bfloat16) and FSDP leave it alone, so the angles stay fp32.
        self.inv_freq = rope_inv_freq(config)
        # llama2.c / GPT-2 init for from-scratch runs: N(0, 0.02) everywhere, and N(0, 0.02/sqrt(2 n_layers)) for the
        # projections that write into the residual stream, so its variance does not grow with depth. (llama2.c scales
        # its w3 and wo; w3 there is the up projection, a naming slip, we scale the residual writers o_proj, down_proj.)
        # Biases start at zero, as transformers initialises them; norm weights at one.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers) if residual else 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    @property
    def is_reward_model(self) -> bool:
        return self.config.reward_model

    def add_score_head(self, generator: torch.Generator | None = None) -> "Llama":
        """Make this causal LM a reward model, in place: the LM head goes, a new score head N(0, SCORE_STD) (as
        transformers initialises one) takes its place; returns self. The body is kept as it is."""
        if self.config.reward_model:
            raise ValueError("add_score_head: this model is a reward model already")
        w = self.embed_tokens.weight
        del self.lm_head  # tied: the embedding stays, the head was only a second name for it
        self.config.reward_model = True
        self.score = nn.Linear(self.config.dim, 1, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=generator) * SCORE_STD)
        return self

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A reward model's score of each row, (B,) fp32: the score head at the row's last real token (the last
        attention_mask = 1 position), with left or right padding. transformers reads the rightmost token that is not
        pad_token_id instead, which is the wrong one when the pad id is also a real token ending the row (a pad id
        equal to the end-of-turn id). Pads are masked out of attention and positions count from each row's first
        real token (as in generate), so a row scores as it would alone."""
        if not self.config.reward_model:
            raise ValueError("rewards: this model has an LM head, not a score head (not a reward model)")
        real = attention_mask.bool()
        if input_ids.shape != real.shape or not real.any(1).all():
            raise ValueError(f"rewards: need input_ids and attention_mask of one shape (B, T) with a real token in "
                             f"every row, got {tuple(input_ids.shape)} and {tuple(real.shape)}")
        B, T = real.shape
        j = torch.arange(T, device=real.device)
        last = (j * real).argmax(-1)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        # query i sees key j iff j <= i and j is real; every query sees itself, so no softmax row is empty (NaN)
        mask = ((j[:, None] >= j) & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=real.device)
        scores = self(input_ids, pos, mask[:, None], logits_index=torch.arange(B, device=real.device) * T + last)
        return scores[:, 0].float()

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, logits_to_keep: int = 0,
                logits_index: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T), causal. logits_to_keep = k > 0 keeps the last k positions,
        (B, k, vocab), as in transformers: the final norm and the LM head, a large share of a small model's work, skip
        positions whose next-token distribution nobody needs (a prompt's, a prefill's). logits_index (N,), indices
        into the flattened B * T positions (repeats allowed), keeps exactly those and returns (N, vocab).
        pos and mask replace the default positions 0..T-1 and causal attention: positions (B, T) and a boolean
        attention mask (B, 1, T, T_keys), True where a query may see a key (generate()'s left-padded rows, packing.py's
        packed rows), or a FlexAttention BlockMask of one (packed rows on CUDA); cache is generate()'s, one KVCache
        per layer. return_hidden returns the final hidden states (after the final norm, before the LM head) at the
        same positions, (B, k, dim) or (N, dim): losses.head_logps runs the head over them chunk by chunk."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)
        if self.inv_freq.device != idx.device:  # once: a plain attribute does not follow model.to(device), and a copy
            self.inv_freq = self.inv_freq.to(idx.device)  # from pageable memory in every forward would sync the GPU
        cos, sin = rope_cos_sin(self.inv_freq, pos)
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i])
        x = x[:, -logits_to_keep:] if logits_index is None else x.flatten(0, 1)[logits_index]  # -0: every position
        x = self.norm(x)
        return x if return_hidden else (self.score if self.config.reward_model else self.lm_head)(x)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at context length seq_len, for MFU: 2 per weight of every matmul (LM head included,
        the embedding lookup is not a matmul) plus attention's q k^T and (attn) v, 2 * 2 * n_layers * seq_len *
        n_heads * head_dim, counted over the full seq_len as nanoGPT and PaLM do. Forward + backward is 3x this.
        Biases and norms (Qwen's q/k/v biases, Qwen3's q_norm/k_norm) are elementwise and, like RMSNorm, not counted."""
        c = self.config
        attn = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
        matmul = c.n_layers * (attn + 3 * c.dim * c.hidden_dim) + c.dim * (1 if c.reward_model else c.vocab_size)
        return 2 * matmul + 4 * c.n_layers * seq_len * c.n_heads * c.head_dim

    # ------------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor | list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_ids=None, use_cache: bool = True,
                 generator: torch.Generator | None = None, n_vocab: int | None = None) -> list[list[int]]:
        """Continue each prompt by up to max_new_tokens tokens; returns each row's new tokens (a list of lists).

        prompts: a LongTensor (B, T) or B token lists of different lengths. Rows are left-padded to a common length
        here; the pads are masked out of attention and positions count from each row's first real token, so every row
        continues exactly as it would alone. temperature 0 is greedy; otherwise sample from softmax(logits /
        temperature) restricted to the top_k tokens and/or the nucleus of probability top_p. A row stops after it emits
        a token in stop_ids (kept as its last token); stop_ids=None means config.eos_id, () never stops early.
        use_cache=False recomputes the whole sequence at every step (a check of the KV cache). n_vocab < vocab_size
        (a tokenizer smaller than the model's vocabulary) draws only ids below n_vocab, the ones the tokenizer can
        decode: the others' logits are -inf before greedy or sampled selection.
        """
        if self.config.reward_model:
            raise ValueError("generate: a reward model (a score head, no LM head) does not generate")
        rows = prompts.tolist() if torch.is_tensor(prompts) else [list(r) for r in prompts]
        if not rows or min(map(len, rows)) == 0:
            raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        check_context(self.config, max(map(len, rows)) + max_new_tokens)
        if stop_ids is None:
            stop_ids = [] if self.config.eos_id is None else self.config.eos_id
        stop = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
        device = self.embed_tokens.weight.device
        B, P, L = len(rows), max(map(len, rows)), max(map(len, rows)) + max_new_tokens
        pad = torch.tensor([P - len(r) for r in rows], device=device)
        idx = torch.zeros(B, L, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            idx[b, P - len(r):P] = torch.tensor(r, dtype=torch.long)
        pos = (torch.arange(L, device=device) - pad[:, None]).clamp(min=0)
        cache = [KVCache(L) for _ in self.layers] if use_cache else None
        out, done, start = [[] for _ in rows], [False] * B, 0
        for t in range(P, L):
            s = slice(start, t) if use_cache else slice(0, t)  # with a cache only the tokens not yet seen go in
            start = t
            # the mask of this step's queries only: (B, 1, P, P) for the prompt, then (B, 1, 1, t) per cached step,
            # so memory grows with the length, not with its square (uncached, each step recomputes (t, t))
            mask = generation_mask(pad, s.start, t)
            logits = self(idx[:, s], pos[:, s], mask, cache, logits_to_keep=1)[:, -1].float()
            if n_vocab is not None and n_vocab < logits.shape[-1]:
                logits[:, n_vocab:] = float("-inf")
            idx[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
            for b, tok in enumerate(idx[:, t].tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = tok in stop
            if all(done):
                break
        return out

    # ------------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> "Llama":
        """Load a Hugging Face Llama, Qwen2, Qwen3 or Mistral directory: config.json (transformers 4.x or 5.x layout)
        and model.safetensors or a sharded model.safetensors.index.json. dtype=None keeps the checkpoint's dtype.
        Files from the Hub are checked before anything is built or read (ValueError naming the file and the key or
        tensor): config.json's keys and types, then the weights' names, shapes and dtypes from the safetensors headers
        against what config.json implies; each weight must be float and finite as it is read. A
        *ForSequenceClassification directory (num_labels 1) gives a reward model: score.weight, no LM head."""
        path = Path(path)
        raw, config = check_pretrained(path)  # before any module is built: num_hidden_layers=1e8 is refused here
        if dtype is None:
            name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
            if name not in DTYPES:
                raise ValueError(f"{path / 'config.json'}: dtype {name!r} is not one of {list(DTYPES)}")
            dtype = DTYPES[name]
        tensors = read_safetensors(path)
        if config.tie_embeddings and "lm_head.weight" in tensors:
            head, embedding = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
            if embedding is not None and not torch.equal(head, embedding):
                raise ValueError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        with torch.device("meta"):  # no memory, no init: every weight comes from the file
            model = cls(config)
        check_keys(tensors, model.state_dict(), config.tie_embeddings, path)
        sd = {from_hf_name(k): v.to(dtype) for k, v in tensors.items()}
        tied = config.tie_embeddings and not config.reward_model
        if tied:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        model.load_state_dict(sd, assign=True)
        if tied:  # assign=True put two separate Parameters in; make them one again
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None):
        """Write config.json and model.safetensors that transformers loads as its class for config.model_type.
        state_dict (our names, full tensors) replaces this module's own, e.g. one gathered from FSDP2 shards."""
        path = Path(path)
        sd = self.state_dict() if state_dict is None else state_dict
        tensors = {to_hf_name(k): v.detach().cpu().contiguous() for k, v in sd.items()
                   if not (self.config.tie_embeddings and k == "lm_head.weight")}
        check_keys(tensors, self.state_dict(), self.config.tie_embeddings, "save_pretrained(state_dict)")
        path.mkdir(parents=True, exist_ok=True)
        dtype = tensors["model.embed_tokens.weight"].dtype
        with open(path / "config.json", "w") as f:
            json.dump(config_to_hf(self.config, dtype), f, indent=2)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def generation_mask(pad: torch.Tensor, first: int, t: int) -> torch.Tensor:
    """generate()'s boolean attention mask (B, 1, t - first, t) of queries first..t-1 over keys 0..t-1, in rows left-
    padded by pad (B,): query i sees key j iff j <= i and j is a real token (j >= the row's pad); a pad query sees
    itself so no softmax row is empty (NaN)."""
    i = torch.arange(first, t, device=pad.device)[:, None]
    j = torch.arange(t, device=pad.device)
    return (((j <= i) & (j >= pad[:, None, None])) | (j == i))[:, None]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, vocab): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"sampling: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, "
                         f"{top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # nucleus: keep the most likely tokens until they hold top_p of the mass (the top one always stays)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint format: names, config.json (both layouts), safetensors files

def to_hf_name(name: str) -> str:
    """Our parameter name -> transformers' LlamaForCausalLM (or *ForSequenceClassification) name."""
    return name if name in ("lm_head.weight", "score.weight") else "model." + name


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def check_keys(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], tied: bool, where):
    """Raise naming the first missing or unexpected key or shape mismatch between HF-named tensors and our state."""
    want = {to_hf_name(k): tuple(v.shape) for k, v in own.items() if not (tied and k == "lm_head.weight")}
    for k in want:
        if k not in tensors:
            raise ValueError(f"{where}: missing key {k}")
    for k, v in tensors.items():
        if k not in want:
            raise ValueError(f"{where}: unexpected key {k}")
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the config implies {want[k]}")


def read_json(file: Path) -> dict:
    """A JSON object from a regular file of at most 64 MiB (inputs.read_json), ValueError naming the file."""
    return inputs.read_json(file)


FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors' names of the weight dtypes loaded; no silent cast of others


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{tensor name: (shape, safetensors dtype, file)} of model.safetensors or of every shard that
    model.safetensors.index.json lists, from the headers alone (no tensor is read). Refused (ValueError naming the
    file and the tensor): a file that is not a regular file or not safetensors, a shard outside the directory, a
    tensor in two shards or not where the index says, a dtype other than float (a quantized checkpoint)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        files, weight_map = [single], None
    elif index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' object of tensor name -> shard file name")
        files = []
        for shard in sorted(set(weight_map.values())):
            if shard in ("", ".", "..") or Path(shard).name != shard:
                raise ValueError(f"{index}: weight_map names {inputs.shown(shard)}, not a file name in {path}")
            if not (path / shard).exists():
                raise ValueError(f"{index}: weight_map names {shard}, which is not in {path}")
            files.append(path / shard)
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    header = {}
    for file in files:
        inputs.check_regular(file)
        try:
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    if k in header:
                        raise ValueError(f"{file}: tensor {k} is in {header[k][2].name} too")
                    s = f.get_slice(k)
                    header[k] = (tuple(s.get_shape()), s.get_dtype(), file)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    if weight_map is not None:
        if stray := sorted(set(header) ^ set(weight_map)):
            raise ValueError(f"{index}: weight_map and the shards disagree on {stray[:5]}")
        if moved := [k for k, (_, _, f) in header.items() if weight_map[k] != f.name]:
            raise ValueError(f"{index}: weight_map puts {moved[0]} in {weight_map[moved[0]]}, but it is in "
                             f"{header[moved[0]][2].name}")
    # Old transformers versions saved the RoPE frequencies as weights; they follow from config.json.
    header = {k: v for k, v in header.items() if not k.endswith("rotary_emb.inv_freq")}
    for k, (_, dtype, file) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {k} is {dtype}; only float weights ({', '.join(FLOAT_DTYPES)}) are "
                             f"loaded (a quantized checkpoint must be dequantized first)")
    return header


def check_header(header: dict, config: ModelConfig, path: Path):
    """The weights' names and shapes (read_header) against what config.json implies, before any module is built:
    first the number of layers (so num_hidden_layers=1e8 builds nothing), then every key and shape (check_keys)."""
    layers = {int(k.split(".")[2]) for k in header if re.fullmatch(r"model\.layers\.\d+\..+", k)}
    if config.n_layers > len(layers):
        raise ValueError(f"{path / 'config.json'}: num_hidden_layers is {config.n_layers}, but the weights hold "
                         f"{len(layers)} layer(s)")
    with torch.device("meta"):  # one block on the meta device gives every layer's names and shapes, with no memory
        block = {f"layers.{{}}.{k}": v for k, v in Block(config).state_dict().items()}
    head, outputs = ("score.weight", 1) if config.reward_model else ("lm_head.weight", config.vocab_size)
    own = {"embed_tokens.weight": torch.empty(config.vocab_size, config.dim, device="meta"),
           "norm.weight": torch.empty(config.dim, device="meta"), head: torch.empty(outputs, config.dim, device="meta")}
    own |= {k.format(i): v for i in range(config.n_layers) for k, v in block.items()}
    shapes = {k: torch.empty(shape, device="meta") for k, (shape, _, _) in header.items()
              if not (config.tie_embeddings and k == "lm_head.weight")}  # a stored tied head: compared when read
    check_keys(shapes, own, config.tie_embeddings, path)


def check_pretrained(path: Path) -> tuple[dict, ModelConfig]:
    """(config.json's dict, its ModelConfig) of a model directory whose config.json and safetensors headers agree
    (ValueError naming the file and the key otherwise); reads no tensor (checkpoint.verify calls it too)."""
    raw = read_json(path / "config.json")
    config = config_from_hf(raw, path / "config.json")
    header = read_header(path)
    # Checkpoints that tie the head to the embedding store it once (no lm_head.weight).
    if "lm_head.weight" not in header and not config.reward_model:  # (a reward model has no LM head to tie)
        config.tie_embeddings = True
    check_header(header, config, path)
    return raw, config


def is_finite(t: torch.Tensor) -> bool:
    """All elements finite: the smallest and the largest are (min and max propagate NaN, and unlike a sum they never
    overflow, fp16 included). One fused reduction in the tensor's own dtype: ~10x faster than isfinite().all()."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard listed in model.safetensors.index.json, checked by
    read_header; each is refused as it is read if it holds NaN or inf (ValueError naming the file and tensor)."""
    tensors, by_file = {}, {}
    for k, (_, _, file) in read_header(path).items():
        by_file.setdefault(file, []).append(k)
    for file, keys in by_file.items():
        try:
            with safe_open(file, "pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if not is_finite(t):
                        raise ValueError(f"{file}: tensor {k} holds NaN or inf values; the weights are damaged")
                    tensors[k] = t
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


# config.json's keys that config_from_hf reads, with the type and range each must have (inputs.check_fields)
HF_FIELDS = {
    "model_type": inputs.STRING, "vocab_size": inputs.POSITIVE_INT, "hidden_size": inputs.POSITIVE_INT,
    "intermediate_size": inputs.POSITIVE_INT, "num_hidden_layers": inputs.POSITIVE_INT,
    "num_attention_heads": inputs.POSITIVE_INT, "num_key_value_heads": inputs.nullable(inputs.POSITIVE_INT),
    "head_dim": inputs.nullable(inputs.POSITIVE_INT), "rms_norm_eps": inputs.POSITIVE,
    "rope_theta": inputs.POSITIVE, "max_position_embeddings": inputs.POSITIVE_INT,
    "tie_word_embeddings": inputs.BOOL, "bos_token_id": inputs.nullable(inputs.NATURAL),
    "eos_token_id": inputs.nullable(inputs.TOKEN_IDS), "attention_bias": inputs.BOOL, "mlp_bias": inputs.BOOL,
    "use_sliding_window": inputs.BOOL, "sliding_window": inputs.nullable(inputs.POSITIVE_INT),
    "max_window_layers": inputs.NATURAL, "layer_types": inputs.nullable(inputs.STRINGS),
    "rope_scaling": inputs.nullable(inputs.OBJECT), "rope_parameters": inputs.nullable(inputs.OBJECT),
    "dtype": inputs.nullable(inputs.STRING), "torch_dtype": inputs.nullable(inputs.STRING),
}
ROPE_FIELDS = {"rope_type": inputs.STRING, "type": inputs.STRING, "rope_theta": inputs.POSITIVE,
               "factor": inputs.POSITIVE, "low_freq_factor": inputs.POSITIVE, "high_freq_factor": inputs.POSITIVE,
               "original_max_position_embeddings": inputs.POSITIVE}


def config_from_hf(d: dict, where) -> ModelConfig:
    """ModelConfig from a config.json dict, read as transformers reads each family (its defaults included):
    transformers 4.x keeps rope_theta/rope_scaling at the top level, 5.x puts both into rope_parameters."""
    def need(key):
        if key not in d:
            raise ValueError(f"missing field '{key}'")  # prefixed with `where` below
        return d[key]

    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    inputs.check_fields(d, HF_FIELDS, where)
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.get(key), dict):
            inputs.check_fields(d[key], ROPE_FIELDS, where, prefix=f"{key}.")
    if d.get("quantization_config") is not None:
        raise ValueError(f"{where}: quantization_config: a quantized checkpoint is not loaded (only float weights: "
                         f"{', '.join(FLOAT_DTYPES)})")
    heads, kv_heads = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = d.get("head_dim", 128 if d.get("model_type") == "qwen3" else None)
    if heads and (head_dim or "hidden_size" in d):
        derived = head_dim is None
        head_dim = d["hidden_size"] // heads if derived else head_dim
        if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of features
            how = f" (hidden_size {d['hidden_size']} / num_attention_heads {heads})" if derived else ""
            raise ValueError(f"{where}: head_dim {head_dim}{how} must be even and >= 2: RoPE rotates pairs of "
                             f"features")
    family = d.get("model_type", "llama")
    if family not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {family!r} is not supported (only {', '.join(ARCHITECTURES)})")
    reward = any(str(a).endswith(REWARD_MODEL) for a in d.get("architectures") or [])
    # transformers' label count: id2label's length, else num_labels, else its default of 2
    labels = len(d["id2label"]) if d.get("id2label") else d.get("num_labels", 2)
    if reward and labels != 1:
        raise ValueError(f"{where}: a {d['architectures'][0]} with num_labels {labels}; a reward model here has one "
                         f"score (num_labels 1, id2label of one entry)")
    for key, ok in (("hidden_act", "silu"), ("attention_dropout", 0.0)):
        if d.get(key, ok) != ok:
            raise ValueError(f"{where}: field '{key}' is {d[key]!r}; this Llama supports only {ok!r}")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the oldest 4.x spelling
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS if k in rope}}
    # Each family's own keys: Qwen2's q/k/v biases are fixed (its config has no attention_bias); Qwen3 always has
    # q_norm/k_norm and a head_dim of 128 unless it says otherwise; Mistral slides a 4096 window unless it says null.
    bias = d.get("attention_bias", False) if family in ("llama", "qwen3") else False
    mlp_bias = d.get("mlp_bias", False) if family == "llama" else False
    window, first, declared = None, 0, d.get("sliding_window", 4096)  # 4096: MistralConfig's and Qwen's default
    if family == "mistral":
        window = declared
    elif family in ("qwen2", "qwen3") and d.get("use_sliding_window", False):  # false (every Qwen release): unused
        n, types = need("num_hidden_layers"), d.get("layer_types")
        if types is None:  # layers from max_window_layers on slide (not a list: n is not yet checked against weights)
            sliding = d.get("max_window_layers", 28) < n
            start = d.get("max_window_layers", 28)
        else:
            if len(types) != n:
                raise ValueError(f"{where}: layer_types has {len(types)} entries, num_hidden_layers is {n}")
            indices = [i for i, t in enumerate(types) if t == "sliding_attention"]
            if indices and indices != list(range(indices[0], n)):
                raise ValueError(f"{where}: layer_types {inputs.shown(types)}: only the last layers may use a sliding "
                                 f"window here")
            sliding, start = bool(indices), indices[0] if indices else 0
        if sliding and declared is not None:
            window, first = declared, start
    try:  # ModelConfig checks the rest (head counts, llama3 keys); say which file it came from
        return ModelConfig(
            vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
            n_heads=need("num_attention_heads"), n_kv_heads=d.get("num_key_value_heads"),
            hidden_dim=need("intermediate_size"), head_dim=d.get("head_dim", 128 if family == "qwen3" else None),
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            rope_scaling=rope_scaling if rope_type == "llama3" else None,
            max_seq_len=d.get("max_position_embeddings", 2048), tie_embeddings=d.get("tie_word_embeddings", False),
            bos_id=d.get("bos_token_id"), eos_id=d.get("eos_token_id"), model_type=family,
            qkv_bias=bias or family == "qwen2", o_bias=bias, mlp_bias=mlp_bias,
            sliding_window=window, max_window_layers=first, reward_model=reward, pad_id=d.get("pad_token_id"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json that transformers 4.x (top-level rope_theta/rope_scaling/torch_dtype) and 5.x (rope_parameters,
    dtype) both read, with the keys of c's family that config_from_hf reads back."""
    dtype_name = str(dtype).removeprefix("torch.")
    family = {"llama": {"attention_bias": c.o_bias, "mlp_bias": c.mlp_bias},
              "qwen2": {}, "qwen3": {"attention_bias": c.o_bias},
              "mistral": {"sliding_window": c.sliding_window}}[c.model_type]
    if c.model_type in ("qwen2", "qwen3"):
        family.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                      max_window_layers=c.max_window_layers)
    arch = ARCHITECTURES[c.model_type]
    if c.reward_model:  # the *ForSequenceClassification class, its one label as transformers writes it
        arch = arch.replace("ForCausalLM", REWARD_MODEL)
        family.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if c.pad_id is not None:
        family["pad_token_id"] = c.pad_id
    return {
        "architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "rope_parameters": {"rope_theta": c.rope_theta, **(c.rope_scaling or {"rope_type": "default"})},
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
        "attention_dropout": 0.0, **family, "torch_dtype": dtype_name, "dtype": dtype_name,
    }

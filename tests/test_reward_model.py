"""model.py's reward models (a score head on the same Llama) against transformers' LlamaForSequenceClassification,
Qwen2ForSequenceClassification, Qwen3ForSequenceClassification and MistralForSequenceClassification: scores,
padding on either side, the pad id that is also the end-of-turn id, saving and reloading, one-line refusals."""
import json

import pytest
import torch
import transformers

from model import Llama, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HF_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2)
FAMILIES = {  # transformers class prefix -> config keys with every bias and norm the family allows
    "Llama": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "Qwen2": dict(num_key_value_heads=2),
    "Qwen3": dict(num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True),
    "Mistral": dict(num_key_value_heads=1, sliding_window=None),
}
PAD, EOT = 0, 5  # pad ids of the tests; EOT plays a chat template's end-of-turn token


def random_hf_rm(family: str, path, pad_token_id=PAD, seed=0):
    """A random transformers reward model (num_labels 1) of the family, saved to path and loaded back (fp32, eager)."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, family + "Config")(**HF_BASE, **FAMILIES[family], num_labels=1,
                                                   pad_token_id=pad_token_id)
    hf = getattr(transformers, family + "ForSequenceClassification")(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(path)
    return load_hf(path)


def load_hf(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rows(lengths: list[int], side: str, pad_id: int = PAD, end: int | None = None, T: int | None = None, seed=1):
    """input_ids and attention_mask of random rows (ids 6..96: never PAD or EOT) of these lengths, padded on `side`;
    end: the id each row ends with (a chat template's end of turn)."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    ids, mask = torch.full((len(lengths), T), pad_id), torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(6, 97, (n,), generator=g)
        if end is not None:
            row[-1] = end
        s = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, s], mask[b, s] = row, 1
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_match_transformers_with_left_and_right_padding(family, tmp_path):
    hf = random_hf_rm(family, tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    assert ours.is_reward_model and ours.config.model_type == family.lower() and ours.config.pad_id == PAD
    assert not hasattr(ours, "lm_head") and ours.score.weight.shape == (1, 32)
    assert ours.num_params() == hf.num_parameters()
    lengths = [12, 7, 3, 12]
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = rows(lengths, side)
            want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
            got = ours.rewards(ids, mask)
            assert got.dtype == torch.float32 and got.shape == (4,)
            assert relative_error(got, want) <= 1e-5, (family, side)
            for b in range(len(lengths)):  # a row scores as it does alone, unpadded
                real = ids[b][mask[b].bool()][None]
                assert relative_error(ours.rewards(real, torch.ones_like(real)), got[b:b + 1]) <= 1e-5
    # gradients through the score head and the body equal transformers' (right padding, the training layout)
    ids, mask = rows(lengths, "right")
    w = torch.randn(4)
    (ours.rewards(ids, mask) * w).sum().backward()
    (hf(input_ids=ids, attention_mask=mask).logits[:, 0] * w).sum().backward()
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = grads[name if name == "score.weight" else "model." + name].grad
        assert relative_error(p.grad, g) <= 1e-5, f"{family}: {name}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_id_equal_to_end_of_turn_transformers_reads_the_token_before_ours_the_end(side, tmp_path):
    """Rows end with the end-of-turn id, which is also pad_token_id. transformers' rule (the rightmost token that is
    not pad_token_id) then reads the token before the end of turn; ours reads the end of turn, the last real token:
    transformers' own score where its rule is unambiguous (the same model with a pad id no row holds)."""
    hf = random_hf_rm("Qwen3", tmp_path / "eot", pad_token_id=EOT)
    ours = Llama.from_pretrained(tmp_path / "eot")
    assert ours.config.pad_id == EOT
    ids, mask = rows([9, 4, 9], side, pad_id=EOT, end=EOT)
    with torch.no_grad():
        got = ours.rewards(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert relative_error(got, theirs) > 1e-2  # transformers' rule read another token
        before = ids.clone()
        last = (torch.arange(ids.shape[1]) * mask).argmax(-1)
        before[torch.arange(3), last] = EOT  # cut the end of turn off: transformers' rule reads what it read above
        m2 = mask.clone()
        m2[torch.arange(3), last] = 0
        assert relative_error(ours.rewards(before, m2), theirs) <= 1e-5
        hf.config.pad_token_id = PAD  # unambiguous: no row holds PAD, so the rightmost non-pad is the last token
        unambiguous = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
        assert relative_error(got, hf(input_ids=unambiguous, attention_mask=mask).logits[:, 0]) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_writes_the_sequence_classification_class_transformers_reloads(family, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                      model_type=family.lower(), qkv_bias=family == "Qwen2", reward_model=True, pad_id=PAD,
                      sliding_window=None)
    ours = Llama(cfg).eval()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [f"{family}ForSequenceClassification"] and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "LABEL_0"}
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == f"{family}ForSequenceClassification" and hf.config.num_labels == 1
    ids, mask = rows([10, 6], "right")
    with torch.no_grad():
        assert relative_error(ours.rewards(ids, mask), hf(input_ids=ids, attention_mask=mask).logits[:, 0]) <= 1e-5
    back = Llama.from_pretrained(tmp_path)
    assert back.config == ours.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_a_causal_lm_gets_a_new_score_head(tmp_path):
    """add_score_head: the body kept, the LM head (tied or not) gone, score N(0, 0.02) seeded; transformers loads
    the result as the family's sequence classifier with the same scores."""
    torch.manual_seed(0)
    lm = Llama(ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, hidden_dim=48, tie_embeddings=True))
    body = {k: v.clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    rm = lm.add_score_head(torch.Generator().manual_seed(3))
    assert rm is lm and rm.is_reward_model and "lm_head.weight" not in rm.state_dict()
    assert all(torch.equal(v, rm.state_dict()[k]) for k, v in body.items())
    w = rm.score.weight
    assert torch.equal(w, torch.randn(1, 32, generator=torch.Generator().manual_seed(3)) * 0.02)
    with pytest.raises(ValueError, match="reward model already"):
        rm.add_score_head()
    with pytest.raises(ValueError, match="does not generate"):
        rm.generate([[1, 2]], 3)
    rm.config.pad_id = PAD
    rm.save_pretrained(tmp_path)
    ids, mask = rows([8, 5], "left")
    with torch.no_grad():
        assert relative_error(rm.rewards(ids, mask), load_hf(tmp_path)(input_ids=ids, attention_mask=mask).logits[:, 0]
                              ) <= 1e-5
    with pytest.raises(ValueError, match="not a reward model"):
        Llama(ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4)).rewards(ids, mask)


def test_label_counts_other_than_one_are_refused_in_one_line(tmp_path):
    random_hf_rm("Llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for labels in ({"id2label": {"0": "bad", "1": "good"}}, {"id2label": None, "num_labels": 3},
                   {"id2label": None}):  # transformers' default: 2 labels
        (tmp_path / "config.json").write_text(json.dumps({**config, **labels}))
        with pytest.raises(ValueError) as e:
            Llama.from_pretrained(tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / "config.json") in msg and "num_labels" in msg

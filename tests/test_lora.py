"""lora.py: the adapters, one shared base under policy and reference, the exact low-rank TR update (and the cross term
that mixing A and B separately misses), parity with peft, checkpoints in peft's format, whole runs and refusals."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import config
import lora
import reference as ref_lib
from conftest import ROOT
from model import Llama, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--loss=dpo", "--ref_update=soft", "--tau=2", "--alpha=0.5", "--dim=32", "--n_layers=2", "--n_heads=4",
        "--batch_size=4", "--micro_batch_size=2", "--max_steps=12", "--eval_every=6", "--eval_size=8",
        "--num_samples=4", "--max_new_tokens=8", "--max_length=16", "--max_prompt_length=8", "--warmup_steps=2",
        "--lr=3e-2", "--ckpt_every=6", "--lora_rank=4", "--lora_alpha=8", "--lora_ref_rank=8"]


def run(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc else [])
    p = subprocess.run(launcher + [str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def tiny_llama(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig(**{"vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                "hidden_dim": 48, "max_seq_len": 32, **kw}))


def randomize_adapters(policy: nn.Module, seed: int, std: float = 0.1):
    """An optimizer step stand-in: new A and B (B != 0, so the delta is not trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers(policy, lora.LoRALinear).values():
            layer.lora_A.copy_(std * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(std * torch.randn(layer.lora_B.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------------
# the layers and the shared base


def test_a_fresh_lora_policy_is_the_base_and_trains_only_adapters():
    base = tiny_llama()
    ids = torch.randint(0, 50, (2, 9))
    want = base(ids)
    policy = lora.apply(base, rank=4, alpha=8.0, targets="q_proj,v_proj,down_proj")
    assert torch.equal(policy(ids), want)  # B = 0: π_θ = W0 exactly at the start
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                              "mlp.down_proj") for ab in "AB"}
    layer = policy.layers[0].self_attn.q_proj
    assert layer.scale == 2.0 and layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound and torch.all(layer.lora_B == 0)
    assert set(policy.state_dict()) - {n for n in trained} == set(tiny_llama().state_dict())  # names unchanged
    # the same seed draws the same A; another seed other ones
    again = lora.apply(tiny_llama(), 4, 8.0, "q_proj,v_proj,down_proj")
    other = lora.apply(tiny_llama(), 4, 8.0, "q_proj,v_proj,down_proj", seed=1)
    assert torch.equal(again.layers[1].mlp.down_proj.lora_A, policy.layers[1].mlp.down_proj.lora_A)
    assert not torch.equal(other.layers[1].mlp.down_proj.lora_A, policy.layers[1].mlp.down_proj.lora_A)


def test_reference_and_initial_share_the_base_storage_and_hold_only_their_delta():
    policy = lora.apply(tiny_llama(), 4, 8.0, base_dtype=torch.bfloat16)
    reference, initial = lora.make_reference(policy), lora.make_reference(policy)
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            assert p.dtype == torch.bfloat16
            for other in (reference, initial):
                assert other.get_parameter(name).data_ptr() == p.data_ptr(), name  # one storage, no copy
    assert not any(p.requires_grad for p in reference.parameters())
    extra = {n: b for n, b in reference.named_buffers()}
    assert set(extra) == {f"{n}.delta_{f}" for n in lora.layers(policy, lora.LoRALinear) for f in "UV"}
    assert all(b.numel() == 0 for b in extra.values())  # ΔW_ref = 0: static reference and the initial policy
    assert all(p.dtype == torch.float32 for n, p in policy.named_parameters() if p.requires_grad)


def test_a_target_score_head_can_stay_trainable_and_be_soft_updated_in_full():
    """`trainable` keeps a module (a reward model's score head) in full, fp32; the reference copies it and the same
    soft update lerps it while the adapters' deltas follow the low-rank rule."""
    policy = lora.apply(tiny_llama(tie_embeddings=False), 2, 4.0, "q_proj", base_dtype=torch.bfloat16,
                        trainable=("lm_head",))
    assert policy.lm_head.weight.requires_grad and policy.lm_head.weight.dtype == torch.float32
    reference = lora.make_reference(policy)
    assert reference.lm_head.weight.data_ptr() != policy.lm_head.weight.data_ptr()
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    before = reference.lm_head.weight.clone()
    ref_lib.soft_update(reference, policy, 0.25)
    assert torch.allclose(reference.lm_head.weight, 0.25 * policy.lm_head.weight + 0.75 * before)


# ----------------------------------------------------------------------------------------------------------------------
# the exact TR update of ΔW_ref


@pytest.mark.parametrize("cap", [64, 16, 12])
def test_soft_updates_of_the_factors_follow_the_dense_recurrence(cap):
    """Eight soft updates with new adapters each time: U·V equals ΔW_ref ← α·s·B·A + (1−α)·ΔW_ref computed densely
    (fp64), to fp32 precision, whether the factors were never compressed (cap 64) or compressed exactly (cap 16: every
    layer's ΔW has rank <= min(out, in) <= 16); a cap of 12 loses a share the updater reports."""
    policy = lora.apply(tiny_llama(dim=16, hidden_dim=24), 4, 8.0)
    reference = lora.make_reference(policy)
    updater = ref_lib.ReferenceUpdater("soft", alpha=0.6, tau=1, max_rank=cap)
    pol, ref = lora.layers(policy, lora.LoRALinear), lora.layers(reference, lora.DeltaLinear)
    dense = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for n, m in pol.items()}
    errors = []
    for step in range(1, 9):
        randomize_adapters(policy, step)
        assert updater.after_step(step, reference, policy)
        errors.append(updater.compression_error)
        for n, m in pol.items():
            dense[n] = 0.6 * m.delta().double() + 0.4 * dense[n]
    for n, m in ref.items():
        assert m.delta_U.shape[1] <= cap
        rel = ((m.delta().double() - dense[n]).norm() / dense[n].norm()).item()
        if cap >= min(m.out_features, m.in_features):  # the true rank fits: exact to fp32 rounding
            assert rel < 1e-6, (n, rel)
        else:  # the best rank-12 approximation of a rank-16 delta: the dropped share, reported by the updater
            assert 1e-3 < rel < 0.5
    assert errors[0] == 0.0 and (max(errors) < 1e-6 if cap >= 16 else max(errors) > 1e-3)


def test_compress_is_exact_while_the_rank_fits_and_reports_the_dropped_share():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(20, 6, generator=g), torch.randn(6, 30, generator=g)
    U = torch.cat([U, U[:, :3] * 2], 1)  # 9 columns, true rank 6
    V = torch.cat([V, V[:3]], 0)
    U2, V2, err = lora.compress(U, V, 6)
    assert U2.shape == (20, 6) and V2.shape == (6, 30)
    assert torch.allclose(U2 @ V2, U @ V, atol=1e-5) and err < 1e-6
    U3, V3, err3 = lora.compress(U, V, 2)
    real = ((U3 @ V3 - U @ V).norm() / (U @ V).norm()).item()
    assert err3 == pytest.approx(real, rel=1e-4) and err3 > 0.1


def test_hard_update_copies_the_delta_and_static_leaves_it_zero():
    policy = lora.apply(tiny_llama(), 4, 8.0)
    reference = lora.make_reference(policy)
    randomize_adapters(policy, 1)
    assert not ref_lib.ReferenceUpdater("static", tau=1).after_step(1, reference, policy)
    assert all(m.delta_U.numel() == 0 for m in lora.layers(reference, lora.DeltaLinear).values())
    for step in (1, 2):
        randomize_adapters(policy, step)
        ref_lib.ReferenceUpdater("hard", tau=1).after_step(step, reference, policy)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.allclose(reference(ids), policy(ids), atol=1e-6)  # π_ref = π_θ after a hard update
    for n, m in lora.layers(policy, lora.LoRALinear).items():
        r = reference.get_submodule(n)
        assert r.delta_U.shape[1] == 4 and torch.equal(r.delta(), m.delta())
        assert r.delta_V.data_ptr() != m.lora_A.data_ptr()  # a copy: the optimizer's next step must not move it


def test_mixing_a_and_b_separately_misses_the_soft_update_by_the_cross_term():
    """From a hard-copied reference (B_r, A_r), one soft update. The exact factors give α·s·B·A + (1−α)·s·B_r·A_r;
    the naive mix (αB + (1−α)B_r)(αA + (1−α)A_r) misses it by exactly α(1−α)·s·(B − B_r)(A − A_r)."""
    alpha = 0.6
    policy = lora.apply(tiny_llama(), 4, 8.0, "v_proj")
    reference = lora.make_reference(policy)
    randomize_adapters(policy, 1)
    ref_lib.hard_update(reference, policy)
    layer, ref_layer = policy.layers[0].self_attn.v_proj, reference.layers[0].self_attn.v_proj
    A_r, B_r, s = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scale
    randomize_adapters(policy, 2)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    ref_lib.soft_update(reference, policy, alpha)
    exact = ref_layer.delta()
    assert torch.allclose(exact, alpha * s * B @ A + (1 - alpha) * s * B_r @ A_r, atol=1e-6)
    naive = s * (alpha * B + (1 - alpha) * B_r) @ (alpha * A + (1 - alpha) * A_r)
    cross = alpha * (1 - alpha) * s * (B - B_r) @ (A - A_r)
    assert torch.allclose(naive, exact - cross, atol=1e-6)
    assert cross.norm() > 0.1 * exact.norm()  # not a rounding-level difference


# ----------------------------------------------------------------------------------------------------------------------
# options and refusals


@pytest.mark.parametrize("argv, message", [
    (["--lora_rank=-1"], "lora_rank=-1"),
    (["--lora_rank=4", "--lora_alpha=0"], "lora_alpha=0.0"),
    (["--lora_rank=8", "--lora_ref_rank=4"], "lora_ref_rank=4 must be >= lora_rank=8"),
    (["--lora_rank=8", "--lora_targets=q_proj,,v_proj"], "lora_targets"),
    (["--lora_rank=8", "--lora_base_dtype=bfloat16"], "needs lora_rank > 0 and dtype=bfloat16"),
    (["--lora_base_dtype=bfloat16", "--dtype=bfloat16"], "needs lora_rank > 0"),
])
def test_bad_lora_options_are_refused(argv, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        config.parse_config(argv, world_size=1)


def test_a_target_that_matches_no_layer_is_refused_naming_it(tmp_path, capsys):
    import train
    assert train.main(TINY + [f"--out_dir={tmp_path}", "--lora_targets=q_proj,qkv_proj"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qkv_proj matches no linear layer" in err and "down_proj" in err
    with pytest.raises(ValueError, match="tied to the embedding"):
        lora.apply(tiny_llama(), 2, 4.0, "lm_head")


# ----------------------------------------------------------------------------------------------------------------------
# whole runs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    run(TINY + [f"--out_dir={out}"])
    return out


def rows(run_dir, split=None) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in out if split in (None, r["split"])]


def test_a_lora_tr_dpo_run_trains_logs_its_compressions_and_checkpoints(lora_run):
    ckpt = lora_run / "ckpt-000012"
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "base", "adapter",
                                                 "reference_delta.safetensors", "optimizer.pt", "manifest.json"}
    assert not (ckpt / "reference").exists()  # the reference is its factors, not a second model
    updates = rows(lora_run, "reference")
    assert [r["step"] for r in updates] == [2, 4, 6, 8, 10, 12]
    assert [r["ref_rank"] for r in updates] == [4, 8, 8, 8, 8, 8]  # r columns per update, capped at lora_ref_rank 8
    assert updates[0]["compression_error"] == 0.0 and updates[1]["compression_error"] == 0.0
    assert all(0 < r["compression_error"] < 1 for r in updates[2:])  # compressed: the error is logged
    assert rows(lora_run, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π_θ = π_ref at the start
    import checkpoint
    assert checkpoint.verify(ckpt) is None
    adapters = lora.load_adapter(ckpt / "adapter")
    assert len(adapters) == 2 * 2 * 7 and all(v.abs().max() > 0 for v in adapters.values())  # B moved off zero


def test_a_lora_run_resumes_exactly_and_refuses_another_rank_or_targets(lora_run, tmp_path):
    import shutil
    import train
    from safetensors.torch import load_file
    shutil.copytree(lora_run / "ckpt-000006", tmp_path / "ckpt-000006")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in map(json.loads, (lora_run / "metrics.jsonl").read_text().splitlines())
        if r["step"] <= 6))
    for change in ("--lora_rank=8", "--lora_targets=q_proj", "--lora_alpha=4", "--lora_ref_rank=16"):
        with pytest.raises(config.ConfigError, match=f"other values of {change[2:].split('=')[0]}"):
            train.resume_checkpoint(train.parse_config(TINY + [f"--out_dir={tmp_path}", "--resume", change]))
    run(TINY + [f"--out_dir={tmp_path}", "--resume"])
    for f in ("model.safetensors", "base/model.safetensors", "adapter/adapter_model.safetensors",
              "reference_delta.safetensors"):
        a, b = load_file(tmp_path / "ckpt-000012" / f), load_file(lora_run / "ckpt-000012" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert rows(tmp_path) == rows(lora_run)


# ----------------------------------------------------------------------------------------------------------------------
# against peft (a dev-only reference)


def hf_and_ours(tmp_path, targets: list[str], tie: bool):
    """A tiny random transformers Llama under peft's LoraModel and our Llama + lora.apply with the same A and B."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                       attn_implementation="eager")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, lora_dropout=0.0))
    ours = lora.apply(Llama.from_pretrained(tmp_path / "base"), 4, 6.0, ",".join(targets))
    randomize_adapters(ours, 3)
    mine = lora.layers(ours, lora.LoRALinear)
    assert len(mine) == 2 * len(targets)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
                layer = mine[name.removeprefix("base_model.model.model.")]
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model, ours


@pytest.mark.parametrize("targets, tie", [(["q_proj", "v_proj"], True),
                                          (lora.DEFAULT_TARGETS.split(","), False)])
def test_forward_and_adapter_gradients_equal_peft(tmp_path, targets, tie):
    peft_model, ours = hf_and_ours(tmp_path, targets, tie)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    theirs_logits, our_logits = peft_model(ids).logits, ours(ids)
    assert (theirs_logits - our_logits).abs().max() < 1e-5
    for logits in (theirs_logits, our_logits):  # a loss that weighs every logit differently
        (logits.log_softmax(-1) * torch.linspace(-1, 1, 61)).sum().backward()
    grads = {n.removeprefix("base_model.model.model.").replace(".default.weight", ""): p.grad
             for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == ours_grads.keys()
    for n, g in ours_grads.items():
        assert torch.allclose(g, grads[n], atol=1e-5, rtol=1e-4), n


def test_a_lora_checkpoint_loads_in_transformers_merged_and_in_peft_as_an_adapter(lora_run):
    """The run's checkpoint: transformers loads its model files (W0 + s·B·A merged) and peft loads adapter/ onto
    base/, both with the logits of our policy (base/ + adapters, as a resume builds it)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ckpt = lora_run / "ckpt-000012"
    ours = lora.apply(Llama.from_pretrained(ckpt / "base"), 4, 8.0)
    lora.load_checkpoint(ckpt, ours, None)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    want = ours(ids)
    load = transformers.AutoModelForCausalLM.from_pretrained
    merged = load(ckpt, dtype=torch.float32, attn_implementation="eager")
    assert (merged(ids).logits - want).abs().max() < 1e-5
    adapted = peft.PeftModel.from_pretrained(load(ckpt / "base", dtype=torch.float32, attn_implementation="eager"),
                                             ckpt / "adapter")
    assert (adapted(ids).logits - want).abs().max() < 1e-5
    assert (load(ckpt / "base", dtype=torch.float32)(ids).logits - want).abs().max() > 1e-3  # the adapter matters
    saved = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and saved["peft_type"] == "LORA"


def test_ddp_on_two_processes_syncs_the_adapters_and_matches_one_process(lora_run, tmp_path):
    """torchrun, 2 CPU processes (DDP): gradients of the adapters are reduced (the run equals the single-process one
    with 2 micro steps), and both ranks hold the same adapters and the same reference factors at every checkpoint."""
    from safetensors.torch import load_file
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(launcher + [str(ROOT / "tests" / "lora_ranks.py"), *TINY, f"--out_dir={tmp_path}"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for step in (6, 12):
        rank0, rank1 = (load_file(tmp_path / f"rank{r}-step{step}.safetensors") for r in (0, 1))
        assert rank0.keys() == rank1.keys() and any(".delta_U" in k for k in rank0)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    for f in ("model.safetensors", "adapter/adapter_model.safetensors", "reference_delta.safetensors"):
        a, b = load_file(tmp_path / "ckpt-000012" / f), load_file(lora_run / "ckpt-000012" / f)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, f
    for a, b in zip(rows(tmp_path), rows(lora_run), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_sft_with_lora_then_init_from_it_continues_on_its_merged_weights_with_a_bf16_base(tmp_path):
    """SFT trains the adapters like the preference losses (no reference: no factors saved); init_from that run loads
    its merged weights W0 + s·B·A as the next run's W0, here stored in bf16 under bf16 autocast, and a fresh adapter."""
    from safetensors.torch import load_file
    sft = [a for a in TINY if not a.startswith(("--loss", "--ref_update", "--lr"))] + ["--loss=sft", "--lr=5e-2"]
    run(sft + [f"--out_dir={tmp_path / 'sft'}", "--max_steps=24", "--eval_every=0", "--ckpt_every=0"])
    ckpt = tmp_path / "sft" / "ckpt-000024"
    assert not (ckpt / "reference_delta.safetensors").exists() and (ckpt / "adapter").is_dir()
    losses = [r["loss"] for r in rows(tmp_path / "sft", "train")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05  # the adapters learn (nats per token; frozen embedding)
    merged = load_file(ckpt / "model.safetensors")
    dpo = TINY + [f"--out_dir={tmp_path / 'dpo'}", f"--init_from={tmp_path / 'sft'}", "--dtype=bfloat16",
                  "--lora_base_dtype=bfloat16", "--max_steps=4", "--eval_every=0", "--ckpt_every=0"]
    run(dpo)
    base = load_file(tmp_path / "dpo" / "ckpt-000004" / "base" / "model.safetensors")
    assert base.keys() == merged.keys() and all(v.dtype == torch.bfloat16 for v in base.values())
    assert all(torch.equal(base[k], merged[k].bfloat16()) for k in base)  # W0 = the SFT run's merged weights
    merged_bf16_run = load_file(tmp_path / "dpo" / "ckpt-000004" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in merged_bf16_run.values())  # W0 + s·B·A in fp32, not rounded to bf16
    assert rows(tmp_path / "dpo", "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_checkpoint_of_one_process_resumes_under_fsdp2_on_two(lora_run, tmp_path):
    """FSDP2 shards the base and the adapters (reference and initial policy sharded alike, each its own W0 shards; the
    reference's factors, computed from the all-gathered adapters, are replicated): step 6 of the single-process run
    continues on 2 FSDP2 processes to its weights, factors and metrics."""
    import shutil
    from safetensors.torch import load_file
    shutil.copytree(lora_run / "ckpt-000006", tmp_path / "ckpt-000006")
    shutil.copy(lora_run / "metrics.jsonl", tmp_path / "metrics.jsonl")
    run(TINY + [f"--out_dir={tmp_path}", "--resume", "--fsdp=true"], nproc=2)
    for f in ("model.safetensors", "adapter/adapter_model.safetensors", "reference_delta.safetensors"):
        a, b = load_file(tmp_path / "ckpt-000012" / f), load_file(lora_run / "ckpt-000012" / f)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, f
    for a, b in zip(rows(tmp_path), rows(lora_run), strict=True):
        assert a.keys() == b.keys() and all(v == pytest.approx(b[k], abs=1e-4) for k, v in a.items())


def test_a_module_trained_in_full_is_saved_as_peft_modules_to_save(tmp_path):
    """apply's `trainable` (a reward model's score head; here an untied lm_head): lora.save_checkpoint writes it into
    base/ and into the adapter as peft's modules_to_save, so PeftModel.from_pretrained(base) gives our logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    peft_model, _ = hf_and_ours(tmp_path, ["q_proj", "v_proj"], tie=False)  # writes tmp_path/base
    ours = lora.apply(Llama.from_pretrained(tmp_path / "base"), 4, 6.0, "q_proj,v_proj", trainable=("lm_head",))
    randomize_adapters(ours, 5)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.5)
    config_dict = {"lora_rank": 4, "lora_alpha": 6.0, "lora_targets": "q_proj,v_proj"}
    lora.save_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt", ours, ours.state_dict(), None, config_dict)
    saved = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"]
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    load = transformers.LlamaForCausalLM.from_pretrained
    adapted = peft.PeftModel.from_pretrained(load(tmp_path / "base", dtype=torch.float32, attn_implementation="eager"),
                                             tmp_path / "ckpt" / "adapter")
    assert (adapted(ids).logits - ours(ids)).abs().max() < 1e-5
    merged = load(tmp_path / "ckpt", dtype=torch.float32, attn_implementation="eager")
    assert (merged(ids).logits - ours(ids)).abs().max() < 1e-5
    assert set(lora.load_adapter(tmp_path / "ckpt" / "adapter")) == {f"{n}.lora_{ab}" for n in lora.layers(
        ours, lora.LoRALinear) for ab in "AB"}  # the adapters only: a resume takes lm_head from base/

"""toy/lora_exactness.py: its naive update is the separate mixing of A and B (and misses the paper's update by the
cross term), its --quick run writes a complete JSON and PNG, and along it the exact reference matches the dense
recurrence while the naive one does not. The study's verdicts are not asserted: docs/method.md reports them."""
import json

import pytest
import torch

import lora
import reference as ref_lib
from model import Llama, ModelConfig
from toy import lora_exactness as study


def tiny_lora(rank: int = 2, alpha: float = 4.0):
    policy = lora.apply(Llama(ModelConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2)), rank, alpha, seed=0)
    return policy, study.track_initial_adapters(policy)


def perturb(policy, g: torch.Generator):
    """A training step's worth of change: every adapter factor moved by random noise."""
    with torch.no_grad():
        for layer in lora.layers(policy, lora.LoRALinear).values():
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def test_naive_update_mixes_the_factors_and_misses_by_the_cross_term():
    policy, reference = tiny_lora()
    g, alpha = torch.Generator().manual_seed(0), 0.5
    for _ in range(3):
        perturb(policy, g)
        before = {n: (m.naive_A.clone(), m.naive_B.clone())
                  for n, m in lora.layers(reference, lora.DeltaLinear).items()}
        study.naive_soft_update(reference, policy, alpha)
        pol = lora.layers(policy, lora.LoRALinear)
        for name, ref in lora.layers(reference, lora.DeltaLinear).items():
            A, B, s = pol[name].lora_A, pol[name].lora_B, pol[name].scale
            A_r, B_r = before[name]
            mixed = s * (alpha * B + (1 - alpha) * B_r) @ (alpha * A + (1 - alpha) * A_r)
            torch.testing.assert_close(ref.delta(), mixed, rtol=1e-5, atol=1e-6)
            # = α·s·B·A + (1−α)·s·B_r·A_r − α(1−α)·s·(B − B_r)(A − A_r): the paper's rule from (A_r, B_r), less the
            # cross term
            paper = alpha * s * B @ A + (1 - alpha) * s * B_r @ A_r
            torch.testing.assert_close(ref.delta(), paper - alpha * (1 - alpha) * s * (B - B_r) @ (A - A_r),
                                       rtol=1e-5, atol=1e-6)
            assert (ref.delta() - paper).norm() > 1e-3 * paper.norm()


def test_naive_reference_starts_at_the_initial_adapter():
    """A_r = A_0 and B_r = 0, so both references start at ΔW_ref = 0 (the SFT model)."""
    policy, reference = tiny_lora()
    pol = lora.layers(policy, lora.LoRALinear)
    for name, ref in lora.layers(reference, lora.DeltaLinear).items():
        assert torch.equal(ref.naive_A, pol[name].lora_A) and not ref.naive_B.any() and not ref.delta().any()


@pytest.mark.parametrize("method, exact", [("exact", True), ("naive", False)])
def test_dense_check_measures_the_distance_to_the_recurrence(method, exact):
    """Under patched(method), reference.soft_update is the method's and each update appends its relative distance to
    D ← α·s·B·A + (1 − α)·D; afterwards reference.py and lora.py are restored."""
    policy, reference = tiny_lora()
    g, errors = torch.Generator().manual_seed(1), []
    with study.patched(method, errors):
        reference = lora.make_reference(policy)  # the patched one for naive: it carries the initial adapter
        updater = ref_lib.ReferenceUpdater("soft", alpha=0.5, tau=1)
        for step in range(1, 5):
            perturb(policy, g)
            updater.after_step(step, reference, policy)
    assert ref_lib.soft_update is study.ORIGINAL_SOFT_UPDATE and lora.make_reference is study.ORIGINAL_MAKE_REFERENCE
    assert len(errors) == 4
    assert max(errors) < 1e-5 if exact else min(errors) > 1e-3


def test_quick_run_writes_the_study(tmp_path):
    payload = study.main(["--quick", "--out", str(tmp_path), "--workers", "1"])
    assert (tmp_path / "lora_exactness.png").stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "lora_exactness.json").read_text())
    assert on_disk["setup"]["seeds"] == study.QUICK["seeds"] and set(on_disk["runs"]) == {"sft", *study.METHODS}
    n_seeds, steps, tau = len(study.QUICK["seeds"]), study.QUICK["steps"], study.QUICK["tau"]
    for method in study.METHODS:
        runs = on_disk["runs"][method]
        assert len(runs) == n_seeds
        for h in runs:
            assert h["step"][-1] == steps and all(len(h[k]) == len(h["step"]) for k in study.METRICS)
            assert method == "full" or len(h["ref_error"]) == steps // tau  # one check per reference update
    s = on_disk["summary"]
    assert set(s["final"]) == set(study.METHODS) and set(s["paired"]) == {"naive - exact", "full - exact"}
    for diffs in s["paired"].values():
        assert set(diffs) == set(study.METRICS)
        assert all(d["lo"] <= d["mean"] <= d["hi"] and d["n"] == n_seeds for d in diffs.values())
    # the exact reference is the dense recurrence (to fp32 rounding), never compressed at this rank cap; the naive
    # one is measurably not
    assert s["ref_error"]["exact"]["max"] < 1e-5 and s["compression_error_max"] < 1e-6
    assert min(e for h in on_disk["runs"]["naive"] for e in h["ref_error"]) > 1e-4
    assert payload["summary"]["ref_error"]["naive"]["max"] == pytest.approx(s["ref_error"]["naive"]["max"], rel=1e-4)

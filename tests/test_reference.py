"""reference.py: the frozen copy, the exact TR recurrences, the dtype rule, bad settings, a 2-process DDP/FSDP2 run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reference import ReferenceUpdater, hard_update, make_reference, reference_logits, soft_update


def tiny(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 10)).to(dtype)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def fake_optimizer_step(policy: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_make_reference_is_a_frozen_independent_copy():
    policy = tiny()
    policy.train()
    reference = make_reference(policy)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert all(torch.equal(reference.get_parameter(n), t) for n, t in params(policy).items())
    fake_optimizer_step(policy, 1)
    assert not any(torch.equal(reference.get_parameter(n), t) for n, t in params(policy).items())
    policy_with_grad = tiny()
    logits = reference_logits(policy_with_grad, torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 10) and not logits.requires_grad  # the forward runs under no_grad


@pytest.mark.parametrize("mode,alpha,tau", [("soft", 0.5, 1), ("soft", 0.6, 3), ("soft", 0.1, 4), ("soft", 1.0, 2),
                                            ("hard", 0.6, 3), ("static", 0.6, 1)])
def test_updater_reproduces_the_recurrence(mode, alpha, tau, steps=25):
    """Both models' weights are saved before each after_step: π_θ must come out untouched and π_ref must be the
    recurrence applied to the saved ones (a copy in the wrong direction, π_ref into π_θ, fails both)."""
    policy = tiny()
    reference = make_reference(policy)
    updater = ReferenceUpdater(mode, alpha, tau)
    real = {n: t.double() for n, t in params(reference).items()}  # θ_ref ← α·θ + (1−α)·θ_ref in fp64 all along
    fired = []
    for step in range(1, steps + 1):
        fake_optimizer_step(policy, step)
        theta, theta_ref = params(policy), params(reference)  # before the update
        fired.append(updater.after_step(step, reference, policy))
        for n, t in params(policy).items():
            assert torch.equal(t, theta[n]), f"after_step changed the policy's {n} at step {step}"
        a = 1.0 if mode == "hard" else alpha
        update = mode != "static" and step % tau == 0
        for n, t in params(reference).items():  # the same lerp, tensor by tensor, in fp32: bitwise
            want = torch.lerp(theta_ref[n], theta[n], a) if update else theta_ref[n]
            assert torch.equal(t, want), f"π_ref's {n} at step {step}"
        if update:
            real = {n: a * theta[n].double() + (1 - a) * r for n, r in real.items()}
    assert fired == [mode != "static" and s % tau == 0 for s in range(1, steps + 1)]
    for n, t in params(reference).items():
        torch.testing.assert_close(t.double(), real[n], rtol=0, atol=1e-6)
    if mode == "static":
        assert all(torch.equal(t, params(tiny())[n]) for n, t in params(reference).items())


def test_soft_with_alpha_one_is_hard():
    policy = tiny()
    ref_soft, ref_hard = make_reference(policy), make_reference(policy)
    soft, hard = ReferenceUpdater("soft", alpha=1.0, tau=2), ReferenceUpdater("hard", tau=2)
    for step in range(1, 7):
        fake_optimizer_step(policy, step)
        assert soft.after_step(step, ref_soft, policy) == hard.after_step(step, ref_hard, policy)
        assert all(torch.equal(ref_soft.get_parameter(n), t) for n, t in params(ref_hard).items())
    assert all(torch.equal(ref_soft.get_parameter(n), t) for n, t in params(policy).items())  # step 6 copied θ


def test_low_precision_reference_refuses_soft_updates():
    # Why: in bf16, α·(θ − θ_ref) below half a unit in the last place of θ_ref rounds away. A drift of one bf16 ulp at
    # 1.0 (2^-7) mixed in with α = 0.1 leaves θ_ref exactly where it was.
    ref, theta = torch.ones(4, dtype=torch.bfloat16), torch.full((4,), 1 + 2 ** -7, dtype=torch.bfloat16)
    assert torch.equal(torch.lerp(ref, theta, 0.1), ref)
    policy = tiny(dtype=torch.bfloat16)
    reference = make_reference(policy)
    assert reference.get_parameter("1.weight").dtype == torch.bfloat16
    fake_optimizer_step(policy, 1)
    with pytest.raises(ValueError, match="bfloat16.*rounding"):
        ReferenceUpdater("soft", alpha=0.5, tau=1).after_step(1, reference, policy)
    soft_update(reference, policy, 1.0)  # α = 1 is a copy, exact in any dtype
    assert all(torch.equal(reference.get_parameter(n), t) for n, t in params(policy).items())
    fake_optimizer_step(policy, 2)
    assert ReferenceUpdater("hard", tau=1).after_step(1, reference, policy)
    assert all(torch.equal(reference.get_parameter(n), t) for n, t in params(policy).items())


@pytest.mark.parametrize("kwargs,match", [(dict(mode="trust"), "mode"), (dict(mode="soft", alpha=0.0), "alpha"),
                                          (dict(mode="soft", alpha=1.5), "alpha"), (dict(mode="hard", tau=0), "tau"),
                                          (dict(mode="hard", tau=2.5), "tau")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=f"reference.py ReferenceUpdater: {match}"):
        ReferenceUpdater(**kwargs)


def test_bad_calls_raise():
    policy = tiny()
    reference = make_reference(policy)
    with pytest.raises(ValueError, match="1-based"):
        ReferenceUpdater("soft").after_step(0, reference, policy)
    with pytest.raises(ValueError, match="alpha"):
        soft_update(reference, policy, 0.0)
    with pytest.raises(ValueError, match="names differ"):
        hard_update(reference, nn.Sequential(nn.Linear(6, 6)))
    with pytest.raises(ValueError, match="in the reference but"):
        hard_update(reference, tiny(dtype=torch.float64))


def test_precompute_only_for_static():
    ReferenceUpdater("static").check_precompute()
    for mode in ("soft", "hard"):
        with pytest.raises(ValueError, match="cannot be precomputed"):
            ReferenceUpdater(mode).check_precompute()


def test_two_processes_ddp_fsdp2_and_kto_z_ref():
    """tests/dist_reference.py under torchrun (gloo, 2 CPU processes): see its checks for what is asserted."""
    script = Path(__file__).with_name("dist_reference.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in ("check_kto_z_ref", "check_ddp", "check_fsdp2"):
        assert f"PASS {check}" in result.stdout, result.stdout

"""Two-process CPU (gloo) checks of reference.py and kto_loss, launched by tests/test_reference.py as
    torchrun --standalone --nproc_per_node=2 tests/dist_reference.py
One launch runs every check (a launch costs seconds); each prints "PASS <name>" on rank 0, and any failure raises.
"""
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import kto_loss  # noqa: E402
from reference import ReferenceUpdater, make_reference, reference_logits  # noqa: E402

V, D = 12, 8


class Tiny(nn.Module):
    """Embedding, a ModuleList of residual blocks and a head tied to the embedding: the shape FSDP2 sees in a Llama."""

    def __init__(self, n_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter tensors by name (all-gathered when FSDP2-sharded)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.named_parameters()}


def same_on_all_ranks(tensors: dict[str, torch.Tensor]) -> bool:
    flat = torch.cat([t.flatten() for t in tensors.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def assert_direction(theta: dict, expected_ref: dict, policy: nn.Module, reference: nn.Module, where: str) -> None:
    """After an update: π_θ still holds theta (its weights saved before), π_ref holds the recurrence's value."""
    got_policy, got_ref = full(policy), full(reference)
    assert all(torch.equal(got_policy[n], t) for n, t in theta.items()), f"{where}: the update changed π_θ"
    assert got_ref.keys() == expected_ref.keys(), where
    assert all(torch.equal(got_ref[n], t) for n, t in expected_ref.items()), f"{where}: π_ref != the recurrence"


def train_step(policy: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    """One optimizer step on rank-specific data (so only gradient sync keeps the ranks' policies equal)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    idx = torch.randint(0, V, (2, 5), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(policy(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    opt.step()


def check_ddp(rank: int, alpha: float = 0.5, tau: int = 2, steps: int = 6) -> None:
    torch.manual_seed(rank)  # different initial weights on each rank: make_reference and DDP must both broadcast
    model = Tiny()
    reference = make_reference(model)
    policy = DistributedDataParallel(model)
    assert same_on_all_ranks(full(reference))
    assert all(torch.equal(full(reference)[n], t) for n, t in full(model).items())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05)
    updater, expected = ReferenceUpdater("soft", alpha, tau), full(reference)
    for step in range(1, steps + 1):
        train_step(policy, opt, rank, step)
        theta = full(model)  # before the update: it must leave π_θ alone
        assert updater.after_step(step, reference, policy) == (step % tau == 0)
        if step % tau == 0:
            expected = {n: torch.lerp(expected[n], t, alpha) for n, t in theta.items()}
        assert_direction(theta, expected, model, reference, f"DDP step {step}")
        assert same_on_all_ranks(full(reference)), f"reference differs across ranks after step {step}"
    got = full(reference)
    assert all(torch.equal(got[n], expected[n]) for n in expected), "DDP: reference != recurrence"
    assert not all(torch.equal(got[n], t) for n, t in full(model).items()), "reference should lag the policy"


def check_fsdp2(rank: int, alpha: float = 0.4, tau: int = 2, steps: int = 6) -> None:
    torch.manual_seed(0)
    policy = Tiny()
    reference = make_reference(policy)  # from the unsharded policy, then both sharded the same way
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in (policy, reference):
        for layer in module.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)  # the root holds the tied embedding/head
    try:
        make_reference(policy)
        raise AssertionError("make_reference accepted an FSDP2-sharded policy")
    except ValueError:
        pass
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05)
    updater, expected = ReferenceUpdater("soft", alpha, tau), full(reference)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(rank))
    for step in range(1, steps + 1):
        train_step(policy, opt, rank, step)
        logits = reference_logits(reference, idx)
        assert not logits.requires_grad
        # the root would stay all-gathered after a forward with no backward; reference_logits reshards it
        assert all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in reference.parameters())
        theta = full(policy)  # before the update: it must leave π_θ alone
        if updater.after_step(step, reference, policy):
            expected = {n: torch.lerp(expected[n], t, alpha) for n, t in theta.items()}
        assert_direction(theta, expected, policy, reference, f"FSDP2 soft step {step}")
    assert same_on_all_ranks(full(reference))
    hard = ReferenceUpdater("hard", tau=1)
    train_step(policy, opt, rank, steps + 1)  # π_θ moves away from π_ref, so a copy in either direction shows
    theta = full(policy)
    assert not all(torch.equal(full(reference)[n], t) for n, t in theta.items())
    assert hard.after_step(steps + 1, reference, policy)
    assert_direction(theta, theta, policy, reference, "FSDP2 hard")


def check_kto_z_ref(rank: int) -> None:
    # rank 0's KL rows average −1, rank 1's +3: TRL's order (mean over ranks, then clamp) gives z_ref = 1 on both;
    # clamping each rank first would give 1.5, no all-reduce would give 0 and 3.
    mean = -1.0 if rank == 0 else 3.0
    kl_policy = torch.tensor([mean - 0.5, mean + 0.5, mean], dtype=torch.float64)
    logps, desirable = torch.tensor([-3.0, -4.0], dtype=torch.float64), torch.tensor([True, False])
    _, _, kl = kto_loss(logps, logps - 1, desirable, kl_policy, torch.zeros(3, dtype=torch.float64), beta=0.1)
    gathered = [torch.empty_like(kl) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, kl)
    assert all(g.item() == 1.0 for g in gathered), f"z_ref per rank: {[g.item() for g in gathered]}"


def main() -> None:
    # FSDP2 warns that a wrapped Linear returns a view (a reshape of its matmul); no in-place op follows here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for check in (check_kto_z_ref, check_ddp, check_fsdp2):
        check(rank)
        dist.barrier()
        if rank == 0:
            print(f"PASS {check.__name__}", flush=True)
    gc.collect()  # the checks' DDP modules go before the process group, as in train.main
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

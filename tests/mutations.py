"""How we know the tests bite: break one property at a time in a scratch copy of the repository, run the tests that
guard it, and check that they fail.

    python tests/mutations.py            # every mutation (a few minutes on 2 cores)
    python tests/mutations.py ipo-average cdpo-smoothing     # some of them
    python tests/mutations.py --list

Each mutation replaces one exact piece of source (it must occur exactly once, else it is reported as not applying: the
code moved, update the mutation) in a copy under /tmp, never in the checkout, and runs the listed tests there. It is
caught when at least one of them fails; the failing test names are printed. Exit status 1 if any mutation survives.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS = "tests/test_train_loss.py::test_compute_loss_matches_trl_with_transformers_logps"
EVAL = ("tests/test_train_loss.py::"
        "test_evaluate_metrics_equal_a_per_sequence_loop_with_pi_ref_pi_init_pi_theta_all_different")
LEARN = "tests/test_train_loss.py::test_a_few_steps_learn_the_synthetic_preferences"
RECURRENCE = "tests/test_reference.py::test_updater_reproduces_the_recurrence"
DIST = "tests/test_reference.py::test_two_processes_ddp_fsdp2_and_kto_z_ref"
PACKED = "tests/test_packing.py::test_compute_loss_packed_equals_padded"
BF16 = "tests/test_packing.py::test_bf16_packed_logps_are_within_bf16_rounding"
SIGKILL = "tests/test_train.py::test_sigkill_then_resume_matches_uninterrupted"
LORA = "tests/test_lora.py::"

# (name, what breaks, file, exact old text, new text, tests expected to catch it)
MUTATIONS = [
    ("ipo-average", "IPO's length averaging removed from train.compute_loss", "train.py",
     'pol, ref = (logps / n, ref_logps / n) if cfg.loss == "ipo" else (logps, ref_logps)',
     "pol, ref = logps, ref_logps",
     [f"{LOSS}[ipo-padded]", f"{LOSS}[ipo-packed]"]),
    ("cdpo-smoothing", "compute_loss passes label smoothing 0 to dpo_loss (cDPO)", "train.py",
     "losses.dpo_loss(*args, cfg.label_smoothing)", "losses.dpo_loss(*args, 0.0)",
     [f"{LOSS}[cdpo-padded]", f"{LOSS}[cdpo-packed]"]),
    ("ipo-rewards", "IPO's logged rewards length-averaged again", "train.py",
     "chosen_r, rejected_r = (cfg.beta * (logps.detach() - ref_logps)).split(b)", "pass",
     [f"{LOSS}[ipo-padded]"]),
    ("hard-reversed", "the hard update copies π_ref into π_θ", "reference.py",
     "torch._foreach_copy_(refs, pols)", "torch._foreach_copy_(pols, refs)",
     [f"{RECURRENCE}[hard-0.6-3]", DIST]),
    ("soft-reversed", "the soft update mixes into π_θ instead of π_ref", "reference.py",
     "torch._foreach_lerp_(refs, pols, alpha)", "torch._foreach_lerp_(pols, refs, 1 - alpha)",
     [f"{RECURRENCE}[soft-0.6-3]", DIST]),
    ("ref-forward-policy", "the reference forward in compute_loss runs the policy", "train.py",
     "ref_logps, _ = forward_logps(reference, reference=True)", "ref_logps, _ = forward_logps(policy, reference=True)",
     [f"{LOSS}[dpo-padded]", f"{LOSS}[dpo-packed]", f"{LOSS}[kto-packed]"]),
    ("tree-mask-leak", "rejected tokens may see chosen ones (tree mask)", "packing.py",
     "tree = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])",
     "tree = branch[:, None, :] <= branch[:, :, None]",
     [f"{LOSS}[dpo-packed]", f"{PACKED}[kto]", BF16]),
    ("kto-kl-rows-packed", "packed KTO's KL rows scored by the policy on both sides (z_ref = 0)", "train.py",
     "ref_logps[:b], ref_logps[b:], n[:b]", "ref_logps[:b], logps[b:].detach(), n[:b]",
     [f"{LOSS}[kto-packed]", f"{PACKED}[kto]"]),
    ("kto-kl-rows-padded", "padded KTO's KL rows scored by the policy on both sides (z_ref = 0)", "train.py",
     "ref_kl, _ = batch_logps(reference, kl_ids", "ref_kl, _ = batch_logps(policy, kl_ids",
     [f"{LOSS}[kto-padded]", f"{PACKED}[kto]"]),
    ("eval-reference", "evaluate's held-out rewards against π_ref instead of π_init", "train.py",
     "_, m = compute_loss(policy, initial,", "_, m = compute_loss(policy, reference,", [EVAL]),
    ("eval-kl-swapped", "evaluate's kl_ref and kl_init swapped", "train.py",
     '(("kl_ref", reference), ("kl_init", initial))', '(("kl_ref", initial), ("kl_init", reference))', [EVAL]),
    ("bf16-logsoftmax", "the log-softmax of bf16 logits runs in bf16", "losses.py",
     "torch.log_softmax(logits, -1, dtype=acc)", "torch.log_softmax(logits, -1).to(acc)", [BF16]),
    ("gradient-ascent", "the training loop ascends the loss", "train.py",
     "(loss * weight).backward()", "(-loss * weight).backward()", [f"{LEARN}[dpo]", f"{LEARN}[ipo]", f"{LEARN}[kto]"]),
    ("resume-data-position", "--resume restarts the data order", "train.py",
     'train_loader.load_state_dict(state["data"])', "pass", [f"{SIGKILL}[checkpoint.write_manifest-5]"]),
    ("keep-freed-memory", "keep_freed_memory reports success without setting malloc", "train.py",
     "return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))", "return True",
     ["tests/test_train.py::test_keep_freed_memory_stops_refaulting_large_blocks"]),
    ("wandb-rows", "rows never reach W&B", "train.py",
     "tracker.log({", "(lambda *a, **k: None)({",
     ["tests/test_train.py::test_wandb_logs_the_metrics_rows_and_is_imported_only_when_set"]),
    ("second-run-clobbers", "a fresh run into an out_dir holding a run is not refused", "checkpoint.py",
     "elif held and not overwrite:", "elif False:",
     ["tests/test_faults.py::test_a_second_run_into_a_finished_run_is_refused_and_touches_nothing"]),
    ("overwrite-at-once", "--overwrite writes metrics.jsonl over the earlier run's before its first checkpoint",
     "checkpoint.py", 'return self.out / (NEW + name if self.old else name)', "return self.out / name",
     ["tests/test_faults.py::test_overwrite_failing_before_its_first_checkpoint_leaves_the_earlier_run_resumable"]),
    ("lora-mix-ab", "the LoRA soft update mixes A and B separately (the naive rule)", "reference.py",
     "U, V = torch.cat([alpha * pol.scale * B, (1 - alpha) * U], 1), torch.cat([A, V], 0)",
     "U, V = alpha * pol.scale * B + (1 - alpha) * U[:, :B.shape[1]], alpha * A + (1 - alpha) * V[:A.shape[0]]",
     [f"{LORA}test_soft_updates_of_the_factors_follow_the_dense_recurrence",
      f"{LORA}test_mixing_a_and_b_separately_misses_the_soft_update_by_the_cross_term"]),
    ("lora-base-copied", "the LoRA reference copies W0 instead of sharing its storage", "lora.py",
     "reference = copy.deepcopy(policy, memo=dict(shared))", "reference = copy.deepcopy(policy)",
     [f"{LORA}test_reference_and_initial_share_the_base_storage_and_hold_only_their_delta"]),
    ("lora-unscaled", "the adapters' product is not scaled by lora_alpha / r", "lora.py",
     "+ self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)",
     "+ F.linear(F.linear(x, self.lora_A), self.lora_B)",
     [f"{LORA}test_forward_and_adapter_gradients_equal_peft"]),
    ("lora-resume-factors", "--resume of a LoRA run starts the reference's delta from zero", "lora.py",
     "for name, layer in layers(reference, DeltaLinear).items():", "for name, layer in []:",
     [f"{LORA}test_a_lora_run_resumes_exactly_and_refuses_another_rank_or_targets",
      f"{SIGKILL}[lora-checkpoint.write_manifest-5]"]),
]


def copy_repo(dst: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def run(name, what, file, old, new, tests) -> tuple[str, list[str]]:
    """('caught' | 'SURVIVED' | 'does not apply', failing tests)."""
    source = (ROOT / file).read_text()
    if source.count(old) != 1:
        return "does not apply", [f"{file}: the text occurs {source.count(old)} times"]
    dst = Path(tempfile.mkdtemp(prefix=f"mut-{name}-"))
    try:
        copy_repo(dst)
        (dst / file).write_text(source.replace(old, new))
        env = {**os.environ, "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR",
                                                                   str(ROOT.parent / "shared" / "tiktoken_cache"))}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=dst,
                           env=env, capture_output=True, text=True)
        failed = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("FAILED ")]
        if p.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage error, nothing collected
            return f"ERROR (pytest exit {p.returncode})", [p.stdout[-1500:] + p.stderr[-1500:]]
        return ("caught" if failed else "SURVIVED"), failed
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for name, what, *_ in MUTATIONS:
            print(f"{name:22} {what}")
        return 0
    chosen = [m for m in MUTATIONS if not argv or m[0] in argv]
    if unknown := set(argv) - {m[0] for m in MUTATIONS}:
        print(f"mutations.py: unknown mutation(s) {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    survived = 0
    for m in chosen:
        verdict, detail = run(*m)
        survived += verdict != "caught"
        print(f"{m[0]:22} {verdict:8} {m[1]}", flush=True)
        for d in detail:
            print(f"{'':31}{d}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

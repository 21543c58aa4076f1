"""toy/: every script runs in --quick mode and writes a complete JSON and its PNG; exact-enumeration sanity checks.

Only robust properties are asserted (probabilities sum to 1, curves have the configured length, KL starts at 0 and is
non-negative, autograd matches the closed forms), never the scientific verdicts, which the README reports from the
full runs."""
import json
import math

import pytest
import torch

from toy import bandit, common, curvature, overoptimization, sequences, stats


def run_quick(module, tmp_path_factory) -> tuple[dict, dict]:
    """main(["--quick", "--out", tmp]) in-process; the payload it returns and the JSON it wrote."""
    name = module.__name__.split(".")[-1]
    out = tmp_path_factory.mktemp(name)
    payload = module.main(["--quick", "--out", str(out)])
    assert (out / f"{name}.png").stat().st_size > 10_000
    with open(out / f"{name}.json") as f:
        return payload, json.load(f)


@pytest.fixture(scope="module")
def bandit_run(tmp_path_factory):
    return run_quick(bandit, tmp_path_factory)


@pytest.fixture(scope="module")
def sequences_run(tmp_path_factory):
    return run_quick(sequences, tmp_path_factory)


@pytest.fixture(scope="module")
def overoptimization_run(tmp_path_factory):
    return run_quick(overoptimization, tmp_path_factory)


@pytest.fixture(scope="module")
def curvature_run(tmp_path_factory):
    return run_quick(curvature, tmp_path_factory)


@pytest.mark.parametrize("run", ["bandit_run", "sequences_run", "overoptimization_run", "curvature_run"])
def test_json_matches_the_returned_payload_and_is_complete(run, request):
    payload, on_disk = request.getfixturevalue(run)
    assert on_disk == json.loads(json.dumps(common.rounded(payload)))
    assert {"setup", "summary", "runs"} <= set(on_disk) and set(on_disk["runs"]) == set(on_disk["summary"])
    seeds, steps, every = (on_disk["setup"][k] for k in ("seeds", "steps", "eval_every"))
    n_points = len([s for s in range(steps + 1) if s % every == 0 or s == steps])  # as common.train records
    for name, histories in on_disk["runs"].items():
        assert len(histories) == len(seeds), name
        for h in histories:
            assert h["step"][0] == 0 and h["step"][-1] == steps, name
            assert all(len(v) == n_points for v in h.values()), name
            assert all(math.isfinite(x) for v in h.values() for x in v), name
            assert h["beta_margin"][0] == pytest.approx(0, abs=1e-6), name  # π = π_ref at step 0


@pytest.mark.parametrize("run", ["bandit_run", "sequences_run"])
def test_likelihood_toys_have_exact_masses(run, request):
    payload, _ = request.getfixturevalue(run)
    expected = {f"{loss}/{mode}" for loss in common.LOSSES for mode in ("static", "soft", "hard")}
    assert expected <= set(payload["runs"]) and set(payload["runs"]) == set(payload["configs"])
    for name, histories in payload["runs"].items():
        for h in histories:
            total = [c + r + o for c, r, o in zip(h["mass_chosen"], h["mass_rejected"], h["mass_ood"])]
            assert max(abs(t - 1) for t in total) < 1e-5, name
            assert h["kl_sft"][0] == pytest.approx(0, abs=1e-6) and min(h["kl_sft"]) > -1e-5, name
        for key in ("d_logp_chosen", "d_mass_ood", "chosen_dip", "chosen_recovery"):
            assert payload["summary"][name][key]["n"] == len(payload["setup"]["seeds"])


def test_overoptimization_records_gold_and_kl(overoptimization_run):
    payload, _ = overoptimization_run
    expected = {f"{loss}/{mode}" for loss in common.LOSSES for mode in ("static", "soft", "hard")}
    expected |= {"dpo/soft/alpha=0.1", "dpo/hard/tau=8", "dpo/static/lr=0.001", "dpo/hard/pairs=256"}
    assert expected <= set(payload["runs"]) and set(payload["runs"]) == set(payload["configs"])
    for name, histories in payload["runs"].items():
        for h in histories:
            assert h["kl_sft"][0] == pytest.approx(0, abs=1e-6) and min(h["kl_sft"]) > -1e-5, name
            assert all(abs(g) < 5 for g in h["gold"]), name  # a standardised reward: |E_π r*| ≤ max |r*|
        summary = payload["summary"][name]
        assert summary["gold_peak"]["mean"] >= summary["gold_final"]["mean"] - 1e-9, name


def test_curvature_autograd_matches_closed_forms(curvature_run):
    payload, _ = curvature_run
    a = payload["analytic"]
    assert max(abs(x - y) for x, y in zip(a["dpo_weight"], a["weight_closed_form"])) < 1e-9
    assert max(abs(x - y) for x, y in zip(a["dpo_curvature"], a["curvature_closed_form"])) < 1e-12
    assert all(x == pytest.approx(2.0) for x in a["ipo_curvature"])  # (h − 1/2β)² has constant curvature 2
    assert set(payload["runs"]) == {"dpo/static", "dpo/soft", "dpo/hard"}


def test_enumeration_is_complete_and_sums_to_one():
    tokens, mask = common.enumerate_sequences(3, 4)
    assert tokens.shape == (81, 5) and len({tuple(r) for r in tokens.tolist()}) == 81
    assert (tokens[:, 0] == 0).all() and mask[:, 0].sum() == 0 and (mask[:, 1:] == 1).all()
    policy = sequences.tiny_llama(0)
    tokens, mask = common.enumerate_sequences(sequences.VOCAB, sequences.LENGTH)
    assert common.all_logps(policy, tokens, mask).exp().sum().item() == pytest.approx(1, abs=1e-5)


def test_sequence_pairs_are_one_token_edits():
    chosen, rejected = sequences.make_pairs(torch.Generator().manual_seed(3))
    tokens, _ = common.enumerate_sequences(sequences.VOCAB, sequences.LENGTH)
    assert len(set(chosen.tolist()) | set(rejected.tolist())) == 2 * sequences.N_PAIRS
    assert ((tokens[chosen] != tokens[rejected]).sum(1) == 1).all()


def test_preference_loss_goes_through_losses_py():
    pol = torch.tensor([-1.0, -2.0, -3.0, -1.5])  # two pairs: [chosen ; rejected]
    ref = torch.tensor([-1.5, -2.0, -2.0, -2.0])
    n_tok = torch.full((4,), 2.0)
    loss, h = common.preference_loss(common.RunConfig(loss="dpo", beta=0.5), pol, ref, n_tok)
    assert h.tolist() == pytest.approx([0.5 + 1.0, 0.0 - 0.5])
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(0.5 * h).mean().item())
    loss, _ = common.preference_loss(common.RunConfig(loss="ipo", beta=0.5), pol, ref, n_tok)
    assert loss.item() == pytest.approx(((h / 2 - 1.0) ** 2).mean().item())  # length-averaged margins, 1/(2β) = 1
    loss, _ = common.preference_loss(common.RunConfig(loss="kto", beta=0.5), pol, ref, n_tok)
    z = (pol - ref).mean().clamp(min=0)
    r = pol - ref
    expected = torch.cat([1 - torch.sigmoid(0.5 * (r[:2] - z)), 1 - torch.sigmoid(0.5 * (z - r[2:]))]).mean()
    assert loss.item() == pytest.approx(expected.item())


def test_gold_at_kl_interpolates_first_crossing():
    assert overoptimization.gold_at_kl([0, 1, 3, 2, 5], [0, 1, 2, 9, 4], 2.0) == pytest.approx(1.5)
    assert overoptimization.gold_at_kl([0, 1], [0, 1], 4.0) is None


def test_bad_run_config_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        common.RunConfig(loss="orpo")
    with pytest.raises(ValueError, match="mode one of"):
        common.RunConfig(mode="ema")


# ---- toy/stats.py: known inputs -> known outputs ----

def test_bootstrap_ci_known_values():
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)  # no spread, no interval
    # two seeds {0, 1}: the resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert stats.bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)  # the 30% and 70% quantiles are both 0.5
    assert stats.bootstrap_ci([3.0]) == (3.0, 3.0)
    x = [0.1, 0.4, 0.35, 0.8, 0.05, 0.6, 0.2, 0.9, 0.3, 0.5]
    lo, hi = stats.bootstrap_ci(x)
    assert lo < sum(x) / len(x) < hi and (lo, hi) == stats.bootstrap_ci(x)  # fixed seed: reproducible
    assert (stats.bootstrap_means(x, seed=1) != stats.bootstrap_means(x, seed=0)).any()
    lo90, hi90 = stats.bootstrap_ci(x, level=0.9)
    assert lo < lo90 < hi90 < hi


def test_paired_diff_removes_the_shared_seed_spread():
    seed_effect = [10.0, -30.0, 55.0, 3.0, -12.0, 40.0, -8.0, 21.0, 0.0, -5.0]  # shared by both methods
    b = seed_effect
    a = [s + 1.0 for s in seed_effect]
    d = stats.paired_diff(a, b)
    assert d == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 10,
                 "method": "paired percentile bootstrap over seeds, 10000 resamples"}
    a = [s + e for s, e in zip(seed_effect, [0.0, 1.0] * 5)]
    d = stats.paired_diff(a, b)
    assert d["mean"] == pytest.approx(0.5) and (d["lo"], d["hi"]) == stats.bootstrap_ci([0.0, 1.0] * 5)
    assert stats.verdict(d) == "TR higher" and stats.verdict(stats.paired_diff(b, a)) == "TR lower"
    assert stats.verdict(stats.paired_diff([0.0, 1.0], [0.5, 0.5])) == "no resolved difference"
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired_diff([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci([1.0, float("nan")])


def test_frontier_is_the_best_gold_within_each_kl_budget():
    kl, gold = [0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0]
    f = stats.frontier(kl, gold, [-1.0, 0.0, 0.5, 1.0, 2.5, 10.0])
    assert math.isnan(f[0]) and f[1:].tolist() == [0.0, 0.0, 2.0, 2.0, 3.0]
    # a family of runs (runs × evaluations): the frontier takes the best run at each budget, unordered KLs included
    f = stats.frontier([[0.0, 2.0, 1.0], [0.0, 0.5, 3.0]], [[0.0, 1.0, 0.2], [0.0, 0.7, 0.4]], [0.5, 1.0, 2.0, 3.0])
    assert f.tolist() == [0.7, 0.7, 1.0, 1.0]
    assert math.isnan(stats.frontier([], [], [1.0])[0])
    with pytest.raises(ValueError, match="one gold per KL"):
        stats.frontier([0.0, 1.0], [0.0], [1.0])

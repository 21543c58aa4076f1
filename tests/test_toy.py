"""toy/: every script runs in --quick mode and writes a complete JSON and its PNG; exact-enumeration sanity checks.

Only robust properties are asserted (probabilities sum to 1, curves have the configured length, KL starts at 0 and is
non-negative, autograd matches the closed forms), never the scientific verdicts, which the README reports from the
full runs."""
import functools
import json
import math

import pytest
import torch

from toy import bandit, common, curvature, overoptimization, sequences, stats


def run_quick(module, tmp_path_factory) -> tuple[dict, dict]:
    """main(["--quick", "--out", tmp, "--workers", "1"]) in-process (the pool has its own test); the payload it
    returns and the JSON it wrote."""
    name = module.__name__.split(".")[-1]
    out = tmp_path_factory.mktemp(name)
    payload = module.main(["--quick", "--out", str(out), "--workers", "1"])
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
    written = {k: v for k, v in payload.items() if k != "regimes"}  # overoptimization writes regimes.json apart
    assert on_disk == json.loads(json.dumps(common.rounded(written)))
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
    tau = payload["setup"]["grid"]["soft_taus"][0]
    expected = {f"{loss}/{mode}" for loss in common.LOSSES for mode in ("static/beta=0.1", "static/beta=0.3",
                                                                       f"soft/beta=0.1/alpha=0.6/tau={tau}",
                                                                       f"hard/beta=0.1/tau={tau}")}
    assert expected <= set(payload["runs"]) and set(payload["runs"]) == set(payload["configs"])
    for name, histories in payload["runs"].items():
        for h in histories:
            assert h["kl_sft"][0] == pytest.approx(0, abs=1e-6) and min(h["kl_sft"]) > -1e-5, name
            assert all(abs(g) < 5 for g in h["gold"]), name  # a standardised reward: |E_π r*| ≤ max |r*|
        summary = payload["summary"][name]
        assert summary["gold_peak"]["mean"] >= summary["gold_final"]["mean"] - 1e-9, name
    for loss, f in payload["frontiers"].items():  # a frontier never falls as the KL budget grows; at K = 0 it is SFT
        for fam in ("static", "tr"):
            means = [d["mean"] for d in f[fam]]
            assert all(b >= a - 1e-12 for a, b in zip(means, means[1:])), (loss, fam)
        assert f["gap"][0]["mean"] == pytest.approx(0, abs=1e-6)


def test_the_full_study_grid_is_the_one_the_frontiers_need():
    """Static over five β from 0.01 to 1, TR soft over an α × τ grid and hard over a τ grid at two β, 10 seeds, and a
    regime axis from 16 distinct pairs to the stream (the grid main() runs for every loss)."""
    seeds, steps, _, _, regimes, g = overoptimization.setup(quick=False)
    assert len(seeds) >= 10 and g["static_betas"] == (0.01, 0.03, 0.1, 0.3, 1.0) and 0.1 in g["tr_betas"]
    assert len(g["tr_betas"]) >= 2 and len(g["alphas"]) >= 3 and len(g["soft_taus"]) >= 2 and len(g["hard_taus"]) >= 3
    assert regimes[0] == 16 and regimes[-2] == 4096 and regimes[-1] == overoptimization.STREAM
    assert all(steps // t >= 3 for t in g["soft_taus"] + g["hard_taus"])  # every TR run updates its reference


def test_regime_map_covers_every_regime_with_paired_gaps(overoptimization_run):
    payload, _ = overoptimization_run
    regimes = payload["regimes"]
    assert set(regimes["gaps"]) == set(regimes["setup"]["regimes"]) and "stream" in regimes["gaps"]
    n = len(payload["setup"]["seeds"])
    for r, gaps in regimes["gaps"].items():
        for k in payload["setup"]["kl_levels"]:
            g = gaps[f"{k:g}"]
            assert g["n"] == n and g["lo"] <= g["mean"] <= g["hi"], (r, k)
    # the N = 64 cell is the main study's runs, not a second copy of them
    assert not any(name.startswith("n=64/") for name in regimes["runs"])


def test_regime_data_pairs_methods_on_the_same_batches():
    _, tokens, _, gold, p_sft = fake_space()
    c, r, batches = overoptimization.regime_data(16, p_sft, gold, seed=0)
    assert batches is None and len(c) == 16 and (gold[c] != gold[r]).any()
    c, r, batches = overoptimization.regime_data(256, p_sft, gold, seed=0)
    epoch = [batches(s) for s in range(256 // overoptimization.BATCH)]
    assert sorted(torch.cat([b[0] for b in epoch]).tolist()) == sorted(c.tolist())  # one pass sees every pair once
    assert all((x[0] == y[0]).all() for x, y in zip(epoch, [batches(s) for s in range(4)]))  # same seed, same order
    _, _, stream = overoptimization.regime_data("stream", p_sft, gold, seed=0)
    assert (stream(3)[0] == stream(3)[0]).all() and not (stream(3)[0] == stream(4)[0]).all()
    assert len(stream(0)[0]) == overoptimization.BATCH


def fake_space():
    """A 1024-response space with a random gold reward and a uniform π_SFT, without training an SFT policy."""
    tokens, mask = common.enumerate_sequences(overoptimization.VOCAB, overoptimization.LENGTH)
    gold = torch.randn(len(tokens), generator=torch.Generator().manual_seed(0))
    return None, tokens, mask, gold, torch.full((len(tokens),), 1 / len(tokens))


def test_frontiers_pair_the_families_per_seed():
    # two seeds; static: one run, TR: two runs; (KL, gold) per evaluation
    runs = {"s": [{"kl_sft": [0, 1, 2], "gold": [0, 1, 2]}, {"kl_sft": [0, 1, 2], "gold": [0, 3, 3]}],
            "t1": [{"kl_sft": [0, 0.5, 1], "gold": [0, 2, 2.5]}, {"kl_sft": [0, 2, 4], "gold": [0, 1, 1]}],
            "t2": [{"kl_sft": [0, 3, 5], "gold": [0, 5, 5]}, {"kl_sft": [0, 1, 2], "gold": [0, 3, 4]}]}
    f = overoptimization.frontiers(runs, ["s"], ["t1", "t2"], [1.0, 2.0, 3.0])
    assert f["static_per_seed"] == [[1, 2, 2], [3, 3, 3]] and f["tr_per_seed"] == [[2.5, 2.5, 5], [3, 4, 4]]
    assert [g["mean"] for g in f["gap"]] == pytest.approx([0.75, 0.75, 2.0])
    assert f["gap"][2]["lo"] == pytest.approx(1.0) and f["gap"][2]["hi"] == pytest.approx(3.0)
    rows = overoptimization.frontier_verdicts("DPO", f, (1.0, 3.0))
    assert [r["verdict"] for r in rows] == ["not resolved", "holds"] and rows[0]["tr"]["mean"] == pytest.approx(2.75)


@pytest.mark.parametrize("run,tr,static,key", [
    ("bandit_run", "dpo/soft", "dpo/static", "logp_chosen"),
    ("sequences_run", "dpo/soft", "dpo/static", "logp_chosen"),
    ("curvature_run", "dpo/hard", "dpo/static", "beta_margin"),
    ("overoptimization_run", "dpo/soft/beta=0.1/alpha=0.6/tau={tau}", "dpo/static/beta=0.1", "kl_sft")])
def test_quick_modes_update_the_reference_and_tr_differs_from_static(run, tr, static, key, request):
    payload, _ = request.getfixturevalue(run)
    setup = payload["setup"]
    grid = setup.get("grid")  # overoptimization: a grid of τ; the other toys: one τ
    taus = [setup["tau"]] if grid is None else [*grid["soft_taus"], *grid["hard_taus"]]
    assert all(setup["steps"] // t >= 2 for t in taus)  # at least two reference updates inside every quick TR run
    tr = tr.format(tau=taus[0])
    for h_tr, h_static in zip(payload["runs"][tr], payload["runs"][static]):
        assert h_tr[key][0] == pytest.approx(h_static[key][0])  # the same start (SFT policy, data)
        assert max(abs(a - b) for a, b in zip(h_tr[key], h_static[key])) > 1e-3, (tr, key)


@pytest.mark.parametrize("run", ["bandit_run", "sequences_run", "overoptimization_run", "curvature_run"])
def test_every_toy_reports_verdicts_with_paired_cis(run, request):
    payload, on_disk = request.getfixturevalue(run)
    n = len(payload["setup"]["seeds"])
    assert payload["verdicts"] and on_disk["setup"]["ci"].startswith("percentile bootstrap over seeds")
    for row in payload["verdicts"]:
        assert row["verdict"] in ("holds", "reversed", "not resolved") and row["n"] == n, row
        assert row["lo"] <= row["mean"] + 1e-12 and row["mean"] <= row["hi"] + 1e-12, row
        assert "paired" in row["method"] or row["claim"].startswith("(a)"), row  # (a) is about static alone


def test_verdict_table_is_printed(capsys):
    d = stats.paired_diff([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    common.print_verdicts("title", [common.claim_row("(c) DPO TR − static", "gold", d, +1)])
    out = capsys.readouterr().out
    assert "title" in out and "(c) DPO TR − static" in out and "holds" in out and "n = 3 seeds" in out


def test_quick_writes_under_out_and_pairs_tr_with_static():
    assert common.parse_args(["--quick"], "").out == "out/toy-quick"
    assert common.parse_args([], "").out == "toy/figures"
    assert common.parse_args(["--quick", "--out", "x"], "").out == "x"
    assert common.static_of("dpo/soft/beta=0.1/alpha=0.6/tau=32") == "dpo/static/beta=0.1"
    assert common.static_of("n=16/kto/hard/beta=0.3/tau=8") == "n=16/kto/static/beta=0.3"
    assert common.static_of("dpo/soft/lr=0.01") == "dpo/static/lr=0.01"


def test_map_seeds_gives_the_same_results_with_a_process_pool():
    fn = functools.partial(pow, 2)
    assert common.map_seeds(fn, [1, 2, 3], workers=2) == common.map_seeds(fn, [1, 2, 3], workers=1) == [2, 4, 8]


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
    assert [stats.judge(d, +1), stats.judge(d, -1)] == ["holds", "reversed"]
    assert stats.judge({"lo": -1.0, "hi": 2.0}, +1) == "not resolved"
    m = stats.mean_ci([1.0, 1.0, 4.0])
    assert m["mean"] == 2.0 and m["n"] == 3 and 1.0 <= m["lo"] < 2.0 < m["hi"] <= 4.0
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

"""toy/: every script runs in --quick mode and writes a complete JSON and its PNG; exact-enumeration sanity checks.

Only robust properties are asserted (probabilities sum to 1, curves have the configured length, KL starts at 0 and is
non-negative, autograd matches the closed forms), never the scientific verdicts, which the README reports from the
full runs."""
import functools
import json
import math

import pytest
import torch

import numpy as np

from toy import bandit, common, curvature, overoptimization, sequences, stats, views


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
    written = {k: v for k, v in overoptimization.stored(payload).items() if k != "regimes"}  # regimes.json apart
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
    # the other two views of (c): bins (K/2, K] at the frontier's budgets, a curve form, matched KLs in 1.5–5 nats
    assert tuple(g["at_kl_bins"]) == overoptimization.KL_LEVELS and g["curve"] == "gao_rl" in stats.CURVES
    assert list(g["final_kl"]) == sorted(g["final_kl"]) and 1.5 <= min(g["final_kl"]) and max(g["final_kl"]) <= 5
    for quick in (False, True):
        g = overoptimization.setup(quick)[-1]
        assert g["curve"] in stats.CURVES and all(k > 0 for k in g["at_kl_bins"] + tuple(g["final_kl"]))


def test_overoptimization_views_of_claim_c(overoptimization_run):
    payload, on_disk = overoptimization_run
    g, n = payload["setup"]["grid"], len(payload["setup"]["seeds"])
    for views_of in (payload["views"], payload["regimes"]["views"]):
        for key, v in views_of.items():
            at, final = v["at_kl"], v["final"]
            assert at["K"] == list(g["at_kl_bins"]) and len(at["static_best_per_seed"]) == n, key
            for stat in ("best", "mean"):
                for d in at[f"gap_{stat}"]:
                    assert d is None or (2 <= d["n"] <= n and d["lo"] <= d["mean"] <= d["hi"]), key
            assert [d["K"] for d in final["gap"]] == list(g["final_kl"]) and final["form"] == g["curve"]
            assert set(final["criterion"]) == set(stats.CURVES)
            for fam in ("static", "tr"):
                c = final["curves"][fam]
                assert len(c["fit"]) == len(c["lo"]) == len(c["hi"]) == len(c["K"]) and c["fit"][0] == 0, key
                assert all(lo <= hi for lo, hi in zip(c["lo"], c["hi"])) and len(final["points"][fam]["kl"]) == n
    assert on_disk["setup"]["grid"]["curve"] == g["curve"] and not set(overoptimization.PLOTTED) & set(on_disk)


def test_replot_recomputes_the_views_from_the_json_alone(overoptimization_run, tmp_path, capsys):
    payload, on_disk = overoptimization_run
    with pytest.raises(SystemExit) as e:  # nothing to replot: a one-line error, exit 2
        overoptimization.main(["--quick", "--replot", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--replot" in capsys.readouterr().err
    for name in ("overoptimization", "regimes"):
        (tmp_path / f"{name}.json").write_text(json.dumps(on_disk if name == "overoptimization" else
                                                          common.rounded(payload["regimes"])))
    again = overoptimization.main(["--quick", "--replot", "--out", str(tmp_path)])
    assert [r["quantity"] for r in again["verdicts"]] == [r["quantity"] for r in payload["verdicts"]]
    for a, b in zip(again["verdicts"] + again["regimes"]["verdicts"],
                    payload["verdicts"] + payload["regimes"]["verdicts"]):  # the JSON's histories have 5 digits
        assert (a["mean"], a["lo"], a["hi"]) == pytest.approx((b["mean"], b["lo"], b["hi"]), rel=1e-3, abs=1e-4)


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
        assert row["verdict"] in ("holds", "reversed", "not resolved") and 2 <= row["n"] <= n, row
        assert row["n"] == n or row["quantity"].startswith("at KL"), row  # only a KL bin can miss seeds
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
    assert common.parse_args(["--replot"], "", replot=True).replot and not common.parse_args([], "", replot=True).replot
    with pytest.raises(SystemExit):  # a toy without a --replot path does not offer one
        common.parse_args(["--replot"], "")


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


def test_at_kl_takes_the_points_inside_each_bin():
    kl, gold = [0.0, 0.3, 0.5, 0.9, 1.0, 2.5], [0.0, 1.0, 2.0, 3.0, 0.5, 4.0]
    best, mean = stats.at_kl(kl, gold, [0.5, 1.0, 2.0, 4.0])  # bins (0.25, 0.5], (0.5, 1], (1, 2], (2, 4]
    assert best[[0, 1, 3]].tolist() == [2.0, 3.0, 4.0] and mean[[0, 1, 3]].tolist() == [1.5, 1.75, 4.0]
    assert math.isnan(best[2]) and math.isnan(mean[2])  # KL = 0 (π_SFT) is in no bin, (1, 2] is empty
    best, mean = stats.at_kl([[0.0, 0.6, 3.0], [0.0, 0.8, 1.5]], [[0.0, 1.0, 5.0], [0.0, 2.0, 7.0]], [1.0, 2.0])
    assert best.tolist() == [2.0, 7.0] and mean.tolist() == [1.5, 7.0]  # runs × evaluations of one family
    with pytest.raises(ValueError, match="one gold per KL"):
        stats.at_kl([0.0, 1.0], [0.0], [1.0])


def test_paired_diff_present_pairs_only_the_seeds_both_reach():
    nan = float("nan")
    d = stats.paired_diff_present([1.0, nan, 3.0, 4.0], [0.0, 1.0, nan, 2.0])  # seeds 0 and 3: differences 1, 2
    assert d["mean"] == 1.5 and d["n"] == 2 and (d["lo"], d["hi"]) == stats.bootstrap_ci([1.0, 2.0])
    assert stats.paired_diff_present([1.0, nan, 3.0, 4.0], [0.0, 1.0, nan, 2.0], min_n=3) is None


@pytest.mark.parametrize("form", sorted(stats.CURVES))
def test_curve_fit_recovers_known_parameters(form):
    rng = np.random.default_rng(0)
    kl = [rng.uniform(0.5, 30, size=6) for _ in range(5)]  # 5 seeds, 6 final checkpoints each
    gain = [stats.curve([0.8, 0.3], k, form) for k in kl]
    assert stats.fit_curve(kl, gain, form) == pytest.approx([0.8, 0.3])
    d = np.sqrt(np.array([4.0, 9.0]))
    expected = d * (0.8 - 0.3 * (d if form == "gao_bon" else np.log(d)))  # the closed forms
    assert stats.curve([0.8, 0.3], [4.0, 9.0], form) == pytest.approx(expected)
    assert stats.FORMULAS[form] == ("d(α − β·d)" if form == "gao_bon" else "d(α − β·log d)")  # as captions write it
    noisy = [g + rng.normal(0, 0.01, g.shape) for g in gain]
    assert stats.fit_curve(kl, noisy, form) == pytest.approx([0.8, 0.3], abs=0.03)
    # a band over seeds: exact data gives no spread, every resample refits the same curve
    band = stats.curve_band(kl, gain, form, [0.0, 1.0, 16.0])
    assert band["fit"] == pytest.approx(band["lo"]) and band["fit"] == pytest.approx(band["hi"])
    assert band["fit"][0] == 0 and band["n"] == 5 and (band["alpha"], band["beta"]) == pytest.approx((0.8, 0.3))
    band = stats.curve_band(kl, noisy, form, [1.0, 4.0, 16.0, 25.0])
    assert len(band["lo"]) == len(band["hi"]) == len(band["fit"]) == 4
    assert all(lo < f < hi for lo, f, hi in zip(band["lo"], band["fit"], band["hi"]))
    with pytest.raises(ValueError, match="curve form"):
        stats.fit_curve(kl, gain, "exponential")
    one_kl = stats.fit_curve([np.array([4.0, 4.0])], [np.array([1.0, 1.2])], form)  # singular: the least-norm fit
    assert np.isfinite(one_kl).all() and stats.curve(one_kl, [4.0], form)[0] == pytest.approx(1.1)


def test_paired_curve_difference_cancels_the_shared_seed_spread():
    rng = np.random.default_rng(1)
    kl = [rng.uniform(1, 20, size=4) for _ in range(6)]
    static = [np.sqrt(k) * (rng.normal(0.5, 0.3) - 0.1 * np.log(np.sqrt(k))) for k in kl]  # a seed effect on α
    tr = [g + 0.05 * np.sqrt(k) for g, k in zip(static, kl)]  # α + 0.05 on every seed
    rows = stats.paired_curve_diff(kl, tr, kl, static, "gao_rl", [4.0, 16.0])
    for row, k in zip(rows, (4.0, 16.0)):  # paired: every resample sees the same seeds in both, so no spread
        assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.05 * k ** 0.5,) * 3) and row["n"] == 6
    unpaired = stats.bootstrap_curves(kl, tr, "gao_rl", [16.0], seed=0) - stats.bootstrap_curves(
        kl, static, "gao_rl", [16.0], seed=1)
    assert np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025) > 0.1  # what pairing removes
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_curve_diff(kl, tr, kl[:5], static[:5], "gao_rl", [4.0])


def test_curve_criterion_prefers_the_true_form():
    rng = np.random.default_rng(2)
    kl = [rng.uniform(0.5, 60, size=8) for _ in range(5)]
    for true in stats.CURVES:
        gain = [stats.curve([0.3, 0.05 if true == "gao_bon" else 0.2], k, true) + rng.normal(0, 0.02, 8) for k in kl]
        sse = {form: stats.curve_criterion(kl, gain, form)["sse"] for form in stats.CURVES}
        assert min(sse, key=sse.get) == true
    # leave one seed out, by hand: two seeds, each predicted from the other's fit
    kl2, gain2 = [np.array([1.0, 4.0]), np.array([9.0, 16.0])], [np.array([1.0, 2.0]), np.array([2.0, 1.0])]
    by_hand = sum(((g - stats.curve(stats.fit_curve([kl2[1 - i]], [gain2[1 - i]], "gao_bon"), kl2[i], "gao_bon"))
                   ** 2).sum() for i, g in enumerate(gain2))
    assert stats.curve_criterion(kl2, gain2, "gao_bon") == {"sse": pytest.approx(by_hand), "n_points": 4}


def test_views_judge_only_bins_enough_seeds_reach_and_curves_inside_both_ranges():
    rng = np.random.default_rng(3)
    n = 4
    points = {fam: [(np.array([[0.0, 0.8, 1.8, 3.5 + s]]), np.array([[0.0, 1.0 + off, 2.0 + off, 2.5 + off]]))
                    for s in range(n)] for fam, off in (("static", 0.0), ("tr", 0.1))}
    at = views.at_kl_view(points, [1.0, 2.0, 4.0, 8.0])
    assert at["min_seeds"] == 2 and at["static_best_per_seed"][0] == [1.0, 2.0, 2.5, None]
    # the last KLs 3.5, 4.5, 5.5, 6.5: (2, 4] holds seed 0 only (not judged), (4, 8] seeds 1–3 (judged on them)
    assert at["gap_best"][2] is None and at["gap_best"][3]["n"] == 3
    assert [at["gap_best"][j]["mean"] for j in (0, 1, 3)] == pytest.approx([0.1, 0.1, 0.1])
    finals = {fam: [(rng.uniform(lo, hi, 5), rng.normal(0.5, 0.1, 5)) for _ in range(n)]
              for fam, lo, hi in (("static", 1.0, 10.0), ("tr", 5.0, 20.0))}
    final = views.final_view(finals, "gao_rl", [2.0, 8.0, 15.0])
    assert [g["inside"] for g in final["gap"]] == [False, True, False]  # overlap ⊂ [5, 10]
    rows = views.view_verdicts("DPO", at, final)
    assert [r["quantity"] for r in rows if r["quantity"].startswith("final")] == [
        "final checkpoints: gao_rl gain at KL 8"]
    assert sum(r["quantity"].startswith("at KL: best") for r in rows) == 3
    assert views.criterion_line([final]).endswith("(used: gao_rl)") and "gao_bon" in views.criterion_line([final])

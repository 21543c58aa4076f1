"""toy/sentiment.py: the stories260K over-optimisation experiment in --quick mode writes a complete JSON and figure.

Only robust properties are asserted (π = π_SFT at step 0, frontiers monotone in K, the matched stories decode to
text), never the verdicts, which docs/stories.md reports from the full run."""
import json
import math

import pytest

from conftest import shared_path


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("vaderSentiment", reason="vaderSentiment (requirements-dev.txt) is not installed")
    shared_path("models", "stories260K")
    from toy import sentiment
    out = tmp_path_factory.mktemp("sentiment")
    payload = sentiment.main(["--quick", "--workers", "1", "--out", str(out)])
    assert (out / "sentiment.png").stat().st_size > 10_000
    return sentiment, payload, json.loads((out / "sentiment.json").read_text())


def test_gold_reward_is_vader_sentiment(quick):
    sentiment = quick[0]
    good, bad, flat = sentiment.gold_reward(["They were happy and loved the fun day.", "He was sad and hurt.",
                                             "The box is on the table."])
    assert good > 0.5 and bad < -0.5 and flat == 0.0


def test_quick_json_is_complete_and_consistent(quick):
    sentiment, payload, on_disk = quick
    from toy import common
    assert on_disk == json.loads(json.dumps(common.rounded(payload)))
    grid = sentiment.QUICK
    points = [s for s in range(grid["steps"] + 1) if s % grid["eval_every"] == 0 or s == grid["steps"]]
    assert set(on_disk["runs"]) == set(on_disk["summary"]) == {c for c, _, _ in sentiment.cells(grid)}
    for cell, loss, _ in sentiment.cells(grid):
        by_name = on_disk["runs"][cell]
        assert set(by_name) == set(sentiment.configs(grid, loss)) and len(by_name) == 3
        start = None
        for name, histories in by_name.items():
            assert len(histories) == len(grid["seeds"]), name
            for h in histories:
                assert [p["step"] for p in h] == points, name
                assert h[0]["kl"] == pytest.approx(0, abs=1e-4) and h[0]["kl_se"] == pytest.approx(0, abs=1e-4)
                assert all(-1 <= p["gold"] <= 1 and math.isfinite(p["kl"]) and p["gold_se"] >= 0 for p in h), name
            start = start or [h[0]["gold"] for h in histories]
            assert [h[0]["gold"] for h in histories] == start  # every run of a seed starts from the same π_SFT samples
        rows = on_disk["summary"][cell]["frontier"]
        assert [r["K"] for r in rows] == grid["kl_grid"]
        for fam in ("static", "tr"):  # best gold at KL ≤ K can only grow with K, and never falls below π_SFT's
            values = [r[fam] for r in rows]
            assert values == sorted(values) and values[0] >= sum(start) / len(start) - 1e-4  # JSON: 5 digits
        assert all(r["diff"]["lo"] <= r["diff"]["mean"] <= r["diff"]["hi"] and r["diff"]["n"] == len(grid["seeds"])
                   for r in rows)
        at, final = on_disk["summary"][cell]["at_kl"], on_disk["summary"][cell]["final"]  # the other two views
        assert at["K"] == grid["at_kl_bins"] and [g["K"] for g in final["gap"]] == grid["final_kl"]
        n_tr = sum(map(sentiment.is_tr, sentiment.configs(grid, loss)))  # one final checkpoint per TR run and seed
        assert final["form"] == grid["curve"]
        assert [len(k) for k in final["points"]["tr"]["kl"]] == [n_tr] * len(grid["seeds"])
    rows = on_disk["verdicts"]
    assert rows and all(r["verdict"] in ("holds", "reversed", "not resolved") for r in rows)
    assert any(r["quantity"].startswith("at KL") for r in rows)
    assert {k: on_disk["setup"][k] for k in ("at_kl_bins", "final_kl", "curve")} == {
        k: grid[k] for k in ("at_kl_bins", "final_kl", "curve")}


def test_replot_redraws_from_the_json(quick, tmp_path):
    sentiment, payload, on_disk = quick
    with pytest.raises(SystemExit) as e:
        sentiment.main(["--quick", "--replot", "--out", str(tmp_path)])
    assert e.value.code == 2
    (tmp_path / "sentiment.json").write_text(json.dumps(on_disk))
    again = sentiment.main(["--quick", "--replot", "--out", str(tmp_path)])
    assert again["runs"] == on_disk["runs"] and len(again["verdicts"]) == len(on_disk["verdicts"])
    for a, b in zip(again["verdicts"], on_disk["verdicts"]):  # the same statistics from the JSON's 5-digit histories
        assert a["quantity"] == b["quantity"] and a["verdict"] == b["verdict"]
        assert (a["mean"], a["lo"], a["hi"]) == pytest.approx((b["mean"], b["lo"], b["hi"]), rel=1e-3, abs=1e-4)
    assert (tmp_path / "sentiment.png").stat().st_size > 10_000


def test_matched_stories_are_decoded_text(quick):
    sentiment, _, on_disk = quick
    stories = on_disk["stories"]
    assert list(stories) == ["SFT", "DPO", "TR-DPO"] and stories["SFT"]["kl"] == pytest.approx(0, abs=1e-4)
    for s in stories.values():
        assert len(s["texts"]) == 3
        assert all(t.startswith(" " + o) and len(t) > len(o) + 10 for t, o in zip(s["texts"], sentiment.OPENINGS))


def test_the_full_grid_sweeps_both_families_equally():
    """Static over a β grid from 0.03 to 1, TR over soft α × τ and hard τ, two dataset sizes for every loss, 5 seeds,
    and as many configurations per family (a noisy frontier is a max over evaluations: more runs, more lucky tries)."""
    pytest.importorskip("vaderSentiment", reason="vaderSentiment (requirements-dev.txt) is not installed")
    from toy import sentiment
    grid = sentiment.FULL
    assert len(grid["seeds"]) >= 5 and len(grid["betas"]) >= 4 and min(grid["betas"]) < 0.1 < max(grid["betas"])
    assert len({a for a, _ in grid["soft"]}) >= 2 and len({t for _, t in grid["soft"]}) >= 2 and len(grid["hard"]) >= 2
    assert all(len(sizes) >= 2 for sizes in grid["sizes"].values()) and set(grid["sizes"]) == {"dpo", "ipo", "kto"}
    for loss in grid["sizes"]:
        names = sentiment.configs(grid, loss)
        assert sum(map(sentiment.is_tr, names)) == sum(not sentiment.is_tr(n) for n in names)
    # the other two views: bins (K/2, K] from 2 nats past the frontier's last budget, a curve form, matched KLs
    from toy import stats
    assert grid["at_kl_bins"] == sorted(grid["at_kl_bins"]) and grid["at_kl_bins"][0] == 2
    assert max(grid["at_kl_bins"]) > max(grid["kl_grid"]) and 32 in grid["at_kl_bins"]
    assert grid["curve"] == "gao_rl" in stats.CURVES and grid["final_kl"] == sorted(grid["final_kl"])

"""winrates.py: the win-rate, length-control and bootstrap maths against independent computations (scikit-learn and
SciPy as dev-only references, or the resamples drawn directly)."""
import numpy as np
import pytest

import winrates


def test_win_counts_ties_as_half():
    assert winrates.win([1, 2, 3], [2, 2, 2]).tolist() == [0.0, 0.5, 1.0]


def test_distinct_n_over_words():
    assert winrates.distinct(["a b a", "b a"], 1) == (2 / 5, 1.0)
    assert winrates.distinct(["a b a", "b a"], 2) == (2 / 3, 1.0)  # (a b), (b a), (b a)
    assert winrates.distinct(["a", ""], 2) == (0.0, 0.0)  # no bigram: left out of the mean


def sklearn_fit(x, y, w):
    """scikit-learn's unpenalised logistic regression (C = ∞, formerly penalty=None); a tie (y = ½) is a win and a
    loss of half the weight each."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    tie = y == 0.5
    xs = np.concatenate([x[~tie], x[tie], x[tie]])[:, None]
    ys = np.concatenate([y[~tie], np.ones(tie.sum()), np.zeros(tie.sum())])
    ws = np.concatenate([w[~tie], w[tie] / 2, w[tie] / 2])
    m = linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(xs, ys, sample_weight=ws)
    return m.intercept_[0], m.coef_[0, 0]


def test_logistic_fit_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = np.where(rng.random(300) < 1 / (1 + np.exp(-(0.3 + 1.5 * x))), 1.0, 0.0)
    y[rng.random(300) < 0.2] = 0.5  # ties
    w = rng.integers(0, 4, size=300).astype(float)  # bootstrap counts, zeros included
    b = winrates.logistic_fit(x, y, np.vstack([np.ones(300), w]))
    for row, weights in zip(b, (np.ones(300), w)):
        np.testing.assert_allclose(row, sklearn_fit(x, y, weights), rtol=1e-5, atol=1e-7)


def test_length_controlled_win_rate_matches_sklearn_and_its_resamples():
    """σ(b0) of the fit on tanh(Δlen / std) is the length-controlled win rate; its CI is the percentile interval of
    the same fit on each bootstrap resample (prompts drawn with replacement, a prompt's K pairs together)."""
    rng = np.random.default_rng(1)
    n, K, B = 40, 3, 30
    dlen = rng.normal(30, 50, size=(1, n, K))  # the policy writes longer
    y = (rng.random((1, n, K)) < 1 / (1 + np.exp(-dlen / 40))).astype(float)  # longer wins more often
    cp = winrates.resample_counts(n, B, np.random.default_rng(2))
    got = winrates.length_controlled(y, dlen, np.ones((B, 1)), cp)
    x = np.tanh(dlen / dlen.std()).ravel()
    fits = [sklearn_fit(x, y.ravel(), np.repeat(c, K)) for c in [np.ones(n), *cp]]
    lc = [1 / (1 + np.exp(-b0)) for b0, _ in fits]
    assert got["value"] == pytest.approx(lc[0], abs=1e-6)
    np.testing.assert_allclose(got["ci"], np.percentile(lc[1:], [2.5, 97.5]), atol=1e-6)
    assert got["value"] < y.mean()  # the longer responses' wins are discounted: at equal length fewer win


def test_ratio_bootstrap_equals_resamples_drawn_directly():
    """A crossed bootstrap over seeds and prompts: each resample draws S seeds and n prompts with replacement."""
    rng = np.random.default_rng(3)
    S, n, B = 3, 12, 200
    N, D = rng.normal(size=(S, n)), rng.integers(1, 5, size=(S, n)).astype(float)
    cs = winrates.resample_counts(S, B, np.random.default_rng(10))
    cp = winrates.resample_counts(n, B, np.random.default_rng(11))
    seeds = np.random.default_rng(10).integers(0, S, size=(B, S))
    prompts = np.random.default_rng(11).integers(0, n, size=(B, n))
    direct = [N[np.ix_(s, p)].sum() / D[np.ix_(s, p)].sum() for s, p in zip(seeds, prompts)]
    got = winrates.ratio_stat(N, D, cs, cp)
    assert got["value"] == pytest.approx(N.sum() / D.sum())
    np.testing.assert_allclose(got["ci"], np.percentile(direct, [2.5, 97.5]), rtol=1e-12)


def test_ratio_bootstrap_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    n, B = 60, 20_000
    x, d = rng.normal(size=n), rng.integers(1, 6, size=n).astype(float)
    cp = winrates.resample_counts(n, B, np.random.default_rng(5))
    ones = np.ones((B, 1))
    mean = winrates.ratio_stat(x[None], np.ones((1, n)), ones, cp)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=B, random_state=0).confidence_interval
    np.testing.assert_allclose(mean["ci"], [ref.low, ref.high], atol=0.02)  # Monte Carlo error of two bootstraps
    ratio = winrates.ratio_stat(x[None], d[None], ones, cp)  # per-token quantities: Σ N / Σ D, N and D paired
    ref = stats.bootstrap((x, d), lambda a, b: a.sum() / b.sum(), paired=True, vectorized=False, method="percentile",
                          n_resamples=B // 4, random_state=0).confidence_interval
    np.testing.assert_allclose(ratio["ci"], [ref.low, ref.high], atol=0.01)

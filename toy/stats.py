"""Statistics for the toy studies: bootstrap CIs over seeds, paired differences, and gold-vs-KL frontiers.

Seeds are the unit of replication: a run's data, SFT policy and initialisation all come from its seed, so the honest
comparison of two methods is their *paired* difference on the same seeds (the seed-to-seed spread, shared by both,
cancels). All resampling uses a fixed numpy seed, so every CI in a JSON is reproducible bit for bit. numpy only.
"""
import numpy as np


def _finite_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"toy/stats.py: {name} must be a non-empty 1-D array of finite numbers, got {a.tolist()!r}")
    return a


def bootstrap_means(x, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """n_boot means of x resampled with replacement (same n): the bootstrap distribution of mean(x)."""
    a = _finite_1d(x, "x")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    return a[idx].mean(axis=1)


def bootstrap_ci(x, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x); x is 1-D over seeds. A constant x gives (c, c)."""
    if not 0 < level < 1:
        raise ValueError(f"toy/stats.py: level must be in (0, 1), got {level}")
    lo, hi = np.quantile(bootstrap_means(x, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(x, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> dict:
    """mean(x) with its percentile bootstrap CI, in paired_diff's layout (for one-method claims such as "falls")."""
    a = _finite_1d(x, "x")
    lo, hi = bootstrap_ci(a, level, n_boot, seed)
    return {"mean": float(a.mean()), "lo": lo, "hi": hi, "n": int(a.size),
            "method": f"percentile bootstrap over seeds, {n_boot} resamples"}


def paired_diff(a, b, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> dict:
    """mean(a − b) with its percentile bootstrap CI, a[i] and b[i] measured on the same seed i."""
    a, b = _finite_1d(a, "a"), _finite_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"toy/stats.py: paired_diff needs one value per seed in both, got {a.size} and {b.size}")
    d = a - b
    lo, hi = bootstrap_ci(d, level, n_boot, seed)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "n": int(d.size),
            "method": f"paired percentile bootstrap over seeds, {n_boot} resamples"}


def verdict(diff: dict, what: str = "TR") -> str:
    """Words for a paired_diff of TR − static: better / worse when the CI excludes 0, else no resolved difference."""
    if diff["lo"] > 0:
        return f"{what} higher"
    if diff["hi"] < 0:
        return f"{what} lower"
    return "no resolved difference"


def judge(diff: dict, expected: int) -> str:
    """A claim's verdict from a CI: "holds" when it excludes 0 on the expected side (+1 or −1), "reversed" when it
    excludes 0 on the other side, "not resolved" when it contains 0."""
    lo, hi = diff["lo"] * expected, diff["hi"] * expected
    lo, hi = min(lo, hi), max(lo, hi)
    return "holds" if lo > 0 else "reversed" if hi < 0 else "not resolved"


def frontier(kl, gold, grid) -> np.ndarray:
    """For each K in grid: max gold over the points with kl ≤ K (nan if none). kl and gold are matching arrays of
    any shape (e.g. runs × evaluations of one method family), flattened: the best gold the family reaches within KL K
    over all of its hyper-parameters and training times."""
    k, g = np.asarray(kl, dtype=float).ravel(), np.asarray(gold, dtype=float).ravel()
    if k.shape != g.shape:
        raise ValueError(f"toy/stats.py: frontier needs one gold per KL, got {k.size} and {g.size}")
    order = np.argsort(k, kind="stable")
    k, best = k[order], np.maximum.accumulate(g[order]) if g.size else g
    n_within = np.searchsorted(k, np.asarray(grid, dtype=float), side="right")  # points with kl ≤ K
    return np.where(n_within > 0, best[np.maximum(n_within - 1, 0)] if best.size else np.nan, np.nan)

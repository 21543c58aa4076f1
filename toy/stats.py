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


def resample_seeds(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_seeds) seed indices drawn with replacement. Every bootstrap here draws through this, so two
    statistics resampled with the same (n_seeds, n_boot, seed) see the same resampled seeds: a paired bootstrap."""
    return np.random.default_rng(seed).integers(0, n_seeds, size=(n_boot, n_seeds))


def percentile_ci(boot: np.ndarray, level: float) -> np.ndarray:
    """(lo, hi) percentile interval of a bootstrap distribution, resamples along axis 0."""
    if not 0 < level < 1:
        raise ValueError(f"toy/stats.py: level must be in (0, 1), got {level}")
    return np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)


def bootstrap_means(x, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """n_boot means of x resampled with replacement (same n): the bootstrap distribution of mean(x)."""
    a = _finite_1d(x, "x")
    return a[resample_seeds(a.size, n_boot, seed)].mean(axis=1)


def bootstrap_ci(x, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x); x is 1-D over seeds. A constant x gives (c, c)."""
    lo, hi = percentile_ci(bootstrap_means(x, n_boot, seed), level)
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


def paired_diff_present(a, b, min_n: int = 2, **kw) -> dict | None:
    """paired_diff over the seeds where both a[i] and b[i] are defined (not nan); None when fewer than min_n seeds
    are: a view that has no point in a KL bin on a seed says nothing about that seed."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"toy/stats.py: paired_diff needs one value per seed in both, got {a.size} and {b.size}")
    both = np.isfinite(a) & np.isfinite(b)
    return paired_diff(a[both], b[both], **kw) if both.sum() >= min_n else None


# ---- gold at KL: the evaluations inside a KL bin ----

def at_kl(kl, gold, bins) -> tuple[np.ndarray, np.ndarray]:
    """For each K in bins: (the best, the mean) gold over the points with K/2 < kl ≤ K (nan where none). kl and gold
    are matching arrays of any shape (runs × evaluations of one family on one seed), flattened. Unlike the frontier
    (kl ≤ K), a bin holds only what a family reaches *at* that KL, so a family that only passes through early gets
    no credit there for its earlier, better points."""
    k, g = np.asarray(kl, dtype=float).ravel(), np.asarray(gold, dtype=float).ravel()
    if k.shape != g.shape:
        raise ValueError(f"toy/stats.py: at_kl needs one gold per KL, got {k.size} and {g.size}")
    best, mean = [], []
    for K in np.asarray(bins, dtype=float):
        inside = g[(k > K / 2) & (k <= K)]
        best.append(inside.max() if inside.size else np.nan)
        mean.append(inside.mean() if inside.size else np.nan)
    return np.array(best), np.array(mean)


# ---- final checkpoints: a gold-vs-KL curve through each run's last evaluation ----

def _d_log_d(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


# gain(d) = gold(d) − gold(π_SFT), d = √KL(π‖π_SFT), linear in the parameters (α, β): the two forms of Gao, Schulman &
# Hilton 2022, "Scaling laws for reward model overoptimization". Each maps d to the design row of (α, β).
CURVES = {
    "gao_bon": lambda d: np.stack([d, -d * d], -1),  # d(α − β·d): best-of-n sampling
    "gao_rl": lambda d: np.stack([d, -_d_log_d(d)], -1),  # d(α − β·log d): RL (gradient) optimisation
}
FORMULAS = {"gao_bon": "d(α − β·d)", "gao_rl": "d(α − β·log d)"}  # each form as the figures' captions write it


def _design(kl, form: str) -> np.ndarray:
    if form not in CURVES:
        raise ValueError(f"toy/stats.py: curve form must be one of {sorted(CURVES)}, got {form!r}")
    return CURVES[form](np.sqrt(np.maximum(np.asarray(kl, dtype=float), 0.0)))  # a sampled KL can be < 0 near 0


def curve(params, kl, form: str) -> np.ndarray:
    """The fitted gain at each kl; params (α, β) or a stack of them (..., 2) gives (..., len(kl))."""
    return np.asarray(params, dtype=float) @ _design(np.atleast_1d(kl), form).T


def _seed_sums(kl: list, gain: list, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Per seed the least-squares sums XᵀX (seeds, 2, 2) and Xᵀy (seeds, 2): a fit over any multiset of seeds is the
    solve of their weighted sums, so a bootstrap over seeds costs one batched 2 × 2 solve."""
    if len(kl) != len(gain) or not kl:
        raise ValueError(f"toy/stats.py: one KL and one gain list per seed, got {len(kl)} and {len(gain)}")
    xtx, xty = [], []
    for k, g in zip(kl, gain):
        x, y = _design(_finite_1d(k, "kl"), form), _finite_1d(g, "gain")
        if len(x) != len(y):
            raise ValueError(f"toy/stats.py: one gain per KL, got {len(x)} and {len(y)}")
        xtx.append(x.T @ x)
        xty.append(x.T @ y)
    return np.array(xtx), np.array(xty)


def _solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """(α, β) from the 2 × 2 normal equations, any batch shape: Cramer's rule, and the pseudo-inverse (the least-norm
    solution) where the system is singular, e.g. a resample whose points all sit at one KL."""
    a, b, c, d = xtx[..., 0, 0], xtx[..., 0, 1], xtx[..., 1, 0], xtx[..., 1, 1]
    det = a * d - b * c
    singular = np.abs(det) <= 1e-12 * np.maximum(np.abs(a * d), 1e-300)
    safe = np.where(singular, 1.0, det)
    out = np.stack([(d * xty[..., 0] - b * xty[..., 1]) / safe, (a * xty[..., 1] - c * xty[..., 0]) / safe], -1)
    if singular.any():
        out[singular] = (np.linalg.pinv(xtx[singular]) @ xty[singular][..., None])[..., 0]
    return out


def fit_curve(kl: list, gain: list, form: str) -> np.ndarray:
    """Least-squares (α, β) of gain = form(√KL) over every point of every seed (kl, gain: one list per seed)."""
    xtx, xty = _seed_sums(kl, gain, form)
    return _solve(xtx.sum(0), xty.sum(0))


def _seed_counts(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_seeds): how often each seed is drawn in each resample of resample_seeds."""
    idx = resample_seeds(n_seeds, n_boot, seed)
    flat = (np.arange(n_boot)[:, None] * n_seeds + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n_seeds).reshape(n_boot, n_seeds).astype(float)


def bootstrap_curves(kl: list, gain: list, form: str, grid, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """(n_boot, len(grid)): the curve refitted on seeds resampled with replacement (all points of a seed together),
    evaluated at the KLs of grid."""
    xtx, xty = _seed_sums(kl, gain, form)
    w = _seed_counts(len(kl), n_boot, seed)
    params = _solve(np.einsum("bs,sij->bij", w, xtx), w @ xty)
    return curve(params, grid, form)


def curve_band(kl: list, gain: list, form: str, grid, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
               ) -> dict:
    """The fit on all seeds and its percentile bootstrap band over seeds at the KLs of grid."""
    boot = bootstrap_curves(kl, gain, form, grid, n_boot, seed)
    lo, hi = percentile_ci(boot, level)
    params = fit_curve(kl, gain, form)
    return {"form": form, "alpha": float(params[0]), "beta": float(params[1]), "K": [float(k) for k in grid],
            "fit": curve(params, grid, form).tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "n": len(kl),
            "method": f"least squares; percentile bootstrap over seeds, {n_boot} resamples"}


def paired_curve_diff(kl_a: list, gain_a: list, kl_b: list, gain_b: list, form: str, grid, level: float = 0.95,
                      n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """curve_a − curve_b at each KL of grid, both fitted on the same resampled seeds (a[i], b[i] from seed i), in
    paired_diff's layout: the estimate from all seeds and its percentile CI."""
    if len(kl_a) != len(kl_b):
        raise ValueError(f"toy/stats.py: paired curves need the same seeds, got {len(kl_a)} and {len(kl_b)}")
    boot = (bootstrap_curves(kl_a, gain_a, form, grid, n_boot, seed)
            - bootstrap_curves(kl_b, gain_b, form, grid, n_boot, seed))
    lo, hi = percentile_ci(boot, level)
    est = curve(fit_curve(kl_a, gain_a, form), grid, form) - curve(fit_curve(kl_b, gain_b, form), grid, form)
    return [{"K": float(k), "mean": float(m), "lo": float(l), "hi": float(h), "n": len(kl_a),
             "method": f"paired percentile bootstrap over seeds of the fitted curves ({form}), {n_boot} resamples"}
            for k, m, l, h in zip(grid, est, lo, hi)]


def curve_criterion(kl: list, gain: list, form: str) -> dict:
    """Leave-one-seed-out prediction error of a form: fit on all seeds but one, predict that seed's points. The held
    out seed is new data, so a form that bends to noise pays for it; forms with equal parameter counts compare fairly.
    Returns the sum of squared errors and the number of points (sums pool over families and cells)."""
    xtx, xty = _seed_sums(kl, gain, form)
    sse = 0.0
    for i, (k, g) in enumerate(zip(kl, gain)):
        params = _solve(xtx.sum(0) - xtx[i], xty.sum(0) - xty[i])
        sse += float(((np.asarray(g, dtype=float) - curve(params, k, form)) ** 2).sum())
    return {"sse": sse, "n_points": int(sum(len(g) for g in gain))}

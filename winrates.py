"""The statistics of judging runs side by side (evaluate.py): win rates with ties counted ½, AlpacaEval 2's
length-controlled win rate (a logistic fit on tanh of the length difference, written here), distinct-n, and a paired
bootstrap over prompts (and over seeds) that puts a 95% CI on each. Pure functions of numpy arrays; the formulas are
in docs/evaluation.md."""
import numpy as np


# ----------------------------------------------------------------------------------------------------------------------
# statistics: a paired bootstrap over prompts (one draw shared by every quantity) and, with several seeds, over seeds
# (a crossed design: the same prompts for every seed); a resample is a weight per prompt and per seed (how often it
# was drawn), so every statistic below is a weighted sum: Σ_sp c_s c_p N_sp / Σ_sp c_s c_p D_sp


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) how often each of n units is drawn in each resample (n draws with replacement)."""
    draws = rng.integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)


def percentile_ci(boot: np.ndarray) -> list[float | None]:
    """The 2.5 and 97.5 percentiles of the resamples that have a value (a ratio over no prompt has none)."""
    boot = boot[np.isfinite(boot)]
    return [float(x) for x in np.percentile(boot, [2.5, 97.5])] if len(boot) else [None, None]


def ratio_stat(N: np.ndarray, D: np.ndarray, cs: np.ndarray, cp: np.ndarray) -> dict:
    """Σ N / Σ D over seeds × prompts (N, D: (S, n)) and its bootstrap 95% CI (cs (B, S), cp (B, n) counts)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.einsum("bs,bp,sp->b", cs, cp, N) / np.einsum("bs,bp,sp->b", cs, cp, D)
    return {"value": float(N.sum() / D.sum()) if D.sum() else None, "ci": percentile_ci(boot)}


def win(a, b) -> np.ndarray:
    """1 if a's score beats b's, ½ for a tie, 0 otherwise."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return (a > b) + 0.5 * (a == b)


def logistic_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, iters: int = 100) -> np.ndarray:
    """Maximum-likelihood (b0, b1) of P(win) = σ(b0 + b1·x) for targets y in [0, 1] (a tie, ½, is half a win) and
    example weights w (B, m): B fits at once, by Newton's method (IRLS): b ← b + H⁻¹ Xᵀ w (y − p), H = Xᵀ diag(w p
    (1−p)) X. Returns (B, 2). Separable data drives b0 to ±∞, σ(b0) to 0 or 1: the fit stops at |b| = 30."""
    X = np.stack([np.ones_like(x), x], -1)  # (m, 2)
    b = np.zeros((w.shape[0], 2))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(b @ X.T, -30, 30)))
        grad = (w * (y - p)) @ X
        H = np.einsum("bm,mi,mj->bij", w * p * (1 - p), X, X) + 1e-12 * np.eye(2)
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        b = np.clip(b + step, -30, 30)
        if np.abs(step).max() < 1e-10:
            break
    return b


def length_controlled(y: np.ndarray, dlen: np.ndarray, cs: np.ndarray, cp: np.ndarray) -> dict:
    """AlpacaEval 2's length control, with length alone: fit P(win) = σ(b0 + b1·tanh(Δlen / scale)) to the win
    indicators y (S, n, K) with Δlen the length difference in characters (policy − opponent), scale = its standard
    deviation; the length-controlled win rate is σ(b0), the win probability at equal length."""
    scale = dlen.std() or 1.0
    x, yy = np.tanh(dlen / scale).ravel(), y.ravel()
    S, n, K = y.shape
    w = np.einsum("bs,bp->bsp", np.vstack([np.ones(S), cs]), np.vstack([np.ones(n), cp]))
    b = logistic_fit(x, yy, np.repeat(w.reshape(len(w), -1), K, axis=1))[:, 0]
    lc = 1 / (1 + np.exp(-b))
    return {"value": float(lc[0]), "ci": percentile_ci(lc[1:]), "scale_chars": float(scale)}


def distinct(texts: list[str], n: int) -> tuple[float, float]:
    """(distinct n-grams of words over the K samples / all their n-grams, 1 if they have any n-gram else 0)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return (len(set(grams)) / len(grams), 1.0) if grams else (0.0, 0.0)

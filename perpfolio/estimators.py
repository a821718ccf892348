"""Rolling moments of per-bar net returns: mean, covariance, downside risk, semicovariance.

``rolling_moments`` gives the sample estimator; ``rolling_estimates`` gives every named estimator
of ``ESTIMATORS`` (sample, ewma, ledoit_wolf, oas, factor, shrinkage) in one batched pass, with
one window length or one per window (regime resets); ``walk_forward_cv`` scores window lengths
and EWMA half-lives by the out-of-sample Gaussian log-likelihood of the next bars.

Window ``k`` holds the ``window`` bars ending at (and including) row ``ends[k]``, the bar opened
at ``asof``: only data at or before ``asof`` is ever used. Inputs are per-bar returns (simple or
log, as ``perpfolio.returns.net_returns`` built them); outputs are per bar until ``annualize``
multiplies them by ``periods_per_year``, the one place where rescaling happens.

NaN policy. A NaN is a missing one-bar return (not listed yet, delisted, an outage, or the
return that spans a gap). Without ``members`` every symbol is required: a window that holds a NaN
in any symbol, starts before the first row, or has a constant symbol gets a status other than
"ok" and all-NaN arrays: never a partial estimate, never a zero-filled one. With ``members``
(the point-in-time universe of ``perpfolio.universe``) each window is estimated on its members
only, over the rows where all of them have a return (at most ``max_missing`` rows skipped); the
other symbols are NaN.

Windows are gathered into stacks (one per member set and row count) and computed by batched
matrix products (two-pass, centred: robust for calm windows after volatile history), in chunks of
``_CHUNK`` windows so memory stays at ``_CHUNK * window * N`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pyarrow as pa

from perpfolio.errors import ConfigError, DataError

STATUSES = ("ok", "insufficient_history", "missing_data", "degenerate")
_STATUS_DTYPE = "<U20"
_CHUNK = 64
_VECTORS = ("mean", "downside")
_MATRICES = ("cov", "semicov")
QUANTITIES = _VECTORS + _MATRICES  # the array columns of features.estimates
ESTIMATE_COLUMNS = ("as_of", "estimator", "symbols", "mean", "downside", "cov", "semicov", "window_bars", "n_obs", "status")  # features.estimates


@dataclass(frozen=True, repr=False)
class Moments:
    """Moments of K windows over N symbols; per-BAR units unless passed through ``annualize``.

    mean      K x N      sample mean of the window
    cov       K x N x N  sample covariance, divides by ``window - ddof`` (ddof=1 by default)
    downside  K x N      ``D_i = mean(min(0, r_i - tau)^2)``, divides by ``window``
    semicov   K x N x N  ``mean(min(0, r - tau) min(0, r - tau)^T)``, divides by ``window``; PSD
    n_obs     K ints     complete bars (every symbol finite) in the window; ``window`` when ok
    status    K str      "ok" | "insufficient_history" | "missing_data" | "degenerate";
                         non-"ok" windows hold NaN in every array and must not reach a solver.
    """

    mean: np.ndarray
    cov: np.ndarray
    downside: np.ndarray
    semicov: np.ndarray
    n_obs: np.ndarray
    status: np.ndarray

    def __post_init__(self) -> None:
        k, n = self.mean.shape
        shapes = {"cov": (k, n, n), "downside": (k, n), "semicov": (k, n, n), "n_obs": (k,), "status": (k,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise DataError(f"Moments.{name} has shape {getattr(self, name).shape}, expected {shape}")
        unknown = set(self.status.tolist()) - set(STATUSES)
        if unknown:
            raise DataError(f"Moments.status holds unknown values {sorted(unknown)}; expected {STATUSES}")

    def __repr__(self) -> str:
        k, n = self.mean.shape
        counts = dict(zip(*np.unique(self.status, return_counts=True)))
        return f"Moments(windows={k}, symbols={n}, status={ {str(s): int(c) for s, c in counts.items()} })"


def to_datetime64(values) -> np.ndarray:
    """UTC ``datetime64[us]`` array from datetime64 values, a polars Datetime series or Python
    datetimes (tz-aware ones are converted to UTC, naive ones are taken to be UTC)."""
    if isinstance(values, pl.Series):
        if not isinstance(values.dtype, pl.Datetime):
            raise DataError(f"timestamps must be Datetime, got a {values.dtype} series")
        utc = values.dt.convert_time_zone("UTC") if values.dtype.time_zone else values
        return utc.dt.cast_time_unit("us").to_numpy()
    array = np.asarray(values)
    if array.dtype.kind == "M":
        return array.astype("datetime64[us]")
    if array.dtype == object and all(isinstance(v, datetime) for v in array.ravel()):
        naive = [v.astimezone(timezone.utc).replace(tzinfo=None) if v.tzinfo else v for v in array.ravel()]
        return np.array(naive, dtype="datetime64[us]").reshape(array.shape)
    raise DataError(f"timestamps must be datetime64 or datetime values, got dtype {array.dtype}")


def window_ends(ts: np.ndarray, asofs: np.ndarray) -> np.ndarray:
    """Row index ``e`` with ``ts[e] == asof`` for every asof (``ts`` strictly increasing, UTC).

    Raises ``DataError`` naming the first asof that is not a bar of ``ts``.
    """
    ts = to_datetime64(ts)
    asofs = to_datetime64(asofs)
    if ts.size > 1 and np.any(np.diff(ts) <= np.timedelta64(0, "us")):
        row = int(np.flatnonzero(np.diff(ts) <= np.timedelta64(0, "us"))[0]) + 1
        raise DataError(f"window_ends: ts must be strictly increasing; row {row} ts={ts[row]} follows {ts[row - 1]}")
    idx = np.searchsorted(ts, asofs)
    found = idx < ts.size
    found[found] = ts[idx[found]] == asofs[found]
    if not found.all():
        raise DataError(f"window_ends: asof {asofs[~found][0]} is not a bar ts of the returns")
    return idx.astype(np.int64)


def rolling_moments(
    returns: np.ndarray, ends: np.ndarray, *, window: int, ddof: int = 1, tau: float = 0.0
) -> Moments:
    """Sample moments over the ``window`` bars ending at each row of ``ends``. Per-bar units.

    For window ``W_k = returns[ends[k] - window + 1 : ends[k] + 1]`` (T_w = ``window`` rows):
    ``mean = sum(r) / T_w``; ``cov = sum((r - mean)(r - mean)^T) / (T_w - ddof)``;
    ``z = min(0, r - tau)``, ``semicov = sum(z z^T) / T_w`` and ``downside = diag(semicov)``
    (``D_i = mean(min(0, r_i - tau)^2)``). ``tau`` is a per-bar return threshold.

    ``returns``: ``T x N`` per-bar returns, NaN = missing bar. ``ends[k] = -1`` means no bar at or
    before the asof. Status per window: "insufficient_history" if it would start before row 0,
    else "missing_data" if it holds a NaN, else "degenerate" if a symbol is constant in it, else
    "ok". Non-ok windows are all NaN. This is the ``sample`` estimator of ``rolling_estimates``
    with every symbol required (no ``members``, no missing bar allowed).
    cov and semicov are symmetrized exactly; semicov is PSD by construction (also when N > T_w).
    """
    return rolling_estimates(returns, ends, window=window, estimators=("sample",), ddof=ddof, tau=tau)["sample"]


ESTIMATORS: dict[str, tuple[str, str]] = {
    "sample": ("sample", "sample"),
    "ewma": ("ewma", "ewma"),
    "ledoit_wolf": ("sample", "ledoit_wolf"),
    "oas": ("sample", "oas"),
    "factor": ("sample", "factor"),
    "shrinkage": ("shrunk", "ledoit_wolf"),
}
"""Named estimators: name -> (mean method, covariance method). A strategy picks one by name."""

MEAN_METHODS = ("sample", "ewma", "shrunk")
COV_METHODS = ("sample", "ewma", "ledoit_wolf", "oas", "factor")


def ewma_weights(window: int, half_life: float) -> np.ndarray:
    """Normalized EWMA weights of a window, oldest bar first: ``a_s = lam^(window-1-s) / sum(lam^j)``.

    ``lam = 2^(-1/half_life)`` (``half_life`` in bars; the weight halves every ``half_life`` bars
    into the past). These are the weights of the recursion ``S_t = lam S_{t-1} + (1 - lam) x_t``
    started at the first bar of the window, renormalized so they sum to 1 exactly.
    ``half_life = inf`` gives equal weights (the sample estimator).
    """
    return age_weights(np.arange(window - 1, -1, -1), half_life)


def age_weights(ages: np.ndarray, half_life: float) -> np.ndarray:
    """Normalized EWMA weights ``a_s = lam^(age_s) / sum_j lam^(age_j)`` over the last axis, ``lam =
    2^(-1/half_life)``; ``ages`` in bars before the window's last bar. With the ages of the bars a
    window actually has, a missing bar still counts as a bar of decay (weights by calendar age)."""
    if not (isinstance(half_life, (int, float, np.floating, np.integer)) and half_life > 0) or np.isnan(half_life):
        raise ConfigError(f"half_life must be a number > 0 (bars), got {half_life!r}")
    lam = 2.0 ** (-1.0 / half_life)
    raw = lam ** np.asarray(ages, dtype=np.float64)
    return raw / raw.sum(axis=-1, keepdims=True)


def rolling_estimates(
    returns: np.ndarray,
    ends: np.ndarray,
    *,
    window: int | np.ndarray,
    estimators: tuple[str, ...] | list[str] = tuple(ESTIMATORS),
    ddof: int = 1,
    tau: float = 0.0,
    half_life: float = 168.0,
    n_factors: int = 1,
    market_factor: str = "mean",
    members: np.ndarray | None = None,
    max_missing: int = 0,
) -> dict[str, Moments]:
    """Every named estimator of ``ESTIMATORS`` over the windows ending at ``ends``. Per-bar units.

    ``window``: one length for all windows, or one per window (``len(ends)`` ints, e.g. shortened
    after a regime change). ``members`` (K x N bools, default all True) are the symbols each
    window is estimated on (the point-in-time universe, ``perpfolio.universe``); the others get
    NaN in every array. A window uses its COMPLETE bars: the rows of ``[e - L + 1, e]`` where every
    member has a finite return (``T_w`` of them, ``n_obs``); at most ``max_missing`` rows may be
    incomplete (default 0: a NaN in any member makes the window "missing_data"). Windows with the
    same members and ``T_w`` are batched. One pass per chunk of windows computes the centred Gram
    matrix ``X^T X`` (``X = W - mean``) and the downside product ``Z^T Z`` (``Z = min(W - tau, 0)``)
    once and derives every estimator from them.

    Status per window: "insufficient_history" if it would start before row 0, "missing_data" if
    it has no member or fewer than ``L - max_missing`` complete rows, "degenerate" if a member is
    constant over them, else "ok"; a non-ok window is all NaN in every estimator.

    Means (per bar): ``sample`` = window mean; ``ewma`` = ``sum_s a_s r_s`` with ``ewma_weights``;
    ``shrunk`` = ``mbar + (1 - delta)(m - mbar)``, toward the cross-sectional mean ``mbar`` of the
    sample means with the diagonal Bayes-Stein intensity
    ``delta = min(1, (N + 2) / (N + 2 + T_w sum_i (m_i - mbar)^2 / s_ii))`` (Jorion 1986 with the
    covariance replaced by its diagonal; ``s_ii`` the sample variances).

    Covariances (per bar^2):

    - ``sample``: ``X^T X / (T_w - ddof)``.
    - ``ewma``: ``sum_s a_s (r_s - m_e)(r_s - m_e)^T / (1 - sum_s a_s^2)`` with the EWMA mean
      ``m_e``; the denominator is the reliability-weights bias correction, so
      ``np.cov(W, aweights=a, ddof=1)`` equals it and ``half_life = inf`` gives the sample cov.
    - ``ledoit_wolf``: scikit-learn's ``LedoitWolf()`` (``assume_centered=False``): the
      maximum-likelihood covariance ``S = X^T X / T_w`` (ddof 0, NOT ddof 1) shrunk toward
      ``mu I``, ``mu = tr(S) / N``: ``(1 - s) S + s mu I`` with the Ledoit-Wolf (2004) intensity
      ``s = min(b, d) / d``, ``d = ||S - mu I||_F^2 / N``, ``b = (sum_t ||x_t||^4 / T_w - ||X^T X||_F^2 / T_w^2) / (N T_w)``.
    - ``oas``: scikit-learn's ``OAS()``: the same ``S`` and target, intensity
      ``s = min(1, (a + mu^2) / ((T_w + 1)(a - mu^2 / N)))``, ``a = mean(S_ij^2)`` (s = 1 if the
      denominator is 0). Both equal scikit-learn per window to relative 1e-10 (tested).
    - ``factor``: ``market_factor="mean"``: the market return ``f_t`` = cross-sectional mean of
      the centred returns, betas ``b = X^T f / f^T f``, residuals ``E = X - f b^T`` with covariance
      ``S_E = E^T E / (T_w - ddof)``; ``Sigma = var(f) b b^T + V_k L_k V_k^T + diag(S_E - V_k L_k V_k^T)``
      with the ``n_factors`` leading eigenpairs ``(L_k, V_k)`` of ``S_E``.
      ``market_factor="pca"``: the first principal component of the sample covariance is the
      market factor, so ``Sigma = V_{k+1} L_{k+1} V_{k+1}^T + diag(residual)`` from the sample
      covariance. A sum of PSD terms with a non-negative diagonal residual: PSD, and PD when
      every residual variance is positive.

    Downside and semicovariance: ``z = min(0, r - tau)``; equal weights ``Z^T Z / T_w`` for every
    estimator but ``ewma``, which uses ``sum_s a_s z_s z_s^T``. ``downside = diag(semicov)``.
    Every matrix is exactly symmetric and PSD (also with N > T_w and near-singular windows).
    N, ``mbar`` and the factor model's cross-section are over the members of the window; the EWMA
    weights ``a_s`` are ``age_weights`` of its complete rows (an incomplete row is left out, but
    still counts as a bar of decay), and ``n_factors`` is capped at the number of members minus one.
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators:
        raise ConfigError(f"estimators: unknown {unknown} (or none given); choose from {sorted(ESTIMATORS)}")
    windows = np.broadcast_to(np.asarray(window), ends.shape) if np.ndim(window) == 0 else np.asarray(window)
    if windows.shape != ends.shape or not np.issubdtype(windows.dtype, np.integer) or (windows < 2).any():
        raise ConfigError(f"window must be an integer >= 2 or one such integer per window, got {window!r}")
    windows = windows.astype(np.int64)
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or not 0 <= ddof < (windows.min() if windows.size else 2):
        raise ConfigError(f"ddof must be an integer in [0, window), got {ddof!r}")
    if not np.isfinite(tau):
        raise ConfigError(f"tau must be finite, got {tau!r}")
    too_many = "factor" in estimators and n_factors > n - 1
    if isinstance(n_factors, bool) or not isinstance(n_factors, (int, np.integer)) or n_factors < 0 or too_many:
        raise ConfigError(f"n_factors must be an integer in [0, N-1] = [0, {n - 1}], got {n_factors!r}")
    if market_factor not in ("mean", "pca"):
        raise ConfigError(f"market_factor must be 'mean' or 'pca', got {market_factor!r}")
    ewma_weights(2, half_life)  # validates half_life
    k = ends.size
    members = np.ones((k, n), dtype=bool) if members is None else np.asarray(members)
    if members.shape != (k, n) or members.dtype != bool:
        raise DataError(f"members must be a {k} x {n} boolean array (asofs x symbols), got {members.dtype} {members.shape}")
    if isinstance(max_missing, bool) or not isinstance(max_missing, (int, np.integer)) or max_missing < 0:
        raise ConfigError(f"max_missing must be an integer >= 0, got {max_missing!r}")
    rows, n_obs, status = _window_rows(returns, ends, windows, members, max_missing=max_missing, ddof=ddof)
    # one output array per METHOD (estimators sharing a mean, covariance or semicovariance method
    # share the array: treat Moments as read-only), so 8 estimators do not allocate 8 copies
    specs = {name: ESTIMATORS[name] for name in estimators}
    methods = {
        "mean": sorted({m for m, _ in specs.values()}),
        "cov": sorted({c for _, c in specs.values()}),
        "semicov": sorted({"ewma" if c == "ewma" else "equal" for _, c in specs.values()}),
    }
    out = {
        quantity: {m: np.full((k, n) if quantity == "mean" else (k, n, n), np.nan) for m in names}
        for quantity, names in methods.items()
    }
    groups: dict[tuple[bytes, int], list[int]] = {}
    for j in np.flatnonzero(status == "ok"):
        groups.setdefault((members[j].tobytes(), int(n_obs[j])), []).append(int(j))
    for (_, count), todo in groups.items():
        cols = np.flatnonzero(members[todo[0]])
        everyone = cols.size == n  # plain row gathers and slice writes: no per-column fancy indexing
        for chunk in range(0, len(todo), _CHUNK):
            windows_ = np.array(todo[chunk : chunk + _CHUNK])
            take = np.stack([rows[j] for j in windows_])  # (c, count) row indices
            w = returns[take] if everyone else returns[take[:, :, None], cols[None, None, :]]  # (c, count, members)
            if count < windows[windows_].max():  # rows skipped: the prefix check of _window_rows did not apply
                constant = (w.max(axis=1) == w.min(axis=1)).any(axis=1)  # a member constant over the window
                status[windows_[constant]] = "degenerate"
                windows_, take, w = windows_[~constant], take[~constant], w[~constant]
                if not windows_.size:
                    continue
            weights = age_weights(ends[windows_, None] - take, half_life)  # (c, count)
            parts = _chunk_estimates(w, methods, ddof=ddof, tau=tau, weights=weights,
                                     n_factors=min(int(n_factors), cols.size - 1), market_factor=market_factor)
            for quantity, arrays in parts.items():
                for method, value in arrays.items():
                    target = out[quantity][method]
                    if everyone:
                        target[windows_] = value
                    elif quantity == "mean":
                        target[windows_[:, None], cols[None, :]] = value
                    else:
                        target[windows_[:, None, None], cols[None, :, None], cols[None, None, :]] = value
    downside = {m: np.diagonal(a, axis1=1, axis2=2).copy() for m, a in out["semicov"].items()}
    n_obs = n_obs.astype(np.int64)
    result = {}
    for name, (mean_method, cov_method) in specs.items():
        semi = "ewma" if cov_method == "ewma" else "equal"
        result[name] = Moments(
            mean=out["mean"][mean_method], cov=out["cov"][cov_method], downside=downside[semi],
            semicov=out["semicov"][semi], n_obs=n_obs, status=status,
        )
    return result


def _chunk_estimates(w, methods, *, ddof, tau, weights, n_factors, market_factor) -> dict[str, dict[str, np.ndarray]]:
    """The requested mean / cov / semicov methods on a stack of complete windows ``w`` (c, T_w, N);
    see ``rolling_estimates``. Returns {quantity: {method: array}}."""
    c, length, n = w.shape
    means, covs = set(methods["mean"]), set(methods["cov"])
    m = w.mean(axis=1)
    x = w - m[:, None, :]
    needs_gram = bool(covs - {"ewma"}) or "shrunk" in means
    gram = _symmetric(x.transpose(0, 2, 1) @ x) if needs_gram else None  # (c, n, n)
    z = np.minimum(w - tau, 0.0)
    mean: dict[str, np.ndarray] = {"sample": m}
    cov: dict[str, np.ndarray] = {}
    semicov = {"equal": _symmetric(z.transpose(0, 2, 1) @ z) / length} if "equal" in methods["semicov"] else {}
    if "sample" in covs or "shrunk" in means:
        cov["sample"] = gram / (length - ddof)
    if "shrunk" in means:
        var = np.diagonal(cov["sample"], axis1=1, axis2=2)
        mbar = m.mean(axis=1, keepdims=True)
        dist = length * np.sum((m - mbar) ** 2 / var, axis=1, keepdims=True)
        delta = np.minimum(1.0, (n + 2.0) / (n + 2.0 + dist))
        mean["shrunk"] = mbar + (1.0 - delta) * (m - mbar)
    if "ledoit_wolf" in covs or "oas" in covs:
        s_ml = gram / length
        trace = np.trace(s_ml, axis1=1, axis2=2)
        mu = trace / n
        eye = np.eye(n)
        if "ledoit_wolf" in covs:
            x2 = x * x
            beta_ = np.sum(x2.sum(axis=2) ** 2, axis=1)  # sum_ij (X2^T X2)_ij = sum_t (sum_i x_ti^2)^2
            delta_ = np.sum(gram**2, axis=(1, 2)) / length**2
            beta = (beta_ / length - delta_) / (n * length)
            delta = (delta_ - 2.0 * mu * trace + n * mu**2) / n
            beta = np.minimum(beta, delta)
            shrink = np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1.0, delta)) if n > 1 else np.zeros(c)
            cov["ledoit_wolf"] = (1.0 - shrink)[:, None, None] * s_ml + (shrink * mu)[:, None, None] * eye
        if "oas" in covs:
            alpha = np.mean(s_ml**2, axis=(1, 2))
            num = alpha + mu**2
            den = (length + 1.0) * (alpha - mu**2 / n)
            shrink = np.where(den == 0, 1.0, np.minimum(num / np.where(den == 0, 1.0, den), 1.0)) if n > 1 else np.zeros(c)
            cov["oas"] = (1.0 - shrink)[:, None, None] * s_ml + (shrink * mu)[:, None, None] * eye
    if "factor" in covs:
        cov["factor"] = _factor_cov(x, gram, ddof=ddof, n_factors=n_factors, market_factor=market_factor)
    if "ewma" in means or "ewma" in covs:
        me = np.einsum("ct,ctn->cn", weights, w)
        xe = w - me[:, None, :]
        mean["ewma"] = me
        bias = 1.0 - np.sum(weights**2, axis=1)
        cov["ewma"] = _symmetric((xe * weights[:, :, None]).transpose(0, 2, 1) @ xe) / bias[:, None, None]
        semicov["ewma"] = _symmetric((z * weights[:, :, None]).transpose(0, 2, 1) @ z)
    return {
        "mean": {m: mean[m] for m in methods["mean"]},
        "cov": {m: cov[m] for m in methods["cov"]},
        "semicov": {m: semicov[m] for m in methods["semicov"]},
    }


def _factor_cov(x: np.ndarray, gram: np.ndarray, *, ddof: int, n_factors: int, market_factor: str) -> np.ndarray:
    """Market factor + ``n_factors`` principal components + diagonal residual (see ``rolling_estimates``)."""
    c, length, n = x.shape
    if market_factor == "pca":
        total = gram / (length - ddof)
        resid, systematic = total, np.zeros_like(total)
        k = n_factors + 1
    else:
        f = x.mean(axis=2)  # (c, length): centred cross-sectional mean return
        ff = np.sum(f * f, axis=1)
        xf = np.einsum("ctn,ct->cn", x, f)
        beta = xf / np.where(ff > 0, ff, 1.0)[:, None]
        # E = X - f b^T with b = X^T f / f^T f: E^T E = X^T X - (X^T f)(X^T f)^T / f^T f (no second Gram)
        resid = _symmetric(gram - beta[:, :, None] * xf[:, None, :]) / (length - ddof)
        systematic = (ff / (length - ddof))[:, None, None] * beta[:, :, None] * beta[:, None, :]
        k = n_factors
    k = min(k, n)
    if k:
        vals, vecs = np.linalg.eigh(resid)  # ascending
        vals, vecs = np.maximum(vals[:, n - k :], 0.0), vecs[:, :, n - k :]
        pcs = _symmetric((vecs * vals[:, None, :]) @ vecs.transpose(0, 2, 1))
    else:
        pcs = np.zeros_like(resid)
    diag = np.maximum(np.diagonal(resid, axis1=1, axis2=2) - np.diagonal(pcs, axis1=1, axis2=2), 0.0)
    return _symmetric(systematic + pcs) + diag[:, :, None] * np.eye(n)


def gaussian_loglik(mean: np.ndarray, cov: np.ndarray, future: np.ndarray) -> np.ndarray:
    """Average Gaussian log-likelihood per bar of ``future`` under ``N(mean, cov)``, per window.

    ``mean`` K x N and ``cov`` K x N x N per bar; ``future`` K x H x N per-bar returns.
    ``ll_k = -1/2 mean_h [N log(2 pi) + log det cov_k + (r_h - m_k)^T cov_k^{-1} (r_h - m_k)]``
    (nats per bar). NaN where ``cov_k`` is not positive definite (an eigenvalue <= 1e-14 x the
    largest) or an input is NaN.
    """
    k, h, n = future.shape
    vals, vecs = np.linalg.eigh(np.where(np.isfinite(cov), cov, 0.0))
    ok = (vals[:, 0] > 1e-14 * np.abs(vals[:, -1])) & np.isfinite(cov).all(axis=(1, 2)) & np.isfinite(mean).all(axis=1)
    ok &= np.isfinite(future).all(axis=(1, 2))
    safe = np.where(ok[:, None], vals, 1.0)
    proj = np.einsum("kij,khi->khj", vecs, np.nan_to_num(future - mean[:, None, :]))  # no NaN reaches an ok row
    maha = np.sum(proj**2 / safe[:, None, :], axis=2)  # (k, h)
    ll = -0.5 * (n * np.log(2 * np.pi) + np.sum(np.log(safe), axis=1)[:, None] + maha)
    return np.where(ok, ll.mean(axis=1), np.nan)


def walk_forward_cv(
    returns: np.ndarray,
    ends: np.ndarray,
    *,
    windows: tuple[int, ...] = (168, 336, 720),
    half_lives: tuple[float, ...] = (24.0, 72.0, 168.0, 336.0),
    ewma_window: int = 720,
    horizon: int = 24,
) -> pl.DataFrame:
    """Choose the window length (``sample``) and the EWMA half-life (``ewma``) by walk-forward CV.

    At every end row ``e`` the candidate's per-bar mean and covariance from bars ``<= e`` are
    scored by ``gaussian_loglik`` on the next ``horizon`` bars ``e+1 .. e+horizon`` (out of
    sample). Only ends where every candidate is "ok" and the future is complete count, so all
    candidates are scored on the same days; to stay free of look-ahead at an asof ``a``, pass
    ends with ``e + horizon <= row(a)``. The score is the mean over those ends (nats per bar;
    higher is better). Returns parameter ("window" | "half_life"), value, score, n_scored,
    chosen (the best value per parameter; none chosen when nothing could be scored).
    """
    returns = _check_returns(returns)
    t = returns.shape[0]
    ends = _check_ends(ends, t)
    ends = ends[(ends >= 0) & (ends + horizon < t)]
    future = returns[ends[:, None] + 1 + np.arange(horizon)]  # (k, horizon, n)
    candidates = [("window", float(w), rolling_estimates(returns, ends, window=int(w), estimators=("sample",))["sample"]) for w in windows]
    candidates += [
        ("half_life", float(hl), rolling_estimates(returns, ends, window=ewma_window, estimators=("ewma",), half_life=hl)["ewma"])
        for hl in half_lives
    ]
    lls = [gaussian_loglik(m.mean, m.cov, future) for _, _, m in candidates]
    common = np.logical_and.reduce([np.isfinite(ll) for ll in lls]) if lls else np.zeros(0, bool)
    rows = [(p, v, float(ll[common].mean()) if common.any() else None, int(common.sum())) for (p, v, _), ll in zip(candidates, lls)]
    frame = pl.DataFrame(rows, schema={"parameter": pl.String, "value": pl.Float64, "score": pl.Float64, "n_scored": pl.Int64}, orient="row")
    best = pl.col("score") == pl.col("score").max().over("parameter")
    return frame.with_columns(chosen=(best & pl.col("score").is_not_null()).fill_null(False))


def annualize(moments: Moments, periods_per_year: float) -> Moments:
    """Per-bar moments to annual units: mean, cov, downside and semicov x ``periods_per_year``.

    (Variances scale linearly with time under i.i.d. bars; ``periods_per_year = 8760 / bar_hours``.)
    """
    if not np.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ConfigError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    return Moments(
        mean=moments.mean * periods_per_year,
        cov=moments.cov * periods_per_year,
        downside=moments.downside * periods_per_year,
        semicov=moments.semicov * periods_per_year,
        n_obs=moments.n_obs.copy(),
        status=moments.status.copy(),
    )


def moments_to_rows(
    asofs: np.ndarray, symbols: list[str], moments: Moments, *, estimator: str = "sample", window_bars: int | np.ndarray
) -> pl.DataFrame:
    """``features.estimates`` rows of one estimator, one per asof: as_of, estimator, symbols, mean,
    downside, cov, semicov, window_bars, n_obs, status (``ESTIMATE_COLUMNS``).

    ``symbols`` lists the symbols with an estimate at the asof (a finite mean: the members of the
    universe), in the given order; every symbol when the status is not "ok". For an asof of n such
    symbols, ``mean`` and ``downside`` hold n values and ``cov`` and ``semicov`` n^2 values row by
    row (``cov[i * n + j]`` is the covariance of symbols[i] and symbols[j]); all four are null when
    the status is not "ok". Values are in the units of ``moments`` (annualized when they went
    through ``annualize``). ``window_bars``: one length, or one per asof (windows shortened after a
    regime change).
    """
    asofs = to_datetime64(asofs)
    k, n = moments.mean.shape
    if asofs.shape != (k,) or len(symbols) != n:
        raise DataError(f"moments_to_rows: {asofs.shape[0]} asofs / {len(symbols)} symbols for moments of shape {(k, n)}")
    ok = moments.status == "ok"
    held = [np.flatnonzero(np.isfinite(moments.mean[i])) if ok[i] else np.arange(n) for i in range(k)]
    sym = np.array(symbols, dtype=object)
    arrays = {
        q: _list_array([getattr(moments, q)[i][h] if ok[i] else None for i, h in enumerate(held)]) for q in _VECTORS
    } | {
        q: _list_array([getattr(moments, q)[i][np.ix_(h, h)].ravel() if ok[i] else None for i, h in enumerate(held)])
        for q in _MATRICES
    }
    return pl.DataFrame({
        "as_of": pl.Series(asofs).dt.replace_time_zone("UTC"),
        "estimator": pl.Series([estimator] * k, dtype=pl.String),
        "symbols": pl.Series([sym[h].tolist() for h in held], dtype=pl.List(pl.String)),
        **{q: pl.from_arrow(a) for q, a in arrays.items()},
        "window_bars": pl.Series(np.broadcast_to(np.asarray(window_bars, dtype=np.int64), (k,)), dtype=pl.Int64),
        "n_obs": pl.Series(moments.n_obs, dtype=pl.Int64),
        "status": pl.Series(moments.status.tolist(), dtype=pl.String),
    }).select(ESTIMATE_COLUMNS)


def moments_from_rows(
    frame: pl.DataFrame, *, estimator: str = "sample", symbols: list[str] | None = None
) -> tuple[np.ndarray, list[str], Moments]:
    """Inverse of ``moments_to_rows`` for one estimator: ``(asofs, symbols, Moments)``.

    ``asofs`` sorted (``datetime64[us]``); ``symbols`` the given list (its order; it must hold
    every symbol of the rows), or the rows' symbols sorted. Values come back bit for bit, NaN for a
    symbol without an estimate at an asof (not in that asof's universe) and on every asof whose
    status is not "ok". A quantity whose column the frame lacks (a read of some columns only, as
    the consumers of ``features.estimates`` that need the covariance alone do) is all NaN. Raises
    ``DataError`` on a second row for an asof, a symbol listed twice or outside ``symbols``, an
    array whose length does not match the row's symbols, or an "ok" row without values.
    """
    rows = frame.filter(pl.col("estimator") == estimator).sort("as_of").with_columns(
        pl.col("as_of").dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    )
    if rows.height == 0:
        raise DataError(f"moments_from_rows: no rows for estimator={estimator!r}")
    if rows["as_of"].is_duplicated().any():
        twice = rows.filter(pl.col("as_of").is_duplicated())["as_of"][0]
        raise DataError(f"moments_from_rows: estimator={estimator!r} has two rows for asof={twice}")
    listed = rows["symbols"].to_list()
    found = sorted({s for names in listed for s in names})
    if symbols is None:
        symbols = found
    elif set(found) - set(symbols):
        raise DataError(f"moments_from_rows: rows hold symbols {sorted(set(found) - set(symbols))} outside {symbols}")
    position = {s: i for i, s in enumerate(symbols)}
    asofs = rows["as_of"].to_numpy()
    status = rows["status"].to_numpy().astype(_STATUS_DTYPE)
    k, n = asofs.size, len(symbols)
    index = []
    for asof, names in zip(asofs, listed):
        if len(set(names)) != len(names):
            raise DataError(f"moments_from_rows: estimator={estimator!r} lists a symbol twice at asof={asof}: {names}")
        index.append(np.array([position[s] for s in names], dtype=np.int64))
    arrays = {q: np.full((k, n), np.nan) for q in _VECTORS} | {q: np.full((k, n, n), np.nan) for q in _MATRICES}
    for quantity, array in arrays.items():
        if quantity not in rows.columns:
            continue
        column = rows[quantity].to_arrow()
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        power = 2 if quantity in _MATRICES else 1
        for i, idx in enumerate(index):
            if valid[i] != (status[i] == "ok"):
                raise DataError(f"moments_from_rows: estimator={estimator!r} asof={asofs[i]} status={str(status[i])!r} "
                                f"{'lacks' if status[i] == 'ok' else 'holds'} {quantity} values; values exist exactly when status is 'ok'")
            if not valid[i]:
                continue
            block = values[offsets[i] : offsets[i + 1]]
            if block.size != idx.size**power:
                raise DataError(f"moments_from_rows: estimator={estimator!r} asof={asofs[i]} {quantity} holds {block.size} "
                                f"values for {idx.size} symbols, expected {idx.size**power}")
            if power == 1:
                array[i, idx] = block
            else:
                array[i][np.ix_(idx, idx)] = block.reshape(idx.size, idx.size)
    moments = Moments(
        mean=arrays["mean"], cov=arrays["cov"], downside=arrays["downside"], semicov=arrays["semicov"],
        n_obs=rows["n_obs"].to_numpy().astype(np.int64), status=status,
    )
    return asofs, list(symbols), moments


def _list_array(blocks: list[np.ndarray | None]) -> pa.LargeListArray:
    """Arrow list array of float64 blocks (None = a null list), built from one buffer of values."""
    lengths = np.array([0 if b is None else b.size for b in blocks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    parts = [b for b in blocks if b is not None]
    values = np.concatenate(parts).astype(np.float64) if parts else np.empty(0)
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, pa.float64()),
                                         mask=pa.array([b is None for b in blocks], pa.bool_()))


def _window_rows(
    returns: np.ndarray, ends: np.ndarray, windows: np.ndarray, members: np.ndarray, *, max_missing: int, ddof: int
) -> tuple[list[np.ndarray | None], np.ndarray, np.ndarray]:
    """``(rows, n_obs, status)`` of the windows ``[ends - windows + 1, ends]``: the complete rows
    of each window's members (None unless the status is "ok"), their count and the status before
    the constant-member check of windows with skipped rows ("degenerate", made on the gathered
    windows; see ``rolling_estimates``). Windows are taken per member set: prefix counts of its
    complete rows give every window's count at once, a window without incomplete rows is a range
    whose constant members prefix counts of value changes find, and only a window with incomplete
    rows lists its rows one by one."""
    valid = np.isfinite(returns)
    # changes[t, i]: how often symbol i's return differs from the row before, up to row t
    changes = np.concatenate([np.zeros((1, returns.shape[1]), np.int64), np.cumsum(np.diff(returns, axis=0) != 0, axis=0)])
    status = np.full(ends.size, "ok", dtype=_STATUS_DTYPE)
    n_obs = np.zeros(ends.size, dtype=np.int64)
    rows: list[np.ndarray | None] = [None] * ends.size
    starts = ends - windows + 1
    first = np.maximum(starts, 0)
    patterns, which = np.unique(members, axis=0, return_inverse=True)
    for p, member in enumerate(patterns):
        todo = np.flatnonzero(which.ravel() == p)
        if not member.any():
            status[todo] = np.where(starts[todo] < 0, "insufficient_history", "missing_data")
            continue
        complete = valid[:, member].all(axis=1)
        counts = np.concatenate([[0], np.cumsum(complete)])
        n_obs[todo] = counts[ends[todo] + 1] - counts[first[todo]]
        for j in todo:
            if starts[j] < 0:
                status[j] = "insufficient_history"
            elif n_obs[j] < max(windows[j] - max_missing, ddof + 1, 2):
                status[j] = "missing_data"
            elif n_obs[j] == windows[j]:
                if (changes[ends[j], member] == changes[starts[j], member]).any():
                    status[j] = "degenerate"
                else:
                    rows[j] = np.arange(starts[j], ends[j] + 1)
            else:
                rows[j] = starts[j] + np.flatnonzero(complete[starts[j] : ends[j] + 1])
    return rows, n_obs, status


def _symmetric(a: np.ndarray) -> np.ndarray:
    """``(A + A^T) / 2`` on the last two axes: exactly symmetric, same values up to rounding."""
    return (a + a.swapaxes(-1, -2)) / 2.0


def _check_returns(returns: np.ndarray) -> np.ndarray:
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 2:
        raise DataError(f"returns must be a T x N matrix, got shape {returns.shape}")
    if np.isinf(returns).any():
        row, col = np.argwhere(np.isinf(returns))[0]
        raise DataError(f"returns: infinite value at row {row}, column {col}")
    return returns


def _check_ends(ends: np.ndarray, t: int) -> np.ndarray:
    """Window end rows in ``[-1, t)``; -1 = no bar at or before the asof (insufficient history)."""
    ends = np.asarray(ends)
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        raise DataError(f"ends must be a 1-D integer array, got dtype {ends.dtype} shape {ends.shape}")
    if ends.size and (ends.min() < -1 or ends.max() >= t):
        bad = ends[(ends < -1) | (ends >= t)][0]
        raise DataError(f"ends: row {bad} outside [-1, {t}) for the {t} rows of returns")
    return ends.astype(np.int64)

"""Signals per (asof, symbol): realized and implied variance, the variance risk premium (plain,
funding-adjusted, z-scored), the next-day funding forecast, momentum, predicted volatility (EWMA,
GARCH(1,1)) and the calm/turbulent regime.

Units: every variance here is ANNUALIZED (a variance of annual returns, e.g. 0.36 = 60% vol).
``VRP = implied_var - realized_var``. Implied variance is ``iv^2`` of an implied-vol index quoted
as an annualized decimal (``raw.implied_vol.iv``, 0.55 = 55%); a symbol without its own index
gets a labelled proxy scaled from the reference index by relative realized variance.
Look-ahead: realized variance uses bars up to and including the one opened at ``asof``; an index
value is usable at ``asof`` only if its ``ts <= asof``.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import _check_ends, _check_returns, ewma_weights, to_datetime64
from perpfolio.garch import fit_garch11
from perpfolio.returns import _utc_us

_CHUNK = 64


def realized_variance(returns: np.ndarray, ends: np.ndarray, *, window: int, periods_per_year: float,
                      max_missing_fraction: float = 0.0) -> np.ndarray:
    """Annualized realized variance ``RV_i = mean(r_i^2) * periods_per_year`` per window, K x N.

    ``returns``: ``T x N`` per-bar returns (NaN = missing bar); window ``k`` is the ``window``
    rows ending at ``ends[k]`` (-1: no bar at or before the asof). The mean is taken around zero
    (not the sample mean), the usual realized-variance convention for short horizons, over the
    bars the symbol has. Each symbol stands on its own: RV is NaN for a symbol missing more than
    ``floor(max_missing_fraction * window)`` bars of its window (default: any), and for every
    symbol when the window would start before row 0.
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}")
    if not np.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ConfigError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    allowed = _allowed_missing(window, max_missing_fraction)
    starts = ends - window + 1
    out = np.full((ends.size, n), np.nan)
    todo = np.flatnonzero(starts >= 0)
    for chunk in range(0, todo.size, _CHUNK):
        rows = todo[chunk : chunk + _CHUNK]
        w = returns[starts[rows, None] + np.arange(window)]  # (c, window, n)
        count = np.isfinite(w).sum(axis=1)
        mean_sq = np.nansum(w * w, axis=1) / np.maximum(count, 1)
        out[rows] = np.where(window - count <= allowed, mean_sq, np.nan)
    return out * periods_per_year


def _allowed_missing(length: int, fraction: float) -> int:
    """Bars of a ``length``-bar window that may be missing: ``floor(fraction * length)``."""
    if not (np.isfinite(fraction) and 0 <= fraction < 1):
        raise ConfigError(f"max_missing_fraction must be in [0, 1), got {fraction!r}")
    return int(np.floor(fraction * length))


def vrp_signals(
    asofs: np.ndarray,
    symbols: list[str],
    realized_var: np.ndarray,
    implied_vol: pl.DataFrame,
    *,
    proxy_reference: str = "BTC",
    use_proxy: bool = False,
    max_iv_age_hours: int = 48,
) -> pl.DataFrame:
    """Variance risk premium ``vrp = implied_var - realized_var`` (annualized variances).

    ``realized_var``: K x N annualized variances (``realized_variance``), NaN = unknown.
    ``implied_vol``: ts, underlying, iv (annualized decimal). For a symbol (underlying = symbol
    without "USDT") the index value is the latest row with ``asof - max_iv_age_hours <= ts <= asof``:
    ``implied_var = iv^2``, ``iv_source = "index"``. Without a usable index of its own, the proxy
    ``implied_var = iv_ref^2 * realized_var_i / realized_var_ref`` (the ``proxy_reference``'s
    implied vol scaled by relative realized vol; the reference symbol must be in ``symbols`` with a
    positive realized variance); its VRP is ``RV_i (IV_ref^2 / RV_ref - 1)``, so whenever the
    reference's own VRP is positive it favours the most volatile symbols, which is why ``vrp``
    takes it only with ``use_proxy`` (then ``iv_source = "proxy:<reference>"``); otherwise
    implied_var and vrp are null and ``iv_source = "unavailable"``. ``vrp_with_proxy`` is always
    the own index's VRP where there is one and the proxy's elsewhere, so a strategy can ask for it
    (its ``vrp_source``) and the two can be compared on the same run.

    Returns asof (Datetime us UTC), symbol, implied_var, realized_var, vrp, iv_source,
    vrp_with_proxy, sorted by asof then in the order of ``symbols``. Nulls stand for unknown values.
    """
    asofs = to_datetime64(asofs)
    realized_var = np.asarray(realized_var, dtype=np.float64)
    k, n = asofs.size, len(symbols)
    if realized_var.shape != (k, n):
        raise DataError(f"vrp_signals: realized_var has shape {realized_var.shape}, expected {(k, n)} (asofs, symbols)")
    if isinstance(max_iv_age_hours, bool) or not isinstance(max_iv_age_hours, int) or max_iv_age_hours < 0:
        raise ConfigError(f"max_iv_age_hours must be an integer >= 0, got {max_iv_age_hours!r}")
    index = _clean_implied_vol(implied_vol)
    max_age = np.timedelta64(max_iv_age_hours, "h")
    underlyings = [s.removesuffix("USDT") for s in symbols]
    own = np.stack([_index_var(index, u, asofs, max_age) for u in underlyings], axis=1) if n else np.empty((k, 0))
    ref_iv = _index_var(index, proxy_reference, asofs, max_age)
    ref_col = underlyings.index(proxy_reference) if proxy_reference in underlyings else None
    ref_rv = realized_var[:, ref_col] if ref_col is not None else np.full(k, np.nan)
    ref_rv = np.where(ref_rv > 0, ref_rv, np.nan)
    proxy = ref_iv[:, None] * realized_var / ref_rv[:, None]
    has_own = ~np.isnan(own)
    has_proxy = ~has_own & ~np.isnan(proxy) & use_proxy
    with_proxy = np.where(has_own, own, proxy)
    implied = np.where(has_own, own, np.where(has_proxy, proxy, np.nan))
    source = np.where(has_own, "index", np.where(has_proxy, f"proxy:{proxy_reference}", "unavailable"))
    return pl.DataFrame(
        {
            "as_of": pl.Series(np.repeat(asofs, n)).dt.replace_time_zone("UTC"),
            "symbol": pl.Series(np.tile(np.array(symbols, dtype=object), k).tolist(), dtype=pl.String),
            "implied_var": pl.Series(implied.ravel(), nan_to_null=True),
            "realized_var": pl.Series(realized_var.ravel(), nan_to_null=True),
            "vrp": pl.Series((implied - realized_var).ravel(), nan_to_null=True),
            "iv_source": pl.Series(source.ravel().tolist(), dtype=pl.String),
            "vrp_with_proxy": pl.Series((with_proxy - realized_var).ravel(), nan_to_null=True),
        }
    )


def _clean_implied_vol(implied_vol: pl.DataFrame) -> pl.DataFrame:
    """Validated index rows: underlying, ts (us UTC), iv; sorted by (underlying, ts)."""
    missing = [c for c in ("ts", "underlying", "iv") if c not in implied_vol.columns]
    if missing:
        raise DataError(f"implied_vol: columns {missing} missing; columns are {implied_vol.columns}")
    frame = implied_vol.select("underlying", _utc_us(implied_vol, "ts"), pl.col("iv").cast(pl.Float64))
    checks = {
        "null underlying or ts": pl.col("underlying").is_null() | pl.col("ts").is_null(),
        "duplicate (underlying, ts)": pl.len().over("underlying", "ts") > 1,
        "iv must be finite and > 0": ~(pl.col("iv").is_finite() & (pl.col("iv") > 0)).fill_null(False),
    }
    for problem, expr in checks.items():
        bad = frame.filter(expr)
        if bad.height:
            r = bad.row(0, named=True)
            raise DataError(
                f"implied_vol: {problem} at underlying={r['underlying']!r} ts={r['ts']} field=iv value={r['iv']!r}"
            )
    return frame.sort("underlying", "ts")


def _index_var(index: pl.DataFrame, underlying: str, asofs: np.ndarray, max_age: np.timedelta64) -> np.ndarray:
    """``iv^2`` of the latest row of ``underlying`` with ``asof - max_age <= ts <= asof``; NaN if none."""
    rows = index.filter(pl.col("underlying") == underlying)
    ts, iv = rows["ts"].to_numpy(), rows["iv"].to_numpy()
    if ts.size == 0:
        return np.full(asofs.shape, np.nan)
    last = np.searchsorted(ts, asofs, side="right") - 1
    pos = np.maximum(last, 0)
    usable = (last >= 0) & (asofs - ts[pos] <= max_age)
    return np.where(usable, iv[pos] ** 2, np.nan)


# --------------------------------------------------------------------------------------------
# Funding, momentum, predicted volatility, regimes (per-bar inputs, explicit units in each name)
# --------------------------------------------------------------------------------------------


def funding_adjusted_vrp(vrp: np.ndarray, funding_forecast_1h: np.ndarray) -> np.ndarray:
    """``funding_adj_vrp = vrp + 8760 * funding_forecast_1h``, annualized decimals.

    ``vrp`` (annualized variance, implied - realized) is what a short-variance position expects
    to earn per year per unit of variance notional; ``8760 * funding_forecast_1h`` is the annual
    funding carry a SHORT perpetual expects to receive per unit of notional (a positive rate
    means longs pay shorts). The sum is the combined annual premium of being short volatility and
    short the perp: positive = both premia favour the short side. NaN where either is unknown.
    """
    vrp = np.asarray(vrp, dtype=np.float64)
    carry = np.asarray(funding_forecast_1h, dtype=np.float64)
    if vrp.shape != carry.shape:
        raise DataError(f"funding_adjusted_vrp: vrp shape {vrp.shape} != funding_forecast_1h shape {carry.shape}")
    return vrp + 8760.0 * carry


def trailing_zscore(values: np.ndarray, *, lookback: int, min_obs: int | None = None) -> np.ndarray:
    """Z-score of each row against the trailing ``lookback`` rows INCLUDING itself, per column.

    ``z_k = (v_k - mean(v_{k-L+1..k})) / std(v_{k-L+1..k}, ddof=1)``, NaNs ignored; NaN when fewer
    than ``min_obs`` (default ``max(3, lookback // 2)``) finite values, when ``v_k`` is NaN, or
    when the trailing std is 0. Rows are the daily asofs; the score is unitless.
    """
    values = np.asarray(values, dtype=np.float64)
    if isinstance(lookback, bool) or not isinstance(lookback, (int, np.integer)) or lookback < 3:
        raise ConfigError(f"lookback must be an integer >= 3, got {lookback!r}")
    min_obs = max(3, lookback // 2) if min_obs is None else min_obs
    if not 2 <= min_obs <= lookback:
        raise ConfigError(f"min_obs must be in [2, lookback], got {min_obs!r}")
    k = values.shape[0]
    padded = np.concatenate([np.full((lookback - 1,) + values.shape[1:], np.nan), values])
    win = np.lib.stride_tricks.sliding_window_view(padded, lookback, axis=0)[:k]  # (k, n, L)
    count = np.sum(np.isfinite(win), axis=-1)
    safe = np.where(np.isfinite(win), win, 0.0)
    mean = safe.sum(axis=-1) / np.maximum(count, 1)
    dev = np.where(np.isfinite(win), win - mean[..., None], 0.0)
    std = np.sqrt((dev**2).sum(axis=-1) / np.maximum(count - 1, 1))
    ok = (count >= min_obs) & np.isfinite(values) & (std > 0)
    return np.where(ok, (values - mean) / np.where(std > 0, std, 1.0), np.nan)


def daily_funding_rate(funding_return: np.ndarray, *, bar_hours: int) -> np.ndarray:
    """Average funding rate per HOUR over the 24 hours ending with each bar, T x N (decimal/hour).

    ``F_t = -sum_{s=t-b+1..t} funding_return_s / 24`` with ``b = 24 / bar_hours`` bars; positive
    means longs pay shorts. Every funding interval (1, 2, 4, 8 h) divides 24 h, so a 24-hour sum
    holds a whole number of intervals and ``F`` is the same average hourly rate whatever the
    interval schedule (an 8 h rate r counts as r/8 per hour, a 1 h rate as r per hour). NaN where
    the 24 hours are not all present or before the first full day.
    """
    f = np.asarray(funding_return, dtype=np.float64)
    if f.ndim != 2:
        raise DataError(f"funding_return must be a T x N matrix, got shape {f.shape}")
    if bar_hours not in (1, 2, 3, 4, 6, 8, 12, 24):
        raise ConfigError(f"bar_hours must divide 24, got {bar_hours!r}")
    b = 24 // bar_hours
    out = np.full(f.shape, np.nan)
    if f.shape[0] >= b:
        # prefix sums with NaN as 0 plus a prefix count of NaNs: a gap only voids the days it touches
        nans = np.concatenate([np.zeros((1, f.shape[1]), np.int64), np.cumsum(np.isnan(f), axis=0)])
        zsum = np.concatenate([np.zeros((1, f.shape[1])), np.cumsum(np.nan_to_num(f, nan=0.0), axis=0)])
        total = zsum[b:] - zsum[:-b]
        missing = nans[b:] - nans[:-b]
        out[b - 1 :] = np.where(missing == 0, -total / 24.0, np.nan)
    return out


def forecast_funding(
    daily_rate_1h: np.ndarray, *, method: str = "ar1", half_life_days: float = 2.0, fit_days: int = 30
) -> np.ndarray:
    """Forecast of the NEXT day's average hourly funding rate from the daily series up to each row.

    ``daily_rate_1h``: K x N average hourly rates of consecutive days (rows = daily asofs, the
    value of row k known at asof k, e.g. ``daily_funding_rate`` sampled at the asofs).
    ``method="naive"``: ``F_hat_{k+1} = F_k``. ``"ewma"``: ``F_hat_{k+1} = sum_j a_j F_{k-j} / sum_j a_j``,
    ``a_j = lam^j``, ``lam = 2^(-1/half_life_days)`` over all finite rows up to k. ``"ar1"``:
    ``F_hat_{k+1} = c + phi F_k``, OLS of ``F_{j+1}`` on ``F_j`` over the pairs in the trailing
    ``fit_days`` rows (at least 10 pairs, else the naive forecast), ``phi`` clipped to [-1, 1].
    Units as the input (decimal per hour). NaN where ``F_k`` is NaN.
    """
    x = np.asarray(daily_rate_1h, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"daily_rate_1h must be a K x N matrix, got shape {x.shape}")
    if method == "naive":
        return x.copy()
    if method == "ewma":
        if not half_life_days > 0:
            raise ConfigError(f"half_life_days must be > 0, got {half_life_days!r}")
        lam = 2.0 ** (-1.0 / half_life_days)
        num = np.zeros(x.shape[1])
        den = np.zeros(x.shape[1])
        out = np.full(x.shape, np.nan)
        for k in range(x.shape[0]):  # K daily rows: a cheap recursion, not a per-window rebuild
            finite = np.isfinite(x[k])
            num = lam * num + np.where(finite, x[k], 0.0)
            den = lam * den + finite
            out[k] = np.where(finite & (den > 0), num / np.where(den > 0, den, 1.0), np.nan)
        return out
    if method == "ar1":
        if isinstance(fit_days, bool) or not isinstance(fit_days, int) or fit_days < 11:
            raise ConfigError(f"fit_days must be an integer >= 11, got {fit_days!r}")
        prev, nxt = x[:-1], x[1:]
        pair = np.isfinite(prev) & np.isfinite(nxt)
        p0, n0 = np.where(pair, prev, 0.0), np.where(pair, nxt, 0.0)
        sums = [np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(a, axis=0)]) for a in (pair * 1.0, p0, n0, p0 * p0, p0 * n0)]
        out = x.copy()
        for k in range(x.shape[0]):
            hi, lo = k, max(0, k - fit_days + 1)  # pairs (j, j+1) with lo <= j and j + 1 <= k
            cnt, sx, sy, sxx, sxy = (s[hi] - s[lo] for s in sums)
            var = sxx - sx * sx / np.maximum(cnt, 1)
            ok = (cnt >= 10) & (var > 0)
            phi = np.clip(np.where(ok, (sxy - sx * sy / np.maximum(cnt, 1)) / np.where(ok, var, 1.0), 0.0), -1.0, 1.0)
            c = (sy - phi * sx) / np.maximum(cnt, 1)
            out[k] = np.where(ok, c + phi * x[k], x[k])
        return out
    raise ConfigError(f"method must be 'naive', 'ewma' or 'ar1', got {method!r}")


def evaluate_funding_forecast(daily_rate_1h: np.ndarray, forecast: np.ndarray) -> dict[str, float]:
    """Out-of-sample errors of a next-day forecast vs the naive last-value forecast.

    Row k's forecast (made at asof k from rows <= k) is compared with the realized ``F_{k+1}``.
    Returns ``n`` (pairs where forecast, naive and target are finite), ``rmse_model``,
    ``rmse_naive``, ``mae_model``, ``mae_naive`` (decimal per hour) and ``rmse_ratio`` =
    ``rmse_model / rmse_naive`` (< 1: the model beats the naive forecast).
    """
    x = np.asarray(daily_rate_1h, dtype=np.float64)
    f = np.asarray(forecast, dtype=np.float64)
    target, model, naive = x[1:], f[:-1], x[:-1]
    ok = np.isfinite(target) & np.isfinite(model) & np.isfinite(naive)
    n = int(ok.sum())
    if n == 0:
        return {"n": 0, "rmse_model": float("nan"), "rmse_naive": float("nan"), "mae_model": float("nan"),
                "mae_naive": float("nan"), "rmse_ratio": float("nan")}
    em, en = (model - target)[ok], (naive - target)[ok]
    rmse_m, rmse_n = float(np.sqrt(np.mean(em**2))), float(np.sqrt(np.mean(en**2)))
    return {"n": n, "rmse_model": rmse_m, "rmse_naive": rmse_n, "mae_model": float(np.mean(np.abs(em))),
            "mae_naive": float(np.mean(np.abs(en))), "rmse_ratio": rmse_m / rmse_n if rmse_n > 0 else float("nan")}


def momentum(returns: np.ndarray, ends: np.ndarray, *, lookback: int, max_missing_fraction: float = 0.0) -> np.ndarray:
    """Momentum ``sum_{s=e-L+1..e} r_s`` per window, K x N: the summed per-bar net returns of the
    ``lookback`` bars ending at ``ends[k]`` (for log returns the log return of the period; not
    annualized). A missing bar adds nothing: pass the gap-spanning returns, which carry the move
    over the gap. NaN for a symbol missing more than ``floor(max_missing_fraction * lookback)``
    bars of the lookback (default: any), or before enough history."""
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if isinstance(lookback, bool) or not isinstance(lookback, (int, np.integer)) or lookback < 1:
        raise ConfigError(f"lookback must be an integer >= 1, got {lookback!r}")
    zsum = np.concatenate([np.zeros((1, n)), np.cumsum(np.nan_to_num(returns, nan=0.0), axis=0)])
    nans = np.concatenate([np.zeros((1, n), np.int64), np.cumsum(np.isnan(returns), axis=0)])
    starts = ends - lookback + 1
    ok_rows = starts >= 0
    lo, hi = np.maximum(starts, 0), ends + 1
    total = zsum[hi] - zsum[lo]
    missing = nans[hi] - nans[lo]
    return np.where(ok_rows[:, None] & (missing <= _allowed_missing(lookback, max_missing_fraction)), total, np.nan)


def ewma_predicted_vol(
    returns: np.ndarray, ends: np.ndarray, *, window: int, half_life: float, periods_per_year: float,
    max_missing_fraction: float = 0.0,
) -> np.ndarray:
    """EWMA volatility forecast, annualized, K x N: ``sqrt(ppy * sum_s a_s r_s^2)`` over the window.

    ``a_s`` = ``perpfolio.estimators.ewma_weights(window, half_life)`` (``lam = 2^(-1/half_life)``,
    normalized; the RiskMetrics recursion ``s2_t = lam s2_{t-1} + (1 - lam) r_t^2`` started at the
    window's first bar), zero mean as for realized variance. It forecasts the next bar's variance.
    A missing bar gets weight 0 and the others are renormalized (``age_weights`` of the bars the
    symbol has). NaN for a symbol missing more than ``floor(max_missing_fraction * window)`` bars of
    the window (default: any) or before enough history.
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if not np.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ConfigError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    weights = ewma_weights(window, half_life)
    allowed = _allowed_missing(window, max_missing_fraction)
    starts = ends - window + 1
    out = np.full((ends.size, n), np.nan)
    todo = np.flatnonzero(starts >= 0)
    for chunk in range(0, todo.size, _CHUNK):
        rows = todo[chunk : chunk + _CHUNK]
        w = returns[starts[rows, None] + np.arange(window)]
        seen = np.isfinite(w)
        mass = np.einsum("t,ctn->cn", weights, seen)  # weight of the bars present: 1 without a gap
        weighted = np.einsum("t,ctn->cn", weights, np.where(seen, w * w, 0.0)) / np.where(mass > 0, mass, 1.0)
        out[rows] = np.where(window - seen.sum(axis=1) <= allowed, weighted, np.nan)
    return np.sqrt(out * periods_per_year)


def garch_predicted_vol(
    returns: np.ndarray,
    ends: np.ndarray,
    *,
    window: int,
    horizon: int,
    periods_per_year: float,
    max_iter: int = 200,
    max_missing_fraction: float = 0.0,
    chunk: int = 4096,
) -> tuple[np.ndarray, dict[str, float]]:
    """GARCH(1,1) volatility forecast, annualized, K x N: one fit per window, all windows at once.

    Model (zero mean, normal QMLE; `perpfolio.garch`): ``r_t = sigma_t e_t``, ``sigma_t^2 = omega +
    alpha r_{t-1}^2 + beta sigma_{t-1}^2``, fitted on the ``window`` bars ending at ``ends[k]``
    (scaled to unit variance, rescaled after). The forecast is the mean of the 1..``horizon``
    bar-ahead variance forecasts, annualized: ``sqrt(ppy * mean_h sigma_{e+h}^2)``. Every window is
    fitted from the same starting grid, on its own (no warm start across windows), so a value
    depends on its window only (a range run equals daily runs). The windows are fitted in batches of
    ``chunk`` (memory: about 3 x chunk x window x 8 bytes). A window missing at most
    ``floor(max_missing_fraction * window)`` bars (default: none) is fitted on the bars it has, in
    order. NaN for a window missing more, a constant one, or a fit that does not converge in
    ``max_iter`` Newton steps or returns non-finite values. Also returns timing / failure counts.
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ConfigError(f"horizon must be an integer >= 1, got {horizon!r}")
    allowed = _allowed_missing(window, max_missing_fraction)
    out = np.full((ends.size, n), np.nan)
    t0 = time.perf_counter()
    windows = [(k, i) for i in range(n) for k, e in enumerate(ends) if e - window + 1 >= 0]
    fits = failures = 0
    for first in range(0, len(windows), chunk):  # one chunk's windows in memory at a time
        cells, rows, lengths, scales = [], [], [], []
        for k, i in windows[first : first + chunk]:
            y = returns[ends[k] - window + 1 : ends[k] + 1, i]
            y = y[np.isfinite(y)]
            sd = np.std(y) if y.size else 0.0
            if window - y.size > allowed or sd == 0:
                continue
            row = np.zeros(window)
            row[: y.size] = y / sd
            cells.append((k, i))
            rows.append(row)
            lengths.append(y.size)
            scales.append(1.0 / sd)
        if not cells:
            continue
        fit = fit_garch11(np.array(rows), np.array(lengths), max_iter=max_iter)
        variance = fit.forecast(horizon) / np.array(scales) ** 2
        ok = fit.converged & np.isfinite(variance)
        fits, failures = fits + len(cells), failures + int((~ok).sum())
        for (k, i), good, var in zip(cells, ok, variance):
            if good:
                out[k, i] = np.sqrt(var * periods_per_year)
    stats = {"garch_fits": fits, "garch_failures": failures, "garch_seconds": round(time.perf_counter() - t0, 3)}
    return out, stats


def regime_states(
    returns: np.ndarray, *, short: int = 48, long: int = 720, enter: float = 2.0, exit: float = 1.2, memory: int = 720,
    max_missing_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Calm/turbulent state per bar from the short/long realized-vol ratio with hysteresis.

    Market return ``m_t`` = cross-sectional mean of the per-bar returns (equal weight, symbols
    with a NaN bar skipped; NaN when no symbol has one, e.g. an exchange-wide outage);
    ``q_t = sqrt(mean(m^2 over the last short bars) / mean(m^2 over the last long bars))``, each
    mean over the bars where ``m`` is known (unitless; NaN until ``long`` bars, or when a window
    misses more than ``floor(max_missing_fraction * length)`` bars of ``m``, default: any).
    Hysteresis: the state turns turbulent when ``q >= enter`` and back to calm when ``q <= exit``
    (``exit < enter``); between the thresholds it keeps its state. Bounded memory: the state at t
    only looks at crossings in the last ``memory`` bars (turbulent iff the latest ``q >= enter`` in
    ``(t - memory, t]`` is later than the latest ``q <= exit``), so it is the same whatever history
    before ``t - long - memory`` is loaded (partitioned runs agree with one long run).

    Returns ``(turbulent: bool T, ratio: float T)``.
    """
    returns = _check_returns(returns)
    for name, value in (("short", short), ("long", long), ("memory", memory)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"regime {name} must be an integer >= 1, got {value!r}")
    if not short < long:
        raise ConfigError(f"regime short ({short}) must be shorter than long ({long})")
    if not (np.isfinite(enter) and np.isfinite(exit) and 0 < exit < enter):
        raise ConfigError(f"regime thresholds must satisfy 0 < exit < enter, got exit={exit!r} enter={enter!r}")
    t = returns.shape[0]
    finite = np.isfinite(returns)
    cnt = finite.sum(axis=1)
    m = np.where(cnt > 0, np.where(finite, returns, 0.0).sum(axis=1) / np.maximum(cnt, 1), np.nan)

    def rolling_mean_sq(length: int) -> np.ndarray:
        out = np.full(t, np.nan)
        if t < length:
            return out
        zsum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(m, nan=0.0) ** 2)])
        nans = np.concatenate([[0], np.cumsum(np.isnan(m))])
        missing = nans[length:] - nans[:-length]
        good = missing <= _allowed_missing(length, max_missing_fraction)
        out[length - 1 :] = np.where(good, (zsum[length:] - zsum[:-length]) / np.maximum(length - missing, 1), np.nan)
        return out

    rv_s, rv_l = rolling_mean_sq(short), rolling_mean_sq(long)
    ratio = np.where(rv_l > 0, np.sqrt(rv_s / np.where(rv_l > 0, rv_l, 1.0)), np.nan)
    idx = np.arange(t)
    last_enter = np.maximum.accumulate(np.where(ratio >= enter, idx, -1)) if t else idx
    last_exit = np.maximum.accumulate(np.where(ratio <= exit, idx, -1)) if t else idx
    turbulent = (last_enter > last_exit) & (last_enter > idx - memory)
    return turbulent, ratio


def regime_breakpoints(turbulent: np.ndarray) -> np.ndarray:
    """Rows where the state differs from the row before (the first row is never a breakpoint)."""
    turbulent = np.asarray(turbulent, dtype=bool)
    return np.flatnonzero(turbulent[1:] != turbulent[:-1]) + 1


def reset_windows(ends: np.ndarray, breakpoints: np.ndarray, *, window: int, reset_window: int) -> np.ndarray:
    """Window length per asof after regime resets: ``clip(e - b + 1, reset_window, window)`` where
    ``b`` is the latest breakpoint row ``<= e`` (``window`` when there is none within the window).

    On a regime change the estimates restart from the breakpoint bar, using at least
    ``reset_window`` bars, and the window grows back by one bar per bar until it is ``window`` again.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if not 2 <= reset_window <= window:
        raise ConfigError(f"reset_window must be in [2, window={window}], got {reset_window!r}")
    bps = np.sort(np.asarray(breakpoints, dtype=np.int64))
    if bps.size == 0:
        return np.full(ends.shape, window, dtype=np.int64)
    pos = np.searchsorted(bps, ends, side="right") - 1
    since = np.where(pos >= 0, ends - bps[np.maximum(pos, 0)] + 1, window)
    return np.clip(since, reset_window, window).astype(np.int64)


def latest_breakpoint(ends: np.ndarray, breakpoints: np.ndarray, *, memory: int) -> np.ndarray:
    """Row of the latest breakpoint ``b <= e`` with ``e - b < memory`` per end row, -1 if none."""
    ends = np.asarray(ends, dtype=np.int64)
    bps = np.sort(np.asarray(breakpoints, dtype=np.int64))
    pos = np.searchsorted(bps, ends, side="right") - 1
    b = np.where(pos >= 0, bps[np.maximum(pos, 0)] if bps.size else -1, -1)
    return np.where((b >= 0) & (ends - b < memory), b, -1)


def build_signals(
    ts: np.ndarray,
    net_returns: np.ndarray,
    funding_returns: np.ndarray,
    asofs,
    symbols: list[str],
    implied_vol: pl.DataFrame,
    *,
    window: int,
    bar_hours: int,
    momentum_bars: int,
    ewma_half_life_bars: float,
    vrp_z_days: int,
    regime_short_bars: int,
    regime_long_bars: int,
    regime_enter: float,
    regime_exit: float,
    funding_fit_days: int = 30,
    garch_max_iter: int = 200,
    one_bar_returns: np.ndarray | None = None,
    max_missing_fraction: float = 0.0,
    vrp_proxy: bool = False,
) -> tuple[pl.DataFrame, dict]:
    """The signals.signals rows of ``asofs`` (consecutive daily asofs) and metadata.

    ``ts``: the T bar times of the matrices (strictly increasing); ``net_returns`` /
    ``funding_returns``: T x N per-bar matrices (NaN = missing), columns in ``symbols`` order;
    ``one_bar_returns``: ``net_returns`` without the returns that span a gap (NaN there; default
    ``net_returns``): realized variance, predicted vols and the regime use one-bar returns,
    momentum and funding the net returns, spanning ones included. Each symbol may miss
    ``max_missing_fraction`` of a window's bars (see the signal functions); ``vrp_proxy`` True
    puts the BTC-scaled proxy into ``vrp`` for symbols without their own index (``vrp_signals``;
    ``vrp_with_proxy`` always holds it).
    Each asof sees the last bar at or before it. Trailing statistics (VRP z-score, funding AR(1))
    are computed on the daily grid of the ``max(vrp_z_days, funding_fit_days + 1)`` days before
    the first asof, so the loaded history must cover them (plus ``window`` bars, and
    ``2 * regime_long_bars`` bars for the regime's long window and memory) for the values to
    equal those of one long run.
    Metadata: funding-forecast evaluation (AR(1) vs naive, out of sample over the daily grid),
    GARCH timing, regime breakpoints, counts.
    """
    ts = to_datetime64(ts)
    asofs = to_datetime64(asofs)
    ppy = 8760.0 / bar_hours
    day = np.timedelta64(1, "D")
    history = max(vrp_z_days, funding_fit_days + 1)
    grid = np.concatenate([asofs[0] - np.arange(history, 0, -1) * day, asofs]) if asofs.size else asofs
    grid_ends = np.searchsorted(ts, grid, side="right") - 1
    k = asofs.size
    ends = grid_ends[-k:] if k else grid_ends[:0]
    one_bar = net_returns if one_bar_returns is None else one_bar_returns
    missing = dict(max_missing_fraction=max_missing_fraction)
    realized = realized_variance(one_bar, grid_ends, window=window, periods_per_year=ppy, **missing)
    vrp_frame = vrp_signals(grid, symbols, realized, implied_vol, use_proxy=vrp_proxy)
    n = len(symbols)
    vrp = vrp_frame["vrp"].fill_null(np.nan).to_numpy().reshape(grid.size, n)
    vrp_z = trailing_zscore(vrp, lookback=vrp_z_days)
    daily_rate = daily_funding_rate(funding_returns, bar_hours=bar_hours)
    f_daily = np.where(grid_ends[:, None] >= 0, daily_rate[np.maximum(grid_ends, 0)], np.nan)
    f_hat = forecast_funding(f_daily, method="ar1", fit_days=funding_fit_days)
    evaluation = evaluate_funding_forecast(f_daily, f_hat)
    adj = funding_adjusted_vrp(vrp, f_hat)
    mom = momentum(net_returns, ends, lookback=momentum_bars, **missing)
    vol_ewma = ewma_predicted_vol(one_bar, ends, window=window, half_life=ewma_half_life_bars, periods_per_year=ppy,
                                  **missing)
    vol_garch, garch_stats = garch_predicted_vol(
        one_bar, ends, window=window, horizon=max(1, 24 // bar_hours), periods_per_year=ppy, max_iter=garch_max_iter,
        **missing,
    )
    memory = regime_long_bars
    turbulent, ratio = regime_states(
        one_bar, short=regime_short_bars, long=regime_long_bars, enter=regime_enter, exit=regime_exit, memory=memory,
        **missing,
    )
    bps = regime_breakpoints(turbulent)
    since = latest_breakpoint(ends, bps, memory=memory)
    safe = np.maximum(ends, 0)
    tail = vrp_frame.slice((grid.size - k) * n, k * n)
    rep = lambda a: np.repeat(np.asarray(a), n)  # noqa: E731  per-asof values onto the asof x symbol rows
    frame = tail.with_columns(
        vrp_z=pl.Series(vrp_z[-k:].ravel(), nan_to_null=True),
        funding_forecast_1h=pl.Series(f_hat[-k:].ravel(), nan_to_null=True),
        funding_adj_vrp=pl.Series(adj[-k:].ravel(), nan_to_null=True),
        momentum=pl.Series(mom.ravel(), nan_to_null=True),
        predicted_vol_ewma=pl.Series(vol_ewma.ravel(), nan_to_null=True),
        predicted_vol_garch=pl.Series(vol_garch.ravel(), nan_to_null=True),
        vol_ratio=pl.Series(rep(np.where(ends >= 0, ratio[safe], np.nan)), nan_to_null=True),
        regime=pl.Series(rep(np.where((ends >= 0) & turbulent[safe], "turbulent", "calm")).tolist(), dtype=pl.String),
        regime_since=pl.Series(rep(np.where(since >= 0, ts[np.maximum(since, 0)], np.datetime64("NaT", "us"))))
        .dt.replace_time_zone("UTC"),
    )
    in_range = bps[(ts[bps] <= asofs[-1])] if (k and bps.size) else bps[:0]
    meta = {
        **{f"funding_forecast_{key}": (round(v, 10) if isinstance(v, float) else v) for key, v in evaluation.items()},
        **garch_stats,
        "regime_breakpoints": [str(ts[b]) + (" -> turbulent" if turbulent[b] else " -> calm") for b in in_range[-20:]],
        "turbulent_asofs": int(np.sum((ends >= 0) & turbulent[safe])),
    }
    return frame, meta

"""Signals per (asof, symbol): realized variance, implied variance and the variance risk premium.

Units: every variance here is ANNUALIZED (a variance of annual returns, e.g. 0.36 = 60% vol).
``VRP = implied_var - realized_var``. Implied variance is ``iv^2`` of an implied-vol index quoted
as an annualized decimal (``raw.implied_vol.iv``, 0.55 = 55%); a symbol without its own index
gets a labelled proxy scaled from the reference index by relative realized variance.
Look-ahead: realized variance uses bars up to and including the one opened at ``asof``; an index
value is usable at ``asof`` only if its ``ts <= asof``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import _check_ends, _check_returns, to_datetime64
from perpfolio.returns import _utc_us

_CHUNK = 64


def realized_variance(returns: np.ndarray, ends: np.ndarray, *, window: int, periods_per_year: float) -> np.ndarray:
    """Annualized realized variance ``RV_i = mean(r_i^2) * periods_per_year`` per window, K x N.

    ``returns``: ``T x N`` per-bar returns (NaN = missing bar); window ``k`` is the ``window``
    rows ending at ``ends[k]`` (-1: no bar at or before the asof). The mean is taken around zero
    (not the sample mean), the usual realized-variance convention for short horizons. Each
    symbol stands on its own: RV is NaN for a symbol with a NaN in its window, and for every
    symbol when the window would start before row 0.
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}")
    if not np.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ConfigError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    starts = ends - window + 1
    out = np.full((ends.size, n), np.nan)
    todo = np.flatnonzero(starts >= 0)
    for chunk in range(0, todo.size, _CHUNK):
        rows = todo[chunk : chunk + _CHUNK]
        w = returns[starts[rows, None] + np.arange(window)]  # (c, window, n)
        out[rows] = np.mean(w * w, axis=1)  # a NaN bar makes that symbol's mean NaN
    return out * periods_per_year


def vrp_signals(
    asofs: np.ndarray,
    symbols: list[str],
    realized_var: np.ndarray,
    implied_vol: pl.DataFrame,
    *,
    proxy_reference: str = "BTC",
    max_iv_age_hours: int = 48,
) -> pl.DataFrame:
    """Variance risk premium ``vrp = implied_var - realized_var`` (annualized variances).

    ``realized_var``: K x N annualized variances (``realized_variance``), NaN = unknown.
    ``implied_vol``: ts, underlying, iv (annualized decimal). For a symbol (underlying = symbol
    without "USDT") the index value is the latest row with ``asof - max_iv_age_hours <= ts <= asof``:
    ``implied_var = iv^2``, ``iv_source = "index"``. Without a usable index of its own, the
    proxy ``implied_var = iv_ref^2 * realized_var_i / realized_var_ref`` (the reference's implied
    vol scaled by relative realized vol; the reference symbol must be in ``symbols`` with a
    positive realized variance) gives ``iv_source = "proxy:<reference>"``. Otherwise
    implied_var and vrp are null and ``iv_source = "unavailable"``.

    Returns asof (Datetime us UTC), symbol, implied_var, realized_var, vrp, iv_source, sorted by
    asof then in the order of ``symbols``. Nulls stand for unknown values.
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
    has_proxy = ~has_own & ~np.isnan(proxy)
    implied = np.where(has_own, own, proxy)
    source = np.where(has_own, "index", np.where(has_proxy, f"proxy:{proxy_reference}", "unavailable"))
    return pl.DataFrame(
        {
            "as_of": pl.Series(np.repeat(asofs, n)).dt.replace_time_zone("UTC"),
            "symbol": pl.Series(np.tile(np.array(symbols, dtype=object), k).tolist(), dtype=pl.String),
            "implied_var": pl.Series(implied.ravel(), nan_to_null=True),
            "realized_var": pl.Series(realized_var.ravel(), nan_to_null=True),
            "vrp": pl.Series((implied - realized_var).ravel(), nan_to_null=True),
            "iv_source": pl.Series(source.ravel().tolist(), dtype=pl.String),
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

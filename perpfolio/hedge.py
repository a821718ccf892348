"""Minimum-variance hedge of spot exposures with perpetual futures (the spot-versus-perp overlay).

Returns are per-bar SIMPLE returns. A symbol's SPOT return is its index price's
``index_close_t / index_close_prev - 1`` (raw.reference_prices kind "index", the exchange's spot
composite), on the same bars as the perps. A PERP return is the net return of a long perp INCLUDING
funding, ``price_return + funding_return`` of features.net_returns (whatever PERPFOLIO_RETURN_KIND
says), so a short hedge earns minus the price move and receives what longs pay.

A spot position of notional ``N`` (USDT; negative = short spot) and perp positions ``x`` (USDT
notional; negative = short) earn ``N r_s + x' r_F`` in a bar. With the hedge ratios ``h = -x / N``
(USDT of each perp SHORTED per USDT of spot) the hedged return per USDT of spot is
``e = r_s - h' r_F``, and::

    Var(e) = s_ss - 2 h' S_FS + h' S_FF h,   minimized by
    h* = S_FF^-1 S_FS                        (cross hedge with K perps)
    h* = Cov(r_s, r_f) / Var(r_f)            (one perp)

``h*`` is the slope of the OLS regression of ``r_s`` on ``r_F`` with an intercept; it is unitless
(USDT per USDT) and does not depend on the bar length. The perp positions of the hedge are
``hedge_notional = -h* N`` USDT. Hedge effectiveness ``HE = 1 - Var(e) / Var(r_s)``: in sample it is
the regression's R^2 (in [0, 1]); out of sample it can be negative (the hedge added risk).
Covariances divide by ``T - 1`` (ddof 1; h* and HE do not depend on ddof).

The spot BOOK (every position together) is one more spot series: its return per USDT of gross
notional ``G = sum_i |N_i|`` is ``b = sum_i N_i r_s,i / G``, hedged like a symbol with notional G.

NaN policy (as perpfolio.estimators): a window holding a missing bar of the spot series or of any
perp it is hedged with is never fitted on partial data; its rows get status "missing_data" (e.g. a
source without index prices), "insufficient_history" when it would start before the first bar, and
"degenerate" when a series is constant or the perps are collinear. Fitting functions called
directly raise :class:`~perpfolio.errors.DataError` naming the symbol and asof instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from perpfolio import returns
from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import to_datetime64

BOOK = "book"
_COLLINEAR_COND = 1e12  # condition number of the perps' correlation matrix above which they are collinear
_TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class HedgeFit:
    """A minimum-variance hedge fitted on one window (per-bar units).

    ratios         K   h*, USDT of each perp shorted per USDT of spot
    effectiveness      in-sample ``1 - hedged_var / spot_var`` (= R^2)
    spot_var           Var(r_s), per bar, ddof 1
    hedged_var         Var(r_s - h*' r_F), per bar, ddof 1
    n_obs              bars in the window
    """

    ratios: np.ndarray
    effectiveness: float
    spot_var: float
    hedged_var: float
    n_obs: int

    def __repr__(self) -> str:
        return f"HedgeFit(ratios={np.round(self.ratios, 4).tolist()}, effectiveness={self.effectiveness:.4f}, n_obs={self.n_obs})"


def fit_hedge(
    spot: np.ndarray, perps: np.ndarray, *, symbol: str, asof: datetime | str, perp_names: Sequence[str]
) -> HedgeFit:
    """Minimum-variance hedge ratios ``h* = S_FF^-1 S_FS`` of ``spot`` with ``perps`` (module docstring).

    ``spot``: T per-bar simple spot returns; ``perps``: T x K per-bar simple perp net returns (or T
    for one perp), both over the same bars. ``symbol``, ``asof`` and ``perp_names`` (K) only name
    the data in errors. Raises DataError naming them when a value is NaN/inf, when T < K + 2 (K
    slopes, an intercept and one degree of freedom), when the spot or a perp is constant, or when
    the perps are collinear (condition number of their correlation matrix above 1e12).
    """
    spot, perps = _check(spot, perps, symbol=symbol, asof=asof)
    t, k = perps.shape
    if len(perp_names) != k:
        raise DataError(f"fit_hedge: {len(perp_names)} perp_names for {k} perp columns (symbol {symbol}, asof {asof})")
    if t < k + 2:
        raise DataError(f"hedge of {symbol} at asof {asof}: {t} bars are too few for {k} perp(s); need at least {k + 2}")
    if np.all(spot == spot[0]):
        raise DataError(f"hedge of {symbol} at asof {asof}: the spot return is constant over the {t} bars (nothing to hedge)")
    flat = [name for name, column in zip(perp_names, perps.T) if np.all(column == column[0])]
    if flat:
        raise DataError(f"hedge of {symbol} at asof {asof}: perp return of {flat} is constant over the {t} bars")
    cov = np.cov(np.column_stack([spot, perps]), rowvar=False, ddof=1).reshape(k + 1, k + 1)
    sd = np.sqrt(np.diag(cov)[1:])
    if np.linalg.cond(cov[1:, 1:] / np.outer(sd, sd)) > _COLLINEAR_COND:
        raise DataError(f"hedge of {symbol} at asof {asof}: the perps {list(perp_names)} are collinear over the {t} bars")
    ratios = np.linalg.solve(cov[1:, 1:], cov[1:, 0])
    spot_var, hedged_var = _variances(spot, perps, ratios)
    return HedgeFit(ratios, 1.0 - hedged_var / spot_var, spot_var, hedged_var, t)


def hedge_effectiveness(
    spot: np.ndarray, perps: np.ndarray, ratios: np.ndarray, *, symbol: str, asof: datetime | str
) -> float:
    """``HE = 1 - Var(r_s - h' r_F) / Var(r_s)`` of the hedge ``ratios`` (K) on these bars (ddof 1).

    Out of sample (``ratios`` fitted on earlier bars) HE can be negative. Raises DataError naming
    ``symbol`` and ``asof`` for NaN/inf, fewer than 2 bars or a constant spot return.
    """
    spot, perps = _check(spot, perps, symbol=symbol, asof=asof)
    ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if ratios.size != perps.shape[1] or not np.all(np.isfinite(ratios)):
        raise DataError(f"hedge of {symbol} at asof {asof}: ratios {ratios.tolist()} must be {perps.shape[1]} finite numbers")
    if spot.size < 2:
        raise DataError(f"hedge of {symbol} at asof {asof}: effectiveness needs at least 2 bars, got {spot.size}")
    if np.all(spot == spot[0]):
        raise DataError(f"hedge of {symbol} at asof {asof}: the spot return is constant over the {spot.size} bars")
    spot_var, hedged_var = _variances(spot, perps, ratios)
    return 1.0 - hedged_var / spot_var


def _variances(spot: np.ndarray, perps: np.ndarray, ratios: np.ndarray) -> tuple[float, float]:
    """(Var(r_s), Var(r_s - perps @ ratios)), ddof 1."""
    return float(np.var(spot, ddof=1)), float(np.var(spot - perps @ ratios, ddof=1))


def _check(spot, perps, *, symbol, asof) -> tuple[np.ndarray, np.ndarray]:
    spot = np.asarray(spot, dtype=np.float64)
    perps = np.asarray(perps, dtype=np.float64)
    if perps.ndim == 1:
        perps = perps[:, None]
    if spot.ndim != 1 or perps.ndim != 2 or perps.shape[0] != spot.size:
        raise DataError(f"hedge of {symbol} at asof {asof}: spot must be T and perps T x K over the same bars, "
                        f"got shapes {spot.shape} and {perps.shape}")
    bad = ~np.isfinite(spot) | ~np.isfinite(perps).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"hedge of {symbol} at asof {asof}: missing or non-finite return at bar {row} of the window "
                        f"(spot {spot[row]!r}, perps {perps[row].tolist()})")
    return spot, perps


# --- the hedge table at every asof ----------------------------------------------------------------


def hedge_table(
    spot: np.ndarray, perps: np.ndarray, ends: np.ndarray, asofs: Sequence[datetime], symbols: Sequence[str],
    notional: Mapping[str, float], *, window: int, period: int, periods_per_year: float,
) -> pl.DataFrame:
    """Single-perp and cross hedges of every spot position and of the book at each asof.

    ``spot``, ``perps``: T x N per-bar simple returns on one bar grid, columns in ``symbols`` order,
    NaN = missing. ``ends[k]``: row of the last bar at or before ``asofs[k]`` (-1: none). The fit at
    asof k uses the ``window`` rows ending at ``ends[k]``. ``notional``: spot USDT per symbol (a
    subset of ``symbols``, non-zero). ``period``: bars between asofs (one day).

    Rows per asof: for each spot symbol s, hedge "single" (with perp s) and "cross" (one row per
    perp); for the book, "cross". Columns: as_of, symbol (spot symbol or "book"), hedge, perp,
    spot_notional (USDT; the book's is the gross G), hedge_ratio (h*), hedge_notional (USDT,
    ``-h* spot_notional``), effectiveness (in sample), effectiveness_oos (the hedge fitted one
    ``period`` earlier applied to the ``period`` bars ending at the asof, unseen by that fit; null
    when that fit or those bars are unusable or ``period < 2``), spot_vol and hedged_vol
    (annualized ``sqrt(var x periods_per_year)``), n_obs (complete bars in the window), window_bars,
    status (ok | insufficient_history | missing_data | degenerate; values null unless ok).
    """
    spot = np.asarray(spot, dtype=np.float64)
    perps = np.asarray(perps, dtype=np.float64)
    symbols = list(symbols)
    n = len(symbols)
    if spot.shape != perps.shape or spot.ndim != 2 or spot.shape[1] != n:
        raise DataError(f"hedge_table: spot {spot.shape} and perps {perps.shape} must both be T x {n} (symbols {symbols})")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < n + 2:
        raise ConfigError(f"hedge window must be an integer >= number of perps + 2 = {n + 2}, got {window!r}")
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
        raise ConfigError(f"hedge period must be a positive integer number of bars, got {period!r}")
    series = _spot_series(spot, symbols, notional)
    ends = np.asarray(ends, dtype=np.int64)
    fits: dict[tuple[str, str, int], HedgeFit | str] = {}
    batched: set[int] = set()  # window ends whose cross hedges `cross_fits_at` has tried

    def cross_fits_at(end: int) -> None:
        """The cross hedges of every series whose window ending at row ``end`` is complete, at once:
        ``S_FF`` is the same for all of them, so one solve with a column per series gives every
        ``h* = S_FF^-1 S_FS`` (what `fit_hedge` computes for each alone). A window the batch cannot
        decide (too short, a missing bar, a constant series, collinear perps) is left to `fit_hedge`."""
        lo = end - window + 1
        if lo < 0 or not np.isfinite(perps[lo : end + 1]).all():
            return
        f = perps[lo : end + 1]
        complete = [(name, r_s[lo : end + 1]) for name, r_s, _, _ in series if np.isfinite(r_s[lo : end + 1]).all()]
        if not complete:
            return
        names, s_cols = [name for name, _ in complete], np.column_stack([column for _, column in complete])
        if (f == f[0]).all(axis=0).any() or (s_cols == s_cols[0]).all(axis=0).any():
            return
        fc, sc = f - f.mean(axis=0), s_cols - s_cols.mean(axis=0)
        s_ff, s_fs = fc.T @ fc / (window - 1), fc.T @ sc / (window - 1)
        sd = np.sqrt(np.diag(s_ff))
        if np.linalg.cond(s_ff / np.outer(sd, sd)) > _COLLINEAR_COND:
            return
        ratios = np.linalg.solve(s_ff, s_fs)
        spot_var, hedged_var = np.var(s_cols, axis=0, ddof=1), np.var(s_cols - f @ ratios, axis=0, ddof=1)
        for j, name in enumerate(names):
            fits[(name, "cross", end)] = HedgeFit(ratios[:, j], 1.0 - hedged_var[j] / spot_var[j], float(spot_var[j]),
                                                  float(hedged_var[j]), window)

    def fit_at(name: str, r_s: np.ndarray, hedge: str, cols: list[int], end: int) -> HedgeFit | str:
        """The fit of the window ending at row ``end``, or its status when it cannot be fitted."""
        key = (name, hedge, end)
        if hedge == "cross" and end not in batched:
            batched.add(end)
            cross_fits_at(end)
        if key not in fits:
            lo = end - window + 1
            rows = slice(max(lo, 0), end + 1)
            if lo < 0:
                fits[key] = "insufficient_history"
            elif not (np.isfinite(r_s[rows]).all() and np.isfinite(perps[rows][:, cols]).all()):
                fits[key] = "missing_data"
            else:
                try:
                    fits[key] = fit_hedge(r_s[rows], perps[rows][:, cols], symbol=name, asof=f"bar row {end}",
                                          perp_names=[symbols[c] for c in cols])
                except DataError:  # the window is complete (checked above): a constant series or collinear perps
                    fits[key] = "degenerate"
        return fits[key]

    def out_of_sample(name: str, r_s: np.ndarray, hedge: str, cols: list[int], end: int, asof) -> float | None:
        start = end - period
        previous = fit_at(name, r_s, hedge, cols, start) if start >= 0 and period >= 2 else None
        if not isinstance(previous, HedgeFit):
            return None
        rows = slice(start + 1, end + 1)
        if not (np.isfinite(r_s[rows]).all() and np.isfinite(perps[rows][:, cols]).all()):
            return None
        try:
            return hedge_effectiveness(r_s[rows], perps[rows][:, cols], previous.ratios, symbol=name, asof=asof)
        except DataError:  # a spot constant over the whole period: effectiveness undefined
            return None

    perps_present = np.isfinite(perps).all(axis=1)
    complete = {name: np.concatenate([[0], np.cumsum(np.isfinite(r_s) & perps_present)]) for name, r_s, _, _ in series}
    out: dict[str, list] = {c: [] for c in _TABLE_COLUMNS}
    for k, asof in enumerate(asofs):
        end = int(ends[k])
        for name, r_s, spot_notional, own in series:
            hedges = ([("single", [own])] if own is not None else []) + [("cross", list(range(n)))]
            lo = max(end - window + 1, 0)
            n_obs = int(complete[name][end + 1] - complete[name][lo]) if end >= 0 else 0
            for hedge, cols in hedges:  # one block of rows (a perp each) per series and hedge
                fit = fit_at(name, r_s, hedge, cols, end)
                ok = isinstance(fit, HedgeFit)
                oos = out_of_sample(name, r_s, hedge, cols, end, asof) if ok else None
                ratios = fit.ratios.tolist() if ok else [None] * len(cols)
                block = {
                    "perp": [symbols[col] for col in cols], "hedge_ratio": ratios,
                    "hedge_notional": [-ratio * spot_notional for ratio in ratios] if ok else ratios,
                }
                same = (asof, name, hedge, spot_notional, float(fit.effectiveness) if ok else None, oos,
                        float(np.sqrt(fit.spot_var * periods_per_year)) if ok else None,
                        float(np.sqrt(fit.hedged_var * periods_per_year)) if ok else None,
                        n_obs, window, "ok" if ok else fit)
                for column, value in zip(_BLOCK_CONSTANT, same):
                    block[column] = [value] * len(cols)
                for column in _TABLE_COLUMNS:
                    out[column].extend(block[column])
    return pl.DataFrame(out, schema=_TABLE_COLUMNS)


_BLOCK_CONSTANT = ("as_of", "symbol", "hedge", "spot_notional", "effectiveness", "effectiveness_oos", "spot_vol",
                   "hedged_vol", "n_obs", "window_bars", "status")  # the same on every row of a block (all but the perp's)
_TABLE_COLUMNS = {
    "as_of": _TS, "symbol": pl.String, "hedge": pl.String, "perp": pl.String, "spot_notional": pl.Float64,
    "hedge_ratio": pl.Float64, "hedge_notional": pl.Float64, "effectiveness": pl.Float64,
    "effectiveness_oos": pl.Float64, "spot_vol": pl.Float64, "hedged_vol": pl.Float64, "n_obs": pl.Int64,
    "window_bars": pl.Int64, "status": pl.String,
}


def _spot_series(spot: np.ndarray, symbols: list[str], notional: Mapping[str, float]) -> list[tuple]:
    """(name, per-bar return, notional USDT, own perp column or None) of each position and the book."""
    unknown = sorted(set(notional) - set(symbols))
    if not notional or unknown:
        raise ConfigError(f"spot notional must name some of the symbols {symbols}; unknown {unknown or 'none given'}")
    bad = {s: v for s, v in notional.items() if not (np.isfinite(v) and v != 0.0)}
    if bad:
        raise ConfigError(f"spot notional must be finite and non-zero USDT, got {bad}")
    cols = [symbols.index(s) for s in symbols if s in notional]
    n_usdt = np.array([notional[symbols[c]] for c in cols])
    gross = float(np.abs(n_usdt).sum())
    book = spot[:, cols] @ n_usdt / gross  # NaN when any position's return is missing
    return [(symbols[c], spot[:, c], float(notional[symbols[c]]), c) for c in cols] + [(BOOK, book, gross, None)]


# --- inputs from the warehouse frames -------------------------------------------------------------


def spot_returns(reference_prices: pl.DataFrame, *, bar_hours: int) -> pl.DataFrame:
    """ts, symbol, spot_return: per-bar simple returns of the index price (kind "index").

    The same bars and gap policy as the perps' price returns (perpfolio.returns.net_returns): coarse
    bars close at their last hourly close, a return spanning missing bars is kept (from the last
    close), the first bar of a symbol has no return.
    """
    index = reference_prices.filter(pl.col("kind") == "index").select("ts", "symbol", "close")
    no_funding = pl.DataFrame(schema={"bar_ts": _TS, "symbol": pl.String, "rate": pl.Float64})
    frame = returns.net_returns(index, no_funding, bar_hours=bar_hours, kind="simple")
    return frame.select("ts", "symbol", pl.col("price_return").alias("spot_return"))


def return_matrices(
    net_returns: pl.DataFrame, spot: pl.DataFrame, symbols: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts, spot T x N, perps T x N) on the union of both bar grids, columns in ``symbols`` order, NaN
    where missing. Perps: ``price_return + funding_return`` of ``net_returns`` (simple, with funding)."""
    perp = net_returns.with_columns(perp_return=pl.col("price_return") + pl.col("funding_return"))
    parts = [returns.returns_matrix(frame, column=column) for frame, column in ((spot, "spot_return"), (perp, "perp_return"))]
    grid = np.union1d(parts[0][0], parts[1][0]).astype("datetime64[us]")
    matrices = []
    for ts, found, matrix in parts:
        out = np.full((grid.size, len(symbols)), np.nan)
        rows = np.searchsorted(grid, ts)
        for j, symbol in enumerate(symbols):
            if symbol in found:
                out[rows, j] = matrix[:, found.index(symbol)]
        matrices.append(out)
    return grid, matrices[0], matrices[1]


def basis_stats(
    candles: pl.DataFrame, reference_prices: pl.DataFrame, asofs: Sequence[datetime], *, window_hours: int, bar_hours: int
) -> pl.DataFrame:
    """as_of, symbol, basis_mean, basis_std, basis_last of the hourly basis ``close / index_close - 1``.

    Basis: the perp's premium over its index (decimal, positive = perp above spot), per hourly bar.
    Over the ``window_hours`` hourly bars that end with the asof's bar (the last hour of a coarse bar
    of ``bar_hours``): mean, standard deviation (ddof 1) and the value of that last hour. Null when
    any of those hours lacks a perp close or an index close.
    """
    hourly = candles.select("ts", "symbol", "close").join(
        reference_prices.filter(pl.col("kind") == "index").select("ts", "symbol", pl.col("close").alias("index_close")),
        on=["ts", "symbol"], how="inner",
    ).select("ts", "symbol", basis=pl.col("close") / pl.col("index_close") - 1.0).sort("symbol", "ts")
    stats = hourly.rolling(index_column="ts", period=f"{window_hours}h", group_by="symbol").agg(
        basis_mean=pl.col("basis").mean(), basis_std=pl.col("basis").std(ddof=1), basis_last=pl.col("basis").last(),
        hours=pl.len(),
    )
    last_hour = timedelta(hours=bar_hours - 1)
    wanted = pl.DataFrame({"as_of": list(asofs)}, schema={"as_of": _TS}).with_columns(ts=pl.col("as_of") + last_hour)
    full = pl.col("hours") == window_hours
    return wanted.join(stats, on="ts", how="inner").select(
        "as_of", "symbol", *(pl.when(full).then(c).alias(c) for c in ("basis_mean", "basis_std", "basis_last"))
    )


def spot_hedge_frame(
    net_returns: pl.DataFrame, reference_prices: pl.DataFrame, candles: pl.DataFrame, symbols: Sequence[str],
    asofs: Sequence[datetime], notional: Mapping[str, float], *, window: int, bar_hours: int,
) -> pl.DataFrame:
    """The risk.spot_hedge table: :func:`hedge_table` over the index-price spot returns and the perps'
    net returns, joined with :func:`basis_stats` of each spot symbol (null for the book).

    ``window`` bars of ``bar_hours`` hours; asofs one day apart (the out-of-sample period is the
    day's ``24 / bar_hours`` bars).
    """
    ts, spot, perps = return_matrices(net_returns, spot_returns(reference_prices, bar_hours=bar_hours), symbols)
    ends = np.searchsorted(ts, to_datetime64(list(asofs)), side="right") - 1
    table = hedge_table(spot, perps, ends, asofs, symbols, notional, window=window, period=24 // bar_hours,
                        periods_per_year=returns.periods_per_year(bar_hours))
    basis = basis_stats(candles, reference_prices, asofs, window_hours=window * bar_hours, bar_hours=bar_hours)
    return table.join(basis, on=["as_of", "symbol"], how="left")

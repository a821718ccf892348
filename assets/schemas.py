"""Pandera (polars) models of every warehouse table: the data contract of DESIGN.md section 2.

Each model is declared once and used three ways: `conform` puts an asset's output in the
table's column order and dtypes, the blocking asset check validates it, and the UI's column view
shows its columns with their descriptions (`dagster/column_schema`, assets/checks.py).

Pandera's polars backend rejects NaN/null in a float column by default but lets `inf`
through `gt=0`, so every float column states finiteness explicitly.
"""


from typing import Annotated

import polars as pl
import pandera.polars as pa
import polars.selectors as cs
from pandera.engines.polars_engine import DateTime
from pandera.api.polars.model_config import BaseConfig

from perpfolio.estimators import STATUSES as ESTIMATE_STATUSES
from perpfolio.universe import REASONS as UNIVERSE_REASONS

UTC_US = {"time_unit": "us", "time_zone": "UTC"}
WEIGHT_SUM_TOLERANCE = 1e-6




def _ts(description: str) -> object:
    return pa.Field(dtype_kwargs=UTC_US, description=description)


def _unique_key(data: pa.PolarsData, key: list[str]) -> pl.LazyFrame:
    return data.lazyframe.select(~pl.struct(key).is_duplicated())


def _ohlc_consistent(data: pa.PolarsData) -> pl.LazyFrame:
    return data.lazyframe.select(
        (pl.col("high") >= pl.max_horizontal("open", "close")) & (pl.col("low") <= pl.min_horizontal("open", "close"))
    )


class Table(pa.DataFrameModel):
    """Base of every table: strict columns, no coercion, every float finite (null where allowed)."""

    class Config(BaseConfig):
        strict = True
        coerce = False

    @pa.dataframe_check(error="float columns must be finite (no inf)")
    def floats_finite(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.all_horizontal(cs.float().is_finite() | cs.float().is_null()))


class Candles(Table):
    """raw.candles: one hourly OHLCV bar per symbol; ts is the bar's open time (UTC)."""

    ts: DateTime = _ts("bar open time, UTC")
    symbol: str = pa.Field(description="exchange symbol, e.g. BTCUSDT")
    open: float = pa.Field(gt=0, description="open price, quote currency")
    high: float = pa.Field(gt=0, description="high price, >= open and close")
    low: float = pa.Field(gt=0, description="low price, <= open and close")
    close: float = pa.Field(gt=0, description="close price")
    volume: float = pa.Field(ge=0, description="base-asset volume of the bar")
    source: str = pa.Field(description="where the row came from (synthetic, exchange, archive)")

    @pa.dataframe_check(error="duplicate (ts, symbol)")
    def unique_bar(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "symbol"])

    @pa.dataframe_check(error="high < max(open, close) or low > min(open, close)")
    def ohlc_consistent(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _ohlc_consistent(data)


class Funding(Table):
    """raw.funding: one funding event per symbol; a positive rate means longs pay shorts."""

    ts: DateTime = _ts("funding event time, UTC")
    bar_ts: DateTime = _ts("open time of the hourly bar whose interval (bar_ts, bar_ts+1h] holds the event")
    symbol: str = pa.Field(description="exchange symbol")
    rate: float = pa.Field(ge=-0.05, le=0.05, description="funding rate per interval, decimal")
    interval_hours: int = pa.Field(isin=[1, 2, 4, 8], description="hours since the previous event of this symbol")
    source: str = pa.Field(description="where the row came from")

    @pa.dataframe_check(error="duplicate (ts, symbol)")
    def unique_event(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "symbol"])


class ImpliedVol(Table):
    """raw.implied_vol: an implied-volatility index (e.g. 30-day DVOL) per underlying."""

    ts: DateTime = _ts("observation time, UTC")
    underlying: str = pa.Field(description="underlying asset, e.g. BTC")
    iv: float = pa.Field(gt=0, lt=10, description="implied volatility, annualized decimal (0.55 = 55%)")
    source: str = pa.Field(description="index provider (synthetic, dvol, csv)")

    @pa.dataframe_check(error="duplicate (ts, underlying)")
    def unique_obs(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "underlying"])


class ReferencePrices(Table):
    """raw.reference_prices: hourly mark and index price bars per symbol (the index is the exchange's
    spot composite, the spot series of the hedge overlay); ts is the bar open time (UTC)."""

    ts: DateTime = _ts("bar open time, UTC")
    symbol: str = pa.Field(description="exchange symbol of the perpetual, e.g. BTCUSDT")
    kind: str = pa.Field(isin=["mark", "index"], description="mark: the price margin and PnL are marked at; index: the spot composite")
    open: float = pa.Field(gt=0, description="open price, quote currency")
    high: float = pa.Field(gt=0, description="high price, >= open and close")
    low: float = pa.Field(gt=0, description="low price, <= open and close")
    close: float = pa.Field(gt=0, description="close price")
    source: str = pa.Field(description="where the row came from (synthetic, exchange, archive)")

    @pa.dataframe_check(error="duplicate (ts, symbol, kind)")
    def unique_bar(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "symbol", "kind"])

    @pa.dataframe_check(error="high < max(open, close) or low > min(open, close)")
    def ohlc_consistent(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _ohlc_consistent(data)


class NetReturns(Table):
    """features.net_returns: per-bar returns of a long position, price plus funding."""

    ts: DateTime = _ts("bar open time, UTC")
    symbol: str = pa.Field(description="exchange symbol")
    price_return: float = pa.Field(gt=-1, description="simple return close/prev_close - 1")
    funding_return: float = pa.Field(description="minus the sum of funding rates settled in the bar")
    net_return: float = pa.Field(description="price + funding (simple) or log1p of it (log), per setting")
    filled: bool = pa.Field(description="true when the return spans missing bars (previous close is older than one bar)")

    @pa.dataframe_check(error="duplicate (ts, symbol)")
    def unique_bar(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "symbol"])


class Universe(Table):
    """features.universe: the point-in-time universe, one row per rebalance asof and configured symbol:
    in it (estimated and optimized) or not, and why (perpfolio.universe)."""

    as_of: DateTime = _ts("rebalance asof: open time of the last bar of the estimation window, UTC")
    symbol: str = pa.Field(description="exchange symbol")
    in_universe: bool = pa.Field(description="true when the symbol has the data its estimate needs at this asof")
    reason: str = pa.Field(isin=list(UNIVERSE_REASONS), description="in, or why not: not_listed (no bar yet), "
                           "no_price_at_asof (outage or delisted), insufficient_history (window not covered since "
                           "listing), too_many_missing (more than PERPFOLIO_MAX_MISSING_FRACTION of the window lacks a "
                           "one-bar return), constant_price (stale feed), joint_missing (dropped so the members keep "
                           "enough complete bars together)")
    bars_missing: int = pa.Field(ge=0, description="bars of the window without a one-bar return (a missing bar, or the "
                                 "return spanning a gap)")
    window_bars: int = pa.Field(gt=0, description="bars in the estimation window (PERPFOLIO_WINDOW_BARS)")

    @pa.dataframe_check(error="duplicate (as_of, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "symbol"])

    @pa.dataframe_check(error="in_universe must be true exactly when reason is 'in'")
    def reason_matches(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("in_universe") == (pl.col("reason") == "in"))


FLOATS = Annotated[pl.List, pl.Float64()]
_ESTIMATE_ARRAYS = ("mean", "downside", "cov", "semicov")


class Estimates(Table):
    """features.estimates: rolling moments, ANNUALIZED, one row per asof and estimator holding the
    arrays over that asof's symbols; the view features.estimates_long shows every cell as a row."""

    as_of: DateTime = _ts("open time of the last bar in the window, UTC")
    estimator: str = pa.Field(
        description="estimator name: sample | ewma | ledoit_wolf | oas | factor | shrinkage, and sample_reset / "
        "ledoit_wolf_reset (window shortened after a regime change, see window_bars)"
    )
    symbols: Annotated[pl.List, pl.String()] = pa.Field(
        description="the symbols the arrays are over, in configured order: those with an estimate (the asof's universe); "
        "every configured symbol when status is not ok"
    )
    mean: FLOATS = pa.Field(nullable=True, description="mean per bar x periods per year, one value per symbol; null when status is not ok")
    downside: FLOATS = pa.Field(nullable=True, description="downside risk D_i = mean(min(0, r_i - tau)^2), annualized, one "
                                "value per symbol; null when status is not ok")
    cov: FLOATS = pa.Field(nullable=True, description="covariance matrix, annualized, row by row: cov[i*n + j] is symbols[i] "
                           "with symbols[j] (n = number of symbols); null when status is not ok")
    semicov: FLOATS = pa.Field(nullable=True, description="semicovariance matrix mean(min(0, r - tau) min(0, r - tau)^T), "
                               "annualized, row by row as cov; null when status is not ok")
    window_bars: int = pa.Field(gt=0, description="bars in the estimation window (shorter after a regime change for *_reset)")
    n_obs: int = pa.Field(ge=0, description="bars actually available in the window")
    status: str = pa.Field(isin=list(ESTIMATE_STATUSES), description="ok | insufficient_history | missing_data | degenerate")

    @pa.dataframe_check(error="mean, downside, cov and semicov must be present exactly when status is ok")
    def values_iff_ok(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ok = pl.col("status") == "ok"
        return data.lazyframe.select(pl.all_horizontal(pl.col(q).is_not_null() == ok for q in _ESTIMATE_ARRAYS))

    @pa.dataframe_check(error="array lengths must match symbols: n for mean and downside, n^2 for cov and semicov")
    def lengths_match(cls, data: pa.PolarsData) -> pl.LazyFrame:
        n = pl.col("symbols").list.len()
        return data.lazyframe.select(
            (pl.col("status") != "ok")
            | ((pl.col("mean").list.len() == n) & (pl.col("downside").list.len() == n)
               & (pl.col("cov").list.len() == n * n) & (pl.col("semicov").list.len() == n * n))
        )

    @pa.dataframe_check(error="array values must be finite")
    def values_finite(cls, data: pa.PolarsData) -> pl.LazyFrame:
        finite = [pl.col(q).list.eval(pl.element().is_finite()).list.all().fill_null(True) for q in _ESTIMATE_ARRAYS]
        return data.lazyframe.select(pl.all_horizontal(finite))

    @pa.dataframe_check(error="a symbol listed twice in symbols")
    def symbols_distinct(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("symbols").list.n_unique() == pl.col("symbols").list.len())

    @pa.dataframe_check(error="duplicate (as_of, estimator)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "estimator"])


ESTIMATES_LONG_VIEW = "features.estimates_long"
ESTIMATES_LONG_SQL = """
SELECT e.as_of, e.estimator, q.quantity, e.symbols[i] AS symbol, NULL::VARCHAR AS symbol_j,
       CASE q.quantity WHEN 'mean' THEN e.mean[i] ELSE e.downside[i] END AS value, e.window_bars, e.n_obs, e.status
FROM features.estimates e, (VALUES ('mean'), ('downside')) q(quantity), range(1, len(e.symbols) + 1) r(i)
UNION ALL
SELECT e.as_of, e.estimator, q.quantity, e.symbols[1 + k // len(e.symbols)], e.symbols[1 + k % len(e.symbols)],
       CASE q.quantity WHEN 'cov' THEN e.cov[k + 1] ELSE e.semicov[k + 1] END, e.window_bars, e.n_obs, e.status
FROM features.estimates e, (VALUES ('cov'), ('semicov')) q(quantity), range(len(e.symbols) * len(e.symbols)) r(k)
"""  # features.estimates as (as_of, estimator, quantity, symbol, symbol_j, value, window_bars, n_obs, status): one row per cell


class Signals(Table):
    """signals.signals: variance-risk-premium signals per asof and symbol (annualized variances)."""

    as_of: DateTime = _ts("open time of the last bar used, UTC")
    symbol: str = pa.Field(description="exchange symbol")
    implied_var: float = pa.Field(nullable=True, ge=0, description="implied variance, annualized")
    realized_var: float = pa.Field(nullable=True, ge=0, description="realized variance over the window, annualized")
    vrp: float = pa.Field(nullable=True, description="implied_var - realized_var")
    iv_source: str = pa.Field(description="where vrp's implied variance comes from: index (the symbol's own) | "
                              "proxy:<reference> (with PERPFOLIO_VRP_PROXY) | unavailable")
    vrp_with_proxy: float = pa.Field(nullable=True, description="vrp of the symbol's own index where it has one, else of "
                                     "the BTC-scaled proxy (for strategies with vrp_source = with_proxy), annualized")
    vrp_z: float = pa.Field(nullable=True, description="z-score of vrp against its trailing daily values (PERPFOLIO_VRP_Z_DAYS), unitless")
    funding_forecast_1h: float = pa.Field(
        nullable=True, description="AR(1) forecast of the next 24 h average funding rate, decimal per hour (+ = longs pay)"
    )
    funding_adj_vrp: float = pa.Field(nullable=True, description="vrp + 8760 * funding_forecast_1h (annualized decimals)")
    momentum: float = pa.Field(nullable=True, description="sum of per-bar net returns over PERPFOLIO_MOMENTUM_BARS, not annualized")
    predicted_vol_ewma: float = pa.Field(nullable=True, ge=0, description="EWMA volatility forecast, annualized decimal")
    predicted_vol_garch: float = pa.Field(
        nullable=True, ge=0, description="GARCH(1,1) forecast of the next day's volatility, annualized decimal; null if the fit failed"
    )
    vol_ratio: float = pa.Field(nullable=True, ge=0, description="short/long realized vol of the equal-weight market, unitless")
    regime: str = pa.Field(isin=["calm", "turbulent"], description="market regime from vol_ratio with hysteresis")
    regime_since: DateTime = pa.Field(
        dtype_kwargs=UTC_US, nullable=True, description="bar of the latest regime breakpoint, UTC; null if none in memory"
    )

    @pa.dataframe_check(error="duplicate (as_of, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "symbol"])


class Weights(Table):
    """portfolio.weights: target weights (fractions of equity) per rebalance, strategy and symbol."""

    as_of: DateTime = _ts("decision time: open time of the last bar used, UTC")
    strategy: str = pa.Field(description="strategy name from the strategies file")
    symbol: str = pa.Field(description="exchange symbol")
    weight: float = pa.Field(ge=-10, le=10, description="fraction of equity; negative is short")
    budget: float = pa.Field(description="the strategy's constraints.budget: its weights sum to it (1 = fully invested)")
    status: str = pa.Field(str_matches=r"^(optimal|fallback:.+)$", description="optimal or fallback:<which>:<reason> "
                           "(fallback:equal_capped:universe_too_small / fallback:flat:<why>: too few symbols in the "
                           "universe to place the budget within the bounds, or none; the rest is cash)")
    solver: str = pa.Field(description="solver that produced the weights, or the fallback rule")
    objective: float = pa.Field(nullable=True, description="objective value of the solved problem")
    solve_ms: float = pa.Field(ge=0, description="wall time of the solve chain, milliseconds")
    universe: str = pa.Field(isin=list(UNIVERSE_REASONS), description="in: the symbol was in the point-in-time universe "
                             "(features.universe); otherwise why not, and the weight is 0")

    @pa.dataframe_check(error="duplicate (as_of, strategy, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "symbol"])

    @pa.dataframe_check(error="weights of an (as_of, strategy) do not sum to its budget within 1e-6 (and the status "
                        "does not say the universe was too small)")
    def sums_to_budget(cls, data: pa.PolarsData) -> pl.LazyFrame:
        total = pl.col("weight").sum().over("as_of", "strategy")
        too_small = pl.col("status").str.starts_with("fallback:equal_capped:") | pl.col("status").str.starts_with("fallback:flat:")
        return data.lazyframe.select(too_small | ((total - pl.col("budget")).abs() <= WEIGHT_SUM_TOLERANCE))

    @pa.dataframe_check(error="a symbol outside the universe holds a weight")
    def zero_outside_universe(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select((pl.col("universe") == "in") | (pl.col("weight") == 0))


FRONTIER_TOLERANCE = 1e-6  # bounds, target and monotonicity of portfolio.frontier (the optimizer's verification tolerance)


class Frontier(Table):
    """portfolio.frontier: the efficient frontier per rebalance asof, min variance (point 0) to the
    highest attainable expected return (last point), one row per point and symbol. A point that failed
    to solve keeps its rows with a failed:<reason> status and null weight / return / volatility."""

    as_of: DateTime = _ts("decision time: open time of the last bar of the estimation window, UTC")
    point: int = pa.Field(ge=0, description="0 = min variance .. PERPFOLIO_FRONTIER_POINTS - 1 = max return")
    target_return: float = pa.Field(nullable=True, description="required expected return mu'w >= target, annualized "
                                    "decimal; null when the min-variance point failed (no target range)")
    expected_return: float = pa.Field(nullable=True, description="mu'w, annualized decimal; null unless optimal")
    volatility: float = pa.Field(nullable=True, ge=0, description="sqrt(w'Sigma w), annualized decimal; null unless optimal")
    sharpe: float = pa.Field(nullable=True, description="expected_return / volatility (risk-free 0); null unless "
                             "optimal or at zero volatility")
    symbol: str = pa.Field(description="exchange symbol")
    weight: float = pa.Field(nullable=True, ge=-10, le=10, description="fraction of equity; null unless optimal")
    budget: float = pa.Field(description="sum of the weights the point was solved under (min_variance strategy)")
    min_weight: float = pa.Field(description="lower weight bound the point was solved under (min_variance strategy)")
    max_weight: float = pa.Field(description="upper weight bound the point was solved under (min_variance strategy)")
    status: str = pa.Field(str_matches=r"^(optimal|failed:.+)$", description="optimal or failed:<reason> "
                           "(failed:min_variance:<reason> when the whole asof had no min-variance portfolio)")

    @pa.dataframe_check(error="duplicate (as_of, point, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "point", "symbol"])

    @pa.dataframe_check(error="weight, expected_return and volatility must be present exactly when status is optimal")
    def values_iff_optimal(cls, data: pa.PolarsData) -> pl.LazyFrame:
        optimal = pl.col("status") == "optimal"
        return data.lazyframe.select(pl.all_horizontal(
            pl.col(c).is_not_null() == optimal for c in ("weight", "expected_return", "volatility")
        ))

    @pa.dataframe_check(error="weights of an optimal (as_of, point) do not sum to its budget within 1e-6")
    def sums_to_budget(cls, data: pa.PolarsData) -> pl.LazyFrame:
        total = pl.col("weight").sum().over("as_of", "point")
        return data.lazyframe.select((pl.col("status") != "optimal") | ((total - pl.col("budget")).abs() <= WEIGHT_SUM_TOLERANCE))

    @pa.dataframe_check(error="weight outside [min_weight, max_weight] (tolerance 1e-6)")
    def bounds(cls, data: pa.PolarsData) -> pl.LazyFrame:
        w = pl.col("weight")
        inside = (w >= pl.col("min_weight") - FRONTIER_TOLERANCE) & (w <= pl.col("max_weight") + FRONTIER_TOLERANCE)
        return data.lazyframe.select((pl.col("status") != "optimal") | inside)

    @pa.dataframe_check(error="expected_return below target_return (tolerance 1e-6)")
    def target_reached(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("status") != "optimal") | (pl.col("expected_return") >= pl.col("target_return") - FRONTIER_TOLERANCE)
        )

    @pa.dataframe_check(error="volatility decreases as expected return rises within an as_of (not on the efficient "
                        "branch; tolerance 1e-6)")
    def efficient_branch(cls, data: pa.PolarsData) -> pl.LazyFrame:
        # the highest volatility among this as_of's optimal points of lower or equal expected return
        # (failed points have null volatility, which cum_max skips)
        running = pl.col("volatility").cum_max().over("as_of", order_by="expected_return")
        return data.lazyframe.select(
            (pl.col("status") != "optimal") | (pl.col("volatility") >= running - FRONTIER_TOLERANCE)
        )


class SpotHedge(Table):
    """risk.spot_hedge: minimum-variance hedge of each spot position (and of the whole spot book) with
    perps at each daily asof: h* = Cov(r_spot, r_perp) / Var(r_perp) (single) or Sigma_FF^-1 Sigma_FS
    (cross), spot = index-price simple returns, perps = net returns with funding; null values unless status is ok."""

    as_of: DateTime = _ts("open time of the last bar of the fitting window, UTC")
    symbol: str = pa.Field(description="spot position: the symbol whose index price is the spot, or 'book' (all positions)")
    hedge: str = pa.Field(isin=["single", "cross"], description="single: with the symbol's own perp; cross: with every perp")
    perp: str = pa.Field(description="perp the row's ratio and notional are for")
    spot_notional: float = pa.Field(description="spot position, USDT (negative = short spot; the book's is its gross notional)")
    hedge_ratio: float = pa.Field(nullable=True, description="h*: USDT of this perp SHORTED per USDT of spot, unitless")
    hedge_notional: float = pa.Field(nullable=True, description="perp position of the hedge, USDT = -hedge_ratio x spot_notional (negative = short)")
    effectiveness: float = pa.Field(nullable=True, le=1 + 1e-9, description="in sample 1 - Var(hedged) / Var(spot) over the window (= R^2)")
    effectiveness_oos: float = pa.Field(nullable=True, le=1 + 1e-9, description="out of sample: the hedge fitted one day earlier "
                                        "over this day's bars; negative = it added risk; null when not computable")
    spot_vol: float = pa.Field(nullable=True, ge=0, description="volatility of the unhedged spot return over the window, annualized")
    hedged_vol: float = pa.Field(nullable=True, ge=0, description="volatility of the hedged return over the window, annualized")
    n_obs: int = pa.Field(ge=0, description="bars with the spot and every perp present in the window")
    window_bars: int = pa.Field(gt=0, description="bars in the fitting window (PERPFOLIO_WINDOW_BARS)")
    status: str = pa.Field(isin=["ok", "insufficient_history", "missing_data", "degenerate"],
                           description="ok, or why there is no hedge (missing_data: e.g. no index prices from the source)")
    basis_mean: float = pa.Field(nullable=True, description="mean hourly basis perp close / index close - 1 over the window, "
                                 "decimal (+ = perp premium); null for the book or when an hour is missing")
    basis_std: float = pa.Field(nullable=True, ge=0, description="standard deviation of that hourly basis, decimal")
    basis_last: float = pa.Field(nullable=True, description="basis of the asof's last hour, decimal")

    @pa.dataframe_check(error="duplicate (as_of, symbol, hedge, perp)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "symbol", "hedge", "perp"])

    @pa.dataframe_check(error="hedge_ratio, hedge_notional, effectiveness and vols must be present exactly when status is ok")
    def values_iff_ok(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ok = pl.col("status") == "ok"
        return data.lazyframe.select(pl.all_horizontal(
            pl.col(c).is_not_null() == ok for c in ("hedge_ratio", "hedge_notional", "effectiveness", "spot_vol", "hedged_vol")
        ))


class Equity(Table):
    """backtest.equity: the walk-forward equity path per bar and strategy (equity units, start 1.0)."""

    ts: DateTime = _ts("bar open time, UTC")
    strategy: str = pa.Field(description="strategy name")
    equity: float = pa.Field(description="account equity after the bar")
    pnl: float = pa.Field(description="equity change over the bar")
    price_pnl: float = pa.Field(description="price PnL of the positions held in the bar")
    funding_pnl: float = pa.Field(description="funding received (+) or paid (-)")
    fees: float = pa.Field(ge=0, description="taker fees on traded notional")
    slippage: float = pa.Field(ge=0, description="slippage cost on traded notional")
    turnover: float = pa.Field(ge=0, description="traded notional / equity")
    gross_leverage: float = pa.Field(ge=0, description="sum |position| / equity")
    drawdown: float = pa.Field(le=0, description="equity / running max - 1")
    stops: int = pa.Field(ge=0, description="positions closed by the stop-loss in the bar (0 when it is off)")
    interest: float = pa.Field(description="interest earned on equity in the bar (PERPFOLIO_CASH_RATE; 0 by default)")
    sizing_leverage: float = pa.Field(gt=0, description="vol-target multiplier lambda of the latest rebalance "
                                      "(PERPFOLIO_TARGET_VOL, capped at PERPFOLIO_MAX_LEVERAGE; 1 when off)")
    cash_fraction: float = pa.Field(ge=0, lt=1, description="cash buffer c of the latest rebalance: the book runs "
                                    "sizing_leverage x (1 - cash_fraction) of its weights (PERPFOLIO_CASH_BUFFER; 0 when off)")
    delisting_closes: int = pa.Field(ge=0, description="positions closed in the bar because their symbol was delisted "
                                     "(its data ends a day or more before the history): sold at its last close with costs")
    untraded: int = pa.Field(ge=0, description="positions a rebalance in this bar could not trade because the symbol had "
                             "no price (an outage): kept at their drifted notional until the next rebalance")

    @pa.dataframe_check(error="duplicate (ts, strategy)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "strategy"])


class Metrics(Table):
    """backtest.metrics: one row of performance figures per strategy or baseline over the whole run
    (annualized with 8760/bar_hours; losses are POSITIVE numbers; PnL totals in equity units, start 1.0)."""

    strategy: str = pa.Field(unique=True, description="strategy name, or baseline:<equal_weight|btc_only|static>")
    total_return: float = pa.Field(gt=-1, description="final / initial equity - 1")
    sharpe: float = pa.Field(description="mean / std of bar returns x sqrt(periods per year), rf = 0")
    sortino: float = pa.Field(description="mean / downside deviation x sqrt(periods per year)")
    ann_return: float = pa.Field(description="compounded annual return")
    ann_vol: float = pa.Field(ge=0, description="annualized volatility of bar returns")
    max_drawdown: float = pa.Field(ge=0, description="largest peak-to-trough loss, fraction")
    max_drawdown_duration_h: float = pa.Field(ge=0, description="longest time under a previous peak, hours")
    max_loss: float = pa.Field(description="worst single-bar (hourly) return, as a positive loss")
    max_loss_day: float = pa.Field(description="worst UTC-day return, as a positive loss")
    turnover: float = pa.Field(ge=0, description="traded notional / mean equity, annualized")
    cvar_95: float = pa.Field(description="mean loss of the worst 5% of bars")
    cvar_99: float = pa.Field(description="mean loss of the worst 1% of bars")
    funding_pnl: float = pa.Field(description="total funding PnL, equity units")
    fees: float = pa.Field(ge=0, description="total taker fees, equity units")
    slippage: float = pa.Field(ge=0, description="total slippage, equity units")
    costs: float = pa.Field(ge=0, description="total fees + slippage, equity units")
    avg_gross_leverage: float = pa.Field(ge=0, description="mean of sum |position| / equity over the bars")
    max_gross_leverage: float = pa.Field(ge=0, description="max of sum |position| / equity over the bars")
    ret_price: float = pa.Field(description="attribution: price PnL / initial equity")
    ret_funding: float = pa.Field(description="attribution: funding PnL / initial equity")
    ret_costs: float = pa.Field(le=0, description="attribution: -(fees + slippage) / initial equity")
    ret_interest: float = pa.Field(description="attribution: interest on equity / initial equity; the four add up to total_return")
    stops: int = pa.Field(ge=0, description="positions closed by the stop-loss")
    delisting_closes: int = pa.Field(ge=0, description="positions closed at a delisting (their last price)")
    avg_sizing_leverage: float = pa.Field(gt=0, description="mean vol-target multiplier lambda over the bars (1 without sizing)")
    avg_cash_fraction: float = pa.Field(ge=0, lt=1, description="mean cash-buffer fraction over the bars (0 without a buffer)")
    fallbacks: int = pa.Field(ge=0, description="rebalances whose weights came from a fallback (0 for baselines)")


class Stress(Table):
    """risk.stress: instant shock scenarios applied to the weights at each rebalance."""

    as_of: DateTime = _ts("rebalance whose weights were shocked")
    strategy: str = pa.Field(description="strategy name")
    scenario: str = pa.Field(description="scenario name")
    leverage: float = pa.Field(gt=0, description="gross notional / equity of the shocked book")
    kind: str = pa.Field(isin=["price", "funding", "volatility", "replay"], description="scenario kind (config/scenarios.toml)")
    margin_mode: str = pa.Field(isin=["cross", "isolated"], description="one margin pool, or a margin per position")
    shock: float = pa.Field(description="price return of the reference (price), funding rate per 8h (funding), "
                            "adverse move in per-bar sigmas (volatility), or the worst replayed return (replay)")
    reference: str = pa.Field(nullable=True, description="price: the shocked symbol (others move by their beta to it) or "
                              "'all' (joint shock); replay: the symbol whose move x beta stands in for a missing one; "
                              "null otherwise")
    account_usdt: float = pa.Field(gt=0, description="account equity (USDT) the positions are sized on (PERPFOLIO_ACCOUNT_USDT)")
    pnl: float = pa.Field(description="PnL of the shock as a fraction of equity")
    equity_after: float = pa.Field(description="equity after the shock, fraction of equity before")
    margin_ratio: float = pa.Field(nullable=True, ge=0, description="maintenance margin / equity after (isolated: of the "
                                   "position closest to liquidation); null when no equity is left")
    liquidated: bool = pa.Field(description="cross: equity after <= maintenance margin; isolated: any position liquidated")
    positions_liquidated: int = pa.Field(ge=0, description="positions closed by liquidation")
    capital_sufficient: bool = pa.Field(description="not liquidated, not oversized and equity after >= maintenance "
                                        "margin + buffer")
    oversized: str = pa.Field(nullable=True, description="held symbols whose notional (before or after the shock) exceeds "
                              "their last leverage bracket, margined with that bracket extended; null when none")
    proxied: str = pa.Field(nullable=True, description="held symbols moved by a substitute and how: beta 1 (no beta to "
                            "the reference in the window), largest held volatility, beta x reference or bar mean "
                            "(replay bar without their return); null when none")
    tier_source: str = pa.Field(nullable=True, description="where the held symbols' leverage tiers came from, distinct and "
                                "comma-separated: file:<name>, exchange:<name>, snapshot:<exchange>:<date> or default; "
                                "null for a flat book")

    @pa.dataframe_check(error="duplicate (as_of, strategy, scenario, leverage, margin_mode)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "scenario", "leverage", "margin_mode"])


class Monthly(Table):
    """backtest.monthly: per strategy and UTC calendar month; returns relative to the month's opening equity."""

    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    month: pl.Date = pa.Field(description="first day of the month (UTC)")
    total_return: float = pa.Field(gt=-1, description="month-end / month-open equity - 1")
    ret_price: float = pa.Field(description="price PnL / month-open equity")
    ret_funding: float = pa.Field(description="funding PnL / month-open equity")
    ret_costs: float = pa.Field(le=0, description="-(fees + slippage) / month-open equity")
    ret_interest: float = pa.Field(description="interest on equity / month-open equity")
    max_drawdown: float = pa.Field(ge=0, description="largest peak-to-trough loss within the month")
    max_loss: float = pa.Field(description="worst bar return of the month, as a positive loss")

    @pa.dataframe_check(error="duplicate (strategy, month)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["strategy", "month"])


class Comparison(Table):
    """backtest.comparison: which book served better and would it have survived: headline backtest
    figures beside the worst stress outcome over every rebalance, one row per strategy or baseline."""

    strategy: str = pa.Field(unique=True, description="strategy name, or baseline:<name>")
    kind: str = pa.Field(isin=["strategy", "baseline"], description="optimized strategy or baseline")
    rank: int = pa.Field(ge=1, description="rank by Sharpe (1 = best)")
    total_return: float = pa.Field(gt=-1, description="final / initial equity - 1")
    excess_vs_equal_weight: float = pa.Field(nullable=True, description="total_return - that of baseline:equal_weight (null without it)")
    sharpe: float = pa.Field(description="annualized Sharpe ratio")
    max_drawdown: float = pa.Field(ge=0, description="largest peak-to-trough loss")
    max_loss_day: float = pa.Field(description="worst UTC-day return, as a positive loss")
    cvar_99: float = pa.Field(description="mean loss of the worst 1% of bars")
    worst_scenario: str = pa.Field(description="scenario with the lowest equity after, at the lowest stress leverage, cross margin")
    worst_equity_after: float = pa.Field(description="its equity after, fraction of equity before (minimum over rebalances)")
    liquidations: int = pa.Field(ge=0, description="stress rows (rebalance x scenario x leverage x margin mode) that liquidate")
    max_safe_leverage: float = pa.Field(ge=0, description="highest stress leverage with capital sufficient in every scenario, "
                                        "rebalance and margin mode (0: none), on an account of account_usdt")
    account_usdt: float = pa.Field(gt=0, description="account equity (USDT) the stress rows, and so max_safe_leverage, "
                                   "assume: tiered margin grows with the position, so a larger account is safe at less")


class Liquidation(Table):
    """risk.liquidation: liquidation price of every held position of each strategy's LATEST weights,
    moving that symbol alone, per stress leverage and margin mode."""

    as_of: DateTime = _ts("rebalance whose weights are examined (the latest)")
    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    leverage: float = pa.Field(gt=0, description="gross notional / equity of the book")
    margin_mode: str = pa.Field(isin=["cross", "isolated"], description="margin mode")
    symbol: str = pa.Field(description="exchange symbol")
    weight: float = pa.Field(description="target weight, fraction of equity")
    notional: float = pa.Field(description="position notional, USDT (negative = short): leverage x account x weight")
    account_usdt: float = pa.Field(gt=0, description="account equity (USDT) the position is sized on (PERPFOLIO_ACCOUNT_USDT)")
    liquidation_price_ratio: float = pa.Field(nullable=True, gt=0, description="liquidation price / current price; "
                                              "null when no positive price liquidates")
    distance: float = pa.Field(nullable=True, ge=0, description="adverse price move to liquidation, fraction")
    exceeds_max_notional: bool = pa.Field(description="the notional is beyond the symbol's last leverage bracket (the "
                                          "exchange would not accept it; margined with that bracket extended)")
    tier_source: str = pa.Field(description="where the symbol's leverage tiers came from: file:<name>, exchange:<name>, "
                                "snapshot:<exchange>:<date> or default")

    @pa.dataframe_check(error="duplicate (as_of, strategy, leverage, margin_mode, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "leverage", "margin_mode", "symbol"])


class DataQuality(Table):
    """raw.data_quality: one row per data-quality issue of the raw layer, symbol and UTC day (a gap
    crossing midnight is two rows). No row means the day was read clean. Gaps are reported, never filled;
    bad prints (outlier) stop the run or are quarantined (PERPFOLIO_OUTLIERS; perpfolio.quality)."""

    symbol: str = pa.Field(description="exchange symbol")
    dataset: str = pa.Field(isin=["candles", "funding", "mark", "index"],
                            description="which raw table the issue is in (mark / index: raw.reference_prices rows of that kind)")
    issue: str = pa.Field(isin=["gap", "duplicates", "out_of_order", "outlier", "funding_gap"], description="gap: hourly "
                          "bars missing; duplicates: repeated (ts, symbol) rows dropped, first kept; out_of_order: rows "
                          "earlier than the row before them, sorted; outlier: a bad print (close or open outside the "
                          "bar's [low, high], or a jump that reverts within two bars); funding_gap: funding events "
                          "expected on the symbol's schedule while it trades are absent")
    from_ts: DateTime = _ts("first affected hour (gap: first missing bar open; outlier: the bar; funding_gap: first "
                            "missing event time), UTC")
    to_ts: DateTime = _ts("last affected hour (gap: last missing bar open, inclusive; funding_gap: last missing event), UTC")
    bars_missing: int = pa.Field(ge=0, description="hourly bars missing in [from_ts, to_ts] (gap rows; 0 otherwise)")
    duplicates_dropped: int = pa.Field(ge=0, description="rows dropped as duplicates (duplicates rows; 0 otherwise)")
    out_of_order: int = pa.Field(ge=0, description="rows found out of order and sorted (out_of_order rows; 0 otherwise)")
    events_missing: int = pa.Field(ge=0, description="funding events missing in [from_ts, to_ts] (funding_gap rows; 0 otherwise)")
    value: float = pa.Field(nullable=True, gt=0, description="the flagged close, quote currency (outlier rows; null otherwise)")
    detail: str = pa.Field(nullable=True, description="outlier: previous and next closes, robust z-score and reversal, "
                           "and where the row came from (file: line, exchange endpoint, or the source); funding_gap: the "
                           "interval expected and the events around the gap; null otherwise")

    @pa.dataframe_check(error="duplicate (symbol, dataset, issue, from_ts)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["symbol", "dataset", "issue", "from_ts"])


def conform(frame: pl.DataFrame, model: type[pa.DataFrameModel]) -> pl.DataFrame:
    """Select the model's columns in declared order and cast them to its dtypes (nothing else)."""
    schema = model.to_schema()
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{model.__name__}: output is missing columns {missing}; it has {frame.columns}")
    return frame.select(
        pl.col(name).cast(column.dtype.type, strict=True) for name, column in schema.columns.items()
    )


def empty(model: type[pa.DataFrameModel]) -> pl.DataFrame:
    """A table with no rows (e.g. a day still in progress has no rebalance yet)."""
    return pl.DataFrame(schema={name: column.dtype.type for name, column in model.to_schema().columns.items()})


class ByRegime(Table):
    """backtest.by_regime: a book's bar returns split by the market regime in force at each bar (the regime
    signals.signals gave the latest rebalance asof strictly before the bar: the asof's own bar helped
    decide it and is left out), annualized with 8760 / bar_hours; losses positive."""

    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    regime: str = pa.Field(isin=["calm", "turbulent"], description="market regime of the bars")
    bars: int = pa.Field(ge=1, description="bars of the book in that regime")
    share: float = pa.Field(ge=0, le=1, description="share of the book's labelled bars (those after the first asof) "
                            "in that regime")
    ann_return: float = pa.Field(description="mean bar return x periods per year (arithmetic)")
    ann_vol: float = pa.Field(nullable=True, ge=0, description="std of bar returns x sqrt(periods per year); null with one bar")
    sharpe: float = pa.Field(nullable=True, description="ann_return / ann_vol; null when undefined")
    cvar_95: float = pa.Field(description="mean loss of the worst 5% of the regime's bars")
    max_loss: float = pa.Field(description="worst bar return of the regime, as a positive loss")

    @pa.dataframe_check(error="duplicate (strategy, regime)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["strategy", "regime"])


def _p_value(description: str) -> object:
    return pa.Field(nullable=True, ge=0, le=1, description=description + "; null without bars (or, independence, "
                    "without two adjacent scored bars)")


class RiskModel(Table):
    """backtest.risk_model: how well each stored covariance estimator predicted the risk of each book's
    target portfolio over the bars it was held (perpfolio.risk_quality): bias statistic, QLIKE, and the
    coverage of the Gaussian one-bar VaR at 95 % and 99 %. Statistics are null without enough scored bars."""

    estimator: str = pa.Field(description="covariance estimator of features.estimates")
    strategy: str = pa.Field(description="book: strategy name, or baseline:<name>")
    windows: int = pa.Field(ge=0, description="decisions scored (a forecast and at least one scored bar)")
    skipped_windows: int = pa.Field(ge=0, description="decisions not scored: no forecast of a held symbol at the asof, "
                                    "a flat target, or no held bar with every held symbol's return (the latest decision "
                                    "has no held bar yet)")
    n_bars: int = pa.Field(ge=0, description="scored bars T: held bars (asof + 2 .. next asof + 1) with a one-bar return "
                           "for every held symbol")
    predicted_vol: float = pa.Field(nullable=True, ge=0, description="sqrt(ppy x mean of sigma_k^2 over the scored bars): "
                                    "predicted vol, annualized")
    realized_vol: float = pa.Field(nullable=True, ge=0, description="std of the target's one-bar returns x sqrt(ppy), "
                                   "annualized; null with fewer than 2 bars")
    bias: float = pa.Field(nullable=True, ge=0, description="bias statistic b = std(z), z = r / sigma (1: correct; > 1: "
                           "risk under-predicted); null with fewer than 2 bars")
    bias_lower: float = pa.Field(nullable=True, description="lower end of b's approximate 95 % band, 1 - 1.96 sqrt(1/(2T))")
    bias_upper: float = pa.Field(nullable=True, description="upper end of b's approximate 95 % band, 1 + 1.96 sqrt(1/(2T))")
    bias_in_band: bool = pa.Field(nullable=True, description="bias_lower <= bias <= bias_upper")
    z_kurtosis: float = pa.Field(nullable=True, ge=0, description="kurtosis m4 / m2^2 of z (3 for normal z; crypto's jumps "
                                 "make it far larger)")
    bias_lower_robust: float = pa.Field(nullable=True, description="lower end of b's kurtosis-robust 95 % band, "
                                        "1 - 1.96 sqrt((z_kurtosis - 1) / (4T))")
    bias_upper_robust: float = pa.Field(nullable=True, description="upper end of b's kurtosis-robust 95 % band, "
                                        "1 + 1.96 sqrt((z_kurtosis - 1) / (4T))")
    bias_in_robust_band: bool = pa.Field(nullable=True, description="bias_lower_robust <= bias <= bias_upper_robust")
    qlike: float = pa.Field(nullable=True, ge=0, description="mean over windows of v/s^2 - ln(v/s^2) - 1 (v: mean r^2 of the "
                            "window, s: its predicted per-bar vol); 0 is a perfect forecast, lower is better")
    var95_exceedances: int = pa.Field(ge=0, description="bars with r < -1.645 sigma (the 95 % one-bar VaR exceeded)")
    var95_expected: float = pa.Field(ge=0, description="exceedances expected under a correct model, 0.05 T")
    var95_kupiec_p: float = _p_value("p-value of Kupiec's unconditional coverage LR test, chi2(1)")
    var95_independence_p: float = _p_value("p-value of Christoffersen's independence LR test, chi2(1)")
    var95_cc_p: float = _p_value("p-value of the conditional coverage test LR_uc + LR_ind, chi2(2)")
    var99_exceedances: int = pa.Field(ge=0, description="bars with r < -2.326 sigma (the 99 % one-bar VaR exceeded)")
    var99_expected: float = pa.Field(ge=0, description="exceedances expected under a correct model, 0.01 T")
    var99_kupiec_p: float = _p_value("p-value of Kupiec's unconditional coverage LR test, chi2(1)")
    var99_independence_p: float = _p_value("p-value of Christoffersen's independence LR test, chi2(1)")
    var99_cc_p: float = _p_value("p-value of the conditional coverage test LR_uc + LR_ind, chi2(2)")

    @pa.dataframe_check(error="duplicate (estimator, strategy)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["estimator", "strategy"])


class RiskModelSummary(Table):
    """backtest.risk_model_summary: which covariance estimator forecasts this market's risk best, over
    the books of backtest.risk_model that have a bias statistic; rank 1 = lowest mean QLIKE."""

    rank: int = pa.Field(ge=1, unique=True, description="1 = lowest mean QLIKE (ties: lowest mean |b - 1|)")
    estimator: str = pa.Field(unique=True, description="covariance estimator of features.estimates")
    books: int = pa.Field(ge=1, description="books scored")
    mean_qlike: float = pa.Field(nullable=True, ge=0, description="mean QLIKE over the books (the ranking loss)")
    mean_abs_bias_error: float = pa.Field(ge=0, description="mean |b - 1| over the books")
    mean_bias: float = pa.Field(ge=0, description="mean bias statistic over the books (> 1: risk under-predicted)")
    books_in_band: int = pa.Field(ge=0, description="books whose b lies inside its (normal) 95 % band")
    books_in_robust_band: int = pa.Field(ge=0, description="books whose b lies inside its kurtosis-robust 95 % band")
    books_var95_pass: int = pa.Field(ge=0, description="books whose 95 % VaR passes the conditional coverage test at 5 %")
    books_var99_pass: int = pa.Field(ge=0, description="books whose 99 % VaR passes the conditional coverage test at 5 %")


class StressVsRealized(Table):
    """risk.stress_vs_realized: risk.stress's liquidation verdict at each rebalance beside what the market
    then did to the same positions (perpfolio.stress_check): opened at the close of the bar after the asof,
    held with constant quantities to the next decision's execution bar, marked every bar at the adverse
    intrabar extreme (low for a long, high for a short) with funding paid and tiered maintenance margin."""

    as_of: DateTime = _ts("rebalance whose weights were stressed and then held")
    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    leverage: float = pa.Field(gt=0, description="gross notional / account equity of the positions (PERPFOLIO_STRESS_LEVERAGES)")
    margin_mode: str = pa.Field(isin=["cross", "isolated"], description="one margin pool, or a margin per position")
    predicted_liquidated: bool = pa.Field(description="some price, funding or volatility scenario of risk.stress "
                                          "liquidates (replays left out: latest rebalance only, drawn from the whole history)")
    predicted_margin_ratio: float = pa.Field(nullable=True, ge=0, description="largest margin ratio of those scenarios "
                                             "(maintenance margin / equity after; finite); null when one leaves no equity")
    predicted_worst_scenario: str = pa.Field(description="the scenario with that margin ratio")
    account_usdt: float = pa.Field(gt=0, description="account equity (USDT) the positions are sized on (PERPFOLIO_ACCOUNT_USDT)")
    bars_held: int = pa.Field(ge=1, description="bars of the holding window: after the execution bar through the next "
                              "decision's execution bar (the last decision: through the last bar loaded)")
    realized_liquidated: bool = pa.Field(description="cross: equity at the adverse marks <= maintenance margin at some bar; "
                                         "isolated: some position's margin + PnL <= its maintenance margin")
    realized_positions_liquidated: int = pa.Field(ge=0, description="positions closed by the realized liquidation(s)")
    realized_liquidated_ts: DateTime = pa.Field(nullable=True, dtype_kwargs=UTC_US,
                                                description="bar of the first realized liquidation, UTC; null when none")
    close_only_liquidated: bool = pa.Field(description="the same check marked at the closes only (a realized liquidation "
                                           "that this misses was revealed by the wicks)")
    realized_worst_margin_ratio: float = pa.Field(nullable=True, ge=0, description="highest maintenance margin / equity "
                                                  "at the adverse marks over the window, up to a liquidation (isolated: of "
                                                  "the position closest to liquidation; finite); null when no equity is left")
    realized_worst_ts: DateTime = _ts("bar where that ratio was reached (the first if tied), UTC")
    realized_worst_symbol: str = pa.Field(nullable=True, description="at that bar, the position that had moved most against "
                                          "itself since entry; null for a flat book")
    realized_worst_move: float = pa.Field(nullable=True, description="its adverse move since entry at that bar (fraction of "
                                          "the entry price, + = against the position; finite)")
    realized_max_adverse_move: float = pa.Field(nullable=True, description="largest adverse intrabar move since entry of any "
                                                "position over the whole window (fraction, + = against it; finite); null "
                                                "for a flat book")

    @pa.dataframe_check(error="duplicate (as_of, strategy, leverage, margin_mode)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "leverage", "margin_mode"])


class StressConfusion(Table):
    """risk.stress_confusion: per book, stress leverage and margin mode, how often risk.stress's liquidation
    verdict matched the realized one over the rebalances of risk.stress_vs_realized."""

    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    leverage: float = pa.Field(gt=0, description="gross notional / account equity (PERPFOLIO_STRESS_LEVERAGES)")
    margin_mode: str = pa.Field(isin=["cross", "isolated"], description="margin mode")
    rebalances: int = pa.Field(ge=1, description="rebalances compared")
    true_alarms: int = pa.Field(ge=0, description="predicted and realized liquidation")
    false_alarms: int = pa.Field(ge=0, description="predicted, not realized")
    missed: int = pa.Field(ge=0, description="realized liquidation the stress did not predict")
    true_calms: int = pa.Field(ge=0, description="neither predicted nor realized")
    hit_rate: float = pa.Field(nullable=True, ge=0, le=1, description="true_alarms / realized liquidations (finite); null "
                               "without a realized liquidation")
    miss_rate: float = pa.Field(nullable=True, ge=0, le=1, description="missed / realized liquidations = 1 - hit_rate "
                                "(finite); null without a realized liquidation")
    false_alarm_rate: float = pa.Field(nullable=True, ge=0, le=1, description="false_alarms / rebalances not liquidated "
                                       "(finite); null when every one was")
    wick_only: int = pa.Field(ge=0, description="realized liquidations a close-only mark would have missed")
    worst_margin_ratio: float = pa.Field(nullable=True, ge=0, description="highest realized margin ratio over every "
                                         "rebalance (finite); null when some window left no equity at its marks")
    worst_ts: DateTime = _ts("bar of that worst realized margin ratio, UTC")
    worst_symbol: str = pa.Field(nullable=True, description="the position that had moved most against itself at that bar")
    worst_as_of: DateTime = _ts("rebalance whose holding window holds that bar")
    worst_hours: str = pa.Field(description="the worst realized bars, worst first: '<ts> <symbol> <margin ratio>' ('wiped' "
                                "when no equity was left), separated by '; '")

    @pa.dataframe_check(error="duplicate (strategy, leverage, margin_mode)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["strategy", "leverage", "margin_mode"])

    @pa.dataframe_check(error="true_alarms + false_alarms + missed + true_calms != rebalances")
    def counts_add_up(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            pl.col("true_alarms") + pl.col("false_alarms") + pl.col("missed") + pl.col("true_calms") == pl.col("rebalances"))


ATTRIBUTION_TOLERANCE = 1e-12  # the attribution's sums hold to rounding


class RiskContributions(Table):
    """risk.contributions: Euler risk contributions of every book's target weights at each traded
    rebalance, under the annualized covariance of the book's estimator (a strategy's ``estimator``,
    ``sample`` for baselines): RC_i = w_i (Σw)_i, summing over a book's rows of an asof to wᵀΣw.
    One row per member of the asof's universe (held or not) and per held symbol; every float finite."""

    as_of: DateTime = _ts("rebalance (decision) asof whose target weights are decomposed")
    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    estimator: str = pa.Field(description="features.estimates estimator whose covariance Σ is used")
    symbol: str = pa.Field(description="exchange symbol")
    weight: float = pa.Field(description="target weight w_i, fraction of equity (before any position sizing)")
    variance_contribution: float = pa.Field(description="RC_i = w_i (Σw)_i, annualized variance; sums to book_vol² per "
                                            "book and asof (negative: the position hedges the rest)")
    share: float = pa.Field(nullable=True, description="RC_i / wᵀΣw, fraction of the book's variance (sums to 1); null "
                            "when the book's variance is 0")
    marginal_vol: float = pa.Field(nullable=True, description="∂σ_p/∂w_i = (Σw)_i / σ_p, annualized vol per unit of "
                                   "weight (what adding to the position does to the book's risk); null when σ_p = 0")
    book_vol: float = pa.Field(ge=0, description="σ_p = √(wᵀΣw), the book's predicted annualized volatility")

    @pa.dataframe_check(error="duplicate (as_of, strategy, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "symbol"])


class Attribution(Table):
    """backtest.attribution: each book's total return split by symbol and by source, in fractions of
    the initial equity, from the same simulation as backtest.equity. One row per configured symbol and
    one row ``cash`` (the interest on equity); ret_total sums over a book's rows to its total_return,
    and each column to backtest.metrics' ret_price, ret_funding, ret_costs, ret_interest. Every float finite."""

    strategy: str = pa.Field(description="strategy name, or baseline:<name>")
    symbol: str = pa.Field(description="exchange symbol, or 'cash' for the interest the account's equity earns")
    ret_price: float = pa.Field(description="Σ_t x_it r_it / E_0: price PnL of the symbol's positions")
    ret_funding: float = pa.Field(description="Σ_t x_it f_it / E_0: funding received (+) or paid (-)")
    ret_fees: float = pa.Field(le=0, description="-taker fees on the symbol's trades (rebalances, stops, delisting closes) / E_0")
    ret_slippage: float = pa.Field(le=0, description="-slippage on the symbol's trades / E_0")
    ret_costs: float = pa.Field(le=0, description="ret_fees + ret_slippage")
    ret_interest: float = pa.Field(description="interest on equity / E_0 (the cash row; 0 on a symbol's row)")
    ret_total: float = pa.Field(description="ret_price + ret_funding + ret_costs + ret_interest")

    @pa.dataframe_check(error="duplicate (strategy, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["strategy", "symbol"])

    @pa.dataframe_check(error="ret_costs != ret_fees + ret_slippage or ret_total != the sum of the sources")
    def sums(cls, data: pa.PolarsData) -> pl.LazyFrame:
        costs = (pl.col("ret_costs") - pl.col("ret_fees") - pl.col("ret_slippage")).abs()
        total = (pl.col("ret_total") - pl.col("ret_price") - pl.col("ret_funding") - pl.col("ret_costs")
                 - pl.col("ret_interest")).abs()
        return data.lazyframe.select((costs <= ATTRIBUTION_TOLERANCE) & (total <= ATTRIBUTION_TOLERANCE))


BREAK_EVEN_STATUSES = ["beats_below", "beats_above", "never_beats", "beats_throughout", "reference", "no_reference"]


class BreakEven(Table):
    """backtest.break_even: per book, the trading cost (taker fee + slippage, bps per side of traded
    notional, in the configured fee : slippage ratio) at which its total return equals that of
    baseline:equal_weight, both re-simulated at that cost. Every float finite (null where stated)."""

    strategy: str = pa.Field(unique=True, description="strategy name, or baseline:<name>")
    fee_bps: float = pa.Field(ge=0, description="configured taker fee, bps per side (PERPFOLIO_FEE_BPS)")
    slippage_bps: float = pa.Field(ge=0, description="configured slippage, bps per side (PERPFOLIO_SLIPPAGE_BPS)")
    cost_bps: float = pa.Field(ge=0, description="fee_bps + slippage_bps: the cost the backtest ran at")
    total_return: float = pa.Field(description="the book's total return at the configured cost (= backtest.metrics)")
    excess_vs_equal_weight: float = pa.Field(nullable=True, description="the book's total return minus equal weight's "
                                             "over the bars both traded, configured cost (null for equal weight itself "
                                             "or without it)")
    excess_at_zero_cost: float = pa.Field(nullable=True, description="the same gap with both books run without costs")
    break_even_cost_bps: float = pa.Field(nullable=True, ge=0, description="lowest cost where the two returns are "
                                          "equal; null when status says there is none up to the search limit")
    break_even_multiplier: float = pa.Field(nullable=True, ge=0, description="break_even_cost_bps / cost_bps: how "
                                            "many times today's costs the lead survives (null with cost_bps = 0)")
    status: str = pa.Field(isin=BREAK_EVEN_STATUSES, description="beats_below: ahead of equal weight below the "
                           "break-even cost; beats_above: ahead only above it (trades less); never_beats: behind or "
                           "level at every cost up to the limit; beats_throughout: ahead at every cost up to the "
                           "limit; reference: equal weight itself; no_reference: no baseline:equal_weight book")

    @pa.dataframe_check(error="break_even_cost_bps is null exactly when status names no crossing")
    def null_with_reason(cls, data: pa.PolarsData) -> pl.LazyFrame:
        crossing = pl.col("status").is_in(["beats_below", "beats_above"])
        return data.lazyframe.select(crossing == pl.col("break_even_cost_bps").is_not_null())


SIGNIFICANCE_STATISTICS = ["sharpe", "ann_return", "max_drawdown", "cvar_95"]


class Significance(Table):
    """backtest.significance: how sure the backtest's verdict is (perpfolio.significance). Stationary
    block bootstrap of every book's simple bar returns (those of backtest.metrics): percentile intervals
    of its statistics (reference null) and of their difference to a reference book over the bars both
    have, the same resamples applied to both (paired). psr / dsr on each book's own sharpe row only.
    Every float finite (null where stated)."""

    strategy: str = pa.Field(description="book: strategy name, or baseline:<name>")
    reference: str = pa.Field(nullable=True, description="book it is compared with (estimate = book - reference); null: "
                              "the book's own statistic")
    statistic: str = pa.Field(isin=SIGNIFICANCE_STATISTICS, description="sharpe (annualized, rf = 0) | ann_return "
                              "(geometric, annualized) | max_drawdown (positive fraction) | cvar_95 (mean loss of the "
                              "worst 5% of bars, positive, per bar), as in backtest.metrics")
    estimate: float = pa.Field(description="the statistic of the observed series (paired: book minus reference)")
    lower: float = pa.Field(description="lower end of the percentile interval: (1 - level)/2 quantile over the resamples")
    upper: float = pa.Field(description="upper end: (1 + level)/2 quantile over the resamples")
    level: float = pa.Field(gt=0, lt=1, description="confidence level of the interval (0.95)")
    prob_better: float = pa.Field(nullable=True, ge=0, le=1, description="share of resamples where the book is strictly "
                                  "better than the reference (higher sharpe / ann_return, lower max_drawdown / cvar_95) "
                                  "by more than 1e-6 of the statistic's bootstrap std (closer is a tie); null on a "
                                  "book's own rows")
    n_bars: int = pa.Field(ge=2, description="bar returns resampled: the book's own, or the bars both books have")
    from_ts: DateTime = _ts("first bar used (open time, UTC)")
    to_ts: DateTime = _ts("last bar used (open time, UTC)")
    block_bars: int = pa.Field(ge=1, description="mean block length of the stationary bootstrap, bars "
                               "(PERPFOLIO_BOOTSTRAP_BLOCK_BARS)")
    n_resamples: int = pa.Field(ge=1, description="bootstrap resamples (PERPFOLIO_BOOTSTRAP_RESAMPLES)")
    seed: int = pa.Field(ge=0, description="seed of the resample indices (PERPFOLIO_BOOTSTRAP_SEED)")
    psr: float = pa.Field(nullable=True, ge=0, le=1, description="probabilistic Sharpe ratio PSR(0): probability that "
                          "the true Sharpe ratio is positive given the bars, skewness and kurtosis; own sharpe rows only")
    dsr: float = pa.Field(nullable=True, ge=0, le=1, description="deflated Sharpe ratio PSR(SR0): probability that it "
                          "beats the best Sharpe ratio luck would give among all the books of the run; own sharpe rows only")
    dsr_benchmark: float = pa.Field(nullable=True, description="SR0, annualized: the expected maximum Sharpe ratio of "
                                    "that many zero-skill books with the books' spread of Sharpe ratios; own sharpe rows only")

    @pa.dataframe_check(error="duplicate (strategy, reference, statistic)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["strategy", "reference", "statistic"])

    @pa.dataframe_check(error="lower > upper")
    def ordered(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("lower") <= pl.col("upper"))

    @pa.dataframe_check(error="prob_better must be set exactly on paired rows, psr / dsr / dsr_benchmark exactly on "
                        "a book's own sharpe row")
    def nulls_by_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        own = pl.col("reference").is_null()
        tested = own & (pl.col("statistic") == "sharpe")
        return data.lazyframe.select((pl.col("prob_better").is_null() == own)
                                     & pl.all_horizontal(pl.col(c).is_not_null() == tested
                                                         for c in ("psr", "dsr", "dsr_benchmark")))

"""Pandera (polars) models of every warehouse table: the data contract of DESIGN.md section 2.

Each model is declared once and used three ways: `conform` puts an asset's output in the
table's column order and dtypes (the DuckDB insert is positional), the blocking asset check
validates it, and the README's table reference is read from the descriptions.

Pandera's polars backend rejects NaN/null in a float column by default but lets `inf`
through `gt=0`, so every float column states finiteness explicitly.
"""


import polars as pl
import pandera.polars as pa
import polars.selectors as cs
from pandera.engines.polars_engine import DateTime
from pandera.api.polars.model_config import BaseConfig

UTC_US = {"time_unit": "us", "time_zone": "UTC"}
WEIGHT_SUM_TOLERANCE = 1e-6




def _ts(description: str) -> object:
    return pa.Field(dtype_kwargs=UTC_US, description=description)


def _unique_key(data: pa.PolarsData, key: list[str]) -> pl.LazyFrame:
    return data.lazyframe.select(~pl.struct(key).is_duplicated())


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
        return data.lazyframe.select(
            (pl.col("high") >= pl.max_horizontal("open", "close")) & (pl.col("low") <= pl.min_horizontal("open", "close"))
        )


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


class Estimates(Table):
    """features.estimates: rolling moments in long form, ANNUALIZED; null values when status != ok."""

    as_of: DateTime = _ts("open time of the last bar in the window, UTC")
    estimator: str = pa.Field(description="estimator name, e.g. sample")
    quantity: str = pa.Field(isin=["mean", "cov", "downside", "semicov"], description="which moment")
    symbol: str = pa.Field(description="row symbol")
    symbol_j: str = pa.Field(nullable=True, description="column symbol for matrices, null for vectors")
    value: float = pa.Field(nullable=True, description="annualized value (x periods per year)")
    window_bars: int = pa.Field(gt=0, description="bars in the estimation window")
    n_obs: int = pa.Field(ge=0, description="bars actually available in the window")
    status: str = pa.Field(description="ok | insufficient_history | missing_data | degenerate")

    @pa.dataframe_check(error="value must be present exactly when status is ok")
    def value_iff_ok(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("value").is_not_null() == (pl.col("status") == "ok"))

    @pa.dataframe_check(error="duplicate (as_of, estimator, quantity, symbol, symbol_j)")
    def unique_cell(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "estimator", "quantity", "symbol", "symbol_j"])


class Signals(Table):
    """signals.signals: variance-risk-premium signals per asof and symbol (annualized variances)."""

    as_of: DateTime = _ts("open time of the last bar used, UTC")
    symbol: str = pa.Field(description="exchange symbol")
    implied_var: float = pa.Field(nullable=True, ge=0, description="implied variance, annualized")
    realized_var: float = pa.Field(nullable=True, ge=0, description="realized variance over the window, annualized")
    vrp: float = pa.Field(nullable=True, description="implied_var - realized_var")
    iv_source: str = pa.Field(description="index | proxy:<reference> | unavailable")

    @pa.dataframe_check(error="duplicate (as_of, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "symbol"])


class Weights(Table):
    """portfolio.weights: target weights (fractions of equity) per rebalance, strategy and symbol."""

    as_of: DateTime = _ts("decision time: open time of the last bar used, UTC")
    strategy: str = pa.Field(description="strategy name from the strategies file")
    symbol: str = pa.Field(description="exchange symbol")
    weight: float = pa.Field(ge=-10, le=10, description="fraction of equity; negative is short")
    status: str = pa.Field(str_matches=r"^(optimal|fallback:.+)$", description="optimal or fallback:<which>:<reason>")
    solver: str = pa.Field(description="solver that produced the weights, or the fallback rule")
    objective: float = pa.Field(nullable=True, description="objective value of the solved problem")
    solve_ms: float = pa.Field(ge=0, description="wall time of the solve chain, milliseconds")

    @pa.dataframe_check(error="duplicate (as_of, strategy, symbol)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["as_of", "strategy", "symbol"])

    @pa.dataframe_check(error="weights of an (as_of, strategy) do not sum to 1 within 1e-6")
    def budget(cls, data: pa.PolarsData) -> pl.LazyFrame:
        total = pl.col("weight").sum().over("as_of", "strategy")
        return data.lazyframe.select((total - 1.0).abs() <= WEIGHT_SUM_TOLERANCE)


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

    @pa.dataframe_check(error="duplicate (ts, strategy)")
    def unique_row(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return _unique_key(data, ["ts", "strategy"])


class Metrics(Table):
    """backtest.metrics: one row of performance figures per strategy (annualized with 8760/bar_hours)."""

    strategy: str = pa.Field(unique=True, description="strategy name")
    sharpe: float = pa.Field(description="mean / std of bar returns x sqrt(periods per year), rf = 0")
    sortino: float = pa.Field(description="mean / downside deviation x sqrt(periods per year)")
    ann_return: float = pa.Field(description="compounded annual return")
    ann_vol: float = pa.Field(ge=0, description="annualized volatility of bar returns")
    max_drawdown: float = pa.Field(ge=0, description="largest peak-to-trough loss, fraction")
    max_loss: float = pa.Field(description="worst single-bar return")
    turnover: float = pa.Field(ge=0, description="traded notional / mean equity, annualized")
    cvar_95: float = pa.Field(description="mean loss of the worst 5% of bars")
    funding_pnl: float = pa.Field(description="total funding PnL, equity units")
    costs: float = pa.Field(ge=0, description="total fees + slippage, equity units")
    fallbacks: int = pa.Field(ge=0, description="rebalances whose weights came from a fallback")


class Stress(Table):
    """risk.stress: instant shock scenarios applied to the weights at each rebalance."""

    as_of: DateTime = _ts("rebalance whose weights were shocked")
    strategy: str = pa.Field(description="strategy name")
    scenario: str = pa.Field(description="scenario name")
    leverage: float = pa.Field(gt=0, description="gross notional / equity of the shocked book")
    shock: float = pa.Field(description="return applied to the reference symbol")
    pnl: float = pa.Field(description="PnL of the shock as a fraction of equity")
    equity_after: float = pa.Field(description="equity after the shock, fraction of equity before")
    margin_ratio: float = pa.Field(nullable=True, ge=0, description="maintenance margin / equity after; null when no equity is left")
    liquidated: bool = pa.Field(description="equity after <= maintenance margin")
    capital_sufficient: bool = pa.Field(description="equity after >= maintenance margin + buffer")


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

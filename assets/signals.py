"""signals.signals: realized and implied variance and the variance risk premium per asof and symbol."""

import math

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import table_asset, validated
from assets.features import NET_RETURNS, aligned_returns, one_bar_returns, regime_lookback_days
from assets.raw import IMPLIED_VOL
from perpfolio import signals as signal_lib
from pipelines.partitions import lookback, partition_window, rebalance_asofs, run_policy
from pipelines.settings import Settings

SIGNALS = dg.AssetKey(["signals", "signals"])
IV_LOOKBACK_DAYS = 2
FUNDING_FIT_DAYS = 30


def regime_at(signals: pl.DataFrame, asofs: list) -> pl.Series:
    """The market regime ("calm" / "turbulent", null where unknown) at each asof, in order.

    The regime is market-wide, so every symbol's row of an asof carries the same value."""
    per_asof = signals.group_by("as_of").agg(pl.col("regime").first())
    return pl.DataFrame({"as_of": asofs}).join(per_asof, on="as_of", how="left")["regime"]


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    trailing_days = max(settings.vrp_z_days, FUNDING_FIT_DAYS + 1)  # daily grid of the z-score and the AR(1)
    bars_days = math.ceil(max(settings.window_bars, settings.momentum_bars) * settings.bar_hours / 24)
    history_days = max(bars_days + trailing_days, regime_lookback_days(settings))

    @table_asset(
        SIGNALS, schemas.Signals, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={
            "net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(history_days, settings)),
            "implied_vol": dg.AssetIn(IMPLIED_VOL, partition_mapping=lookback(IV_LOOKBACK_DAYS + trailing_days, settings)),
        },
        group_name="signals", kinds={"duckdb", "numpy"},
        description="VRP = implied variance - realized variance (annualized). Implied variance is iv^2 of the "
        "underlying's own index (e.g. Deribit DVOL for BTC and ETH); a symbol without one has no VRP "
        f"({'a proxy scaled from BTC by relative realized variance, iv_source proxy:BTC' if settings.vrp_proxy else 'PERPFOLIO_VRP_PROXY=on proxies it from BTC'}). "
        "Also: VRP z-score, AR(1) next-day funding forecast (per hour) and funding-adjusted VRP, momentum, EWMA and "
        "GARCH(1,1) predicted vol, calm/turbulent regime from the short/long vol ratio with its breakpoint.",
    )
    def signals(context: dg.AssetExecutionContext, net_returns: pl.DataFrame, implied_vol: pl.DataFrame):
        asofs = rebalance_asofs(partition_window(context, settings), settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.Signals), schemas.Signals, SIGNALS, metadata={"asofs": 0})
            return
        ts, matrix = aligned_returns(net_returns, symbols, bar_hours=settings.bar_hours)
        _, one_bar, _ = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
        _, funding = aligned_returns(net_returns, symbols, column="funding_return", bar_hours=settings.bar_hours)
        frame, extra = signal_lib.build_signals(
            ts, matrix, funding, asofs, symbols, implied_vol, one_bar_returns=one_bar,
            max_missing_fraction=settings.max_missing_fraction, vrp_proxy=settings.vrp_proxy,
            window=settings.window_bars, bar_hours=settings.bar_hours,
            momentum_bars=settings.momentum_bars, ewma_half_life_bars=settings.ewma_half_life_bars,
            vrp_z_days=settings.vrp_z_days, regime_short_bars=settings.regime_short_bars,
            regime_long_bars=settings.regime_long_bars, regime_enter=settings.regime_enter,
            regime_exit=settings.regime_exit, funding_fit_days=FUNDING_FIT_DAYS,
        )
        sources = frame.group_by("iv_source").len().sort("iv_source")
        meta = {"asofs": len(asofs), **{f"iv_source_{s}": n for s, n in sources.iter_rows()}, **extra}
        yield from validated(frame, schemas.Signals, SIGNALS, metadata=meta)

    return [signals]

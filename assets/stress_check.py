"""risk.stress_vs_realized and risk.stress_confusion: the verdicts of risk.stress against what the
market then did to the same positions (perpfolio.stress_check).

Unpartitioned like the rest of the evaluation: each rebuilds from the whole stored history.
"""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.evaluation import (
    MARGIN_MODES,
    STRESS,
    STRESS_CONFUSION,
    STRESS_VS_REALIZED,
    bar_index,
    books,
)
from assets.features import NET_RETURNS, aligned_returns
from assets.portfolio import WEIGHTS
from assets.raw import CANDLES
from perpfolio import stress_check
from pipelines.resources import RawMarket
from pipelines.settings import Settings


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    delisted_after = max(1, 24 // settings.bar_hours)  # as backtest.equity

    @table_asset(
        STRESS_VS_REALIZED, schemas.StressVsRealized,
        ins={"candles": dg.AssetIn(CANDLES), "net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS),
             "stress": dg.AssetIn(STRESS)},
        group_name="risk", kinds={"duckdb", "numpy"},
        description="Did the stress verdict come true? For every rebalance of every book, stress leverage and margin "
        f"mode: the positions on an account of {settings.account_usdt:,.0f} USDT, opened at the close of the bar after "
        "the asof and held to the next decision's execution bar, marked every bar at their adverse intrabar extreme "
        "(low for a long, high for a short) with funding paid and tiered maintenance margin; realized liquidation, "
        "worst margin ratio and where, beside risk.stress's prediction (price, funding and volatility scenarios).",
    )
    def stress_vs_realized(candles: pl.DataFrame, net_returns: pl.DataFrame, weights: pl.DataFrame,
                           stress: pl.DataFrame, market: RawMarket):
        ts, funding = aligned_returns(net_returns, symbols, "funding_return", bar_hours=settings.bar_hours)
        close, high, low = stress_check.candle_matrices(candles, ts, symbols, bar_hours=settings.bar_hours)
        tiers = {s: r.tiers for s, r in market.leverage_tiers(symbols).items()}
        frames, unopened = [], 0
        for name, (asofs, targets) in books(weights, settings)[0].items():
            outcome, missing = stress_check.realized_outcomes(
                ts, close, high, low, funding, bar_index(ts, asofs), targets, symbols=symbols,
                leverages=settings.stress_leverages, tiers=tiers, account_usdt=settings.account_usdt,
                margin_modes=MARGIN_MODES, lag_bars=1, delisted_after=delisted_after)
            frames.append(outcome.with_columns(strategy=pl.lit(name)))
            unopened += missing
        realized = pl.concat(frames) if frames else None
        frame = (stress_check.stress_vs_realized(stress_check.predicted_verdicts(stress), realized) if frames
                 else schemas.empty(schemas.StressVsRealized))
        meta = {"rows": frame.height, "realized_liquidations": int(frame["realized_liquidated"].sum()),
                "predicted_liquidations": int(frame["predicted_liquidated"].sum()),
                "missed": int((frame["realized_liquidated"] & ~frame["predicted_liquidated"]).sum()),
                "wick_only": int((frame["realized_liquidated"] & ~frame["close_only_liquidated"]).sum()),
                "realized_without_prediction": (realized.height if frames else 0) - frame.height,
                "positions_not_opened": unopened, "account_usdt": settings.account_usdt,
                "replays": "left out of the prediction (latest rebalance only, drawn from the whole history)"}
        yield from validated(frame, schemas.StressVsRealized, STRESS_VS_REALIZED, metadata=meta)

    @table_asset(
        STRESS_CONFUSION, schemas.StressConfusion, ins={"rows": dg.AssetIn(STRESS_VS_REALIZED)},
        group_name="risk", kinds={"duckdb", "polars"},
        description="Per book, stress leverage and margin mode: how often risk.stress's liquidation verdict matched "
        "the realized one (true alarms, false alarms, missed, true calms), hit, miss and false-alarm rates, "
        "liquidations only the wicks revealed, and the worst realized bars with their time and symbol.",
    )
    def stress_confusion(rows: pl.DataFrame):
        frame = stress_check.confusion(rows) if rows.height else schemas.empty(schemas.StressConfusion)
        shown = frame.filter(pl.col("margin_mode") == "cross").select(
            "strategy", "leverage", "true_alarms", "false_alarms", "missed", "true_calms", "hit_rate", "worst_hours")
        yield from validated(frame, schemas.StressConfusion, STRESS_CONFUSION, metadata={
            "rows": frame.height, "missed": int(frame["missed"].sum()) if frame.height else 0,
            "cross_margin": dg.MetadataValue.md(markdown_table(shown))})

    return [stress_vs_realized, stress_confusion]

"""backtest.by_regime: every book's returns in calm and in turbulent markets (the article's claim that
downside risk helps when markets are turbulent). The article's other ablations are paired rows of
backtest.significance (perpfolio.significance.ablation_pairs)."""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.evaluation import BY_REGIME, EQUITY
from assets.signals import SIGNALS
from perpfolio import backtest, returns
from pipelines.settings import Settings


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    ppy = returns.periods_per_year(settings.bar_hours)

    @table_asset(
        BY_REGIME, schemas.ByRegime, ins={"equity": dg.AssetIn(EQUITY), "signals": dg.AssetIn(SIGNALS)},
        group_name="backtest", kinds={"duckdb", "numpy"},
        description="Per book and market regime (calm / turbulent, as signals.signals decided it at each rebalance): "
        "bars, annualized return and volatility, Sharpe, CVaR 95 and the worst bar.",
    )
    def by_regime(equity: pl.DataFrame, signals: pl.DataFrame):
        per_asof = signals.group_by("as_of").agg(pl.col("regime").first()).sort("as_of")
        asofs, regimes = per_asof["as_of"].to_list(), per_asof["regime"].to_list()
        frames = [backtest.regime_metrics(path, asofs, regimes, periods_per_year=ppy).with_columns(strategy=pl.lit(s))
                  for (s,), path in equity.group_by("strategy", maintain_order=True)]
        frame = (pl.concat(frames).sort("strategy", "regime").with_columns(pl.col(pl.Float64).fill_nan(None))
                 if frames else schemas.empty(schemas.ByRegime))
        table = frame.pivot(on="regime", index="strategy", values="sharpe") if frame.height else frame
        yield from validated(frame, schemas.ByRegime, BY_REGIME,
                             metadata={"rows": frame.height, "sharpe_by_regime": dg.MetadataValue.md(markdown_table(table))})

    return [by_regime]

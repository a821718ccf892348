"""backtest.equity, backtest.metrics, risk.stress and the report: the walk-forward verdict.

These assets are unpartitioned: each reads the whole stored history of returns and weights
and rebuilds its table, because an equity path compounds across days.
"""

from dataclasses import replace
from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.features import NET_RETURNS, aligned_returns
from assets.portfolio import WEIGHTS
from assets.signals import SIGNALS
from perpfolio import backtest, report, returns, stress
from pipelines.settings import Settings

EQUITY = dg.AssetKey(["backtest", "equity"])
METRICS = dg.AssetKey(["backtest", "metrics"])
STRESS = dg.AssetKey(["risk", "stress"])
REPORT = dg.AssetKey(["report"])
WARMUP_STATUS = "insufficient_history"


def traded_weights(weights: pl.DataFrame, strategy: str, symbols: list[str]) -> tuple[list[datetime], np.ndarray]:
    """Asofs and K x N target weights of one strategy, from its first asof with a full estimation window."""
    rows = weights.filter(pl.col("strategy") == strategy)
    warm = rows.filter(pl.col("status").str.contains(WARMUP_STATUS))["as_of"]
    if warm.len():
        rows = rows.filter(pl.col("as_of") > warm.max())
    wide = rows.pivot(on="symbol", index="as_of", values="weight").sort("as_of")
    return wide["as_of"].to_list(), wide.select(symbols).to_numpy()


def bar_index(ts: np.ndarray, asofs: list[datetime]) -> np.ndarray:
    stamps = np.array([np.datetime64(a.replace(tzinfo=None), "us") for a in asofs])
    idx = np.searchsorted(ts, stamps)
    bad = (idx >= len(ts)) | (ts[np.minimum(idx, len(ts) - 1)] != stamps)
    if bad.any():
        raise ValueError(f"features.net_returns has no bar at rebalance asof {asofs[int(np.argmax(bad))]}")
    return idx


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    ppy = returns.periods_per_year(settings.bar_hours)

    @table_asset(
        EQUITY, schemas.Equity, ins={"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS)},
        group_name="backtest", kinds={"duckdb", "numpy"},
        description=f"Walk-forward equity per bar and strategy: trade at the close of the bar after each asof, "
        f"taker fee {settings.fee_bps:g} bps + slippage {settings.slippage_bps:g} bps on traded notional, "
        "funding paid or received by position sign, positions drift between rebalances.",
    )
    def equity(net_returns: pl.DataFrame, weights: pl.DataFrame):
        ts, price = aligned_returns(net_returns, symbols, "price_return")
        _, funding = aligned_returns(net_returns, symbols, "funding_return")
        paths = []
        for strategy in weights["strategy"].unique(maintain_order=True):
            asofs, targets = traded_weights(weights, strategy, symbols)
            if not asofs:
                continue
            bars = bar_index(ts, asofs)
            start = int(bars[0])
            path = backtest.simulate(
                ts[start:], price[start:], funding[start:], bars - start, targets,
                fee_bps=settings.fee_bps, slippage_bps=settings.slippage_bps, lag_bars=1,
            )
            paths.append(path.with_columns(strategy=pl.lit(strategy)))
        frame = pl.concat(paths) if paths else pl.DataFrame()
        final = frame.group_by("strategy").agg(pl.col("equity").last()).sort("strategy") if paths else frame
        meta = {"strategies": len(paths), **{f"final_equity_{s}": float(e) for s, e in final.iter_rows()}}
        yield from validated(frame, schemas.Equity, EQUITY, metadata=meta)

    @table_asset(
        METRICS, schemas.Metrics, ins={"equity": dg.AssetIn(EQUITY), "weights": dg.AssetIn(WEIGHTS)},
        group_name="backtest", kinds={"duckdb", "numpy"},
        description="Per-strategy Sharpe, Sortino, annual return and vol, max drawdown, worst bar, turnover, "
        "CVaR 95, funding PnL, costs and the number of fallback rebalances.",
    )
    def metrics(equity: pl.DataFrame, weights: pl.DataFrame):
        fallbacks = weights.unique(["as_of", "strategy"]).group_by("strategy").agg(
            fallbacks=pl.col("status").str.starts_with("fallback").sum()
        )
        rows = [
            {"strategy": s, **backtest.performance_metrics(path.sort("ts"), periods_per_year=ppy)}
            for (s,), path in equity.group_by("strategy", maintain_order=True)
        ]
        frame = pl.DataFrame(rows).join(fallbacks, on="strategy", how="left").sort("sharpe", descending=True)
        yield from validated(frame, schemas.Metrics, METRICS, metadata={"table": dg.MetadataValue.md(markdown_table(frame))})

    @table_asset(
        STRESS, schemas.Stress, ins={"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS)},
        group_name="risk", kinds={"duckdb", "numpy"},
        description="Instant one-hour shocks (BTC -5%/-10% with others moved by rolling beta, all -10%) applied to "
        f"the weights of every rebalance at gross leverage {', '.join(f'{x:g}' for x in settings.stress_leverages)}; "
        "cross margin with tiered maintenance margin, liquidation and capital sufficiency.",
    )
    def stress_tests(net_returns: pl.DataFrame, weights: pl.DataFrame):
        ts, matrix = aligned_returns(net_returns, symbols)
        reference = symbols.index("BTCUSDT") if "BTCUSDT" in symbols else 0
        tiers = stress.load_leverage_tiers()
        scenarios = [replace(sc, reference=symbols[reference]) if sc.reference else sc for sc in stress.DEFAULT_SCENARIOS]
        frames = []
        for strategy in weights["strategy"].unique(maintain_order=True):
            asofs, targets = traded_weights(weights, strategy, symbols)
            for asof, end, w in zip(asofs, bar_index(ts, asofs), targets):
                window = matrix[max(0, end - settings.window_bars + 1): end + 1]
                betas = stress.rolling_betas(window[~np.isnan(window).any(axis=1)], reference=reference)
                for leverage in settings.stress_leverages:
                    rows = stress.stress_test(
                        w, symbols, betas, scenarios=scenarios, leverage=leverage, tiers=tiers, buffer=settings.margin_buffer,
                    )
                    frames.append(rows.with_columns(as_of=pl.lit(asof), strategy=pl.lit(strategy)))
        frame = pl.concat(frames) if frames else pl.DataFrame()
        if frames:  # the table states fractions of pre-shock equity; a wiped-out account has no margin ratio (null)
            frame = frame.drop("pnl", "equity_after").rename({"pnl_frac": "pnl", "equity_after_frac": "equity_after"})
            frame = frame.with_columns(margin_ratio=pl.when(pl.col("margin_ratio").is_finite()).then("margin_ratio"))
        meta = {"rows": frame.height, "liquidations": int(frame["liquidated"].sum()) if frames else 0}
        yield from validated(frame, schemas.Stress, STRESS, metadata=meta)

    @dg.asset(
        key=REPORT,
        ins={name: dg.AssetIn(key) for name, key in
             {"metrics": METRICS, "equity": EQUITY, "weights": WEIGHTS, "signals": SIGNALS, "stress": STRESS}.items()},
        group_name="report", kinds={"html", "matplotlib"},
        description=f"Self-contained HTML report with plots under {settings.reports_dir}; the plots also show here.",
    )
    def strategy_report(metrics, equity, weights, signals, stress) -> dg.MaterializeResult:
        latest = stress.filter(pl.col("as_of") == pl.col("as_of").max())
        figures = {
            "equity": report.plot_equity(equity),
            "drawdown": report.plot_drawdown(equity),
            **{f"weights_{s}": report.plot_weights(weights, s) for s in weights["strategy"].unique(maintain_order=True)},
            "variance_risk_premium": report.plot_vrp(signals),
            "stress_latest_weights": report.plot_stress(latest.rename({"equity_after": "equity_after_frac"})),
        }
        path = report.write_report(settings.reports_dir, title="perpfolio strategy report", metrics=metrics, figures=figures)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)),
            "metrics": dg.MetadataValue.md(markdown_table(metrics)),
            **{name: dg.MetadataValue.md(report.markdown_image(png, name)) for name, png in figures.items()},
        })

    return [equity, metrics, stress_tests, strategy_report]


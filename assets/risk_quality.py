"""backtest.risk_model and backtest.risk_model_summary: did the stored covariance forecasts
predict the risk each book then ran (perpfolio.risk_quality)?

Unpartitioned like the rest of the evaluation: every estimator of features.estimates is scored on
every book of ``assets.evaluation.books`` over the whole stored history.
"""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.evaluation import RISK_MODEL, RISK_MODEL_SUMMARY, bar_index, books, predicted_covariances
from assets.features import NET_RETURNS, estimates_in, one_bar_returns
from assets.portfolio import WEIGHTS
from perpfolio import report, returns, risk_quality
from pipelines.settings import Settings

LAG_BARS = 1  # backtest.equity executes one bar after the asof


def risk_model_frame(net_returns: pl.DataFrame, weights: pl.DataFrame, estimates: pl.DataFrame,
                     settings: Settings) -> tuple[pl.DataFrame, dict[str, str]]:
    """One backtest.risk_model row per (estimator, book), and {book: why it was skipped}."""
    symbols = list(settings.symbols)
    ts, matrix, _ = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
    plans, skipped = books(weights, settings)
    union = sorted({a for asofs, _ in plans.values() for a in asofs})
    position = {a: i for i, a in enumerate(union)}
    rows = []
    for estimator in sorted(estimates["estimator"].unique()) if union else ():
        cov = predicted_covariances(estimates, estimator, union, symbols)  # members' block, NaN without an estimate
        for name, (asofs, targets) in plans.items():
            rows.append({"estimator": estimator, "strategy": name, **risk_quality.forecast_quality(
                matrix, targets, cov[[position[a] for a in asofs]], bar_index(ts, asofs),
                periods_per_year=returns.periods_per_year(settings.bar_hours), lag_bars=LAG_BARS)})
    frame = pl.DataFrame(rows) if rows else schemas.empty(schemas.RiskModel)
    return frame, skipped


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    @table_asset(
        RISK_MODEL, schemas.RiskModel,
        ins={"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS), "estimates": estimates_in("cov")},
        group_name="backtest", kinds={"duckdb", "numpy"},
        description="Risk-model quality per covariance estimator and book: the predicted per-bar vol of each target, "
        "sqrt(w'Sw / ppy), against the target's one-bar returns over the bars it is held (bars asof + 2 .. next asof "
        "+ 1): bias statistic std(r / sigma) with its normal and kurtosis-robust 95 % bands, QLIKE, and the 95 % / 99 % "
        "Gaussian VaR exceedances with Kupiec, Christoffersen independence and conditional coverage p-values.",
    )
    def risk_model(net_returns: pl.DataFrame, weights: pl.DataFrame, estimates: pl.DataFrame):
        frame, skipped = risk_model_frame(net_returns, weights, estimates, settings)
        scored = frame.filter(pl.col("bias").is_not_null())
        meta = {"rows": frame.height, "estimators": frame["estimator"].n_unique(), "books": frame["strategy"].n_unique(),
                "books_in_band": f"{int(scored['bias_in_band'].sum())} of {scored.height}",
                "books_in_robust_band": f"{int(scored['bias_in_robust_band'].sum())} of {scored.height}",
                **{f"book_skipped_{k}": v for k, v in skipped.items()}}
        if scored.height:
            order = risk_quality.rank_estimators(frame)["estimator"].to_list()  # best forecaster on the left
            meta["bias_plot"] = dg.MetadataValue.md(report.markdown_image(
                report.plot_risk_model_bias(scored, order=order), "risk-model bias"))
        yield from validated(frame, schemas.RiskModel, RISK_MODEL, metadata=meta)

    @table_asset(
        RISK_MODEL_SUMMARY, schemas.RiskModelSummary, ins={"risk_model": dg.AssetIn(RISK_MODEL)},
        group_name="backtest", kinds={"duckdb", "polars"},
        description="Which covariance estimator forecasts this market's risk best: per estimator over the books, mean "
        "QLIKE (rank 1 = lowest), mean |bias - 1|, books inside the normal and robust bias bands and books passing the "
        "95 % / 99 % VaR conditional coverage test at 5 %.",
    )
    def risk_model_summary(risk_model: pl.DataFrame):
        frame = risk_quality.rank_estimators(risk_model)
        meta = {"table": dg.MetadataValue.md(markdown_table(frame)),
                "best_estimator": frame["estimator"][0] if frame.height else "none"}
        yield from validated(frame, schemas.RiskModelSummary, RISK_MODEL_SUMMARY, metadata=meta)

    return [risk_model, risk_model_summary]

"""backtest.significance: how sure is the comparison of the books? Bootstrap intervals of each
book's Sharpe, annual return, drawdown and tail loss, paired differences to a reference book, and
the probabilistic and deflated Sharpe ratios (perpfolio.significance).

Unpartitioned like the rest of the evaluation: it rebuilds from the whole stored backtest.equity.
"""

import dagster as dg
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.evaluation import EQUITY, SIGNIFICANCE
from perpfolio import returns, significance
from perpfolio.optimize import load_strategies
from pipelines.settings import Settings


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    ppy = returns.periods_per_year(settings.bar_hours)
    specs = load_strategies(settings.strategies_file)
    hybrids = {s.name: s.parameters.baseline for s in specs if s.objective == "hybrid"}
    bootstrap = dict(block_bars=settings.bootstrap_block_bars, n_resamples=settings.bootstrap_resamples,
                     seed=settings.bootstrap_seed, level=significance.LEVEL)

    @table_asset(
        SIGNIFICANCE, schemas.Significance, ins={"equity": dg.AssetIn(EQUITY)}, group_name="backtest",
        kinds={"duckdb", "numpy"},
        description=f"{significance.LEVEL:.0%} intervals of every book's Sharpe, annual return, max drawdown and CVaR "
        f"95 from a stationary block bootstrap of its bar returns ({settings.bootstrap_resamples} resamples, mean block "
        f"{settings.bootstrap_block_bars} bars, seed {settings.bootstrap_seed}); paired intervals of the difference of "
        f"every book to {significance.EQUAL_WEIGHT}, of every hybrid to its baseline and of the article's ablations "
        "(proxied vs real implied vol, capped vs uncapped overlay, downside vs variance) over the bars both have, with "
        "the share of resamples where the book is better; probabilistic Sharpe ratio PSR(0) and deflated Sharpe ratio "
        "over all the books tried.",
    )
    def significance_table(equity: pl.DataFrame):
        by_book = significance.book_returns(equity)
        pairs = significance.comparison_pairs(list(by_book), hybrid_baselines=hybrids)
        pairs += [p for p in significance.ablation_pairs(specs) if p not in pairs and set(p) <= set(by_book)]
        frame = significance.significance(by_book, pairs=pairs, periods_per_year=ppy, **bootstrap)
        sharpe = frame.filter(pl.col("statistic") == "sharpe").select(
            "strategy", "reference", "estimate", "lower", "upper", "prob_better", "psr", "dsr", "n_bars")
        meta = {"books": len(by_book), "pairs": ", ".join(f"{b} - {r}" for b, r in pairs) or "none",
                "dsr_benchmark_sharpe": float(frame["dsr_benchmark"].drop_nulls()[0]), **bootstrap,
                "sharpe": dg.MetadataValue.md(markdown_table(sharpe))}
        yield from validated(frame, schemas.Significance, SIGNIFICANCE, metadata=meta)

    return [significance_table]

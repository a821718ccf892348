"""risk.contributions, backtest.attribution and backtest.break_even: where each book's risk and
return come from, and the trading cost its lead over equal weight survives.

Unpartitioned like the rest of the evaluation: each rebuilds from the whole stored history. The
attribution and the break-even re-run every book through ``assets.evaluation.book_simulations``,
the same simulation as backtest.equity (so their sums equal backtest.metrics).
"""

from functools import cache, partial

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.evaluation import (
    ATTRIBUTION, BREAK_EVEN, CONTRIBUTIONS, book_simulations, books, predicted_covariances, universe_members,
)
from assets.features import NET_RETURNS, estimates_in
from assets.portfolio import WEIGHTS
from assets.signals import SIGNALS
from perpfolio import attribution
from perpfolio.backtest import BASELINE_PREFIX
from perpfolio.optimize import load_strategies
from pipelines.settings import Settings

REFERENCE = BASELINE_PREFIX + "equal_weight"
MAX_BREAK_EVEN_BPS = 1000.0  # beyond this cost per side no book is worth trading: the search stops there


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    sizing = settings.sizing_rule()
    simulation_ins = {"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS), "signals": dg.AssetIn(SIGNALS)}
    if sizing is not None and sizing.needs_covariance:  # as backtest.equity: the sizing reads predicted covariances
        simulation_ins["estimates"] = estimates_in("cov")
    cost = settings.fee_bps + settings.slippage_bps

    @table_asset(
        CONTRIBUTIONS, schemas.RiskContributions, ins={"weights": dg.AssetIn(WEIGHTS), "estimates": estimates_in("cov")},
        group_name="risk", kinds={"duckdb", "numpy"},
        description="Euler risk contributions of every book's target weights at each traded rebalance: RC_i = "
        "w_i (Σw)_i (annualized variance, summing to wᵀΣw), its share of the book's variance and the marginal vol "
        "(Σw)_i / σ_p, under the covariance of the book's estimator (sample for baselines); rows for every member "
        "of the asof's universe and every held symbol.",
    )
    def contributions(weights: pl.DataFrame, estimates: pl.DataFrame):
        estimator_of = {s.name: s.estimator for s in load_strategies(settings.strategies_file)}
        frames, unknown, not_in_file = [], {}, []
        for name, (asofs, targets) in books(weights, settings)[0].items():
            if not name.startswith(BASELINE_PREFIX) and name not in estimator_of:
                not_in_file.append(name)  # weights stored under an older strategies file
            estimator = estimator_of.get(name, "sample")
            cov = predicted_covariances(estimates, estimator, asofs, symbols)
            known = np.isfinite(cov).all(axis=(1, 2))
            unknown[name] = int((~known).sum())
            if not known.any():
                continue
            frames.append(attribution.contributions_frame(
                asofs=[a for a, k in zip(asofs, known) if k], symbols=symbols, weights=targets[known], cov=cov[known],
                members=universe_members(weights, asofs, symbols)[known], book=name, estimator=estimator))
        frame = pl.concat(frames).sort("strategy", "as_of", "symbol") if frames else schemas.empty(schemas.RiskContributions)
        latest = frame.filter(pl.col("as_of") == pl.col("as_of").max().over("strategy"))
        table = latest.pivot(on="symbol", index=["strategy", "book_vol"], values="share") if latest.height else latest
        meta = {"rows": frame.height, "latest_variance_shares": dg.MetadataValue.md(markdown_table(table)),
                **{f"asofs_without_covariance_{k}": v for k, v in unknown.items() if v},
                **({"estimator_assumed_sample": ", ".join(not_in_file)} if not_in_file else {})}
        yield from validated(frame, schemas.RiskContributions, CONTRIBUTIONS, metadata=meta)

    @table_asset(
        ATTRIBUTION, schemas.Attribution, ins=simulation_ins, group_name="backtest", kinds={"duckdb", "numpy"},
        description="Each book's total return by symbol and source (price, funding, fees, slippage) plus the interest on "
        "cash, fractions of the initial equity, from the same simulation as backtest.equity: the rows add up to the "
        "book's total return and each column to backtest.metrics' attribution.",
    )
    def return_attribution(net_returns: pl.DataFrame, weights: pl.DataFrame, signals: pl.DataFrame,
                           **sizing_inputs: pl.DataFrame):
        runs, skipped, _ = book_simulations(net_returns, weights, signals, settings, estimates=sizing_inputs.get("estimates"))
        frames = [attribution.return_attribution(*run(by_symbol=True)).with_columns(strategy=pl.lit(name))
                  for name, run in runs.items()]
        frame = pl.concat(frames)
        by_source = frame.group_by("strategy", maintain_order=True).agg(
            pl.col("ret_price", "ret_funding", "ret_costs", "ret_interest", "ret_total").sum())
        by_symbol = frame.pivot(on="symbol", index="strategy", values="ret_total")
        meta = {"rows": frame.height, "by_source": dg.MetadataValue.md(markdown_table(by_source)),
                "by_symbol": dg.MetadataValue.md(markdown_table(by_symbol)),
                **{f"book_skipped_{k}": v for k, v in skipped.items()}}
        yield from validated(frame, schemas.Attribution, ATTRIBUTION, metadata=meta)

    @table_asset(
        BREAK_EVEN, schemas.BreakEven, ins=simulation_ins, group_name="backtest", kinds={"duckdb", "numpy"},
        description=f"Per book, the trading cost (fee + slippage in bps per side, ratio {settings.fee_bps:g} : "
        f"{settings.slippage_bps:g}) at which its total return equals {REFERENCE}'s, both re-simulated at that cost; "
        f"searched from 0 to {MAX_BREAK_EVEN_BPS:g} bps (Brent's method on a bracketing grid), null with the reason "
        "in status when the book never beats equal weight or beats it throughout.",
    )
    def break_even(net_returns: pl.DataFrame, weights: pl.DataFrame, signals: pl.DataFrame, **sizing_inputs: pl.DataFrame):
        runs, skipped, _ = book_simulations(net_returns, weights, signals, settings, estimates=sizing_inputs.get("estimates"))
        at_cost = partial(attribution.return_at_cost, fee_bps=settings.fee_bps, slippage_bps=settings.slippage_bps)
        configured = {"fee_bps": settings.fee_bps, "slippage_bps": settings.slippage_bps}
        ref_run = cache(runs[REFERENCE]) if REFERENCE in runs else None  # one simulation per cost, shared by every book
        rows = []
        for name, run in runs.items():
            run = cache(run)  # the configured-cost path serves total_return, the common start and the search
            row = {"strategy": name, "fee_bps": settings.fee_bps, "slippage_bps": settings.slippage_bps,
                   "cost_bps": cost, "total_return": at_cost(run)(cost), "excess_vs_equal_weight": None,
                   "excess_at_zero_cost": None, "break_even_cost_bps": None, "break_even_multiplier": None}
            if ref_run is None or name == REFERENCE:
                rows.append(row | {"status": "no_reference" if ref_run is None else "reference"})
                continue
            # over the bars both books traded: a book that starts later is not charged equal weight's earlier bars
            since = max(run(**configured)["ts"][0], ref_run(**configured)["ts"][0])
            book, reference = at_cost(run, since=since), at_cost(ref_run, since=since)
            found = attribution.break_even_cost(book=book, reference=reference, max_cost_bps=MAX_BREAK_EVEN_BPS)
            multiplier = found.cost_bps / cost if found.cost_bps is not None and cost > 0 else None
            rows.append(row | {"excess_vs_equal_weight": book(cost) - reference(cost),
                               "excess_at_zero_cost": found.gap_at_zero, "break_even_cost_bps": found.cost_bps,
                               "break_even_multiplier": multiplier, "status": found.status})
        frame = pl.DataFrame(rows, schema_overrides={c: pl.Float64 for c in (
            "excess_vs_equal_weight", "excess_at_zero_cost", "break_even_cost_bps", "break_even_multiplier")})
        meta = {"table": dg.MetadataValue.md(markdown_table(frame.drop("fee_bps", "slippage_bps"))),
                "max_cost_bps": MAX_BREAK_EVEN_BPS, **{f"book_skipped_{k}": v for k, v in skipped.items()}}
        yield from validated(frame, schemas.BreakEven, BREAK_EVEN, metadata=meta)

    return [contributions, return_attribution, break_even]

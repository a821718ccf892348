"""The walk-forward verdict: backtest.equity / metrics / monthly / comparison, risk.stress /
liquidation, and the report.

These assets are unpartitioned: each reads the whole stored history of returns and weights
and rebuilds its table, because an equity path compounds across days. Every strategy in
portfolio.weights and every configured baseline (``baseline:<name>``, constant weights) is a
"book"; books share the same decision asofs and rebalancing frequency.
"""

from collections.abc import Callable
from datetime import datetime
from functools import partial

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import markdown_table, table_asset, validated
from assets.features import NET_RETURNS, aligned_returns, estimates_in, one_bar_returns
from assets.frontier import FRONTIER, frontier_figure, frontier_strategy
from assets.portfolio import WEIGHTS, stored_moments
from assets.signals import SIGNALS, regime_at
from perpfolio import backtest, estimators, report, returns, significance as significance_lib, stress
from perpfolio import universe as universe_lib
from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize import load_strategies
from pipelines.resources import RawMarket
from pipelines.settings import Settings

EQUITY = dg.AssetKey(["backtest", "equity"])
METRICS = dg.AssetKey(["backtest", "metrics"])
MONTHLY = dg.AssetKey(["backtest", "monthly"])
COMPARISON = dg.AssetKey(["backtest", "comparison"])
STRESS = dg.AssetKey(["risk", "stress"])
LIQUIDATION = dg.AssetKey(["risk", "liquidation"])
REPORT = dg.AssetKey(["report"])
STRESS_VS_REALIZED = dg.AssetKey(["risk", "stress_vs_realized"])  # built in assets/stress_check.py
STRESS_CONFUSION = dg.AssetKey(["risk", "stress_confusion"])
CONTRIBUTIONS = dg.AssetKey(["risk", "contributions"])  # built in assets/attribution.py
ATTRIBUTION = dg.AssetKey(["backtest", "attribution"])
BREAK_EVEN = dg.AssetKey(["backtest", "break_even"])
RISK_MODEL = dg.AssetKey(["backtest", "risk_model"])  # built in assets/risk_quality.py
RISK_MODEL_SUMMARY = dg.AssetKey(["backtest", "risk_model_summary"])
SIGNIFICANCE = dg.AssetKey(["backtest", "significance"])  # built in assets/significance.py
BY_REGIME = dg.AssetKey(["backtest", "by_regime"])  # built in assets/ablations.py
EVALUATION_KEYS = (EQUITY, METRICS, MONTHLY, COMPARISON, STRESS, LIQUIDATION, REPORT, STRESS_VS_REALIZED, STRESS_CONFUSION,
                   CONTRIBUTIONS, ATTRIBUTION, BREAK_EVEN, RISK_MODEL, RISK_MODEL_SUMMARY, SIGNIFICANCE, BY_REGIME)
WARMUP_STATUS = "insufficient_history"
MIN_PATH_BARS = 2  # bars a book's equity path needs from its first rebalance for its metrics (one bar return)
MARGIN_MODES = ("cross", "isolated")


def traded_weights(weights: pl.DataFrame, strategy: str, symbols: list[str]) -> tuple[list[datetime], np.ndarray]:
    """Asofs and K x N target weights of one strategy, from its first asof with a full estimation window."""
    rows = weights.filter(pl.col("strategy") == strategy)
    warm = rows.filter(pl.col("status").str.contains(WARMUP_STATUS))["as_of"]
    if warm.len():
        rows = rows.filter(pl.col("as_of") > warm.max())
    wide = rows.pivot(on="symbol", index="as_of", values="weight").sort("as_of")
    return wide["as_of"].to_list(), wide.select(symbols).to_numpy()


def books(weights: pl.DataFrame, settings: Settings) -> tuple[dict[str, tuple[list[datetime], np.ndarray]], dict[str, str]]:
    """{book: (asofs, K x N targets)} for every strategy, then every baseline that fits the universe
    (on the union of the strategies' traded asofs, within each asof's point-in-time universe, read
    from the weights' universe column); and {baseline: why it was skipped}."""
    symbols = list(settings.symbols)
    out = {s: traded_weights(weights, s, symbols) for s in weights["strategy"].unique(maintain_order=True)}
    out = {s: v for s, v in out.items() if v[0]}
    asofs = sorted({a for dates, _ in out.values() for a in dates})
    skipped = {}
    members = universe_members(weights, asofs, symbols) if asofs else None
    for kind in settings.baselines if asofs else ():
        try:
            targets = backtest.baseline_weights(kind, symbols, len(asofs), static=dict(settings.static_weights),
                                                members=members)
        except ConfigError as exc:
            skipped[kind] = str(exc)
            continue
        out[backtest.BASELINE_PREFIX + kind] = (asofs, targets)
    return out, skipped


def universe_members(weights: pl.DataFrame, asofs: list[datetime], symbols: list[str]) -> np.ndarray:
    """K x N: the symbols in the point-in-time universe at each asof, from portfolio.weights' universe column."""
    per_asof = weights.unique(["as_of", "symbol"]).select("as_of", "symbol", in_universe=pl.col("universe") == "in")
    return universe_lib.members_at(per_asof, asofs, symbols)


def regime_flags(signals: pl.DataFrame, asofs: list[datetime]) -> np.ndarray:
    """True where signals.signals says the market was turbulent at the asof (unknown = calm)."""
    return (regime_at(signals, asofs) == "turbulent").fill_null(False).to_numpy()


SLIPPAGE_SCALE_RANGE = (0.25, 4.0)


def volatility_scale(signals: pl.DataFrame, asofs: list[datetime], symbols: list[str]) -> np.ndarray:
    """K x N slippage multipliers: predicted EWMA vol / realized vol of the estimation window per
    symbol and asof, clipped to [0.25, 4]; 1 where either is unknown (a calm market trades at the
    quoted slippage, a spiking one pays more)."""
    ratio = signals.with_columns(
        scale=(pl.col("predicted_vol_ewma") / pl.col("realized_var").sqrt()).clip(*SLIPPAGE_SCALE_RANGE)
    ).pivot(on="symbol", index="as_of", values="scale")
    wide = pl.DataFrame({"as_of": asofs}).join(ratio, on="as_of", how="left")
    columns = [pl.col(s) if s in wide.columns else pl.lit(None, pl.Float64).alias(s) for s in symbols]
    out = wide.select(columns).cast(pl.Float64).to_numpy()
    return np.where(np.isfinite(out), out, 1.0)


def predicted_covariances(estimates: pl.DataFrame, estimator: str, asofs: list[datetime], symbols: list[str]) -> np.ndarray:
    """K x N x N annualized covariances of features.estimates' ``estimator`` at each asof (configured
    symbol order); NaN where it has none (the sizing then leaves that rebalance unlevered). A symbol
    outside an asof's universe has NaN rows and columns; its weight there is 0, so those entries
    are set to 0 and the book's predicted variance is that of its members."""
    stored, moments = stored_moments(estimates, estimator, symbols)
    cov = moments.cov
    stamps = estimators.to_datetime64(asofs)
    idx = np.minimum(np.searchsorted(stored, stamps), len(stored) - 1)
    member = np.isfinite(np.diagonal(cov[idx], axis1=1, axis2=2))  # K x N: the asof's universe
    pair = member[:, :, None] & member[:, None, :]
    known = (stored[idx] == stamps) & member.any(axis=1)
    return np.where(known[:, None, None], np.where(pair, cov[idx], 0.0), np.nan)


def bar_index(ts: np.ndarray, asofs: list[datetime]) -> np.ndarray:
    stamps = estimators.to_datetime64(asofs)
    idx = np.searchsorted(ts, stamps)
    bad = (idx >= len(ts)) | (ts[np.minimum(idx, len(ts) - 1)] != stamps)
    if bad.any():
        raise ValueError(f"features.net_returns has no bar at rebalance asof {asofs[int(np.argmax(bad))]}")
    return idx


def book_simulations(
    net_returns: pl.DataFrame, weights: pl.DataFrame, signals: pl.DataFrame, settings: Settings, *,
    estimates: pl.DataFrame | None = None,
) -> tuple[dict[str, Callable[..., pl.DataFrame]], dict[str, str], int]:
    """Every book's backtest exactly as backtest.equity runs it: ``({book: run}, {book: why skipped},
    rebalances without a predicted covariance)``. ``run()`` is ``backtest.simulate`` bound to the book's
    bars (from its first traded asof), rebalance plan, costs, stop, cash rate and sizing; keywords
    override (``run(fee_bps=0, slippage_bps=0)``, ``run(by_symbol=True)``). ``estimates`` is read only
    when the sizing rule predicts each book's volatility (required then). DataError when no book has a
    traded rebalance followed by another bar."""
    symbols = list(settings.symbols)
    sizing = settings.sizing_rule()
    if sizing is not None and sizing.needs_covariance and estimates is None:
        raise DataError(f"book_simulations: the sizing rule {sizing.describe()} needs features.estimates "
                        f"({settings.sizing_estimator} covariance)")
    ts, price = aligned_returns(net_returns, symbols, "price_return", bar_hours=settings.bar_hours)
    _, funding = aligned_returns(net_returns, symbols, "funding_return", bar_hours=settings.bar_hours)
    plans, skipped = books(weights, settings)
    runs, unpredicted = {}, 0
    for name, (asofs, targets) in plans.items():
        bars = bar_index(ts, asofs)
        start = int(bars[0])
        if len(ts) - start < MIN_PATH_BARS:  # e.g. the first traded asof is the last bar loaded
            skipped[name] = f"{len(ts) - start} bar(s) from its first rebalance on; metrics need {MIN_PATH_BARS}"
            continue
        turbulent = regime_flags(signals, asofs) if settings.rebalance == "adaptive" else None
        plan = dict(n_bars=len(ts) - start, frequency=settings.rebalance, turbulent=turbulent)
        reb, w = backtest.rebalance_plan(bars - start, targets, **plan)
        scale = None
        if settings.slippage_vol_scaled:  # the same plan selects the matching rows of the multipliers
            _, scale = backtest.rebalance_plan(bars - start, volatility_scale(signals, asofs, symbols), **plan)
        cov = None
        if sizing is not None and sizing.needs_covariance:  # predicted covariance at each asof, same plan
            by_asof = predicted_covariances(estimates, settings.sizing_estimator, asofs, symbols)
            unpredicted += int((~np.isfinite(by_asof).all(axis=(1, 2))).sum())
            _, cov = backtest.rebalance_plan(bars - start, by_asof, **plan)
        runs[name] = partial(
            backtest.simulate, ts[start:], price[start:], funding[start:], reb, w, fee_bps=settings.fee_bps,
            slippage_bps=settings.slippage_bps, lag_bars=1, symbols=symbols, stop_loss=settings.stop_loss,
            slippage_scale=scale, cash_rate_per_bar=settings.cash_rate / returns.periods_per_year(settings.bar_hours),
            sizing=sizing, predicted_cov=cov, delisted_after=max(1, 24 // settings.bar_hours),
        )
    if not runs:
        raise DataError(
            f"backtest.equity: no book has a traded rebalance followed by another bar yet ({len(ts)} bars loaded, "
            f"books skipped: {skipped or 'none had a rebalance after the warm-up'}); the first "
            f"{settings.lookback_days} days are the estimation window's warm-up (PERPFOLIO_WINDOW_BARS="
            f"{settings.window_bars}): materialize a longer range")
    return runs, skipped, unpredicted


def build(settings: Settings) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    ppy = returns.periods_per_year(settings.bar_hours)
    stop = "off" if settings.stop_loss is None else f"{settings.stop_loss:g} of entry notional"
    sizing = settings.sizing_rule()
    sizing_text = "off" if sizing is None else f"{sizing.describe()} ({settings.sizing_estimator} covariance)"
    equity_ins = {"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS), "signals": dg.AssetIn(SIGNALS)}
    if sizing is not None and sizing.needs_covariance:  # only then does the backtest read the predicted covariances
        equity_ins["estimates"] = estimates_in("cov")

    @table_asset(
        EQUITY, schemas.Equity,
        ins=equity_ins,
        group_name="backtest", kinds={"duckdb", "numpy"},
        description=f"Walk-forward equity per bar and book (strategies and baselines {', '.join(settings.baselines)}): "
        f"{settings.rebalance} rebalancing, trade at the close of the bar after each asof, taker fee {settings.fee_bps:g} bps "
        f"+ slippage {settings.slippage_bps:g} bps{' x volatility scale' if settings.slippage_vol_scaled else ''} on traded "
        f"notional, funding paid or received by position sign, equity earning {settings.cash_rate:g} a year, "
        f"positions drift between rebalances, stop-loss {stop}, position sizing {sizing_text}.",
    )
    def equity(net_returns: pl.DataFrame, weights: pl.DataFrame, signals: pl.DataFrame, **sizing_inputs: pl.DataFrame):
        runs, skipped, unpredicted = book_simulations(net_returns, weights, signals, settings,
                                                      estimates=sizing_inputs.get("estimates"))
        paths = [run().with_columns(strategy=pl.lit(name)) for name, run in runs.items()]
        frame = pl.concat(paths)
        final = frame.group_by("strategy").agg(pl.col("equity").last()).sort("strategy")
        meta = {"books": len(paths), "rebalance": settings.rebalance, "stop_loss": stop, "sizing": sizing_text,
                **({"sizing_unpredicted_asofs": unpredicted} if "estimates" in sizing_inputs else {}),
                **{f"book_skipped_{k}": v for k, v in skipped.items()},
                **{f"final_equity_{s}": float(e) for s, e in final.iter_rows()}}
        yield from validated(frame, schemas.Equity, EQUITY, metadata=meta)

    @table_asset(
        METRICS, schemas.Metrics, ins={"equity": dg.AssetIn(EQUITY), "weights": dg.AssetIn(WEIGHTS)},
        group_name="backtest", kinds={"duckdb", "numpy"},
        description="Per book over the whole run: total and annual return, vol, Sharpe, Sortino, max drawdown and its "
        "duration, worst hour and day, turnover, CVaR 95/99, funding, fees, slippage, gross leverage, return "
        "attribution (price + funding + costs = total), stops and fallback rebalances.",
    )
    def metrics(equity: pl.DataFrame, weights: pl.DataFrame):
        fallbacks = weights.unique(["as_of", "strategy"]).group_by("strategy").agg(
            fallbacks=pl.col("status").str.starts_with("fallback").sum()
        )
        rows = [
            {"strategy": s, **backtest.performance_metrics(path.sort("ts"), periods_per_year=ppy)}
            for (s,), path in equity.group_by("strategy", maintain_order=True)
        ]
        frame = (pl.DataFrame(rows).join(fallbacks, on="strategy", how="left")
                 .with_columns(pl.col("fallbacks").fill_null(0)).sort("sharpe", descending=True))
        yield from validated(frame, schemas.Metrics, METRICS, metadata={"table": dg.MetadataValue.md(markdown_table(frame))})

    @table_asset(
        MONTHLY, schemas.Monthly, ins={"equity": dg.AssetIn(EQUITY)}, group_name="backtest", kinds={"duckdb", "polars"},
        description="Per book and UTC calendar month: return with its price / funding / cost attribution, "
        "max drawdown and worst hour within the month.",
    )
    def monthly(equity: pl.DataFrame):
        frames = [backtest.monthly_metrics(path).with_columns(strategy=pl.lit(s))
                  for (s,), path in equity.group_by("strategy", maintain_order=True)]
        frame = pl.concat(frames).sort("strategy", "month") if frames else schemas.empty(schemas.Monthly)
        yield from validated(frame, schemas.Monthly, MONTHLY, metadata={"rows": frame.height})

    @table_asset(
        STRESS, schemas.Stress, ins={"net_returns": dg.AssetIn(NET_RETURNS), "weights": dg.AssetIn(WEIGHTS)},
        group_name="risk", kinds={"duckdb", "numpy"},
        description=f"Scenarios of {settings.scenarios_file.name} (price shocks moving the others by their betas to the "
        f"shocked symbol, default {settings.stress_reference}; funding and volatility spikes) on the weights of every "
        f"rebalance of every book, plus a replay of the worst historical bars on the latest weights; an account of "
        f"{settings.account_usdt:,.0f} USDT at gross leverage {', '.join(f'{x:g}' for x in settings.stress_leverages)}, "
        "cross and isolated margin with each symbol's tiered maintenance margin (tier_source says whose), "
        "liquidation, oversized positions and capital sufficiency.",
    )
    def stress_tests(net_returns: pl.DataFrame, weights: pl.DataFrame, market: RawMarket):
        # one-bar returns only (NaN where a symbol has no bar or its return spans a gap): betas, vols, replays
        ts, matrix, _ = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
        _, price, _ = one_bar_returns(net_returns.with_columns(net_return=pl.col("price_return")), symbols,
                                      bar_hours=settings.bar_hours)
        resolved = market.leverage_tiers(symbols)
        tiers, sources = {s: r.tiers for s, r in resolved.items()}, {s: r.source for s, r in resolved.items()}
        configured, n_worst = stress.load_scenarios(settings.scenarios_file, symbols=symbols,
                                                    reference=settings.stress_reference)
        scenarios = list(configured)
        replay_ref = settings.stress_reference if settings.stress_reference in symbols else None
        replays = list(stress.worst_bars(ts, price, symbols, count=n_worst, bar_hours=settings.bar_hours,
                                         reference=replay_ref))
        references = sorted({sc.reference for sc in scenarios if sc.kind == "price" and sc.reference != stress.JOINT}
                            | ({replay_ref} if replay_ref else set()))
        window_stats: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
        frames = []
        for name, (asofs, targets) in books(weights, settings)[0].items():
            for k, (asof, end, w) in enumerate(zip(asofs, bar_index(ts, asofs), targets)):
                if end not in window_stats:  # pairwise over each symbol's own returns in the window (NaN skipped)
                    window = matrix[max(0, end - settings.window_bars + 1): end + 1]
                    window_stats[end] = ({ref: stress.rolling_betas(window, reference=symbols.index(ref))
                                          for ref in references}, stress.bar_vols(window))
                betas, vols = window_stats[end]
                todo = scenarios + (replays if k == len(asofs) - 1 else [])
                rows = stress.stress_test(w, symbols, betas, scenarios=todo, leverage=settings.stress_leverages,
                                          tiers=tiers, buffer=settings.margin_buffer, account_usdt=settings.account_usdt,
                                          vols=vols, bar_hours=settings.bar_hours, margin_mode=MARGIN_MODES,
                                          tier_sources=sources)
                frames.append(rows.with_columns(as_of=pl.lit(asof), strategy=pl.lit(name)))
        frame = pl.concat(frames) if frames else pl.DataFrame()
        if frames:  # the table states fractions of pre-shock equity; a wiped-out account has no margin ratio (null)
            frame = frame.drop("pnl", "equity_after").rename({"pnl_frac": "pnl", "equity_after_frac": "equity_after"})
            frame = frame.with_columns(margin_ratio=pl.when(pl.col("margin_ratio").is_finite()).then("margin_ratio"))
        else:
            frame = schemas.empty(schemas.Stress)
        meta = {"rows": frame.height, "liquidations": int(frame["liquidated"].sum()),
                "oversized_rows": int(frame["oversized"].is_not_null().sum()),
                "proxied_rows": int(frame["proxied"].is_not_null().sum()), "account_usdt": settings.account_usdt,
                "tier_sources": ", ".join(f"{s}: {src}" for s, src in sources.items()),
                "scenarios": ", ".join(sc.name for sc in scenarios + replays)}
        yield from validated(frame, schemas.Stress, STRESS, metadata=meta)

    @table_asset(
        LIQUIDATION, schemas.Liquidation, ins={"weights": dg.AssetIn(WEIGHTS)}, group_name="risk", kinds={"duckdb", "numpy"},
        description="Liquidation price (as a ratio to the current price) and distance to it for every position of each "
        f"book's latest weights on an account of {settings.account_usdt:,.0f} USDT, moving that symbol alone, per stress "
        "leverage, cross and isolated margin, with whose tiers (tier_source) and whether the position exceeds them.",
    )
    def liquidation(weights: pl.DataFrame, market: RawMarket):
        resolved = market.leverage_tiers(symbols)
        tiers, sources = {s: r.tiers for s, r in resolved.items()}, {s: r.source for s, r in resolved.items()}
        frames = []
        for name, (asofs, targets) in books(weights, settings)[0].items():
            for leverage in settings.stress_leverages:
                for mode in MARGIN_MODES:
                    levels = stress.liquidation_levels(targets[-1], symbols, leverage=leverage, tiers=tiers, margin_mode=mode,
                                                       account_usdt=settings.account_usdt, tier_sources=sources)
                    frames.append(levels.with_columns(as_of=pl.lit(asofs[-1]), strategy=pl.lit(name),
                                                      leverage=pl.lit(float(leverage))))
        frame = pl.concat(frames) if frames else schemas.empty(schemas.Liquidation)
        nearest = frame["distance"].min() if frame.height else None
        yield from validated(frame, schemas.Liquidation, LIQUIDATION,
                             metadata={"rows": frame.height, "nearest_distance": float(nearest) if nearest is not None else -1.0,
                                       "exceeding_max_notional": int(frame["exceeds_max_notional"].sum()),
                                       "account_usdt": settings.account_usdt})

    @table_asset(
        COMPARISON, schemas.Comparison, ins={"metrics": dg.AssetIn(METRICS), "stress": dg.AssetIn(STRESS)},
        group_name="backtest", kinds={"duckdb", "polars"},
        description="Which book served better and would it have survived: return, Sharpe rank, excess over equal "
        "weight, drawdown and tail beside the worst stress scenario, liquidations and the highest safe leverage.",
    )
    def comparison(metrics: pl.DataFrame, stress: pl.DataFrame):
        frame = backtest.compare(metrics, stress)
        yield from validated(frame, schemas.Comparison, COMPARISON, metadata={"table": dg.MetadataValue.md(markdown_table(frame))})

    specs = load_strategies(settings.strategies_file)

    @dg.asset(
        key=REPORT,
        ins={name: dg.AssetIn(key) for name, key in
             {"metrics": METRICS, "comparison": COMPARISON, "equity": EQUITY, "weights": WEIGHTS, "signals": SIGNALS,
              "stress": STRESS, "liquidation": LIQUIDATION, "frontier": FRONTIER,
              "significance": SIGNIFICANCE, "risk_model": RISK_MODEL, "risk_model_summary": RISK_MODEL_SUMMARY,
              "stress_vs_realized": STRESS_VS_REALIZED, "stress_confusion": STRESS_CONFUSION,
              "attribution": ATTRIBUTION, "contributions": CONTRIBUTIONS, "break_even": BREAK_EVEN,
              "by_regime": BY_REGIME}.items()} | {"estimates": estimates_in("mean", "cov")},
        group_name="report", kinds={"html", "matplotlib"},
        description=f"Self-contained HTML report with plots under {settings.reports_dir}; the plots also show here. "
        f"Computed on the {settings.market_label}.",
    )
    def strategy_report(metrics, comparison, equity, weights, signals, stress, liquidation, estimates, frontier,
                        significance, risk_model, risk_model_summary, stress_vs_realized, stress_confusion, attribution,
                        contributions, break_even, by_regime) -> dg.MaterializeResult:
        levs = sorted(settings.stress_leverages)
        lev = levs[len(levs) // 2]
        latest = stress.filter((pl.col("as_of") == pl.col("as_of").max().over("strategy")) & (pl.col("leverage") == lev)
                               & (pl.col("margin_mode") == "cross"))
        worst_path = (stress.filter((pl.col("leverage") == lev) & (pl.col("margin_mode") == "cross")
                                    & (pl.col("kind") != "replay")))
        figures = {
            "equity": report.plot_equity(equity),
            "drawdown": report.plot_drawdown(equity),
            "funding_pnl": report.plot_funding(equity),
            "weights": report.plot_weights(weights),
            "variance_risk_premium": report.plot_vrp(signals),
            "stress_latest_weights": report.plot_stress(
                latest.rename({"equity_after": "equity_after_frac"}),
                title=f"Stress on the latest weights at {lev:g}x, cross margin (incl. worst-hour replays)"),
            "stress_every_rebalance": report.plot_stress(
                worst_path.rename({"equity_after": "equity_after_frac"}),
                title=f"Stress: worst equity after over every rebalance at {lev:g}x, cross margin"),
            "liquidation_distance": report.plot_liquidation(liquidation, leverage=lev),
        }
        estimator = frontier_strategy(specs).estimator
        frontier_png = frontier_figure(frontier, estimates, weights, symbols, estimator)  # the stored portfolio.frontier
        if frontier_png is not None:
            figures["efficient_frontier"] = frontier_png
        ranked = risk_model_summary.sort("rank")["estimator"].to_list()
        figures |= {
            "sharpe_intervals": report.plot_significance(significance, statistic="sharpe"),
            "annual_return_intervals": report.plot_significance(significance, statistic="ann_return"),
            "risk_model_bias": report.plot_risk_model_bias(risk_model.drop_nulls("bias"), order=ranked),
            "stress_vs_realized": report.plot_stress_vs_realized(stress_vs_realized),
            "return_attribution": report.plot_return_attribution(attribution),
            "risk_contributions": report.plot_risk_contributions(contributions),
        }
        ablations = [p for p in significance_lib.ablation_pairs(specs) if p[0] in set(significance["strategy"])]
        summary = [f"Computed on the {settings.market_label}.", *significance_lib.hybrid_verdicts(significance, specs)]
        tables = {"Comparison": comparison, **report.evidence_sections(
            significance, risk_model_summary.sort("rank"), stress_confusion, break_even, by_regime, ablations=ablations)}
        path = report.write_report(settings.reports_dir, title=f"perpfolio strategy report — {settings.market_label}",
                                   metrics=metrics, figures=figures, tables=tables, summary=summary)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)),
            "market_data": settings.market_label,
            "verdict": dg.MetadataValue.md("\n\n".join(summary)),
            "comparison": dg.MetadataValue.md(markdown_table(comparison)),
            **{name: dg.MetadataValue.md(report.markdown_image(png, name)) for name, png in figures.items()},
        })

    return [equity, metrics, monthly, stress_tests, liquidation, comparison, strategy_report]


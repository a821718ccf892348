"""features.net_returns and features.estimates: funding-netted returns and rolling moments."""

import math

import dagster as dg
import numpy as np
import polars as pl

from assets import schemas
from assets.checks import table_asset, time_range, validated
from assets.raw import CANDLES, FUNDING
from perpfolio import estimators, returns, signals as signal_lib, universe as universe_lib
from pipelines.partitions import lookback, partition_window, rebalance_asofs, run_policy
from pipelines.resources import VIEWS
from pipelines.settings import Settings

NET_RETURNS = dg.AssetKey(["features", "net_returns"])
UNIVERSE = dg.AssetKey(["features", "universe"])
ESTIMATES = dg.AssetKey(["features", "estimates"])
ESTIMATE_KEYS = [c for c in estimators.ESTIMATE_COLUMNS if c not in estimators.QUANTITIES]  # read by every consumer


def estimates_in(*quantities: str) -> dg.AssetIn:
    """features.estimates as an input that reads only the arrays named (mean, downside, cov,
    semicov; the others come back NaN from ``moments_from_rows``): a consumer of the covariance
    alone loads a quarter of the table."""
    return dg.AssetIn(ESTIMATES, metadata={"columns": ESTIMATE_KEYS + list(quantities)})


def aligned_returns(frame: pl.DataFrame, symbols: list[str], column: str = "net_return", *,
                    bar_hours: int) -> tuple[np.ndarray, np.ndarray]:
    """(ts, T x N matrix) on the complete bar grid (every bar from the first to the last of the
    frame), columns in the configured symbol order; NaN where a symbol has no bar."""
    ts, found, matrix = returns.returns_matrix(frame, column=column, bar_hours=bar_hours)
    out = np.full((len(ts), len(symbols)), np.nan)
    for j, symbol in enumerate(symbols):
        if symbol in found:
            out[:, j] = matrix[:, found.index(symbol)]
    return ts, out


def one_bar_returns(net_returns: pl.DataFrame, symbols: list[str], *, bar_hours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts, one-bar net returns, present) on the complete bar grid: the returns are NaN where a
    symbol has no bar AND where its return spans a gap (a multi-bar return is not one bar's
    observation); ``present`` is True where the symbol has a bar (a price) at all."""
    ts, net = aligned_returns(net_returns, symbols, bar_hours=bar_hours)
    _, filled = aligned_returns(net_returns.with_columns(pl.col("filled").cast(pl.Float64)), symbols, "filled",
                                bar_hours=bar_hours)
    return ts, np.where(filled == 0.0, net, np.nan), np.isfinite(net)


def window_ends(ts: np.ndarray, asofs: list) -> np.ndarray:
    """Index of the last bar at or before each asof (-1 when there is none): nothing later is seen."""
    return np.searchsorted(ts, estimators.to_datetime64(asofs), side="right") - 1


RESET_ESTIMATORS = ("sample", "ledoit_wolf")


def regime_lookback_days(settings: Settings) -> int:
    """Days of history that make the regime of every bar a breakpoint can matter for exact: the
    state at a bar needs the long window plus the memory (both regime_long_bars) before it, and
    breakpoints count back a full estimation window (resets) or the memory (regime_since)."""
    bars = 2 * settings.regime_long_bars + max(settings.window_bars, settings.regime_long_bars)
    return math.ceil(bars * settings.bar_hours / 24) + 1


def estimate_frame(settings: Settings, symbols: list[str], ts: np.ndarray, matrix: np.ndarray, asofs: list,
                   members: np.ndarray) -> tuple[pl.DataFrame, dict]:
    """features.estimates rows (one per asof and estimator) of every named estimator (fixed window)
    and of the regime-reset variants ``<name>_reset`` (window from ``reset_windows``), annualized,
    with metadata.

    ``matrix``: T x N one-bar returns on the complete bar grid (``one_bar_returns``); ``members``:
    K x N point-in-time universe (features.universe) that each asof is estimated on."""
    ppy = returns.periods_per_year(settings.bar_hours)
    ends = window_ends(ts, asofs)
    common = dict(ddof=1, tau=settings.downside_tau, half_life=settings.ewma_half_life_bars,
                  n_factors=min(settings.n_factors, max(len(symbols) - 1, 0)), members=members,
                  max_missing=settings.max_missing_bars)
    fixed = estimators.rolling_estimates(matrix, ends, window=settings.window_bars, **common)
    turbulent, _ = signal_lib.regime_states(
        matrix, short=settings.regime_short_bars, long=settings.regime_long_bars,
        enter=settings.regime_enter, exit=settings.regime_exit, memory=settings.regime_long_bars,
        max_missing_fraction=settings.max_missing_fraction,
    )
    windows = signal_lib.reset_windows(
        ends, signal_lib.regime_breakpoints(turbulent), window=settings.window_bars,
        reset_window=min(settings.reset_window_bars, settings.window_bars),
    )
    reset = estimators.rolling_estimates(matrix, ends, window=windows, estimators=RESET_ESTIMATORS, **common)
    parts = [
        estimators.moments_to_rows(asofs, symbols, estimators.annualize(m, ppy), estimator=name, window_bars=settings.window_bars)
        for name, m in fixed.items()
    ] + [
        estimators.moments_to_rows(asofs, symbols, estimators.annualize(m, ppy), estimator=f"{name}_reset", window_bars=windows)
        for name, m in reset.items()
    ]
    statuses = dict(zip(*np.unique(fixed["sample"].status, return_counts=True)))
    meta_cv = cv_metadata(settings, ts, matrix[:, members[-1]], ends) if members[-1].any() else {}
    meta = {
        "asofs": len(asofs), "window_bars": settings.window_bars, "estimators": sorted(fixed) + [f"{n}_reset" for n in reset],
        "reset_asofs": int(np.sum(windows < settings.window_bars)), "min_reset_window": int(windows.min()),
        **{f"status_{k}": int(v) for k, v in statuses.items()}, **meta_cv,
    }
    return pl.concat(parts), meta


def cv_metadata(settings: Settings, ts: np.ndarray, matrix: np.ndarray, ends: np.ndarray) -> dict:
    """Walk-forward CV of the window length and the EWMA half-life on the loaded history: every
    daily asof whose next day is complete by the partition's last asof (no look-ahead)."""
    day = max(1, 24 // settings.bar_hours)
    last = int(ends.max()) if ends.size else -1
    cv_ends = np.arange(last - day, -1, -day)[::-1]
    windows = tuple(sorted({w for w in (168, 336, settings.window_bars) if 2 <= w <= settings.window_bars}))
    cv = estimators.walk_forward_cv(
        matrix, cv_ends, windows=windows, half_lives=(24.0, 72.0, 168.0, 336.0),
        ewma_window=settings.window_bars, horizon=day,
    )
    lines = ["| parameter | value | score (nats/bar) | days scored | chosen |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {v:g} | {'' if sc is None else f'{sc:.4f}'} | {n} | {'yes' if c else ''} |" for p, v, sc, n, c in cv.iter_rows()]
    chosen = {p: v for p, v, _, _, c in cv.iter_rows() if c}
    return {
        "cv_scores": dg.MetadataValue.md("\n".join(lines)),
        "cv_chosen_window_bars": int(chosen["window"]) if "window" in chosen else -1,
        "cv_chosen_half_life_bars": float(chosen["half_life"]) if "half_life" in chosen else -1.0,
    }


def build(settings: Settings, partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    symbols = list(settings.symbols)
    ppy = returns.periods_per_year(settings.bar_hours)

    @table_asset(
        NET_RETURNS, schemas.NetReturns, partitions=partitions, partition_expr="ts", backfill_policy=run_policy(settings),
        ins={"candles": dg.AssetIn(CANDLES, partition_mapping=lookback(1, settings)), "funding": dg.AssetIn(FUNDING)},
        group_name="features", kinds={"duckdb", "polars"},
        description="Per-bar return of a long position: simple price return plus funding return "
        "(minus the rates settled in the bar); net_return is simple or log per PERPFOLIO_RETURN_KIND.",
    )
    def net_returns(context: dg.AssetExecutionContext, candles: pl.DataFrame, funding: pl.DataFrame):
        window = partition_window(context, settings)
        frame = returns.net_returns(candles, funding, bar_hours=settings.bar_hours, kind=settings.return_kind)
        frame = frame.filter(pl.col("ts").is_between(window.start, window.end, closed="left"))
        meta = {"time_range": time_range(frame), "bars_spanning_gaps": int(frame["filled"].sum()), "return_kind": settings.return_kind}
        yield from validated(frame, schemas.NetReturns, NET_RETURNS, metadata=meta)

    @table_asset(
        UNIVERSE, schemas.Universe, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={"net_returns": dg.AssetIn(NET_RETURNS, partition_mapping=lookback(settings.lookback_days, settings))},
        group_name="features", kinds={"duckdb", "numpy"},
        description=f"Point-in-time universe at each daily asof: a symbol is in when it has a price at the asof, its "
        f"last {settings.window_bars} bars are covered since its listing and at most {settings.max_missing_bars} of "
        "them lack a one-bar return; otherwise it holds weight 0 and the row says why.",
    )
    def universe(context: dg.AssetExecutionContext, net_returns: pl.DataFrame):
        asofs = rebalance_asofs(partition_window(context, settings), settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.Universe), schemas.Universe, UNIVERSE, metadata={"asofs": 0})
            return
        ts, one_bar, present = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
        members = universe_lib.point_in_time_universe(one_bar, present, window_ends(ts, asofs), window=settings.window_bars,
                                                      max_missing=settings.max_missing_bars)
        frame = universe_lib.universe_frame(asofs, symbols, members, window=settings.window_bars)
        latest = frame.filter(pl.col("as_of") == pl.col("as_of").max())
        counts = frame.group_by("reason").len().sort("reason")
        meta = {"asofs": len(asofs), "members_min": int(members.member.sum(axis=1).min()),
                "members_max": int(members.member.sum(axis=1).max()),
                "latest_members": ", ".join(latest.filter(pl.col("in_universe"))["symbol"]) or "none",
                **{f"rows_{reason}": n for reason, n in counts.iter_rows()}}
        yield from validated(frame, schemas.Universe, UNIVERSE, metadata=meta)

    @table_asset(
        ESTIMATES, schemas.Estimates, partitions=partitions, partition_expr="as_of", backfill_policy=run_policy(settings),
        ins={"net_returns": dg.AssetIn(
            NET_RETURNS, partition_mapping=lookback(max(settings.lookback_days, regime_lookback_days(settings)), settings)
        ), "universe": dg.AssetIn(UNIVERSE)},
        group_name="features", kinds={"duckdb", "numpy"},
        metadata={VIEWS: {schemas.ESTIMATES_LONG_VIEW: schemas.ESTIMATES_LONG_SQL}},
        description=f"Rolling mean, covariance, downside D_i and semicovariance over the last {settings.window_bars} "
        f"bars at each daily asof, on the symbols of features.universe and the window's complete bars, annualized "
        f"x{ppy:g}, one row per asof and estimator holding the arrays (the view {schemas.ESTIMATES_LONG_VIEW} shows "
        f"one row per cell): sample (ddof=1), ewma "
        f"(half-life {settings.ewma_half_life_bars:g} bars), ledoit_wolf, oas, factor, shrinkage; and sample_reset / "
        f"ledoit_wolf_reset whose window restarts at a regime breakpoint (at least {settings.reset_window_bars} bars).",
    )
    def estimates(context: dg.AssetExecutionContext, net_returns: pl.DataFrame, universe: pl.DataFrame):
        asofs = rebalance_asofs(partition_window(context, settings), settings.bar_hours, net_returns["ts"].max())
        if not asofs:
            yield from validated(schemas.empty(schemas.Estimates), schemas.Estimates, ESTIMATES, metadata={"asofs": 0})
            return
        ts, matrix, _ = one_bar_returns(net_returns, symbols, bar_hours=settings.bar_hours)
        members = universe_lib.members_at(universe, asofs, symbols)
        frame, meta = estimate_frame(settings, symbols, ts, matrix, asofs, members)
        yield from validated(frame, schemas.Estimates, ESTIMATES, metadata=meta)

    return [net_returns, universe, estimates]

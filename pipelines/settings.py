"""Settings of a perpfolio deployment, read from environment variables in one place.

Every knob has a safe default that reproduces the article's case study on the built-in
synthetic market (BTC/ETH/SOL USDT perpetuals, hourly bars, 30-day window, daily rebalancing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import ESTIMATORS
from perpfolio.optimize.config import load_strategies
from perpfolio.sources.archive import archive_files
from perpfolio.optimize.sizing import SizingRule
from perpfolio.stress import load_scenarios
from perpfolio.tiers import load_tier_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def normalize_symbol(raw: str) -> str:
    """'btc', 'BTCUSDT' and 'BTC/USDT:USDT' all mean the USDT-margined perpetual 'BTCUSDT'."""
    base = raw.strip().upper().split(":")[0].replace("/", "")
    if not base or not base.isalnum():
        raise ConfigError(f"PERPFOLIO_SYMBOLS: {raw!r} is not a symbol (expected e.g. BTC, BTCUSDT or BTC/USDT:USDT)")
    return base if base.endswith("USDT") else base + "USDT"


def _parse_static_weights(raw: str) -> tuple[tuple[str, float], ...]:
    """'BTC=0.5,ETH=0.3,SOL=0.2' -> (('BTCUSDT', 0.5), ...) for the static-weight baseline."""
    pairs = []
    for item in (x for x in raw.split(",") if x.strip()):
        symbol, sep, weight = item.partition("=")
        if not sep:
            raise ValueError(f"expected SYMBOL=WEIGHT, got {item!r}")
        pairs.append((normalize_symbol(symbol), float(weight)))
    return tuple(pairs)


def _flag(value: str) -> bool:
    """'true'/'1'/'yes'/'on' or 'false'/'0'/'no'/'off' (any case)."""
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """One deployment's settings. Dates are UTC days; `end` is the last day materialized (inclusive),
    or None (PERPFOLIO_END=open) for a live deployment whose partitions run through the current day."""

    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    start: date = date(2025, 1, 1)
    end: date | None = date(2025, 7, 29)
    partitions: Literal["daily", "weekly", "monthly"] = "weekly"  # grain of the time partitions (pipelines.partitions)
    max_days_per_run: int | None = None  # a backfill runs in pieces of at most this many days; None = auto (pipelines.partitions)
    seed: int = 1
    source: Literal["synthetic", "archive", "exchange"] = "synthetic"
    synthetic_events: bool = False  # source "synthetic": listings, delistings, outages, bad prints, missing funding
    archive_dir: Path | None = None  # root of a Binance archive layout (futures/um/...) when source = "archive"
    iv_csv: tuple[Path, ...] = ()  # implied-vol CSVs (Deribit DVOL or ts,underlying,iv); source "exchange": instead of DVOL
    exchange: Literal["binance", "bybit", "okx"] = "binance"  # source = "exchange": whose USDT perpetuals
    exchange_url: str | None = None  # source = "exchange": API base URL instead of the exchange's (mirror, replay server)
    exchange_cache: Path = PROJECT_ROOT / "warehouse" / "exchange_cache.duckdb"  # downloaded closed days, for resume
    exchange_refresh: bool = False  # download the window again even where the cache holds it
    exchange_rate_limit: bool = True  # ccxt's limiter at the exchange's documented request weights
    exchange_timeout_s: float = 10.0
    exchange_retries: int = 5  # retries of a 429 / 5xx / timeout / unreadable response, then the run fails
    outliers: Literal["error", "quarantine"] = "error"  # bad prints (perpfolio.quality): stop the run, or drop the bar and go on
    warehouse: Path = PROJECT_ROOT / "warehouse" / "perpfolio.duckdb"
    reports_dir: Path = PROJECT_ROOT / "warehouse" / "reports"
    strategies_file: Path = PROJECT_ROOT / "config" / "strategies.toml"
    bar_hours: int = 1
    return_kind: Literal["simple", "log"] = "simple"
    window_bars: int = 720
    ewma_half_life_bars: float = 168.0  # EWMA mean/cov and EWMA predicted vol (issue 5)
    reset_window_bars: int = 168  # shortest window after a regime change (estimators "*_reset")
    n_factors: int = 1  # principal components beside the market factor in the "factor" estimator
    downside_tau: float = 0.0  # downside threshold per bar for D_i and the semicovariance
    momentum_bars: int = 720
    vrp_z_days: int = 30  # trailing daily asofs of the VRP z-score
    regime_short_bars: int = 48
    regime_long_bars: int = 720
    regime_enter: float = 2.0  # short/long realized-vol ratio that enters the turbulent regime
    regime_exit: float = 1.2  # ratio at or below which it returns to calm
    # point-in-time universe (perpfolio.universe): share of an estimation window's bars a symbol may miss
    max_missing_fraction: float = 0.05
    vrp_proxy: bool = False  # a symbol without its own implied-vol index gets a VRP proxied from BTC's (labelled)
    fee_bps: float = 5.0
    slippage_bps: float = 2.0
    stress_leverages: tuple[float, ...] = (1.0, 3.0, 5.0, 10.0)
    margin_buffer: float = 0.05
    min_quote_volume: float | None = None  # liquidity filter: trailing mean quote volume per bar (None = off)
    top_k: int | None = None  # liquidity filter: trade only the K most liquid symbols (None = off)
    frontier_points: int = 20  # points of portfolio.frontier per asof (min variance .. max return)
    executor: Literal["in_process", "multiprocess", "celery", "k8s"] = "in_process"  # Dagster executor (scale-out)
    max_staleness_hours: float = 2.0  # raw.candles freshness check: allowed lag of the latest bar
    rebalance: Literal["hourly", "daily", "weekly", "adaptive"] = "daily"
    stop_loss: float | None = None
    cash_rate: float = 0.0  # annual rate earned by the account's equity (collateral), nominal, per bar = rate / bars a year
    slippage_vol_scaled: bool = False  # slippage x (predicted EWMA vol / window realized vol) per symbol
    # Position sizing in the backtest (perpfolio.optimize.sizing.SizingRule): book = lambda (1 - c) x weights.
    target_vol: float | None = None  # annualized target vol sigma*; lambda = min(max_leverage, sigma*/predicted vol); None = off
    max_leverage: float = 3.0  # cap of lambda (used with target_vol)
    cash_buffer: bool = False  # c = min(max, base + per_drawdown |DD| + per_excess_vol (vol/sigma* - 1)^+); off = 0
    cash_buffer_base: float = 0.0
    cash_buffer_per_drawdown: float = 1.0
    cash_buffer_per_excess_vol: float = 0.5  # the excess-vol term needs target_vol (no term without it)
    cash_buffer_max: float = 0.5
    sizing_estimator: str = "ewma"  # features.estimates covariance that predicts each book's vol at the asof
    baselines: tuple[str, ...] = ("equal_weight", "btc_only", "static")
    static_weights: tuple[tuple[str, float], ...] = (("BTCUSDT", 0.5), ("ETHUSDT", 0.3), ("SOLUSDT", 0.2))
    spot_notional: tuple[tuple[str, float], ...] = ()  # spot book of risk.spot_hedge, USDT per symbol; () = 1 USDT long each
    scenarios_file: Path = PROJECT_ROOT / "config" / "scenarios.toml"
    stress_reference: str = "BTCUSDT"  # shocked by price scenarios that name no reference; betas are against it
    account_usdt: float = 100_000.0  # account equity (USDT) that risk.stress and risk.liquidation size positions on
    tiers_file: Path | None = None  # leverage tiers (project or ccxt format) ahead of live and snapshot tiers; None = off
    # backtest.significance (perpfolio.significance): stationary block bootstrap of every book's bar returns
    bootstrap_block_bars: int = 168  # mean block length in bars (168 = a week of hourly bars)
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.end is not None and self.end < self.start:
            raise ConfigError(f"PERPFOLIO_END {self.end} is before PERPFOLIO_START {self.start}")
        if self.bar_hours not in (1, 4, 24):
            raise ConfigError(f"PERPFOLIO_BAR_HOURS must be 1, 4 or 24, got {self.bar_hours}")
        if self.return_kind not in ("simple", "log"):
            raise ConfigError(f"PERPFOLIO_RETURN_KIND must be 'simple' or 'log', got {self.return_kind!r}")
        if self.window_bars < 2:
            raise ConfigError(f"PERPFOLIO_WINDOW_BARS must be at least 2, got {self.window_bars}")
        if not (self.ewma_half_life_bars > 0 and self.reset_window_bars >= 2 and self.momentum_bars >= 1
                and self.vrp_z_days >= 3 and self.n_factors >= 0 and math.isfinite(self.downside_tau)):
            raise ConfigError(
                "PERPFOLIO_EWMA_HALF_LIFE_BARS > 0, PERPFOLIO_RESET_WINDOW_BARS >= 2, PERPFOLIO_MOMENTUM_BARS >= 1, "
                "PERPFOLIO_VRP_Z_DAYS >= 3, PERPFOLIO_N_FACTORS >= 0 and a finite PERPFOLIO_DOWNSIDE_TAU are required, got "
                f"{self.ewma_half_life_bars}, {self.reset_window_bars}, {self.momentum_bars}, {self.vrp_z_days}, "
                f"{self.n_factors}, {self.downside_tau}"
            )
        if not (1 <= self.regime_short_bars < self.regime_long_bars and 0 < self.regime_exit < self.regime_enter):
            raise ConfigError(
                "PERPFOLIO_REGIME_SHORT_BARS < PERPFOLIO_REGIME_LONG_BARS and 0 < PERPFOLIO_REGIME_EXIT < "
                f"PERPFOLIO_REGIME_ENTER are required, got {self.regime_short_bars}, {self.regime_long_bars}, "
                f"{self.regime_exit}, {self.regime_enter}"
            )
        if not 0 <= self.max_missing_fraction < 0.5 or self.max_missing_bars >= self.window_bars - 1:
            raise ConfigError(f"PERPFOLIO_MAX_MISSING_FRACTION must be in [0, 0.5) and leave at least 2 complete bars of "
                              f"the window, got {self.max_missing_fraction}")
        if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
            raise ConfigError(f"PERPFOLIO_SYMBOLS must list distinct symbols, got {self.symbols}")
        if not -1 < self.cash_rate < 1:
            raise ConfigError(f"PERPFOLIO_CASH_RATE must be an annual decimal rate in (-1, 1), got {self.cash_rate}")
        if self.target_vol is not None and not (math.isfinite(self.target_vol) and self.target_vol > 0):
            raise ConfigError(f"PERPFOLIO_TARGET_VOL must be an annualized decimal > 0 (0.2 = 20% a year) or 'off', "
                              f"got {self.target_vol}")
        if not (math.isfinite(self.max_leverage) and self.max_leverage > 0):
            raise ConfigError(f"PERPFOLIO_MAX_LEVERAGE must be a finite number > 0, got {self.max_leverage}")
        if not 0 <= self.cash_buffer_base <= self.cash_buffer_max < 1:
            raise ConfigError(f"need 0 <= PERPFOLIO_CASH_BUFFER_BASE ({self.cash_buffer_base}) <= "
                              f"PERPFOLIO_CASH_BUFFER_MAX ({self.cash_buffer_max}) < 1")
        if not (0 <= self.cash_buffer_per_drawdown < math.inf and 0 <= self.cash_buffer_per_excess_vol < math.inf):
            raise ConfigError(f"PERPFOLIO_CASH_BUFFER_PER_DRAWDOWN and PERPFOLIO_CASH_BUFFER_PER_EXCESS_VOL must be finite "
                              f"and >= 0, got {self.cash_buffer_per_drawdown}, {self.cash_buffer_per_excess_vol}")
        if self.sizing_estimator.removesuffix("_reset") not in ESTIMATORS:
            raise ConfigError(f"PERPFOLIO_SIZING_ESTIMATOR must be one of {sorted(ESTIMATORS)} (optionally with the "
                              f"suffix _reset), got {self.sizing_estimator!r}")
        if self.rebalance not in ("hourly", "daily", "weekly", "adaptive"):
            raise ConfigError(f"PERPFOLIO_REBALANCE must be hourly, daily, weekly or adaptive, got {self.rebalance!r}")
        if self.stop_loss is not None and not 0 < self.stop_loss < 1:
            raise ConfigError(f"PERPFOLIO_STOP_LOSS must be in (0, 1) or 'off', got {self.stop_loss}")
        spot_symbols = [s for s, _ in self.spot_notional]
        if len(set(spot_symbols)) != len(spot_symbols) or not set(spot_symbols) <= set(self.symbols) or not all(
                math.isfinite(v) and v != 0 for _, v in self.spot_notional):
            raise ConfigError(f"PERPFOLIO_SPOT_NOTIONAL must give distinct configured symbols {list(self.symbols)} a finite, "
                              f"non-zero USDT notional (negative = short spot), got {dict(self.spot_notional)}")
        unknown = set(self.baselines) - {"equal_weight", "btc_only", "static"}
        if unknown:
            raise ConfigError(f"PERPFOLIO_BASELINES: unknown {sorted(unknown)}; choose from equal_weight, btc_only, static")
        if (self.min_quote_volume is not None and self.min_quote_volume < 0) or (self.top_k is not None and self.top_k < 1):
            raise ConfigError(f"PERPFOLIO_MIN_QUOTE_VOLUME must be >= 0 and PERPFOLIO_TOP_K >= 1, got "
                              f"{self.min_quote_volume}, {self.top_k}")
        if isinstance(self.frontier_points, bool) or not isinstance(self.frontier_points, int) or self.frontier_points < 2:
            raise ConfigError(f"PERPFOLIO_FRONTIER_POINTS must be an integer >= 2 (min variance and max return at least), "
                              f"got {self.frontier_points!r}")
        if self.partitions not in ("daily", "weekly", "monthly"):
            raise ConfigError(f"PERPFOLIO_PARTITIONS must be daily, weekly or monthly, got {self.partitions!r}")
        if self.max_days_per_run is not None and (isinstance(self.max_days_per_run, bool) or not isinstance(self.max_days_per_run, int)
                                                  or self.max_days_per_run < 1):
            raise ConfigError(f"PERPFOLIO_MAX_DAYS_PER_RUN must be auto or a whole number of days >= 1, got {self.max_days_per_run!r}")
        if self.executor not in ("in_process", "multiprocess", "celery", "k8s"):
            raise ConfigError(
                f"PERPFOLIO_EXECUTOR must be in_process, multiprocess, celery or k8s, got {self.executor!r}"
            )
        if self.source not in ("synthetic", "archive", "exchange"):
            raise ConfigError(f"PERPFOLIO_SOURCE {self.source!r} is not available; choose synthetic, archive or exchange")
        if not isinstance(self.synthetic_events, bool) or (self.synthetic_events and self.source != "synthetic"):
            raise ConfigError(f"PERPFOLIO_SYNTHETIC_EVENTS must be on or off, and on only with PERPFOLIO_SOURCE=synthetic, "
                              f"got {self.synthetic_events!r} with source {self.source!r}")
        if self.outliers not in ("error", "quarantine"):
            raise ConfigError(f"PERPFOLIO_OUTLIERS must be error (stop the run on a bad print) or quarantine (drop the bar "
                              f"from raw.candles, record it in raw.data_quality and go on), got {self.outliers!r}")
        if self.exchange not in ("binance", "bybit", "okx"):
            raise ConfigError(f"PERPFOLIO_EXCHANGE must be binance, bybit or okx, got {self.exchange!r}")
        if self.exchange_timeout_s <= 0 or self.exchange_retries < 0:
            raise ConfigError(f"PERPFOLIO_EXCHANGE_TIMEOUT_S must be > 0 and PERPFOLIO_EXCHANGE_RETRIES >= 0, got "
                              f"{self.exchange_timeout_s}, {self.exchange_retries}")
        if self.source == "archive" and (self.archive_dir is None or not Path(self.archive_dir).is_dir()):
            raise ConfigError(f"PERPFOLIO_SOURCE=archive needs PERPFOLIO_ARCHIVE_DIR to name a folder, got {self.archive_dir}")
        missing_iv = [str(p) for p in self.iv_csv if not Path(p).is_file()]
        if missing_iv:
            raise ConfigError(f"PERPFOLIO_IV_CSV: no such file(s) {missing_iv}")
        try:  # the strategies file is read at load time too, so a bad name or key fails before any run
            load_strategies(self.strategies_file, n_assets=len(self.symbols))
        except ConfigError as exc:
            raise ConfigError(f"PERPFOLIO_STRATEGIES_FILE: {exc}") from exc
        if self.source == "archive":
            self._check_archive_coverage()
        for name, value, least in (("BOOTSTRAP_BLOCK_BARS", self.bootstrap_block_bars, 1),
                                   ("BOOTSTRAP_RESAMPLES", self.bootstrap_resamples, 100),
                                   ("BOOTSTRAP_SEED", self.bootstrap_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"PERPFOLIO_{name} must be an integer >= {least}, got {value!r}")
        if not (math.isfinite(self.account_usdt) and self.account_usdt > 0):
            raise ConfigError(f"PERPFOLIO_ACCOUNT_USDT must be a finite USDT amount > 0, got {self.account_usdt}")
        # checked at load time, not after a walk-forward: a broken file names its problem here
        for variables, check in (
            ("PERPFOLIO_TIERS_FILE", lambda: self.tiers_file is None or load_tier_file(self.tiers_file)),
            ("PERPFOLIO_SCENARIOS_FILE / PERPFOLIO_STRESS_REFERENCE",
             lambda: load_scenarios(self.scenarios_file, symbols=self.symbols, reference=self.stress_reference)),
        ):
            try:
                check()
            except ConfigError as exc:
                raise ConfigError(f"{variables}: {exc}") from exc

    def _check_archive_coverage(self) -> None:
        """Every configured symbol has candle files in the archive for some of [start, end]: a symbol
        with no data at all in the window is a typo or a wrong folder, rejected at load time."""
        last = self.last_day(datetime.now(timezone.utc).date())
        window_end = datetime(last.year, last.month, last.day, tzinfo=timezone.utc) + timedelta(days=1)
        empty = []
        for symbol in self.symbols:
            try:
                files = archive_files(self.archive_dir, symbol, "klines", self.origin, window_end)
            except DataError as exc:
                raise ConfigError(f"PERPFOLIO_SYMBOLS: {exc}") from exc
            if not files:
                empty.append(symbol)
        if empty:
            raise ConfigError(f"PERPFOLIO_SYMBOLS: {', '.join(empty)} have no klines files in {self.archive_dir} for "
                              f"{self.start}..{last} (PERPFOLIO_START..END); check the symbols, the folder or the dates")

    def sizing_rule(self) -> SizingRule | None:
        """The backtest's position sizing, or None when vol targeting and the cash buffer are both off."""
        if self.target_vol is None and not self.cash_buffer:
            return None
        return SizingRule(
            target_vol=self.target_vol, max_leverage=self.max_leverage, cash_buffer=self.cash_buffer,
            cash_buffer_base=self.cash_buffer_base, cash_buffer_per_drawdown=self.cash_buffer_per_drawdown,
            cash_buffer_per_excess_vol=self.cash_buffer_per_excess_vol, cash_buffer_max=self.cash_buffer_max,
        )

    @property
    def origin(self) -> datetime:
        """First bar of the history (00:00 UTC of `start`)."""
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=timezone.utc)

    @property
    def spot_book(self) -> dict[str, float]:
        """Spot positions hedged by risk.spot_hedge, USDT notional per symbol: PERPFOLIO_SPOT_NOTIONAL,
        or 1 USDT long of every configured symbol (hedge notionals then read per USDT of spot)."""
        return dict(self.spot_notional) if self.spot_notional else dict.fromkeys(self.symbols, 1.0)

    @property
    def market_label(self) -> str:
        """What the numbers were computed on, for every place results are shown (report, printout, UI)."""
        if self.source == "synthetic":
            events = ", with listings, outages and bad prints" if self.synthetic_events else ""
            return f"SYNTHETIC market (built-in, seed {self.seed}{events}): not real data"
        if self.source == "archive":
            return f"real data: Binance archive files in {self.archive_dir}"
        return f"real data: {self.exchange} API" + (f" at {self.exchange_url}" if self.exchange_url else "")

    @property
    def max_missing_bars(self) -> int:
        """Bars of an estimation window a symbol may miss and stay in the universe: floor(fraction x window)."""
        return math.floor(self.max_missing_fraction * self.window_bars)

    @property
    def lookback_days(self) -> int:
        """Whole days of history an estimation window needs before the day it is computed for."""
        return math.ceil(self.window_bars * self.bar_hours / 24)

    def last_day(self, today: date) -> date:
        """The last partition day: `end`, or today (in progress) for an open window."""
        return today if self.end is None else self.end

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read PERPFOLIO_* variables; unset variables keep their defaults."""
        env = os.environ if env is None else env
        parsers = {
            "symbols": lambda v: tuple(normalize_symbol(s) for s in v.split(",") if s.strip()),
            "start": date.fromisoformat,
            "end": lambda v: None if v.lower() == "open" else date.fromisoformat(v),
            "partitions": lambda v: v.lower(),
            "max_days_per_run": lambda v: None if v.lower() == "auto" else int(v),
            "seed": int,
            "source": str,
            "synthetic_events": _flag,
            "outliers": lambda v: v.lower(),
            "archive_dir": Path,
            "iv_csv": lambda v: tuple(Path(x.strip()) for x in v.split(",") if x.strip()),
            "exchange": lambda v: v.lower(),
            "exchange_url": str,
            "exchange_cache": Path,
            "exchange_refresh": _flag,
            "exchange_rate_limit": _flag,
            "exchange_timeout_s": float,
            "exchange_retries": int,
            "warehouse": Path,
            "reports_dir": Path,
            "strategies_file": Path,
            "bar_hours": int,
            "return_kind": str,
            "window_bars": int,
            "ewma_half_life_bars": float,
            "reset_window_bars": int,
            "n_factors": int,
            "downside_tau": float,
            "momentum_bars": int,
            "vrp_z_days": int,
            "regime_short_bars": int,
            "regime_long_bars": int,
            "regime_enter": float,
            "regime_exit": float,
            "max_missing_fraction": float,
            "vrp_proxy": _flag,
            "fee_bps": float,
            "slippage_bps": float,
            "stress_leverages": lambda v: tuple(float(x) for x in v.split(",") if x.strip()),
            "margin_buffer": float,
            "min_quote_volume": float,
            "top_k": int,
            "frontier_points": int,
            "executor": str,
            "max_staleness_hours": float,
            "rebalance": str,
            "stop_loss": lambda v: None if v.lower() in ("off", "none", "0") else float(v),
            "slippage_vol_scaled": _flag,
            "cash_rate": float,
            "target_vol": lambda v: None if v.lower() in ("off", "none") else float(v),
            "max_leverage": float,
            "cash_buffer": _flag,
            "cash_buffer_base": float,
            "cash_buffer_per_drawdown": float,
            "cash_buffer_per_excess_vol": float,
            "cash_buffer_max": float,
            "sizing_estimator": str,
            "baselines": lambda v: tuple(x.strip() for x in v.split(",") if x.strip() and x.strip() != "none"),
            "static_weights": _parse_static_weights,
            "spot_notional": _parse_static_weights,
            "scenarios_file": Path,
            "stress_reference": normalize_symbol,
            "account_usdt": float,
            "tiers_file": lambda v: None if v.lower() in ("off", "none") else Path(v),
            "bootstrap_block_bars": int,
            "bootstrap_resamples": int,
            "bootstrap_seed": int,
        }
        values = {}
        for f in fields(cls):
            name = f"PERPFOLIO_{f.name.upper()}"
            if env.get(name, "").strip():
                try:
                    values[f.name] = parsers[f.name](env[name].strip())
                except ValueError as exc:
                    raise ConfigError(f"{name}={env[name]!r} cannot be read: {exc}") from exc
        return cls(**values)

"""`make case-study`: the real-data case study page, generated from one run on the shared real data.

    python -m pipelines.case_study                                   # ../shared/data/real, H1 2025
    python -m pipelines.case_study --data /path/to/real --start 2025-01-01 --end 2025-06-30

It materializes the walk-forward and the evaluation for the ten Binance USD-M perps of the shared
data (archive source; Deribit DVOL as the implied vol of BTC and ETH) into its own warehouse
(`warehouse/case_study.duckdb`, kept for SQL) with an in-memory Dagster instance, then writes
`docs/real-data-case-study.md` and its figures (`docs/case-study/*.png`, copied from the report the
run wrote) from the stored tables. Every number on the page comes from that run; the page states
the command, the commit and the settings that produced it. The research settings are the
project's defaults plus the data's location, symbols and dates: PERPFOLIO_* variables of the
calling shell do not leak in, so the same command on the same commit gives the same page (the
run's wall time and memory aside).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

from assets.checks import markdown_table
from perpfolio import report
from perpfolio import significance as significance_lib
from perpfolio.optimize import load_strategies
from pipelines.definitions import build_definitions
from pipelines.resources import as_utc
from pipelines.run import COMPARISON, materialize_range
from pipelines.settings import PROJECT_ROOT, Settings

SYMBOLS = ("BTC", "ETH", "SOL", "BNB", "XRP", "DOGE", "BCH", "1000PEPE", "OP", "ZEC")
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "real"
PAGE = PROJECT_ROOT / "docs" / "real-data-case-study.md"
# the report's figures the page shows, with what each answers
FIGURES = {
    "equity": "Equity of every book (after fees, slippage and funding)",
    "drawdown": "Drawdown of every book",
    "weights": "Each strategy's target weights over time",
    "sharpe_intervals": "Sharpe ratios with their 95 % stationary-bootstrap intervals, and each book minus equal weight",
    "risk_model_bias": "Which covariance estimator forecast the books' risk best (bias statistic and its band)",
    "stress_vs_realized": "Stress verdicts at each rebalance against the realized path to the next one",
    "return_attribution": "Return attribution by symbol and source",
    "risk_contributions": "Euler risk contributions at each rebalance",
}

# the settings the page lists: label -> Settings attribute
SETTINGS_SHOWN = {
    "symbols": "symbols", "window (bars)": "window_bars", "rebalance": "rebalance", "fee (bps)": "fee_bps",
    "slippage (bps)": "slippage_bps", "stress leverages": "stress_leverages", "account (USDT)": "account_usdt",
    "bootstrap block (bars)": "bootstrap_block_bars", "bootstrap resamples": "bootstrap_resamples",
    "bootstrap seed": "bootstrap_seed",
}


def case_study_environment(data: Path, start: date, end: date, *, warehouse: Path, reports: Path) -> dict[str, str]:
    """The PERPFOLIO_* variables of the case study: the shared data's files, symbols and dates, the
    run's own warehouse and report folder; every other setting keeps its default."""
    dvol = data / "deribit_dvol"
    return {
        "PERPFOLIO_SOURCE": "archive", "PERPFOLIO_ARCHIVE_DIR": str(data / "binance"),
        "PERPFOLIO_SYMBOLS": ",".join(SYMBOLS),
        "PERPFOLIO_IV_CSV": f"{dvol / 'BTC_DVOL_1d.csv'},{dvol / 'ETH_DVOL_1d.csv'}",
        "PERPFOLIO_START": start.isoformat(), "PERPFOLIO_END": end.isoformat(),
        "PERPFOLIO_WAREHOUSE": str(warehouse), "PERPFOLIO_REPORTS_DIR": str(reports),
    }


def data_coverage(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Per symbol: first and last candle, candles present and missing on the hourly grid between them
    (raw.candles is hourly whatever the bar length),
    funding events, the share of rebalance asofs in the universe, and where its implied vol came from."""
    return as_utc(con.sql("""
        WITH c AS (SELECT symbol, min(ts) AS first_bar, max(ts) AS last_bar, count(*) AS candles FROM raw.candles GROUP BY 1),
             f AS (SELECT symbol, count(*) AS funding_events FROM raw.funding GROUP BY 1),
             u AS (SELECT symbol, avg(in_universe::INT) AS in_universe_share FROM features.universe GROUP BY 1),
             v AS (SELECT symbol, string_agg(DISTINCT iv_source, ', ' ORDER BY iv_source) AS implied_vol
                   FROM signals.signals WHERE iv_source IS NOT NULL GROUP BY 1)
        SELECT c.symbol, c.first_bar::DATE AS first_day, c.last_bar::DATE AS last_day, c.candles,
               (date_diff('hour', c.first_bar, c.last_bar) + 1 - c.candles)::BIGINT AS missing_bars,
               coalesce(f.funding_events, 0) AS funding_events, round(u.in_universe_share, 3) AS in_universe_share,
               coalesce(v.implied_vol, 'none') AS implied_vol
        FROM c LEFT JOIN f USING (symbol) LEFT JOIN u USING (symbol) LEFT JOIN v USING (symbol) ORDER BY c.symbol
    """).pl())


def write_page(con: duckdb.DuckDBPyConnection, settings: Settings, *, figures_from: Path, page: Path, command: str,
               commit: str, timings: dict[str, float], peak_rss_gb: float) -> Path:
    """Write the case study page and its figures (``page.parent / 'case-study'``) from the run's tables."""
    table = lambda sql: as_utc(con.sql(sql).pl())  # noqa: E731
    specs = load_strategies(settings.strategies_file)
    significance = table("SELECT * FROM backtest.significance")
    ablations = [p for p in significance_lib.ablation_pairs(specs) if p[0] in set(significance["strategy"])]
    risk_summary = table("SELECT * FROM backtest.risk_model_summary ORDER BY rank")
    confusion = table("SELECT * FROM risk.stress_confusion WHERE margin_mode = 'cross'")
    sections = report.evidence_sections(
        significance, risk_summary, confusion, table("SELECT * FROM backtest.break_even"),
        table("SELECT * FROM backtest.by_regime"), ablations=ablations)
    quality = table("SELECT dataset, issue, count(*) AS rows, count(DISTINCT symbol) AS symbols "
                    "FROM raw.data_quality GROUP BY ALL ORDER BY ALL")
    bars = con.sql("SELECT count(DISTINCT ts) FROM backtest.equity").fetchone()[0]
    verdicts = significance_lib.hybrid_verdicts(significance, specs)

    figures_dir = page.parent / "case-study"
    if figures_dir.exists():
        shutil.rmtree(figures_dir)
    figures_dir.mkdir(parents=True)
    for name in FIGURES:
        shutil.copy(figures_from / f"{name}.png", figures_dir / f"{name}.png")

    lines = [
        f"# Case study: {len(settings.symbols)} Binance perps, {settings.start} to {settings.end}",
        "",
        f"Generated by `{command}` at commit `{commit}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Every number and figure on this page comes from that run's warehouse; nothing is typed by hand. "
        f"Market data: {settings.market_label}. Run again to reproduce it (the walk-forward is deterministic; "
        "only the run time below changes).",
        "",
        f"Run cost on this machine: walk-forward {timings['daily_walk_forward']:.0f} s, evaluation "
        f"{timings['evaluation']:.0f} s, peak memory {peak_rss_gb:.2f} GB.",
        "",
        "## Settings",
        "",
        markdown_table(pl.DataFrame({"setting": list(SETTINGS_SHOWN), "value": [
            _text(getattr(settings, field)) for field in SETTINGS_SHOWN.values()]})),
        f"Strategies: `{_shown(settings.strategies_file)}` ({len(specs)} strategies; "
        f"with the baselines {significance.filter(pl.col('reference').is_null())['strategy'].n_unique()} books). "
        "Hourly bars; the bootstrap resamples the books' hourly returns.",
        "",
        "## The data",
        "",
        markdown_table(data_coverage(con)),
        "`missing_bars`: hours without a candle between the symbol's first and last candle. "
        "`in_universe_share`: share of rebalance asofs at which the symbol was in the universe (the first "
        "window of every symbol is warm-up). `implied_vol`: `iv_source` of signals.signals (`index`: the "
        "Deribit DVOL of that coin; `unavailable`: no implied vol, so no VRP signal; `proxy`: the BTC-scaled proxy).",
        "",
        ("Data-quality findings (raw.data_quality):\n\n" + markdown_table(quality)) if quality.height
        else "raw.data_quality holds no finding for this window.",
        "",
        "## The books",
        "",
        markdown_table(table(COMPARISON)),
        f"Over {bars} hourly bars. Ranked by the comparison's rule (backtest.comparison).",
        "",
        "## Findings",
        "",
        "Does the hybrid beat min-variance and equal weight, and how sure are we?",
        "",
        *(f"- {line}" for line in verdicts),
        "",
        _figure("sharpe_intervals"),
        "",
        "Which covariance estimator forecast this market's risk best?",
        "",
        f"- {estimator_finding(risk_summary)}",
        "",
        "How often did the stress module's verdicts match what the market then did (all books, cross margin)?",
        "",
        *(f"- {line}" for line in stress_findings(confusion)),
        "",
    ]
    for heading, frame in sections.items():
        lines += [f"## {heading}", "", markdown_table(frame) if frame.height else "(no rows)", ""]
    lines += ["## Figures", ""]
    for name in FIGURES:
        if name != "sharpe_intervals":
            lines += [_figure(name), ""]
    lines += [
        "## How to read this page",
        "",
        "The tables are the warehouse's (backtest.significance, backtest.risk_model_summary, "
        "risk.stress_confusion, backtest.break_even, backtest.by_regime); their columns are described in "
        "`assets/schemas.py` and in the Dagster UI. "
        f"Query them in `{_shown(settings.warehouse)}`. An interval that contains 0 is "
        "no evidence of a difference, whatever the point estimate; the deflated Sharpe ratio (dsr) discounts "
        "each book's Sharpe for the number of books tried.",
        "",
    ]
    page.write_text("\n".join(lines), encoding="utf-8")
    return page


def estimator_finding(risk_summary: pl.DataFrame) -> str:
    """One sentence on the estimator ranked first by backtest.risk_model_summary (lowest mean QLIKE)."""
    best = risk_summary.sort("rank").row(0, named=True)
    return (f"{best['estimator']} ranks first of {risk_summary.height} estimators (mean QLIKE {best['mean_qlike']:.3f}; "
            f"mean bias statistic {best['mean_bias']:.3f}, inside its kurtosis-robust 95 % band for "
            f"{best['books_in_robust_band']} of {best['books']} books). Its 95 % / 99 % Gaussian VaR passed the "
            f"conditional coverage test for {best['books_var95_pass']} / {best['books_var99_pass']} of "
            f"{best['books']} books.")


def stress_findings(confusion: pl.DataFrame) -> list[str]:
    """One sentence per stress leverage: risk.stress_confusion summed over the books."""
    lines = []
    totals = confusion.group_by("leverage").agg(pl.col("rebalances", "true_alarms", "false_alarms", "missed",
                                                           "true_calms", "wick_only").sum()).sort("leverage")
    for r in totals.iter_rows(named=True):
        realized = r["true_alarms"] + r["missed"]
        lines.append(
            f"at {r['leverage']:g}x over {r['rebalances']} book-rebalances: {realized} realized "
            f"liquidation{'' if realized == 1 else 's'}, "
            f"{r['true_alarms']} predicted and {r['missed']} missed ({r['wick_only']} only on an intrabar wick); "
            f"{r['false_alarms']} false alarms and {r['true_calms']} correct all-clears.")
    return lines


def _shown(path: Path) -> str:
    """A path relative to the project when it lies inside it (the page is read from the repository)."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _text(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _figure(name: str) -> str:
    return f"![{FIGURES[name]}](case-study/{name}.png)\n\n*{FIGURES[name]}.*"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with binance/ and deribit_dvol/")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2025, 1, 1))
    parser.add_argument("--end", type=date.fromisoformat, default=date(2025, 6, 30))
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--warehouse", type=Path, default=PROJECT_ROOT / "warehouse" / "case_study.duckdb")
    args = parser.parse_args(argv)
    if not (args.data / "binance").is_dir():
        raise SystemExit(f"case study: no Binance archive at {args.data / 'binance'} (pass --data)")
    command = "python -m pipelines.case_study" + "".join(
        f" --{k} {v}" for k, v in (("start", args.start), ("end", args.end)) if v != parser.get_default(k))
    args.warehouse.unlink(missing_ok=True)  # a fresh warehouse: the page describes this run only
    with tempfile.TemporaryDirectory() as reports:
        settings = Settings.from_env(case_study_environment(args.data.resolve(), args.start, args.end,
                                                            warehouse=args.warehouse.resolve(), reports=Path(reports)))
        with dg.DagsterInstance.ephemeral() as instance:
            timings = materialize_range(build_definitions(settings), settings.start, settings.end, instance)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
        with duckdb.connect(str(settings.warehouse), read_only=True) as con:
            page = write_page(con, settings, figures_from=Path(reports), page=args.page.resolve(), command=command,
                              commit=_commit(), timings=timings, peak_rss_gb=peak)
    print(f"case study: {page}")


if __name__ == "__main__":
    began = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - began:.0f} s")

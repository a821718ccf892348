"""The whole chain on the shared real Binance data (issue 12): ten perps through the comparison and
the report, then copies of it with a 5-hour hole, a missing month, a listing and a delisting inside
the window, a fat-finger close and an empty funding month, and 4-hour bars.

The data is read in place from ../shared/data/real (never copied into the project); every test
skips with its reason where the folder is absent, as on a user's machine."""

import io
import re
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from pipelines.case_study import FIGURES, write_page
from pipelines.definitions import build_definitions
from pipelines.resources import as_utc
from pipelines.run import main, materialize_range
from pipelines.settings import Settings
from tests.conftest import REAL_DATA

ARCHIVE = REAL_DATA / "binance"
DVOL = REAL_DATA / "deribit_dvol"
TEN = "BTC,ETH,SOL,BNB,XRP,DOGE,BCH,1000PEPE,OP,ZEC"
SYMBOLS = [f"{s}USDT" for s in TEN.split(",")]
MONTHLY = Path("futures/um/monthly")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ARCHIVE.is_dir(), reason=f"the shared real data is not at {ARCHIVE}")]


def environment(tmp_path: Path, archive: Path, start: str, end: str, **extra: str) -> dict[str, str]:
    return {
        "PERPFOLIO_SOURCE": "archive", "PERPFOLIO_ARCHIVE_DIR": str(archive), "PERPFOLIO_SYMBOLS": TEN,
        "PERPFOLIO_IV_CSV": f"{DVOL / 'BTC_DVOL_1d.csv'},{DVOL / 'ETH_DVOL_1d.csv'}",
        "PERPFOLIO_START": start, "PERPFOLIO_END": end, "PERPFOLIO_WINDOW_BARS": "168",
        "PERPFOLIO_STRESS_LEVERAGES": "1,5", "PERPFOLIO_WAREHOUSE": str(tmp_path / "warehouse.duckdb"),
        "PERPFOLIO_REPORTS_DIR": str(tmp_path / "reports"), "DAGSTER_HOME": str(tmp_path / "home"), **extra,
    }


def run(env: dict[str, str], monkeypatch, capsys) -> tuple[dict[str, pl.DataFrame], str]:
    """`make run` with these variables: every table of the warehouse and what it printed."""
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main([])
    return read_tables(env["PERPFOLIO_WAREHOUSE"]), capsys.readouterr().out


def materialize(env: dict[str, str]) -> dict[str, pl.DataFrame]:
    """The walk-forward and the evaluation over the whole window in an in-memory Dagster instance
    (what `make run` does, without its run history on disk): every table of the warehouse."""
    settings = Settings.from_env(env)
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(build_definitions(settings), settings.start, settings.end, instance)
    return read_tables(env["PERPFOLIO_WAREHOUSE"])


def read_tables(warehouse: str) -> dict[str, pl.DataFrame]:
    with duckdb.connect(warehouse, read_only=True) as con:
        names = [f"{s}.{t}" for s, t in con.sql("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()]
        return {name: as_utc(con.sql(f"SELECT * FROM {name}").pl()) for name in names}


def at(day: str, hour: int = 23) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


class TestTenRealPerps:
    def test_whole_chain_through_the_comparison_and_the_report(self, tmp_path, monkeypatch, capsys):
        tables, printed = run(environment(tmp_path, ARCHIVE, "2025-01-01", "2025-01-21"), monkeypatch, capsys)
        assert "Strategy comparison" in printed and "report.html" in printed
        assert (tmp_path / "reports" / "report.html").stat().st_size > 10_000
        empty = {name for name, frame in tables.items() if frame.is_empty()}
        # the real archive is clean (no gap, bad print or missing funding) and has no mark/index klines
        assert empty == {"raw.data_quality", "raw.reference_prices"}
        assert set(tables["raw.candles"]["symbol"]) == set(SYMBOLS) and tables["raw.candles"].height == 10 * 21 * 24
        universe = tables["features.universe"]
        assert set(universe.filter(pl.col("as_of") >= at("2025-01-08"))["reason"]) == {"in"}
        assert set(universe.filter(pl.col("as_of") < at("2025-01-07"))["reason"]) == {"insufficient_history"}
        # every symbol is stressed with the packaged snapshot's brackets (equal weight holds all ten)
        stress = tables["risk.stress"]
        assert stress.height > 0 and stress["tier_source"].str.starts_with("snapshot:binance:").all()
        liquidation = tables["risk.liquidation"].filter(pl.col("strategy") == "baseline:equal_weight")
        assert set(liquidation["symbol"]) == set(SYMBOLS) and liquidation["tier_source"].str.starts_with("snapshot:").all()
        comparison = tables["backtest.comparison"]
        assert comparison.height == tables["portfolio.weights"]["strategy"].n_unique() + 3  # and three baselines
        assert (comparison["account_usdt"] == 100_000.0).all()
        # only BTC and ETH have their own implied-vol index: no proxy by default
        sources = tables["signals.signals"].group_by("symbol").agg(pl.col("iv_source").unique())
        assert {s: tuple(v) for s, v in sources.iter_rows()} == {
            s: ("index",) if s in ("BTCUSDT", "ETHUSDT") else ("unavailable",) for s in SYMBOLS}
        # the case study page, written from this run's warehouse: its numbers are the tables'
        settings = Settings.from_env(environment(tmp_path, ARCHIVE, "2025-01-01", "2025-01-21"))
        with duckdb.connect(str(settings.warehouse), read_only=True) as con:
            page = write_page(con, settings, figures_from=tmp_path / "reports", page=tmp_path / "docs" / "case.md",
                              command="make case-study", commit="abc1234",
                              timings={"daily_walk_forward": 1.0, "evaluation": 2.0}, peak_rss_gb=0.5)
        text = page.read_text()
        assert sorted(p.name for p in (tmp_path / "docs" / "case-study").iterdir()) == sorted(f"{n}.png" for n in FIGURES)
        assert not re.search(r"\b(None|nan|NaN|inf)\b", text) and "abc1234" in text
        best = tables["backtest.risk_model_summary"].sort("rank").row(0, named=True)
        assert f"{best['estimator']} ranks first" in text and f"mean QLIKE {best['mean_qlike']:.3f}" in text
        hybrid_vs_ew = tables["backtest.significance"].filter(
            (pl.col("strategy") == "hybrid") & (pl.col("reference") == "baseline:equal_weight")
            & (pl.col("statistic") == "sharpe")).row(0, named=True)
        assert f"sharpe difference {hybrid_vs_ew['estimate']:+.3g}" in text
        for leverage, rows in tables["risk.stress_confusion"].filter(pl.col("margin_mode") == "cross").group_by("leverage"):
            assert f"at {leverage[0]:g}x over {rows['rebalances'].sum()} book-rebalances" in text
            assert f"{rows['missed'].sum()} missed" in text
        for symbol in SYMBOLS:
            assert f"| {symbol} | 2025-01-01 | 2025-01-21 | 504 | 0 |" in text  # 21 days of hourly candles, none missing

    def test_four_hour_bars(self, tmp_path):
        tables = materialize(environment(tmp_path, ARCHIVE, "2025-01-01", "2025-01-21", PERPFOLIO_BAR_HOURS="4",
                                         PERPFOLIO_WINDOW_BARS="42"))
        assert tables["backtest.comparison"].height > 0 and (tmp_path / "reports" / "report.html").exists()
        returns = tables["features.net_returns"]
        assert (returns["ts"].dt.hour() % 4 == 0).all() and returns.height == 10 * (21 * 6 - 1)
        # the volatility scenario: sigmas x multiplier x per-BAR vol x sqrt(hours / bar_hours)
        vol = tables["risk.stress"].filter(pl.col("kind") == "volatility")
        assert vol.height > 0 and vol["pnl"].max() <= 0.0
        assert (tables["features.universe"].filter(pl.col("as_of") >= at("2025-01-09"))["reason"] == "in").all()


def rewrite_zip(path: Path, transform) -> None:
    """Replace the CSV inside an archive zip by ``transform(frame)`` (header kept as in the source)."""
    with zipfile.ZipFile(path) as z:
        member = z.namelist()[0]
        frame = pl.read_csv(z.read(member))
    out = io.BytesIO()
    transform(frame).write_csv(out)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, out.getvalue())


def ms(day: str, hour: int) -> int:
    return int(datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def damaged_archive(tmp_path_factory) -> Path:
    """A copy of the real archive with what real universes have:
    ETH 5 hours missing (2025-02-05 03:00-07:00), SOL's February missing, OP listed on 2025-02-01 (no
    January), ZEC delisted after 2025-02-28 (no March), DOGE's February funding file empty, and a 10x
    fat-finger BCH close (high raised with it) on 2025-02-10 10:00."""
    root = tmp_path_factory.mktemp("damaged") / "binance"
    shutil.copytree(ARCHIVE, root)
    klines, funding = root / MONTHLY / "klines", root / MONTHLY / "fundingRate"
    rewrite_zip(klines / "ETHUSDT/1h/ETHUSDT-1h-2025-02.zip",
                lambda f: f.filter(~pl.col("open_time").is_between(ms("2025-02-05", 3), ms("2025-02-05", 7))))
    (klines / "SOLUSDT/1h/SOLUSDT-1h-2025-02.zip").unlink()
    for path in [*(klines / "OPUSDT/1h").glob("*-2025-01.zip"), *(funding / "OPUSDT").glob("*-2025-01.zip")]:
        path.unlink()
    for path in [*(klines / "ZECUSDT/1h").glob("*-2025-0[3-6].zip"), *(funding / "ZECUSDT").glob("*-2025-0[3-6].zip")]:
        path.unlink()
    rewrite_zip(funding / "DOGEUSDT/DOGEUSDT-fundingRate-2025-02.zip", lambda f: f.head(0))
    bad = pl.col("open_time") == ms("2025-02-10", 10)
    rewrite_zip(klines / "BCHUSDT/1h/BCHUSDT-1h-2025-02.zip", lambda f: f.with_columns(
        close=pl.when(bad).then(pl.col("close") * 10).otherwise("close"),
        high=pl.when(bad).then(pl.col("close") * 10).otherwise("high")))
    return root


class TestDamagedRealUniverse:
    @pytest.fixture(scope="class")
    def tables(self, damaged_archive, tmp_path_factory):
        tmp_path = tmp_path_factory.mktemp("damaged_run")
        return materialize(environment(tmp_path, damaged_archive, "2025-01-01", "2025-03-09", PERPFOLIO_OUTLIERS="quarantine"))

    def reason(self, tables, symbol: str, day: str) -> str:
        universe = tables["features.universe"]
        return universe.filter((pl.col("symbol") == symbol) & (pl.col("as_of") == at(day)))["reason"].item()

    def test_the_five_hour_hole_is_a_gap_carried_and_freezes_nobody(self, tables):
        quality = tables["raw.data_quality"]
        gap = quality.filter((pl.col("symbol") == "ETHUSDT") & (pl.col("issue") == "gap"))
        assert gap.select("from_ts", "to_ts", "bars_missing").rows() == [(at("2025-02-05", 3), at("2025-02-05", 7), 5)]
        spanning = tables["features.net_returns"].filter((pl.col("symbol") == "ETHUSDT") & pl.col("filled"))
        assert spanning["ts"].to_list() == [at("2025-02-05", 8)]
        # 6 bars of ETH's window lack a one-bar return: within the 8 allowed (5 % of 168), it stays in
        assert self.reason(tables, "ETHUSDT", "2025-02-05") == "in"
        statuses = tables["portfolio.weights"].filter(pl.col("as_of") >= at("2025-01-08"))["status"]
        assert not statuses.str.contains("missing_data").any()

    def test_a_missing_month_takes_the_symbol_out_and_it_re_enters(self, tables):
        assert self.reason(tables, "SOLUSDT", "2025-02-10") == "no_price_at_asof"
        assert self.reason(tables, "SOLUSDT", "2025-03-03") == "too_many_missing"  # back, window not yet clean
        assert self.reason(tables, "SOLUSDT", "2025-03-09") == "in"
        weights = tables["portfolio.weights"]
        sol_feb = weights.filter((pl.col("symbol") == "SOLUSDT") & pl.col("as_of").is_between(at("2025-02-01"), at("2025-02-28")))
        assert sol_feb.height > 0 and (sol_feb["weight"] == 0).all() and set(sol_feb["universe"]) == {"no_price_at_asof"}

    def test_a_listing_inside_the_window_enters_once_its_window_is_covered(self, tables):
        assert self.reason(tables, "OPUSDT", "2025-01-20") == "not_listed"
        assert self.reason(tables, "OPUSDT", "2025-02-05") == "insufficient_history"
        assert self.reason(tables, "OPUSDT", "2025-02-09") == "in"

    def test_a_delisted_position_is_closed_at_its_last_price(self, tables):
        assert self.reason(tables, "ZECUSDT", "2025-03-05") == "no_price_at_asof"
        equity = tables["backtest.equity"].filter(pl.col("strategy") == "baseline:equal_weight")
        closes = equity.filter(pl.col("delisting_closes") > 0)
        # equal weight held ZEC when its data ended: sold at the close of its last bar, with costs
        assert closes.select("ts", "delisting_closes").rows() == [(at("2025-02-28"), 1)]
        assert closes["fees"].item() > 0

    def test_the_fat_finger_close_is_quarantined_and_recorded(self, tables):
        quality = tables["raw.data_quality"]
        outlier = quality.filter(pl.col("issue") == "outlier")
        assert outlier.select("symbol", "from_ts").rows() == [("BCHUSDT", at("2025-02-10", 10))]
        assert "BCHUSDT-1h-2025-02.zip" in outlier["detail"].item()
        bch = tables["raw.candles"].filter(pl.col("symbol") == "BCHUSDT")
        assert at("2025-02-10", 10) not in bch["ts"].to_list()
        assert tables["features.net_returns"].filter((pl.col("symbol") == "BCHUSDT") & (pl.col("ts") == at("2025-02-10", 11)))[
            "filled"].item()
        assert tables["backtest.metrics"]["max_loss"].max() < 0.2  # no -90 % hour reached the books

    def test_an_empty_funding_month_is_a_funding_gap(self, tables):
        gaps = tables["raw.data_quality"].filter((pl.col("symbol") == "DOGEUSDT") & (pl.col("issue") == "funding_gap"))
        assert gaps.height > 0
        assert gaps["from_ts"].min() <= at("2025-02-01", 8) and gaps["to_ts"].max() >= at("2025-02-28", 16)

    def test_the_chain_ends_with_the_comparison_and_the_report(self, tables):
        comparison = tables["backtest.comparison"]
        assert comparison.height == tables["portfolio.weights"]["strategy"].n_unique() + 3 and comparison["sharpe"].is_finite().all()
        stress = tables["risk.stress"]
        assert stress.filter(pl.col("kind") == "replay").height > 0
        assert np.isfinite(stress["equity_after"].to_numpy()).all()

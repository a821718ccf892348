"""PERPFOLIO_SOURCE=exchange through the whole chain, against the replay server: the same tables as
the synthetic market it replays, a re-run downloads nothing, and a run killed mid-download then
re-run stores exactly what an uninterrupted run stores."""

import signal
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from tools.replay import ReplayServer, synthetic_market
from pipelines.definitions import build_definitions
from pipelines.run import materialize_range
from tests.test_operations import (
    assert_same_tables, checksums, env_for, finish, read_tables, reference, settings_in, short, start_run,  # noqa: F401 (fixtures)
)

pytestmark = pytest.mark.slow
UTC = timezone.utc


@pytest.fixture(scope="module")
def market(short):
    origin = datetime(short.start.year, short.start.month, short.start.day, tzinfo=UTC)
    return synthetic_market(list(short.symbols), origin, origin + timedelta(days=(short.end - short.start).days + 1), seed=short.seed)


def exchange_settings(settings, server, exchange="okx"):
    return replace(settings, source="exchange", exchange=exchange, exchange_url=server.url, exchange_rate_limit=False,
                   exchange_cache=settings.warehouse.parent / "exchange_cache.duckdb", exchange_retries=2)


def without_source(tables):
    return {name: frame.drop("source") if "source" in frame.columns else frame for name, frame in tables.items()}


@pytest.fixture(scope="module")
def exchange_run(short, market, tmp_path_factory):
    """The short window materialized from the replay server (OKX format: the smallest pages), then
    materialized again; returns (tables, data requests of the first run, of the second run)."""
    settings = settings_in(tmp_path_factory.mktemp("exchange"), short)
    with ReplayServer(market) as server, dg.DagsterInstance.ephemeral() as instance:
        defs = build_definitions(exchange_settings(settings, server))
        materialize_range(defs, settings.start, settings.end, instance)
        first = server.data_requests()
        tables = read_tables(settings.warehouse)
        materialize_range(defs, settings.start, settings.end, instance)
        second = server.data_requests() - first
        assert read_tables(settings.warehouse).keys() == tables.keys()
        assert checksums(read_tables(settings.warehouse)) == checksums(tables)
    return tables, first, second


def test_the_exchange_source_gives_the_tables_of_the_market_it_replays(exchange_run, reference):
    tables, first, _ = exchange_run
    assert first > 0
    assert set(tables["raw.candles"]["source"]) == {"exchange"}
    assert set(tables["raw.implied_vol"]["source"]) == {"dvol"}
    # DVOL travels in percent (iv x 100), which moves implied vol and what is computed from it by an ulp
    tiered = {"risk.stress", "risk.liquidation", "backtest.comparison", "risk.stress_vs_realized", "risk.stress_confusion"}
    assert_same_tables(without_source(tables), without_source(reference), set(reference) - tiered,
                       tolerance={"rtol": 1e-9, "atol": 1e-12})
    # the risk tables are margined on the exchange's own live tiers (the replay server's OKX position tiers),
    # the synthetic run's on the packaged Binance snapshot: the same positions, different brackets
    positions = ["as_of", "strategy", "leverage", "margin_mode", "symbol", "weight", "notional", "account_usdt"]
    assert_same_tables({"p": tables["risk.liquidation"].select(positions)},
                       {"p": reference["risk.liquidation"].select(positions)}, tolerance={"rtol": 1e-9, "atol": 1e-6})
    assert set(tables["risk.liquidation"]["tier_source"]) == {"exchange:okx@127.0.0.1"}
    assert set(reference["risk.liquidation"]["tier_source"]) == {"snapshot:binance:2026-09-29"}
    assert set(tables["risk.stress"]["tier_source"].drop_nulls()) == {"exchange:okx@127.0.0.1"}
    # the stress-vs-realized rows judge the same decisions over the same bars, margined on those tiers
    decisions = ["as_of", "strategy", "leverage", "margin_mode", "account_usdt", "bars_held"]
    assert_same_tables({"d": tables["risk.stress_vs_realized"].select(decisions)},
                       {"d": reference["risk.stress_vs_realized"].select(decisions)})


def test_a_rerun_of_a_complete_window_downloads_nothing(exchange_run):
    _, _, second = exchange_run
    assert second == 0


def test_sigkill_mid_download_then_rerun_equals_an_uninterrupted_run(short, market, exchange_run, tmp_path):
    tables, _, _ = exchange_run
    settings = settings_in(tmp_path, short)
    home = tmp_path / "home"
    with ReplayServer(market) as server:
        env = {**env_for(settings, home), "PERPFOLIO_SOURCE": "exchange", "PERPFOLIO_EXCHANGE": "okx",
               "PERPFOLIO_EXCHANGE_URL": server.url, "PERPFOLIO_EXCHANGE_CACHE": str(tmp_path / "exchange_cache.duckdb"),
               "PERPFOLIO_EXCHANGE_RATE_LIMIT": "true"}  # paced by ccxt's limiter, so the kill lands mid-download
        victim = start_run(env, log=tmp_path / "killed.log")
        deadline = time.monotonic() + 120
        while server.data_requests() < 12 and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
        killed_after = server.data_requests()
        finish(start_run(env, log=tmp_path / "rerun.log"), tmp_path / "rerun.log", timeout=300)
        resumed = server.data_requests() - killed_after
    _, uninterrupted_requests, _ = exchange_run
    assert resumed < uninterrupted_requests  # the series finished before the kill came from the cache
    assert checksums(read_tables(settings.warehouse)) == checksums(tables)

"""The live exchange source (perpfolio.sources.exchange) against the local replay server
(tools.replay): each exchange's format and paging, fault tolerance, resume, validation."""

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError, SourceUnavailable
from tools.replay import Fault, ReplayServer, synthetic_market
from perpfolio.sources.exchange import (
    EXCHANGES, DvolClient, client_for, funding_intervals, read_exchange,
)
from perpfolio.sources.exchange_cache import ExchangeCache
from perpfolio.sources.synthetic import generate_market

UTC = timezone.utc
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
ORIGIN = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2025, 2, 15, tzinfo=UTC)
HOLE = (datetime(2025, 1, 10, 5, tzinfo=UTC), datetime(2025, 1, 12, tzinfo=UTC))
DELIST = datetime(2025, 2, 3, 17, tzinfo=UTC)


@pytest.fixture(scope="module")
def truth():
    return generate_market(SYMBOLS, ORIGIN, END, seed=1)


@pytest.fixture(scope="module")
def clean_market():
    return synthetic_market(SYMBOLS, ORIGIN, END, seed=1)


@pytest.fixture(scope="module")
def holed_market():
    return synthetic_market(SYMBOLS, ORIGIN, END, seed=1, holes={"ETHUSDT": [HOLE]}, delisted={"SOLUSDT": DELIST})


def client(exchange, server, **kw):
    return client_for(exchange, base_url=server.url, rate_limit=False, **{"timeout_s": 1.0, **kw})


def read(exchange, server, start=ORIGIN + timedelta(days=2), end=END, **kw):
    c = client(exchange, server, sleep=kw.pop("sleep", lambda s: None))
    return read_exchange(c, SYMBOLS, start, end, now=END + timedelta(days=30), **kw)


def tables(result):
    d = result.data
    return {"candles": d.candles, "funding": d.funding, "reference_prices": d.reference_prices,
            "quality": d.quality, "implied_vol": result.implied_vol}


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_each_exchange_reproduces_the_market_it_serves(exchange, clean_market, truth):
    """Paging in each exchange's format (page sizes, order, exclusive or inclusive bounds) loses
    nothing and invents nothing: the tables equal the synthetic market the server replays."""
    start = ORIGIN + timedelta(days=2)
    with ReplayServer(clean_market) as server:
        got = read(exchange, server, start=start, dvol=DvolClient(base_url=server.url, rate_limit=False))
    window = lambda f, col="ts": f.filter(pl.col(col) >= start)  # noqa: E731
    assert got.data.candles.drop("source").equals(window(truth.candles).drop("source"))
    assert set(got.data.candles["source"]) == {"exchange"}
    expected_funding = window(truth.funding, "bar_ts")
    assert got.data.funding.drop("source").equals(expected_funding.drop("source"))
    refs = window(truth.reference_prices).sort("symbol", "kind", "ts")
    assert got.data.reference_prices.sort("symbol", "kind", "ts").drop("source").equals(refs.drop("source"))
    iv = window(truth.implied_vol)
    assert got.implied_vol.select("ts", "underlying").equals(iv.select("ts", "underlying"))
    np.testing.assert_allclose(got.implied_vol["iv"], iv["iv"], rtol=1e-12)
    assert got.data.quality.is_empty()


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_faults_are_retried_and_change_nothing(exchange, holed_market):
    """429 with Retry-After, a 500, a timeout and a truncated body: each retried, the Retry-After
    honoured, and the tables equal a fault-free read; the outage and the delisting are gaps,
    reported and not filled, and there are no others and no duplicate keys."""
    faults = [Fault("429", 2), Fault("500", 4), Fault("timeout", 6), Fault("truncated", 8)]
    with ReplayServer(holed_market) as server:
        reference = tables(read(exchange, server))
    with ReplayServer(holed_market, faults=faults, retry_after_s=3, delay_s=1.5) as server:
        waits = []
        got = read(exchange, server, sleep=waits.append)
        fired = [f for *_, f in server.requests if f]
    assert fired == ["429", "500", "timeout", "truncated"]
    assert waits[0] == 3.0 and len(waits) == 4  # the server's Retry-After, then backoff
    for name, frame in tables(got).items():
        assert frame.equals(reference[name]), name
    candles = got.data.candles
    assert candles.select("ts", "symbol").is_duplicated().sum() == 0
    gaps = got.data.quality.filter(pl.col("issue") == "gap")
    hole_bars = int((HOLE[1] - HOLE[0]) / timedelta(hours=1))
    delisted_bars = int((END - DELIST) / timedelta(hours=1))
    assert gaps.filter(pl.col("symbol") == "ETHUSDT")["bars_missing"].sum() == hole_bars
    assert gaps.filter(pl.col("symbol") == "SOLUSDT")["bars_missing"].sum() == delisted_bars
    assert gaps.filter(pl.col("symbol") == "BTCUSDT").is_empty()
    assert gaps["from_ts"].min() == HOLE[0]
    hours = int((END - ORIGIN - timedelta(days=2)) / timedelta(hours=1))
    assert candles.height == 3 * hours - hole_bars - delisted_bars


def test_a_failure_that_persists_names_the_endpoint(clean_market):
    with ReplayServer(clean_market, faults=[Fault("500", 2, count=100)]) as server:
        c = client("binance", server, max_retries=2, sleep=lambda s: None)
        with pytest.raises(SourceUnavailable, match=r"binance fapipublic_get_klines .*BTCUSDT.* after 3 attempts"):
            read_exchange(c, SYMBOLS, ORIGIN, END, now=END)
        assert len(server.requests) == 1 + 3


def test_unknown_symbol_fails_before_any_download_listing_close_matches(clean_market):
    with ReplayServer(clean_market) as server:
        c = client("okx", server)
        with pytest.raises(ConfigError, match=r"ETHUSD is not a USDT perpetual on okx \(close matches: ETHUSDT"):
            read_exchange(c, ["BTCUSDT", "ETHUSD"], ORIGIN, END, now=END)
        assert server.data_requests() == 0


def test_cache_resumes_and_a_complete_window_downloads_nothing(clean_market, tmp_path):
    """A read that dies half-way keeps the pieces it finished; the next read fetches only the rest
    and gives the same tables as one uninterrupted read; a third read makes no data request, and
    refresh downloads again."""
    start, end = ORIGIN + timedelta(days=3), ORIGIN + timedelta(days=40)
    with ReplayServer(clean_market) as server:
        uninterrupted = tables(read("bybit", server, start=start, end=end))
        full_requests = server.data_requests()
        port = int(server.url.rsplit(":", 1)[1])  # the same host for every server below: the cache is per host
    with ReplayServer(clean_market, port=port, faults=[Fault("500", 20, "/v5/market/", count=1000)]) as server:
        with ExchangeCache(tmp_path / "cache.duckdb") as cache, pytest.raises(SourceUnavailable):
            read("bybit", server, start=start, end=end, cache=cache)
    with ReplayServer(clean_market, port=port) as server:
        with ExchangeCache(tmp_path / "cache.duckdb") as cache:
            resumed = tables(read("bybit", server, start=start, end=end, cache=cache))
            resumed_requests = server.data_requests()
            again = tables(read("bybit", server, start=start, end=end, cache=cache))
            assert server.data_requests() == resumed_requests  # nothing downloaded
            read("bybit", server, start=start, end=end, cache=cache, refresh=True)
            assert server.data_requests() == resumed_requests + full_requests
    assert 0 < resumed_requests < full_requests - 10
    for name in uninterrupted:
        assert resumed[name].equals(uninterrupted[name]), name
        assert again[name].equals(uninterrupted[name]), name


def test_the_cache_never_serves_one_host_s_rows_for_another(clean_market, tmp_path):
    """Rows downloaded from a mirror or the replay server are filed under that host: a read of the
    same days from another host (the exchange itself, another mirror) downloads them again."""
    start, end = ORIGIN + timedelta(days=3), ORIGIN + timedelta(days=6)
    with ExchangeCache(tmp_path / "c.duckdb") as cache:
        with ReplayServer(clean_market) as first:
            read("binance", first, start=start, end=end, cache=cache)
            assert client("binance", first).origin == f"binance@{first.url}"
        with ReplayServer(clean_market) as second:
            read("binance", second, start=start, end=end, cache=cache)
            assert second.data_requests() > 0
            before = second.data_requests()
            read("binance", second, start=start, end=end, cache=cache)
            assert second.data_requests() == before  # its own rows are reused
    assert client_for("binance").origin == "binance"


def test_a_day_in_progress_is_returned_but_never_cached(clean_market, tmp_path):
    now = ORIGIN + timedelta(days=5, hours=7)
    with ReplayServer(clean_market) as server, ExchangeCache(tmp_path / "c.duckdb") as cache:
        c = client("binance", server)
        first = read_exchange(c, ["BTCUSDT"], ORIGIN + timedelta(days=4), ORIGIN + timedelta(days=6), cache=cache, now=now)
        assert first.data.candles["ts"].max() == now - timedelta(hours=1)
        assert first.data.quality.is_empty()  # hours that have not closed yet are not gaps
        before = server.data_requests()
        read_exchange(c, ["BTCUSDT"], ORIGIN + timedelta(days=4), ORIGIN + timedelta(days=6), cache=cache, now=now)
        assert server.data_requests() - before == 4  # the open day again (trade, mark, index, funding), not the closed one


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_live_run_at_midnight_gets_the_funding_event_stamped_at_midnight(exchange, clean_market, truth, tmp_path):
    """The daily job runs day D once D has closed (now = D+1 00:00): the event stamped D+1 00:00
    settles D's last bar and must be in D's funding, although its timestamp is not before now."""
    day = ORIGIN + timedelta(days=4)
    now = day + timedelta(days=1)
    with ReplayServer(clean_market) as server, ExchangeCache(tmp_path / "c.duckdb") as cache:
        got = read_exchange(client(exchange, server), ["BTCUSDT"], day, now, cache=cache, now=now).data.funding
        again = read_exchange(client(exchange, server), ["BTCUSDT"], day, now, cache=cache, now=now).data.funding
    expected = truth.funding.filter((pl.col("symbol") == "BTCUSDT") & pl.col("bar_ts").is_between(day, now, closed="left"))
    assert expected["ts"].max() == now  # the midnight event is part of the day
    assert got.drop("source").equals(expected.drop("source"))
    assert again.drop("source").equals(expected.drop("source"))  # also with day D cached


def test_invalid_value_names_exchange_symbol_bar_and_field_and_is_not_cached(tmp_path):
    market = synthetic_market(["BTCUSDT"], ORIGIN, ORIGIN + timedelta(days=3), seed=1)
    series = market.klines["trade", "BTCUSDT"]
    series.values[30, 3] = -1.0  # close of 2025-01-02 06:00
    with ReplayServer(market) as server, ExchangeCache(tmp_path / "c.duckdb") as cache:
        c = client("binance", server)
        with pytest.raises(DataError, match=r"binance trade candles BTCUSDT: bar 2025-01-02 06:00 UTC field close = -1.0"):
            read_exchange(c, ["BTCUSDT"], ORIGIN, ORIGIN + timedelta(days=3), cache=cache, now=END)
        assert cache.complete_days("binance", "trade", "BTCUSDT", [ORIGIN.date(), (ORIGIN + timedelta(days=1)).date()]) == set()


def test_rate_limiter_spaces_requests_by_their_weight(clean_market):
    """ccxt's limiter: a 1000-row Binance kline page weighs 5 x 50 ms."""
    with ReplayServer(clean_market) as server:
        c = client_for("binance", base_url=server.url, rate_limit=True)
        read_exchange(c, ["BTCUSDT"], ORIGIN + timedelta(days=1), ORIGIN + timedelta(days=2), now=END)
        times = [t for t, path, _, _ in server.requests if "Klines" in path or path.endswith("klines")]
    assert len(times) == 3
    assert min(np.diff(times)) > 0.2


def test_dvol_follows_continuation_for_long_pieces(clean_market):
    with ReplayServer(clean_market) as server:
        d = DvolClient(base_url=server.url, rate_limit=False)
        lo, hi = ORIGIN + timedelta(days=1), ORIGIN + timedelta(days=1 + 43)  # 1032 hours: two responses
        rows = d.fetch_rows("dvol", "BTC", int(lo.timestamp() * 1000), int(hi.timestamp() * 1000))
        assert len(server.requests) == 2
    ts = [r[0] for r in rows]
    assert len(set(ts)) == 1032 and min(ts) == lo.timestamp() * 1000


def test_funding_intervals_by_hand():
    h = 3_600_000
    events = [0, 8 * h, 16 * h, 20 * h, 21 * h, 22 * h, 38 * h, 50 * h]
    # first: spacing to the next (8); 16 h after a missed event keeps 8; 12 h -> 4
    assert funding_intervals(events) == [8, 8, 8, 4, 1, 1, 8, 4]
    assert funding_intervals([5 * h]) == [8]
    assert funding_intervals([]) == []


def test_base_url_keeps_each_endpoint_path_and_rejects_junk():
    c = client_for("binance", base_url="http://127.0.0.1:9/mirror", rate_limit=False)
    assert c.api.urls["api"]["fapiPublic"] == "http://127.0.0.1:9/mirror/fapi/v1"
    assert client_for("okx", base_url="http://127.0.0.1:9", rate_limit=False).api.urls["api"]["rest"] == "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="PERPFOLIO_EXCHANGE_URL"):
        client_for("bybit", base_url="127.0.0.1:9")
    with pytest.raises(ConfigError, match="PERPFOLIO_EXCHANGE must be one of binance, bybit, okx"):
        client_for("kraken")


def test_settings_read_the_exchange_variables(tmp_path):
    from pipelines.settings import Settings

    s = Settings.from_env({"PERPFOLIO_SOURCE": "exchange", "PERPFOLIO_EXCHANGE": "OKX",
                           "PERPFOLIO_EXCHANGE_URL": "http://127.0.0.1:8765", "PERPFOLIO_EXCHANGE_CACHE": str(tmp_path / "c.duckdb"),
                           "PERPFOLIO_EXCHANGE_REFRESH": "yes", "PERPFOLIO_EXCHANGE_RATE_LIMIT": "off",
                           "PERPFOLIO_EXCHANGE_TIMEOUT_S": "2.5", "PERPFOLIO_EXCHANGE_RETRIES": "0"})
    assert (s.source, s.exchange, s.exchange_url, s.exchange_cache, s.exchange_refresh, s.exchange_rate_limit,
            s.exchange_timeout_s, s.exchange_retries) == (
        "exchange", "okx", "http://127.0.0.1:8765", tmp_path / "c.duckdb", True, False, 2.5, 0)
    assert (Settings().exchange, Settings().exchange_refresh, Settings().exchange_rate_limit) == ("binance", False, True)
    with pytest.raises(ConfigError, match="PERPFOLIO_EXCHANGE must be binance, bybit or okx, got 'kraken'"):
        Settings.from_env({"PERPFOLIO_EXCHANGE": "kraken"})
    with pytest.raises(ConfigError, match="PERPFOLIO_EXCHANGE_TIMEOUT_S must be > 0"):
        Settings(exchange_timeout_s=0)


def test_retry_after_in_seconds_as_a_date_or_unreadable():
    c = client_for("binance", backoff_s=0.5)
    waits = []
    for header in ("7", "Wed, 21 Oct 2099 07:28:00 GMT", "soon", None):
        c.api.last_response_headers = {} if header is None else {"Retry-After": header}
        waits.append(c._wait_s(attempt=2))
    assert waits[0] == 7.0
    assert waits[1] == 120.0  # a far date is capped at 4 x 30 s
    assert waits[2] == waits[3] == 2.0  # unreadable or absent: 0.5 s x 2**2

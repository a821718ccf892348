"""Data events of the synthetic market (PERPFOLIO_SYNTHETIC_EVENTS): listings, delistings, outages, bad
prints and missing funding days, checked against the clean market of the same seed (the true path)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError
from perpfolio.sources.synthetic import SyntheticMarket, generate_market
from pipelines.settings import Settings

UTC = timezone.utc
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
START = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2025, 7, 30, tzinfo=UTC)  # the default deployment: days 2025-01-01 .. 2025-07-29
MAJORS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
SEED = 1  # the deployment's default seed
DATA_KINDS = ["listing", "delisting", "outage", "bad_print", "funding_missing"]
FAR = END + 365 * DAY

# The planted schedule, by hand from the module docstring (start is midnight, so day n is start + n days).
LISTING = datetime(2025, 1, 21, tzinfo=UTC)  # SOLUSDT, day 20
DELISTING = datetime(2025, 6, 20, tzinfo=UTC)  # SOLUSDT, day 170
ETH_OUTAGE = (datetime(2025, 2, 15, 13, tzinfo=UTC), datetime(2025, 2, 15, 18, tzinfo=UTC))  # day 45, 5 h
BAD_PRINT = datetime(2025, 3, 2, 14, tzinfo=UTC)  # SOLUSDT, day 60
FUNDING_DAY = datetime(2025, 3, 17, tzinfo=UTC)  # ETHUSDT, day 75
EXCHANGE_OUTAGE = (datetime(2025, 4, 11, 7, tzinfo=UTC), datetime(2025, 4, 11, 10, tzinfo=UTC))  # day 100, 3 h
HIDDEN = {
    "BTCUSDT": [EXCHANGE_OUTAGE],
    "ETHUSDT": [ETH_OUTAGE, EXCHANGE_OUTAGE],
    "SOLUSDT": [(START, LISTING), (DELISTING, FAR), EXCHANGE_OUTAGE],
}


@pytest.fixture(scope="module")
def clean() -> SyntheticMarket:
    return generate_market(MAJORS, START, END, seed=SEED)


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return generate_market(MAJORS, START, END, seed=SEED, data_events=True)


def of(frame: pl.DataFrame, symbol: str, *, kind: str | None = None) -> pl.DataFrame:
    rows = frame.filter(pl.col("symbol") == symbol)
    return (rows if kind is None else rows.filter(pl.col("kind") == kind)).sort("ts")


def outside(col: str, spans) -> pl.Expr:
    """Rows whose ``col`` lies in none of the half-open spans [a, b)."""
    return ~pl.any_horizontal([pl.col(col).is_between(a, b, closed="left") for a, b in spans])


def data_events(m: SyntheticMarket) -> pl.DataFrame:
    return m.events.filter(pl.col("kind").is_in(DATA_KINDS))


class TestPlanted:
    def test_events_table(self, market, clean):
        assert data_events(market).rows() == [
            ("listing", "SOLUSDT", LISTING, LISTING),
            ("outage", "ETHUSDT", *ETH_OUTAGE),
            ("bad_print", "SOLUSDT", BAD_PRINT, BAD_PRINT + HOUR),
            ("funding_missing", "ETHUSDT", FUNDING_DAY, FUNDING_DAY + DAY),
            ("outage", None, *EXCHANGE_OUTAGE),
            ("delisting", "SOLUSDT", DELISTING, DELISTING),
        ]
        assert market.events.filter(~pl.col("kind").is_in(DATA_KINDS)).equals(clean.events)

    def test_planted_events_do_not_depend_on_the_seed(self, market):
        other = generate_market(MAJORS, START, START + 120 * DAY, seed=SEED + 4, data_events=True)
        assert data_events(other).equals(data_events(market).filter(pl.col("start") < START + 120 * DAY))

    @pytest.mark.parametrize("symbol", MAJORS)
    def test_published_bars_are_the_true_bars_outside_the_holes(self, market, clean, symbol):
        expected = of(clean.candles, symbol).filter(outside("ts", HIDDEN[symbol]))
        got = of(market.candles, symbol)
        assert got["ts"].to_list() == expected["ts"].to_list()
        for kind in ("mark", "index"):
            assert of(market.reference_prices, symbol, kind=kind)["ts"].to_list() == expected["ts"].to_list()
        if symbol != "SOLUSDT":  # SOL is rescaled (test_listing_opens_at_price0)
            assert got.equals(expected)
            assert of(market.reference_prices, symbol).equals(
                of(clean.reference_prices, symbol).filter(outside("ts", HIDDEN[symbol])))

    def test_listing_and_delisting(self, market):
        sol = of(market.candles, "SOLUSDT")
        assert sol["ts"].min() == LISTING and sol["ts"].max() == DELISTING - HOUR
        assert sol["open"][0] == pytest.approx(190.0, rel=1e-12)
        funding = of(market.funding, "SOLUSDT")
        assert funding["bar_ts"].min() >= LISTING and funding["ts"].min() > LISTING
        assert funding["ts"].max() <= DELISTING

    def test_listing_opens_at_price0(self, market, clean):
        """Every SOL price is the true one times price0 / (true open at the listing), volume divided by it."""
        true = of(clean.candles, "SOLUSDT").filter(outside("ts", HIDDEN["SOLUSDT"]))
        got = of(market.candles, "SOLUSDT")
        scale = 190.0 / of(clean.candles, "SOLUSDT").filter(pl.col("ts") == LISTING)["open"].item()
        printed = (got["ts"] == BAD_PRINT).to_numpy()
        for col in ("open", "low"):
            np.testing.assert_allclose(got[col].to_numpy() / true[col].to_numpy(), scale, rtol=1e-12)
        for col in ("close", "high"):
            ratio = got[col].to_numpy() / true[col].to_numpy()
            np.testing.assert_allclose(ratio[~printed], scale, rtol=1e-12)
        np.testing.assert_allclose(got["volume"].to_numpy() * scale, true["volume"].to_numpy(), rtol=1e-12)
        refs = of(clean.reference_prices, "SOLUSDT").filter(outside("ts", HIDDEN["SOLUSDT"])).sort("kind", "ts")
        got_refs = of(market.reference_prices, "SOLUSDT").sort("kind", "ts")
        for col in ("open", "high", "low", "close"):
            np.testing.assert_allclose(got_refs[col].to_numpy() / refs[col].to_numpy(), scale, rtol=1e-12)

    def test_gap_spanning_return_is_the_true_move(self, market, clean):
        """The path continues under the ETH outage: the first bar after it spans the hole with the true return."""
        a, b = ETH_OUTAGE
        eth = of(market.candles, "ETHUSDT")
        before, after = (eth.filter(pl.col("ts") == t).row(0, named=True) for t in (a - HOUR, b))
        true = of(clean.candles, "ETHUSDT").filter(pl.col("ts").is_between(a, b))
        assert after["open"] == true["close"][-2]  # the hidden 17:00 bar's close
        true_move = np.prod((true["close"] / true["open"]).to_numpy())
        assert after["close"] / before["close"] == pytest.approx(true_move, rel=1e-12)

    def test_bad_print(self, market, clean):
        sol = of(market.candles, "SOLUSDT")
        i = sol["ts"].to_list().index(BAD_PRINT)
        prev, bad, nxt = (sol.row(k, named=True) for k in (i - 1, i, i + 1))
        true = of(clean.candles, "SOLUSDT").filter(pl.col("ts") == BAD_PRINT).row(0, named=True)
        true_next = of(clean.candles, "SOLUSDT").filter(pl.col("ts") == BAD_PRINT + HOUR).row(0, named=True)
        scale = bad["open"] / true["open"]
        assert bad["close"] == pytest.approx(10 * scale * true["close"], rel=1e-12)
        excursion = true["high"] / max(true["open"], true["close"])
        assert bad["high"] == pytest.approx(max(bad["open"], bad["close"]) * excursion, rel=1e-12)
        assert bad["low"] <= min(bad["open"], bad["close"])
        assert nxt["open"] == pytest.approx(scale * true["close"], rel=1e-12)  # back on the true path
        assert nxt["close"] == pytest.approx(scale * true_next["close"], rel=1e-12)
        up, down = bad["close"] / prev["close"] - 1, nxt["close"] / bad["close"] - 1
        assert up == pytest.approx(10 * (true["close"] / true["open"]) - 1, rel=1e-12) and up > 8
        assert down == pytest.approx(true_next["close"] / true_next["open"] / 10 - 1, rel=1e-12) and down < -0.85
        for name in ("mark", "index"):  # the reference prices did not print
            ref = of(market.reference_prices, "SOLUSDT", kind=name).filter(pl.col("ts") == BAD_PRINT)
            assert ref["close"].item() < 1.01 * scale * true["close"]
        o, h, lo, c = (market.candles[k].to_numpy() for k in ("open", "high", "low", "close"))
        assert np.all(h >= np.maximum(o, c)) and np.all(lo <= np.minimum(o, c))

    @pytest.mark.parametrize("symbol", MAJORS)
    def test_funding(self, market, clean, symbol):
        """Events settling a hidden bar (bar_ts in a hole) and, for ETH, every event on the missing day are gone."""
        true = of(clean.funding, symbol).filter(outside("bar_ts", HIDDEN[symbol]))
        if symbol == "ETHUSDT":
            assert true.filter(pl.col("ts").is_between(FUNDING_DAY, FUNDING_DAY + DAY, closed="left")).height == 24
            true = true.filter(outside("ts", [(FUNDING_DAY, FUNDING_DAY + DAY)]))
        assert of(market.funding, symbol).equals(true)

    def test_funding_inside_the_holes_is_missing(self, market, clean):
        lost = [("ETHUSDT", datetime(2025, 2, 15, 16, tzinfo=UTC)), ("BTCUSDT", datetime(2025, 4, 11, 8, tzinfo=UTC))]
        for symbol, ts in lost:
            assert of(clean.funding, symbol).filter(pl.col("ts") == ts).height == 1
            assert of(market.funding, symbol).filter(pl.col("ts") == ts).height == 0

    def test_raw_schemas_and_implied_vol(self, market, clean):
        from assets.schemas import Funding, ReferencePrices

        Funding.validate(market.funding)
        ReferencePrices.validate(market.reference_prices)
        assert market.implied_vol.equals(clean.implied_vol)  # another venue's index: no outage
        assert market.reference_prices.sort("symbol", "kind", "ts").equals(market.reference_prices)


class TestSwitch:
    def test_off_is_the_clean_market(self, clean):
        off = generate_market(MAJORS, START, END, seed=SEED, data_events=False)
        for name in ("candles", "funding", "implied_vol", "events", "reference_prices"):
            assert getattr(off, name).equals(getattr(clean, name)), name
        assert data_events(clean).height == 0

    def test_bad_flag(self):
        with pytest.raises(ConfigError, match="data_events must be True or False, got 'on'"):
            generate_market(MAJORS, START, END, data_events="on")

    def test_settings_and_resource(self):
        from pipelines.definitions import build_definitions

        assert Settings().synthetic_events is False
        assert Settings.from_env({"PERPFOLIO_SYNTHETIC_EVENTS": "off"}).synthetic_events is False
        settings = Settings.from_env({"PERPFOLIO_SYNTHETIC_EVENTS": "on"})
        assert settings.synthetic_events is True
        with pytest.raises(ConfigError, match="PERPFOLIO_SYNTHETIC_EVENTS='sometimes' cannot be read"):
            Settings.from_env({"PERPFOLIO_SYNTHETIC_EVENTS": "sometimes"})
        with pytest.raises(ConfigError, match="PERPFOLIO_SYNTHETIC_EVENTS must be on or off, and on only with "
                                              "PERPFOLIO_SOURCE=synthetic, got True with source 'exchange'"):
            Settings(source="exchange", synthetic_events=True)
        source = build_definitions(settings).resources["market"]
        assert source.synthetic_events is True
        sol = source.fetch(LISTING - DAY, LISTING + DAY).candles.filter(pl.col("symbol") == "SOLUSDT")
        assert sol["ts"].min() == LISTING and sol.height == 24


DRAWN = [f"D{i:02d}USDT" for i in range(30)]


class TestPrefixStability:
    """Backfills per daily partition must not rewrite history, with the events on."""

    @pytest.fixture(scope="class")
    def long(self) -> SyntheticMarket:
        return generate_market(MAJORS + DRAWN, START, END + 30 * DAY, seed=SEED, data_events=True)

    @pytest.mark.parametrize("cut", [EXCHANGE_OUTAGE[0] + HOUR, FUNDING_DAY, FUNDING_DAY + 5 * HOUR, DELISTING + DAY])
    def test_end_extended(self, long, cut):
        short = generate_market(MAJORS + DRAWN, START, cut, seed=SEED, data_events=True)
        assert short.candles.equals(long.candles.filter(pl.col("ts") < cut))
        assert short.funding.equals(long.funding.filter(pl.col("ts") <= cut))
        assert short.reference_prices.equals(long.reference_prices.filter(pl.col("ts") < cut))
        assert short.events.equals(long.events.filter(pl.col("start") < cut))
        drawn = data_events(short).filter(pl.col("symbol").is_in(DRAWN))
        assert {"outage", "bad_print", "funding_missing", "listing"} <= set(drawn["kind"])  # something to rewrite

    def test_drawn_delistings_before_the_last_cut(self, long):
        delistings = data_events(long).filter(pl.col("kind") == "delisting")
        assert delistings.filter(pl.col("symbol").is_in(DRAWN) & (pl.col("start") < DELISTING + DAY)).height > 0

    def test_symbols_added(self, long):
        for symbols in (["ETHUSDT"], ["SOLUSDT"], DRAWN[:1], DRAWN[5:7]):
            alone = generate_market(symbols, START, END + 30 * DAY, seed=SEED, data_events=True)
            for name in ("candles", "funding", "reference_prices"):
                frame = getattr(long, name).filter(pl.col("symbol").is_in(symbols))
                assert getattr(alone, name).equals(frame), (symbols, name)
            mine = pl.col("symbol").is_in(symbols) | pl.col("symbol").is_null()
            assert data_events(alone).equals(data_events(long).filter(mine))

    def test_deterministic(self, long):
        again = generate_market(MAJORS + DRAWN, START, END + 30 * DAY, seed=SEED, data_events=True)
        for name in ("candles", "funding", "implied_vol", "events", "reference_prices"):
            assert getattr(again, name).equals(getattr(long, name)), name


UNIVERSE = [f"U{i:03d}USDT" for i in range(100)]


class TestHundredSymbols:
    """Every kind happens at about its documented rate and shows in the data."""

    @pytest.fixture(scope="class")
    def pair(self) -> tuple[SyntheticMarket, SyntheticMarket]:
        return (generate_market(UNIVERSE, START, END, seed=SEED, data_events=True),
                generate_market(UNIVERSE, START, END, seed=SEED))

    @staticmethod
    def life_hours(events: pl.DataFrame) -> np.ndarray:
        """Hours each symbol is listed inside the window, from its listing and delisting rows."""
        start = dict(events.filter(pl.col("kind") == "listing").select("symbol", "start").iter_rows())
        stop = dict(events.filter(pl.col("kind") == "delisting").select("symbol", "start").iter_rows())
        return np.array([(stop.get(s, END) - start.get(s, START)) / HOUR for s in UNIVERSE])

    def test_rates(self, pair):
        market, _ = pair
        ev = data_events(market)
        count = dict(ev.group_by("kind").len().iter_rows())
        listed = self.life_hours(ev)
        assert 8 <= count["listing"] <= 32  # Binomial(100, 1/5): every draw lies in [1 d, 180 d), inside the window
        assert 1 <= count["delisting"] <= 20  # Binomial(100, 1/10), most of them inside the window
        expected = {
            "outage": listed.sum() / (90 * 24),  # per listed hour
            "bad_print": market.candles.height / (180 * 24),  # per published bar
            "funding_missing": listed.sum() / 24 / 180,  # per listed day
        }
        for kind, mean in expected.items():
            assert mean > 80 and abs(count[kind] - mean) < 4 * np.sqrt(mean), (kind, count[kind], mean)
        assert ev.filter(pl.col("kind") == "outage")["symbol"].null_count() == 1  # the exchange-wide one

    def test_events_show_in_the_data(self, pair):
        market, clean = pair
        ev = data_events(market)
        candles, funding = market.candles, market.funding
        first = candles.group_by("symbol").agg(pl.col("ts").min().alias("first"), pl.col("ts").max().alias("last"))
        listing = ev.filter(pl.col("kind") == "listing").join(first, on="symbol")
        assert (listing["first"] == listing["start"]).all()
        price0 = clean.candles.group_by("symbol").agg(pl.col("open").first().alias("price0"))
        opens = candles.join(listing.select("symbol", ts="start"), on=["symbol", "ts"]).join(price0, on="symbol")
        np.testing.assert_allclose(opens["open"], opens["price0"], rtol=1e-12)
        delisting = ev.filter(pl.col("kind") == "delisting").join(first, on="symbol")
        assert (delisting["last"] < delisting["start"]).all()
        after = funding.join(delisting.select("symbol", "start"), on="symbol").filter(pl.col("ts") > pl.col("start"))
        assert after.height == 0

        outages = ev.filter(pl.col("kind") == "outage")
        everyone = pl.DataFrame({"symbol": UNIVERSE})
        exchange_wide = outages.filter(pl.col("symbol").is_null()).drop("symbol").join(everyone, how="cross")
        holes = outages.filter(pl.col("symbol").is_not_null()).vstack(exchange_wide.select(outages.columns))
        inside = candles.join(holes, on="symbol").filter(pl.col("ts").is_between("start", "end", closed="left"))
        assert holes.height > 100 and inside.height == 0

        bad = ev.filter(pl.col("kind") == "bad_print").select("symbol", ts="start")
        gross = lambda m: m.candles.join(bad, on=["symbol", "ts"]).sort("symbol", "ts").select(  # noqa: E731
            pl.col("close") / pl.col("open"))["close"].to_numpy()
        np.testing.assert_allclose(gross(market), 10 * gross(clean), rtol=1e-12)
        assert (candles["close"] / candles["open"]).filter(candles["close"] / candles["open"] > 3).len() == bad.height

        days = ev.filter(pl.col("kind") == "funding_missing")
        gone = funding.join(days, on="symbol").filter(pl.col("ts").is_between("start", "end", closed="left"))
        true = clean.funding.join(days, on="symbol").filter(pl.col("ts").is_between("start", "end", closed="left"))
        assert gone.height == 0 and true.height >= 3 * days.height


def test_missing_funding_day_is_a_utc_day_when_start_is_not_midnight():
    """Day numbers count from the first midnight at or after start: day 75 of a 05:00 start is 2025-03-18."""
    start = datetime(2025, 1, 1, 5, tzinfo=UTC)
    m = generate_market(["ETHUSDT"], start, start + 80 * DAY, seed=SEED, data_events=True)
    clean = generate_market(["ETHUSDT"], start, start + 80 * DAY, seed=SEED)
    day = datetime(2025, 3, 18, tzinfo=UTC)
    missing = data_events(m).filter(pl.col("kind") == "funding_missing")
    assert missing.rows() == [("funding_missing", "ETHUSDT", day, day + DAY)]
    on_day = pl.col("ts").is_between(day, day + DAY, closed="left")
    assert clean.funding.filter(on_day).height == 24 and m.funding.filter(on_day).height == 0
    eth_outage = [(start + 45 * DAY + 13 * HOUR, start + 45 * DAY + 18 * HOUR)]
    assert m.funding.filter(~on_day).equals(clean.funding.filter(~on_day & outside("bar_ts", eth_outage)))

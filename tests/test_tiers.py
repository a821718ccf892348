"""Tests of perpfolio.tiers and where the stress tables get their leverage tiers: the packaged
snapshot and its conversion from freqtrade's file, the bracket rules, the conservative default, tier
files in both formats, live tiers of Bybit and OKX from the replay server, precedence and
tier_source, and the account size."""

import hashlib
import json
import zipfile
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.backtest import compare
from perpfolio.errors import ConfigError, DataError
from tools.replay import OKX_CONTRACT, ReplayServer, replay_tiers, synthetic_market
from perpfolio.sources.exchange import client_for, read_leverage_tiers
from perpfolio.stress import Scenario, liquidation_levels, stress_test
from perpfolio.tiers import (
    DEFAULT_TIERS_PATH, FREQTRADE_MEMBER, Tier, TierTable, convert, default_tiers, load_snapshot, load_tier_file,
    main, resolve_tiers,
)
from pipelines.resources import RawMarket
from pipelines.settings import Settings
from tests.conftest import REAL_DATA

UTC = timezone.utc
REAL_TIERS = REAL_DATA / "leverage_tiers" / "binance_leverage_tiers_2025-01-02_subset.json"
BOOK = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]

# brackets as freqtrade 2026.9's binance_leverage_tiers.json holds them (minNotional, maxNotional,
# maintenanceMarginRate, maxLeverage, info.cum), copied by hand from the file
FREQTRADE = {
    "BTC/USDT:USDT": [(0, 300_000, 0.004, 150, 0.0), (300_000, 800_000, 0.005, 100, 300.0),
                      (800_000, 3_000_000, 0.0065, 75, 1500.0)],
    "ZEC/USDT:USDT": [(0, 20_000, 0.01, 75, 0.0), (20_000, 200_000, 0.015, 50, 100.0),
                      (200_000, 1_000_000, 0.02, 25, 1100.0)],
}


def ccxt_structure(brackets: dict) -> dict:
    return {sym: [{"tier": k + 1.0, "symbol": sym, "currency": "USDT", "minNotional": float(lo), "maxNotional": float(hi),
                   "maintenanceMarginRate": mmr, "maxLeverage": float(lev),
                   "info": {"bracket": k + 1, "notionalFloor": lo, "notionalCap": hi, "cum": cum}}
                  for k, (lo, hi, mmr, lev, cum) in enumerate(rows)] for sym, rows in brackets.items()}


def recomputed_cum(floors, mmrs) -> list[float]:
    """Independent of the parser: cum_k = sum over j <= k of floor_j (mmr_j - mmr_(j-1))."""
    steps = [f * (m - p) for f, m, p in zip(floors, mmrs, [mmrs[0], *mmrs[:-1]])]
    return list(np.cumsum(steps))


def margin(n, tiers) -> float:
    t = [x for x in tiers if x.min_notional <= n][-1]
    return n * t.mmr - t.cum


# --- the packaged snapshot and the conversion -----------------------------------------------------


class TestConversion:
    def test_json_source_reproduces_freqtrade_and_skips_other_contracts(self, tmp_path):
        source = tmp_path / "binance_leverage_tiers.json"
        other = {"BTC/USDC:USDC": FREQTRADE["BTC/USDT:USDT"], "BTC/USDT:USDT-260925": FREQTRADE["BTC/USDT:USDT"]}
        source.write_text(json.dumps(ccxt_structure({**FREQTRADE, **other})))
        out = tmp_path / "snapshot.json"
        convert(source, out, snapshot_date="2026-09-29")
        raw = json.loads(out.read_text())
        assert raw["provenance"] == {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
        assert sorted(raw["tiers"]) == ["BTCUSDT", "ZECUSDT"]  # USDC-settled and dated futures skipped
        table = load_snapshot(out)
        assert table.source == "snapshot:binance:2026-09-29"
        for unified, rows in FREQTRADE.items():
            got = table.tiers[unified.split("/")[0] + "USDT"]
            assert [(t.min_notional, t.max_notional, t.mmr, t.max_leverage) for t in got] == [r[:4] for r in rows]
            cums = recomputed_cum([r[0] for r in rows], [r[2] for r in rows])
            assert [t.cum for t in got] == pytest.approx(cums, abs=1e-9)

    def test_wheel_source_states_date_version_and_sha256(self, tmp_path, capsys):
        wheel = tmp_path / "freqtrade-2099.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(zipfile.ZipInfo(FREQTRADE_MEMBER, date_time=(2099, 3, 4, 5, 6, 8)),
                       json.dumps(ccxt_structure(FREQTRADE)))
        out = tmp_path / "snapshot.json"
        main(["convert", str(wheel), str(out)])
        raw = json.loads(out.read_text())
        assert raw["snapshot_date"] == "2099-03-04"
        assert raw["provenance"] == {"package": "freqtrade", "version": "2099.1", "file": wheel.name,
                                     "member": FREQTRADE_MEMBER, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
        assert "2 USDT perpetuals, 6 brackets (snapshot:binance:2099-03-04)" in capsys.readouterr().out

    def test_json_source_needs_a_date(self, tmp_path):
        source = tmp_path / "t.json"
        source.write_text(json.dumps(ccxt_structure(FREQTRADE)))
        with pytest.raises(ConfigError, match="needs --snapshot-date"):
            convert(source, tmp_path / "out.json")


class TestPackagedSnapshot:
    def test_dated_with_provenance_and_compact(self):
        raw = json.loads(DEFAULT_TIERS_PATH.read_text())
        assert raw["snapshot_date"] == "2026-09-29" and raw["exchange"] == "binance"
        assert raw["provenance"]["package"] == "freqtrade" and raw["provenance"]["version"] == "2026.9"
        assert raw["provenance"]["sha256"] == "3cc4432381b83ec35000bff6b76f494fa3ec7d1681c7a45c04667dc063789fac"
        assert DEFAULT_TIERS_PATH.stat().st_size < 1_000_000
        assert load_snapshot().source == "snapshot:binance:2026-09-29"

    def test_holds_freqtrades_values(self):
        tiers = load_snapshot().tiers
        for unified, rows in FREQTRADE.items():
            got = tiers[unified.split("/")[0] + "USDT"][: len(rows)]
            assert [(t.min_notional, t.max_notional, t.mmr, t.max_leverage, t.cum) for t in got] == list(rows)

    def test_every_usdt_perpetual_with_every_bracket_passes_the_rules(self):
        """858 perpetuals, 6817 brackets (every one of freqtrade's USDT-settled perpetuals); each table
        contiguous from 0, rates never falling, cum the continuous deduction recomputed here."""
        tiers = load_snapshot().tiers
        assert len(tiers) == 858 and sum(len(t) for t in tiers.values()) == 6817
        assert {"BTCUSDT", "BNBUSDT", "ZECUSDT", "1000PEPEUSDT", "OPUSDT", "DOGEUSDT", "XRPUSDT", "BCHUSDT"} <= set(tiers)
        for symbol, t in tiers.items():
            floors, mmrs = [x.min_notional for x in t], [x.mmr for x in t]
            assert floors[0] == 0 and floors[1:] == [x.max_notional for x in t[:-1]], symbol
            assert all(b >= a for a, b in zip(mmrs, mmrs[1:])), symbol
            assert [x.cum for x in t] == pytest.approx(recomputed_cum(floors, mmrs), rel=1e-9, abs=1e-6), symbol

    def test_the_ten_perp_universe_is_covered_with_room(self):
        """Regression: the old table (BTC/ETH/SOL, 4 brackets) failed a ten-perp run ("no leverage tiers
        for symbol BNBUSDT") and a 150,000 USDT ZEC position ("exceeds the last leverage bracket")."""
        got = resolve_tiers(["BTCUSDT", "BNBUSDT", "ZECUSDT"], snapshot=load_snapshot())
        assert {r.source for r in got.values()} == {"snapshot:binance:2026-09-29"}
        assert got["ZECUSDT"].tiers[-1].max_notional == 60_000_000
        row = stress_test(np.array([0.0, 0.0, 1.0]), ["BTCUSDT", "BNBUSDT", "ZECUSDT"], {"BTCUSDT": np.ones(3)},
                          leverage=1.5, tiers={s: r.tiers for s, r in got.items()})  # 150,000 USDT of ZEC
        assert row["oversized"].is_null().all()


# --- bracket rules and tier files --------------------------------------------------------------------


def project_file(path, brackets: dict, **extra):
    path.write_text(json.dumps({"note": "test", **extra, "tiers": brackets}))
    return path


class TestTierFiles:
    def test_project_format_arrays_and_objects(self, tmp_path):
        path = project_file(tmp_path / "mine.json", {
            "AAAUSDT": [[0, 1000, 0.01, 50, 0], [1000, 5000, 0.02, 25, 10]],
            "BBBUSDT": [{"min_notional": 0, "max_notional": 2000, "mmr": 0.05, "max_leverage": 10, "cum": 0}],
        })
        table = load_tier_file(path)
        assert table.source == "file:mine.json"
        assert table.tiers["AAAUSDT"] == (Tier(0, 1000, 0.01, 50, 0), Tier(1000, 5000, 0.02, 25, 10))
        assert table.tiers["BBBUSDT"] == (Tier(0, 2000, 0.05, 10, 0),)

    def test_ccxt_structure_at_the_top_level_as_freqtrade_writes_it(self, tmp_path):
        path = tmp_path / "binance_leverage_tiers.json"
        path.write_text(json.dumps(ccxt_structure(FREQTRADE)))
        table = load_tier_file(path)
        assert sorted(table.tiers) == ["BTCUSDT", "ZECUSDT"] and table.tiers["ZECUSDT"][2].cum == 1100.0

    def test_the_real_2025_snapshot_under_tiers(self):
        if not REAL_TIERS.exists():
            print(f"skipping: real leverage-tier snapshot not found at {REAL_TIERS}")
            pytest.skip(f"real leverage-tier snapshot not found at {REAL_TIERS}")
        tiers = load_tier_file(REAL_TIERS).tiers  # ccxt structure under "tiers", numbers as strings in info
        assert len(tiers) == 10
        assert tiers["BTCUSDT"][:2] == (Tier(0, 50_000, 0.004, 125, 0), Tier(50_000, 600_000, 0.005, 100, 50))

    def test_a_table_without_deductions_is_the_whole_position_rule(self, tmp_path):
        """OKX margins the whole notional at its bracket's rate: cum 0 everywhere is valid, and its MM
        is never below the continuous rule's."""
        path = project_file(tmp_path / "okx.json", {"AAAUSDT": [[0, 1000, 0.01, 50, 0], [1000, 5000, 0.02, 25, 0]]})
        whole = load_tier_file(path).tiers["AAAUSDT"]
        assert margin(2000, whole) == 40.0 > 2000 * 0.02 - 10  # 30 under the continuous rule

    @pytest.mark.parametrize("brackets, message", [
        ([[0, 10, 0.01, 50, 0], [10, 20, 0.02, 25, 5]], r"bad.json: symbol XUSDT, bracket 2: cum 5 != expected 0.1"),
        ([[0, 10, 0.01, 50, 0], [15, 20, 0.02, 25, 0.15]], r"bad.json: symbol XUSDT, bracket 2: starts at 15, not where "
                                                         r"bracket 1 ends \(10\)"),
        ([[0, 10, 0.02, 50, 0], [10, 20, 0.01, 25, -0.1]], r"symbol XUSDT, bracket 2: mmr 0.01 is below bracket 1's 0.02"),
        ([[5, 10, 0.01, 50, 0]], r"symbol XUSDT, bracket 1: the first bracket must start at notional 0"),
        ([[0, 10, 1.5, 50, 0]], r"symbol XUSDT, bracket 1: need 0 <= mmr < 1"),
        ([[0, 10, 0.01, 50]], r"symbol XUSDT, bracket 1: expected numbers"),
        ([[0, 10, 0.01, 50, 0], [10, 20, "x", 25, 0]], r"symbol XUSDT, bracket 2: expected numbers"),
    ])
    def test_broken_project_files_name_file_symbol_and_bracket(self, tmp_path, brackets, message):
        with pytest.raises(ConfigError, match=message):
            load_tier_file(project_file(tmp_path / "bad.json", {"XUSDT": brackets}))

    def test_broken_ccxt_files_name_file_symbol_and_bracket(self, tmp_path):
        structure = ccxt_structure(FREQTRADE)
        structure["ZEC/USDT:USDT"][1]["info"]["cum"] = 99.0
        path = tmp_path / "ft.json"
        path.write_text(json.dumps(structure))
        with pytest.raises(ConfigError, match=r"ft.json: symbol ZECUSDT, bracket 2: cum 99 != expected 100"):
            load_tier_file(path)
        del structure["ZEC/USDT:USDT"][1]["info"]["cum"]
        structure["ZEC/USDT:USDT"][0]["maxNotional"] = "lots"
        path.write_text(json.dumps(structure))
        with pytest.raises(ConfigError, match=r"ft.json: symbol ZECUSDT, bracket 1: expected numeric minNotional"):
            load_tier_file(path)

    @pytest.mark.parametrize("text, message", [
        ("{not json", "cannot read a leverage-tier table"),
        ("[]", "expected a JSON object mapping symbols to brackets"),
        (json.dumps(ccxt_structure({"BTC/USDC:USDC": FREQTRADE["BTC/USDT:USDT"]})), "no USDT-margined perpetual"),
    ])
    def test_unreadable_files(self, tmp_path, text, message):
        path = tmp_path / "t.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_tier_file(path)

    def test_the_setting_rejects_a_broken_file_when_the_code_location_loads(self, tmp_path):
        good = project_file(tmp_path / "good.json", {"BTCUSDT": [[0, 10, 0.01, 50, 0]]})
        assert Settings.from_env({"PERPFOLIO_TIERS_FILE": str(good)}).tiers_file == good
        assert Settings.from_env({"PERPFOLIO_TIERS_FILE": "off"}).tiers_file is None
        bad = project_file(tmp_path / "bad.json", {"BTCUSDT": [[0, 10, 0.01, 50, 0], [10, 20, 0.02, 25, 3]]})
        with pytest.raises(ConfigError, match=r"PERPFOLIO_TIERS_FILE: .*bad.json: symbol BTCUSDT, bracket 2: cum 3"):
            Settings.from_env({"PERPFOLIO_TIERS_FILE": str(bad)})
        with pytest.raises(ConfigError, match=r"PERPFOLIO_TIERS_FILE: .*missing.json: cannot read"):
            Settings.from_env({"PERPFOLIO_TIERS_FILE": str(tmp_path / "missing.json")})


# --- the conservative default ------------------------------------------------------------------------


class TestDefault:
    def test_by_hand_on_two_symbols(self):
        """A: [0,100) 1% x100, [100,1000) 5% cum 4 x20; B: [0,500) 2% x50, [500,800) 10% cum 40 x10. Lines
        0.01n, 0.05n-4, 0.02n, 0.1n-40: from 0 the steepest line through 0 (B's 2%) leads until A's
        5% line overtakes it at 4/0.03 = 133.33, then B's 10% line from 36/0.05 = 720 to the smallest
        last cap, 800. Max leverage: the lowest of the brackets overlapping each default bracket."""
        table = TierTable({"AUSDT": (Tier(0, 100, 0.01, 100, 0), Tier(100, 1000, 0.05, 20, 4)),
                           "BUSDT": (Tier(0, 500, 0.02, 50, 0), Tier(500, 800, 0.1, 10, 40))}, "snapshot:x:d")
        got = default_tiers(table)
        expected = (Tier(0, 4 / 0.03, 0.02, 20, 0), Tier(4 / 0.03, 720, 0.05, 10, 4), Tier(720, 800, 0.1, 10, 40))
        assert len(got) == 3
        for g, e in zip(got, expected):
            assert (g.min_notional, g.max_notional, g.mmr, g.max_leverage, g.cum) == pytest.approx(
                (e.min_notional, e.max_notional, e.mmr, e.max_leverage, e.cum), rel=1e-12)

    def test_at_least_as_demanding_as_every_snapshot_symbol(self):
        """MM_default(n) >= MM_s(n) for every symbol s of the snapshot at every bracket boundary and on a
        grid up to the default's cap (equal to the maximum: the envelope is exact); its cap is the
        smallest last bracket; its max leverage never above any symbol's at that size."""
        snapshot = load_snapshot()
        default = default_tiers(snapshot)
        cap = default[-1].max_notional
        assert cap == min(t[-1].max_notional for t in snapshot.tiers.values()) == 350_000
        grid = np.unique(np.concatenate([np.linspace(0, cap, 701),
                                         [t.min_notional for ts in snapshot.tiers.values() for t in ts
                                          if t.min_notional <= cap]]))
        mm = {s: np.array([margin(n, t) for n in grid]) for s, t in snapshot.tiers.items()}
        highest = np.max(np.stack(list(mm.values())), axis=0)
        ours = np.array([margin(n, default) for n in grid])
        assert (ours >= highest - 1e-9 * np.maximum(1, highest)).all()
        np.testing.assert_allclose(ours, highest, rtol=1e-9, atol=1e-9)
        for d in default:
            mid = (d.min_notional + d.max_notional) / 2
            assert all(d.max_leverage <= [t for t in ts if t.min_notional <= mid][-1].max_leverage
                       for ts in snapshot.tiers.values())
        assert default[0].mmr == max(ts[0].mmr for ts in snapshot.tiers.values())  # 16.67%: the riskiest listing


# --- live tiers and precedence -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def market():
    return synthetic_market(BOOK, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 3, tzinfo=UTC), seed=1)


def replay_resource(server, exchange, **kw) -> RawMarket:
    return RawMarket(source="exchange", exchange=exchange, exchange_url=server.url, symbols=BOOK,
                     origin="2025-01-01T00:00:00+00:00", exchange_rate_limit=False, exchange_timeout_s=2.0, **kw)


class TestLiveTiers:
    def test_bybit_risk_limit_pages_and_deductions(self, market):
        with ReplayServer(market) as server:
            got = replay_resource(server, "bybit").leverage_tiers(BOOK)
            pages = [q for _, path, q, _ in server.requests if path == "/v5/market/risk-limit"]
        assert len(pages) == 6 and {q.get("cursor") for q in pages} == {None, "4"}  # 6 brackets, pages of 4
        for i, s in enumerate(BOOK):
            served = replay_tiers(i)
            tiers, source = got[s]
            assert source == "exchange:bybit@127.0.0.1"
            assert [(t.max_notional, t.mmr) for t in tiers] == [(cap, mmr) for cap, mmr, _ in served]
            assert [t.min_notional for t in tiers] == [0.0] + [cap for cap, _, _ in served[:-1]]
            assert [t.cum for t in tiers] == pytest.approx(
                recomputed_cum([t.min_notional for t in tiers], [mmr for _, mmr, _ in served]), rel=1e-12)

    def test_okx_position_tiers_in_contracts_become_usdt(self, market):
        """OKX sizes are contracts: the USDT boundary is maxSz x ctVal (0.01 BTC) x the mark price, each
        bracket starts where the previous ends, and there is no deduction (whole-position rule)."""
        with ReplayServer(market) as server:
            got = replay_resource(server, "okx").leverage_tiers(BOOK)
            served = {q["instFamily"]: server.answer(path, q)[1]["data"]
                      for _, path, q, _ in server.requests if path == "/api/v5/public/position-tiers"}
        for s in BOOK:
            mark = float(market.klines["mark", s].values[-1, 3])
            rows = served[f"{s[:-4]}-USDT"]
            tiers, source = got[s]
            assert source == "exchange:okx@127.0.0.1"
            caps = [int(r["maxSz"]) * OKX_CONTRACT * mark for r in rows]
            assert [t.max_notional for t in tiers] == pytest.approx(caps, rel=1e-12)
            assert [t.min_notional for t in tiers[1:]] == pytest.approx(caps[:-1], rel=1e-12)
            assert [t.mmr for t in tiers] == [float(r["mmr"]) for r in rows] and {t.cum for t in tiers} == {0.0}
            # the generated USDT cap, to within the half contract OKX's whole-contract sizes round it by
            assert abs(tiers[0].max_notional - replay_tiers(BOOK.index(s))[0][0]) <= 0.5 * OKX_CONTRACT * mark

    def test_binance_serves_none_without_a_key(self, market):
        with ReplayServer(market) as server:
            assert read_leverage_tiers(client_for("binance", base_url=server.url, rate_limit=False), BOOK) is None
            got = replay_resource(server, "binance").leverage_tiers(BOOK)
            assert all("leverage" not in path.lower() for _, path, _, _ in server.requests)
        assert {r.source for r in got.values()} == {load_snapshot().source}

    def test_a_broken_live_bracket_is_a_data_error(self, market):
        broken = synthetic_market(["BTCUSDT"], datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC))
        broken.tiers["BTCUSDT"] = [(100_000.0, 0.01, 50.0), (200_000.0, 0.005, 100.0)]
        with ReplayServer(broken) as server:
            with pytest.raises(DataError, match=r"bybit risk-limit: symbol BTCUSDT, bracket 2: mmr 0.005 is below"):
                read_leverage_tiers(client_for("bybit", base_url=server.url, rate_limit=False), ["BTCUSDT"])


class TestPrecedence:
    def test_file_then_exchange_then_snapshot_then_default(self, market, tmp_path):
        mine = project_file(tmp_path / "mine.json", {"SOLUSDT": [[0, 1e6, 0.02, 25, 0]]})
        with ReplayServer(market) as server:
            got = replay_resource(server, "okx", tiers_file=str(mine)).leverage_tiers(BOOK)
            asked = {q["instFamily"] for _, path, q, _ in server.requests if path == "/api/v5/public/position-tiers"}
        assert asked == {"BTC-USDT", "ETH-USDT"}  # the file's symbol is not fetched
        assert {s: r.source for s, r in got.items()} == {
            "BTCUSDT": "exchange:okx@127.0.0.1", "ETHUSDT": "exchange:okx@127.0.0.1", "SOLUSDT": "file:mine.json"}
        offline = RawMarket(symbols=["BTCUSDT", "NOTLISTEDUSDT"], origin="2025-01-01T00:00:00+00:00")
        local = offline.leverage_tiers(["BTCUSDT", "NOTLISTEDUSDT"])
        assert local["BTCUSDT"] == (load_snapshot().tiers["BTCUSDT"], "snapshot:binance:2026-09-29")
        assert local["NOTLISTEDUSDT"] == (default_tiers(load_snapshot()), "default")

    def test_resolve_asks_the_exchange_only_for_what_the_file_lacks(self):
        user = TierTable({"AAAUSDT": (Tier(0, 10, 0.1, 5, 0),)}, "file:u.json")
        asked = []

        def live(symbols):
            asked.extend(symbols)
            return TierTable({"BBBUSDT": (Tier(0, 20, 0.2, 2, 0),)}, "exchange:okx")

        got = resolve_tiers(["AAAUSDT", "BBBUSDT", "BTCUSDT", "ZZZUSDT"], snapshot=load_snapshot(), user=user, live=live)
        assert asked == ["BBBUSDT", "BTCUSDT", "ZZZUSDT"]
        assert [r.source for r in got.values()] == ["file:u.json", "exchange:okx", "snapshot:binance:2026-09-29",
                                                    "default"]

    def test_stress_and_liquidation_rows_name_their_tier_sources(self, tmp_path):
        snapshot = load_snapshot()
        tiers = {s: snapshot.tiers[s] for s in BOOK}
        sources = {"BTCUSDT": "exchange:okx", "ETHUSDT": "file:mine.json", "SOLUSDT": "default"}
        rows = stress_test(np.array([0.6, 0.4, 0.0]), BOOK, {"BTCUSDT": np.ones(3)}, leverage=2.0, tiers=tiers,
                           tier_sources=sources)
        assert set(rows["tier_source"]) == {"exchange:okx, file:mine.json"}  # SOL is not held
        flat = stress_test(np.zeros(3), BOOK, {"BTCUSDT": np.ones(3)}, leverage=2.0, tiers=tiers, tier_sources=sources)
        assert flat["tier_source"].is_null().all()
        levels = liquidation_levels(np.array([0.6, 0.4, 0.0]), BOOK, leverage=2.0, tiers=tiers, tier_sources=sources)
        assert levels["tier_source"].to_list() == ["exchange:okx", "file:mine.json"]


# --- the account size -----------------------------------------------------------------------------------


class TestAccountSize:
    """10x long BTC, -8%: equity after 20% of the account either way, but the maintenance margin
    grows faster than the position. 100k account: 920k in [800k, 3M) at 0.65% - 1500 = 4480 <= 20k -
    5k buffer: sufficient. 10M account: 92M in [70M, 100M) at 2.5% - 482,000 = 1,818,000 > 2M - 500k:
    not sufficient."""

    def rows(self, account, leverage):
        return stress_test(np.array([1.0, 0.0, 0.0]), BOOK, {"BTCUSDT": np.ones(3)}, leverage=leverage,
                           tiers=load_snapshot().tiers, account_usdt=account,
                           scenarios=[Scenario("btc_-8", -0.08, reference="BTCUSDT")])

    def test_margin_and_sufficiency_depend_on_it(self):
        small, large = self.rows(100_000.0, 10.0).row(0, named=True), self.rows(1e7, 10.0).row(0, named=True)
        assert small["equity_after_frac"] == pytest.approx(large["equity_after_frac"]) == pytest.approx(0.2)
        assert small["maintenance_margin"] == pytest.approx(920_000 * 0.0065 - 1500, rel=1e-12)
        assert large["maintenance_margin"] == pytest.approx(92e6 * 0.025 - 482_000, rel=1e-12)
        assert (small["capital_sufficient"], large["capital_sufficient"]) == (True, False)
        assert (small["account_usdt"], large["account_usdt"]) == (1e5, 1e7)

    def test_max_safe_leverage_says_which_account_it_assumes(self):
        metrics = pl.DataFrame({"strategy": ["s"], "total_return": [0.1], "sharpe": [1.0], "max_drawdown": [0.1],
                                "max_loss_day": [0.02], "cvar_99": [0.01]})
        for account, safe in ((1e5, 10.0), (1e7, 1.0)):
            stress = pl.concat([self.rows(account, lev) for lev in (1.0, 10.0)]).with_columns(
                strategy=pl.lit("s"), equity_after=pl.col("equity_after_frac"))
            row = compare(metrics, stress).row(0, named=True)
            assert (row["max_safe_leverage"], row["account_usdt"]) == (safe, account)
        mixed = pl.concat([self.rows(a, 1.0) for a in (1e5, 1e7)]).with_columns(
            strategy=pl.lit("s"), equity_after=pl.col("equity_after_frac"))
        with pytest.raises(DataError, match=r"stress rows of \['s'\] were sized on different account_usdt"):
            compare(metrics, mixed)

    def test_liquidation_distance_shrinks_for_a_larger_account(self):
        tiers = load_snapshot().tiers
        near = [liquidation_levels(np.array([1.0, 0, 0]), BOOK, leverage=10.0, tiers=tiers, account_usdt=a)
                .row(0, named=True) for a in (1e5, 1e7)]
        assert near[0]["distance"] > near[1]["distance"] > 0
        assert [r["account_usdt"] for r in near] == [1e5, 1e7]

    def test_setting(self):
        assert Settings.from_env({"PERPFOLIO_ACCOUNT_USDT": "25000"}).account_usdt == 25_000.0
        with pytest.raises(ConfigError, match="PERPFOLIO_ACCOUNT_USDT must be a finite USDT amount > 0, got 0.0"):
            Settings.from_env({"PERPFOLIO_ACCOUNT_USDT": "0"})


def test_stress_reference_setting_and_unconfigured_references():
    assert Settings.from_env({"PERPFOLIO_STRESS_REFERENCE": "eth"}).stress_reference == "ETHUSDT"
    with pytest.raises(ConfigError, match=r"PERPFOLIO_SCENARIOS_FILE / PERPFOLIO_STRESS_REFERENCE: .*scenarios.toml: "
                                          r"scenario 'btc_-5pct_1h': reference 'BTCUSDT' is not a configured symbol "
                                          r"\['ETHUSDT', 'SOLUSDT'\]"):
        Settings.from_env({"PERPFOLIO_SYMBOLS": "ETH,SOL"})

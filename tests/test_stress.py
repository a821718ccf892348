"""Tests of perpfolio.stress: bracket margin, liquidation boundary, betas, the packaged tier table."""

import json
from pathlib import Path

import numpy as np
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.stress import (
    DEFAULT_SCENARIOS,
    Scenario,
    Tier,
    liquidation_levels,
    load_leverage_tiers,
    load_scenarios,
    maintenance_margin,
    rolling_betas,
    stress_test,
    worst_hours,
)

REAL_TIERS = (Path(__file__).parents[2] / "shared" / "data" / "real" / "leverage_tiers"
              / "binance_leverage_tiers_2025-01-02_subset.json")
BOOK = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.fixture(scope="module")
def tiers():
    return load_leverage_tiers()


def progressive_margin(notional, brackets):
    """Independent check of the cum formula: each slice of notional at its own bracket's rate."""
    return sum(max(0.0, min(notional, t.max_notional) - t.min_notional) * t.mmr for t in brackets)


class TestMaintenanceMargin:
    def test_crossing_the_first_btc_boundary(self, tiers):
        # 100k BTC: 50k at 0.4% + 50k at 0.5% = 200 + 250 = 450 = 100k * 0.5% - cum 50
        assert maintenance_margin(100_000.0, tiers["BTCUSDT"]) == pytest.approx(450.0, abs=1e-9)
        assert maintenance_margin(50_000.0, tiers["BTCUSDT"]) == pytest.approx(200.0, abs=1e-9)
        assert maintenance_margin(-100_000.0, tiers["BTCUSDT"]) == pytest.approx(450.0, abs=1e-9)

    @pytest.mark.parametrize("symbol", BOOK)
    @pytest.mark.parametrize("notional", [0.0, 1.0, 19_999.0, 20_000.0, 75_000.0, 650_000.0, 3_500_000.0])
    def test_equals_progressive_sum(self, tiers, symbol, notional):
        expected = progressive_margin(notional, tiers[symbol])
        assert maintenance_margin(notional, tiers[symbol]) == pytest.approx(expected, rel=1e-12, abs=1e-9)

    def test_notional_beyond_table_raises(self, tiers):
        with pytest.raises(ConfigError, match="exceeds the last leverage bracket"):
            maintenance_margin(13_000_000.0, tiers["BTCUSDT"])


class TestLiquidationBoundary:
    # brackets [0, 1000) at 25% and [1000, inf) at 50% with cum = 1000 * (0.5 - 0.25) = 250
    tiers = {"BTCUSDT": [Tier(0.0, 1000.0, 0.25, 4.0, 0.0), Tier(1000.0, np.inf, 0.5, 2.0, 250.0)]}

    def run(self, shock):
        return stress_test(np.array([1.0]), ["BTCUSDT"], np.array([1.0]), scenarios=[Scenario("s", shock)],
                           leverage=2.0, tiers=self.tiers, account_notional=1000.0, buffer=0.0)

    def test_equity_equal_to_margin_is_liquidated(self):
        # position 2000, shock -25%: pnl -500, equity_after 500; notional 1500 -> 1500 * 0.5 - 250 = 500
        row = self.run(-0.25).row(0, named=True)
        assert (row["pnl"], row["equity_after"], row["maintenance_margin"]) == (-500.0, 500.0, 500.0)
        assert row["margin_ratio"] == 1.0
        assert row["liquidated"] is True and row["positions_liquidated"] == 1
        assert row["capital_sufficient"] is False  # a liquidated book is never sufficient, even with buffer 0

    def test_slightly_smaller_shock_survives(self):
        # shock -31/128: equity 1000 - 2000 * 31/128 = 515.625; notional 1515.625 -> 507.8125
        row = self.run(-31 / 128).row(0, named=True)
        assert (row["equity_after"], row["maintenance_margin"]) == (515.625, 507.8125)
        assert row["liquidated"] is False

    def test_wiped_out_equity_has_infinite_margin_ratio(self):
        row = self.run(-0.6).row(0, named=True)
        assert row["equity_after"] == -200.0 and row["margin_ratio"] == np.inf and row["liquidated"] is True


class TestBetas:
    def test_against_polyfit(self, rng):
        x = rng.normal(0, 0.01, 720)
        returns = np.column_stack([x, 1.3 * x + rng.normal(0, 0.005, 720), -0.4 * x + rng.normal(0, 0.02, 720)])
        betas = rolling_betas(returns, reference=0)
        expected = [np.polyfit(x, returns[:, i], 1)[0] for i in range(3)]
        np.testing.assert_allclose(betas, expected, rtol=1e-10)
        assert betas[0] == 1.0

    def test_nan_is_rejected(self):
        returns = np.ones((5, 2))
        returns[2, 1] = np.nan
        with pytest.raises(DataError, match="row 2, column 1"):
            rolling_betas(returns, reference=0)

    def test_flat_reference_is_rejected(self):
        with pytest.raises(DataError, match="zero variance"):
            rolling_betas(np.ones((5, 2)), reference=0)


class TestScenarios:
    def test_all_long_book_loses_leverage_times_ten_percent(self, tiers):
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, np.array([1.0, 1.2, 1.5]), leverage=3.0, tiers=tiers)
        row = out.filter(out["scenario"] == "all_-10pct").row(0, named=True)
        assert row["pnl_frac"] == pytest.approx(-0.3, abs=1e-15)
        assert row["pnl"] == pytest.approx(-30_000.0, abs=1e-9)
        assert row["equity_after_frac"] == pytest.approx(0.7, abs=1e-15)

    def test_beta_scaled_shock_by_hand(self, tiers):
        w, betas = np.array([0.6, -0.4, 0.8]), np.array([1.0, 1.5, 2.0])
        out = stress_test(w, BOOK, betas, leverage=2.0, tiers=tiers, account_notional=10_000.0, buffer=0.1)
        row = out.filter(out["scenario"] == "btc_-10pct_1h").row(0, named=True)
        pos = 2.0 * 10_000.0 * w  # [12000, -8000, 16000]
        shocks = [-0.10, -0.15, -0.20]
        pnl = 12000 * -0.10 + -8000 * -0.15 + 16000 * -0.20  # -1200 + 1200 - 3200 = -3200
        post = [abs(p * (1 + s)) for p, s in zip(pos, shocks)]  # [10800, 6800, 12800]
        mm = 10800 * 0.004 + 6800 * 0.004 + 12800 * 0.005  # all in the first brackets
        assert row["pnl"] == pytest.approx(pnl, abs=1e-9)
        assert row["maintenance_margin"] == pytest.approx(mm, abs=1e-9)
        assert row["margin_ratio"] == pytest.approx(mm / (10_000 + pnl), rel=1e-12)
        assert row["capital_sufficient"] is (10_000 + pnl >= mm + 1_000)
        assert post == pytest.approx([10800, 6800, 12800])

    def test_short_book_gains_in_a_sell_off(self, tiers):
        out = stress_test(np.array([-1.0, 0.0, 0.0]), BOOK, np.ones(3), leverage=1.0, tiers=tiers)
        assert out["pnl_frac"].to_list() == pytest.approx([0.05, 0.10, 0.10])
        assert out["scenario"].to_list() == [s.name for s in DEFAULT_SCENARIOS]

    def test_capital_insufficient_before_liquidation(self, tiers):
        # 9x long BTC, -10%: equity 100k - 90k = 10k; MM = 810k * 0.0065 - 950 = 4315 (third bracket)
        out = stress_test(np.array([1.0, 0, 0]), BOOK, np.ones(3), scenarios=[Scenario("b", -0.10)],
                          leverage=9.0, tiers=tiers, buffer=0.06)
        row = out.row(0, named=True)
        assert row["maintenance_margin"] == pytest.approx(810_000 * 0.0065 - 950, abs=1e-6)
        assert row["liquidated"] is False and row["capital_sufficient"] is False  # 10k < 4315 + 6k


class TestUnknownSymbols:
    def test_unknown_held_symbol_raises(self, tiers):
        with pytest.raises(ConfigError, match="no leverage tiers for symbol DOGEUSDT"):
            stress_test(np.array([0.5, 0.5]), ["BTCUSDT", "DOGEUSDT"], np.ones(2), leverage=1.0, tiers=tiers)

    def test_default_mmr_fallback(self, tiers):
        out = stress_test(np.array([0.5, 0.5]), ["BTCUSDT", "DOGEUSDT"], np.ones(2), leverage=1.0, tiers=tiers,
                          scenarios=[Scenario("all", -0.10, reference=None)], default_mmr=0.02)
        assert out["maintenance_margin"][0] == pytest.approx(45_000 * 0.004 + 45_000 * 0.02, abs=1e-9)

    def test_unknown_symbol_with_zero_weight_is_fine(self, tiers):
        out = stress_test(np.array([1.0, 0.0]), ["BTCUSDT", "DOGEUSDT"], np.array([1.0, np.nan]),
                          leverage=1.0, tiers=tiers)
        assert out["pnl_frac"].to_list() == pytest.approx([-0.05, -0.10, -0.10])

    def test_reference_missing_from_book(self, tiers):
        with pytest.raises(ConfigError, match="reference BTCUSDT not in symbols"):
            stress_test(np.array([1.0]), ["ETHUSDT"], np.ones(1), leverage=1.0, tiers=tiers)


class TestTierTable:
    def test_inconsistent_cum_is_rejected(self, tmp_path):
        bad = {"tiers": {"X": [{"min_notional": 0, "max_notional": 10, "mmr": 0.01, "max_leverage": 50, "cum": 0},
                               {"min_notional": 10, "max_notional": 20, "mmr": 0.02, "max_leverage": 25, "cum": 5}]}}
        path = tmp_path / "tiers.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=r"X, bracket 2: .*cum 5.0 != expected 0.1"):
            load_leverage_tiers(path)

    def test_default_table_is_first_brackets_of_real_snapshot(self, tiers):
        if not REAL_TIERS.exists():
            print(f"skipping: real leverage-tier snapshot not found at {REAL_TIERS}")
            pytest.skip(f"real leverage-tier snapshot not found at {REAL_TIERS}")
        real = json.loads(REAL_TIERS.read_text())
        packaged = json.loads((Path(__file__).parents[1] / "perpfolio" / "data" / "leverage_tiers.json").read_text())
        assert real["snapshot_date"] == packaged["snapshot_date"] == "2025-01-02"
        assert set(tiers) == set(BOOK)
        for symbol in BOOK:
            source = real["tiers"][f"{symbol[:-4]}/USDT:USDT"][:4]
            expected = [Tier(b["minNotional"], b["maxNotional"], b["maintenanceMarginRate"], b["maxLeverage"],
                             float(b["info"]["cum"])) for b in source]
            assert tiers[symbol] == expected


CONFIG = Path(__file__).parents[1] / "config" / "scenarios.toml"


class TestMarginModes:
    """Two longs of 1000 USDT each on an account of 1000 (2x), one flat 10% bracket each."""

    flat = {s: [Tier(0.0, np.inf, 0.1, 10.0, 0.0)] for s in ("BTCUSDT", "ETHUSDT")}

    def run(self, mode):
        return stress_test(np.array([0.5, 0.5]), ["BTCUSDT", "ETHUSDT"], np.array([1.0, 0.0]),
                           scenarios=[Scenario("btc_-45", -0.45)], leverage=2.0, tiers=self.flat,
                           account_notional=1000.0, buffer=0.0, margin_mode=mode).row(0, named=True)

    def test_isolated_position_liquidated_alone(self):
        # BTC margin 500, pnl -450 -> own equity 50 <= MM 550 * 0.1 = 55: liquidated, loses its 500.
        row = self.run("isolated")
        assert row["liquidated"] is True and row["positions_liquidated"] == 1
        assert row["pnl"] == pytest.approx(-500.0, abs=1e-9) and row["equity_after"] == pytest.approx(500.0, abs=1e-9)
        assert row["maintenance_margin"] == pytest.approx(100.0, abs=1e-9)  # only ETH survives
        assert row["margin_ratio"] == pytest.approx(55.0 / 50.0, rel=1e-12)
        assert row["capital_sufficient"] is False

    def test_cross_margin_survives_the_same_shock(self):
        # one pool: 1000 - 450 = 550 > MM 55 + 100 = 155
        row = self.run("cross")
        assert row["liquidated"] is False and row["positions_liquidated"] == 0
        assert (row["equity_after"], row["maintenance_margin"]) == pytest.approx((550.0, 155.0), abs=1e-9)
        assert row["capital_sufficient"] is True

    def test_unknown_mode(self):
        with pytest.raises(ConfigError, match="margin_mode"):
            self.run("portfolio")


class TestLiquidationPrice:
    boundary = TestLiquidationBoundary.tiers
    # brackets [0, 1600) at 25% and [1600, inf) at 50%: cum = 1600 * 0.25 = 400
    crossing = {"BTCUSDT": [Tier(0.0, 1600.0, 0.25, 4.0, 0.0), Tier(1600.0, np.inf, 0.5, 2.0, 400.0)]}

    def levels(self, tiers, w=(1.0,), symbols=("BTCUSDT",), mode="cross", leverage=2.0):
        return liquidation_levels(np.array(w), list(symbols), leverage=leverage, tiers=tiers, margin_mode=mode,
                                  account_notional=1000.0)

    def test_matches_the_boundary_case(self):
        # 2000 long on 1000: 1000 + 2000 s = 1500 * 0.5 - 250 at s = -0.25 (the liquidation test above)
        row = self.levels(self.boundary).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(-0.25, abs=1e-15)
        assert row["liquidation_price_ratio"] == pytest.approx(0.75, abs=1e-15)
        assert row["distance"] == pytest.approx(0.25, abs=1e-15)

    def test_liquidation_falls_back_into_the_lower_bracket(self):
        # upper bracket would give s = (1000 - 400 - 1000) / 1000 = -0.4 -> notional 1200 < 1600: not its bracket.
        # lower: s = (500 - 1000) / (2000 - 500) = -1/3 -> notional 1333.33 in [0, 1600); MM = 333.33 = equity.
        row = self.levels(self.crossing).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(-1 / 3, abs=1e-15)
        out = stress_test(np.array([1.0]), ["BTCUSDT"], np.ones(1), scenarios=[Scenario("s", -1 / 3)], leverage=2.0,
                          tiers=self.crossing, account_notional=1000.0, buffer=0.0).row(0, named=True)
        assert out["equity_after"] == pytest.approx(out["maintenance_margin"], abs=1e-9)

    def test_short_liquidation_price_is_above(self):
        # short 2000 on 1000: a rally grows the notional past 1600 into the 50% bracket:
        # 1000 - 2000 s = 2000 (1 + s) 0.5 - 400 -> s = 400 / 3000 (notional 2266.67 >= 1600); the 25% bracket
        # would give s = 500 / 2500 = 0.2 -> notional 2400, outside [0, 1600): rejected
        row = self.levels(self.crossing, w=(-1.0,)).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(2 / 15, abs=1e-15)
        assert row["liquidation_price_ratio"] == pytest.approx(17 / 15) and row["distance"] == pytest.approx(2 / 15)

    def test_isolated_and_cross_by_hand(self):
        flat = TestMarginModes.flat
        book = dict(w=(0.5, 0.5), symbols=("BTCUSDT", "ETHUSDT"), tiers=flat)
        iso = self.levels(mode="isolated", **book).row(0, named=True)
        cross = self.levels(mode="cross", **book).row(0, named=True)
        # isolated: 500 + 1000 s = 1000 (1 + s) 0.1 -> s = -400 / 900; cross: 1000 + 1000 s = 100 (1 + s) + 100
        assert iso["margin"] == 500.0 and iso["liquidation_move"] == pytest.approx(-4 / 9, abs=1e-15)
        assert cross["margin"] == 1000.0 and cross["liquidation_move"] == pytest.approx(-8 / 9, abs=1e-15)

    def test_fully_collateralized_long_has_no_liquidation_price(self):
        row = self.levels(self.boundary, leverage=1.0).row(0, named=True)
        assert row["liquidation_move"] is None and row["distance"] is None

    def test_random_books_land_on_the_boundary(self, rng, tiers):
        for _ in range(20):
            w = rng.dirichlet(np.ones(3)) * rng.choice([-1, 1], 3)
            for mode in ("cross", "isolated"):
                lv = liquidation_levels(w, BOOK, leverage=8.0, tiers=tiers, margin_mode=mode)
                for row in lv.iter_rows(named=True):
                    if row["liquidation_move"] is None:
                        continue
                    i = BOOK.index(row["symbol"])
                    alone = stress_test(w, BOOK, np.eye(3)[i], leverage=8.0, tiers=tiers, margin_mode=mode, buffer=0,
                                        scenarios=[Scenario("x", row["liquidation_move"], reference=row["symbol"])])
                    own = row["margin"] + row["notional"] * row["liquidation_move"]
                    mm = maintenance_margin(row["notional"] * (1 + row["liquidation_move"]), tiers[row["symbol"]])
                    if mode == "cross":
                        others = sum(maintenance_margin(8e5 * w[j], tiers[BOOK[j]]) for j in range(3) if j != i)
                        assert alone["equity_after"][0] == pytest.approx(mm + others, rel=1e-9)
                    else:
                        assert own == pytest.approx(mm, rel=1e-9, abs=1e-6)


class TestOtherKinds:
    def test_funding_spike(self, tiers):
        # +0.5% per 8h for 24h: a 3x long book pays 1.5% of 3x its equity; a short receives it
        sc = [Scenario("f", kind="funding", funding_rate_8h=0.005, hours=24)]
        long_ = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, np.ones(3), scenarios=sc, leverage=3.0, tiers=tiers)
        short = stress_test(np.array([-1.0, 0, 0]), BOOK, np.ones(3), scenarios=sc, leverage=3.0, tiers=tiers)
        assert long_["pnl_frac"][0] == pytest.approx(-0.045, abs=1e-15) and long_["shock"][0] == 0.005
        assert short["pnl_frac"][0] == pytest.approx(0.045, abs=1e-15)
        # notionals unchanged: BTC 150k and ETH 90k in their second brackets, SOL 60k in its second
        assert long_["maintenance_margin"][0] == pytest.approx(150_000 * 0.005 - 50 + 90_000 * 0.005 - 50
                                                               + 60_000 * 0.0065 - 30, abs=1e-9)

    def test_volatility_spike_moves_against_every_position(self, tiers):
        sc = [Scenario("v", kind="volatility", sigmas=3.0, vol_multiplier=2.0, hours=4)]
        vols = np.array([0.01, 0.02, 0.03])
        out = stress_test(np.array([0.5, -0.3, 0.2]), BOOK, np.ones(3), scenarios=sc, leverage=1.0, tiers=tiers,
                          vols=vols)
        moves = 3 * 2 * vols * 2  # sqrt(4) = 2
        assert out["pnl_frac"][0] == pytest.approx(-(0.5 * moves[0] + 0.3 * moves[1] + 0.2 * moves[2]), abs=1e-15)
        with pytest.raises(DataError, match="needs the per-bar volatility of BTCUSDT"):
            stress_test(np.array([0.5, -0.3, 0.2]), BOOK, np.ones(3), scenarios=sc, leverage=1.0, tiers=tiers)

    def test_worst_hours_replay(self, tiers):
        ts = np.datetime64("2025-01-01T00", "us") + np.arange(5) * np.timedelta64(1, "h")
        r = np.array([[0.0, 0.0, 0.0], [-0.05, -0.04, np.nan], [0.01, 0.0, 0.0], [-0.02, -0.01, -0.12],
                      [np.nan, np.nan, np.nan]])
        replays = worst_hours(ts, r, BOOK, count=2)
        assert [s.name for s in replays] == ["replay:2025-01-01T03:00Z", "replay:2025-01-01T01:00Z"]
        assert dict(replays[1].moves) == {"BTCUSDT": -0.05, "ETHUSDT": -0.04}
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, np.ones(3), scenarios=replays[:1], leverage=2.0,
                          tiers=tiers)
        assert out["pnl_frac"][0] == pytest.approx(2 * (0.5 * -0.02 + 0.3 * -0.01 + 0.2 * -0.12), abs=1e-15)
        with pytest.raises(DataError, match="no move for held symbol SOLUSDT"):
            stress_test(np.array([0.5, 0.3, 0.2]), BOOK, np.ones(3), scenarios=replays[1:], leverage=1.0, tiers=tiers)


class TestScenarioFile:
    def test_checked_in_file(self):
        scenarios, worst = load_scenarios(CONFIG)
        kinds = {s.name: s.kind for s in scenarios}
        assert kinds == {"btc_-5pct_1h": "price", "btc_-10pct_1h": "price", "all_-10pct": "price",
                         "funding_+0.5pct_8h_24h": "funding", "vol_x3_3sigma_1h": "volatility"}
        assert tuple(s for s in scenarios if s.kind == "price") == tuple(
            Scenario(s.name, s.shock, s.reference) for s in DEFAULT_SCENARIOS)
        assert worst == 3

    @pytest.mark.parametrize("body, message", [
        ('[[scenario]]\nname = "a"\nkind = "price"\n', r"missing \['shock'\]"),
        ('[[scenario]]\nname = "a"\nkind = "meteor"\nshock = 1\n', "kind must be one of"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\nshok = 2\n', r"unknown keys \['shok'\]"),
        ('[[scenario]]\nname = "a"\nshock = -1.5\n', "shock > -1"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\n[[scenario]]\nname = "a"\nshock = -0.2\n', "unique names"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\n[replay]\nworst_hours = -1\n', "worst_hours"),
    ])
    def test_bad_files_name_the_problem(self, tmp_path, body, message):
        path = tmp_path / "s.toml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_scenarios(path)


class TestSolverNoise:
    def test_noise_weights_are_no_position(self, tiers):
        """Regression (found by the range-vs-daily equivalence test): a 1e-10 weight left by the solver
        counted as a position, so the isolated margin ratio and the liquidation rows changed between
        runs that solved the same problem along different iterates."""
        clean, noisy = np.array([0.6, 0.4, 0.0]), np.array([0.6, 0.4 - 1e-10, 1e-10])
        for mode in ("cross", "isolated"):
            a = stress_test(clean, BOOK, np.ones(3), leverage=5.0, tiers=tiers, margin_mode=mode)
            b = stress_test(noisy, BOOK, np.ones(3), leverage=5.0, tiers=tiers, margin_mode=mode)
            assert a["margin_ratio"].to_list() == pytest.approx(b["margin_ratio"].to_list(), rel=1e-8)
            la = liquidation_levels(clean, BOOK, leverage=5.0, tiers=tiers, margin_mode=mode)
            lb = liquidation_levels(noisy, BOOK, leverage=5.0, tiers=tiers, margin_mode=mode)
            assert la["symbol"].to_list() == lb["symbol"].to_list() == ["BTCUSDT", "ETHUSDT"]


def test_fully_collateralized_longs_have_no_liquidation_price():
    """Regression: at leverage 1 in isolated margin each long is backed by its whole notional and
    is liquidated only at price 0. The root 1 + s* came out as 1.1e-16 or as no root depending on
    rounding, so the range-vs-daily equality test saw a number against a null. Ratios within 1e-9
    of 0 are no price."""
    w = np.array([0.6652300066862088, 0.021254131078561812, 0.31351586223522954])  # sums to exactly 1.0
    levels = liquidation_levels(w, BOOK, leverage=1.0,
                                tiers=load_leverage_tiers(), margin_mode="isolated")
    assert levels.height == 3
    assert levels["liquidation_price_ratio"].is_null().all() and levels["distance"].is_null().all()

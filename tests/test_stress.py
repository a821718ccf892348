"""Tests of perpfolio.stress: bracket margin, liquidation boundary, betas and vols with NaN, every
scenario kind (4 h bars included), substitute moves, oversized positions."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.stress import (
    DEFAULT_SCENARIOS,
    JOINT,
    Scenario,
    bar_vols,
    liquidation_levels,
    load_scenarios,
    maintenance_margin,
    rolling_betas,
    stress_test,
    worst_bars,
)
from perpfolio.tiers import Tier, load_snapshot, load_tier_file
from tests.conftest import REAL_DATA

CONFIG = Path(__file__).parents[1] / "config" / "scenarios.toml"
REAL_TIERS = REAL_DATA / "leverage_tiers" / "binance_leverage_tiers_2025-01-02_subset.json"
BOOK = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
ONES = {"BTCUSDT": np.ones(3)}


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.fixture(scope="module")
def tiers():
    """The packaged Binance snapshot of 2026-09-29. BTC and ETH: [0, 300k) 0.4%, [300k, 800k) 0.5% cum 300,
    [800k, 3M) 0.65% cum 1500; SOL: [0, 50k) 0.5%, [50k, 400k) 0.65% cum 75, [400k, 1M) 1% cum 1475."""
    return load_snapshot().tiers


def progressive_margin(notional, brackets):
    """Independent check of the cum formula: each slice of notional at its own bracket's rate (the last
    bracket extended)."""
    caps = [t.max_notional for t in brackets[:-1]] + [np.inf]
    return sum(max(0.0, min(notional, cap) - t.min_notional) * t.mmr for t, cap in zip(brackets, caps))


class TestMaintenanceMargin:
    def test_crossing_the_first_btc_boundary(self, tiers):
        # 400k BTC: 300k at 0.4% + 100k at 0.5% = 1200 + 500 = 1700 = 400k * 0.5% - cum 300
        assert maintenance_margin(400_000.0, tiers["BTCUSDT"]) == pytest.approx(1700.0, abs=1e-9)
        assert maintenance_margin(300_000.0, tiers["BTCUSDT"]) == pytest.approx(1200.0, abs=1e-9)
        assert maintenance_margin(-400_000.0, tiers["BTCUSDT"]) == pytest.approx(1700.0, abs=1e-9)

    @pytest.mark.parametrize("symbol", BOOK)
    @pytest.mark.parametrize("notional", [0.0, 1.0, 19_999.0, 50_000.0, 75_000.0, 650_000.0, 3_500_000.0, 2e9])
    def test_equals_progressive_sum(self, tiers, symbol, notional):
        expected = progressive_margin(notional, tiers[symbol])
        assert maintenance_margin(notional, tiers[symbol]) == pytest.approx(expected, rel=1e-12, abs=1e-9)

    def test_beyond_the_table_the_last_bracket_is_extended(self, tiers):
        # BTC's last bracket: [1.2e9, 1.8e9] at 50%, cum 421,482,000; 2e9 is beyond it
        assert tiers["BTCUSDT"][-1].max_notional == 1.8e9
        assert maintenance_margin(2e9, tiers["BTCUSDT"]) == pytest.approx(2e9 * 0.5 - 421_482_000, rel=1e-12)


class TestLiquidationBoundary:
    # brackets [0, 1000) at 25% and [1000, inf) at 50% with cum = 1000 * (0.5 - 0.25) = 250
    tiers = {"BTCUSDT": [Tier(0.0, 1000.0, 0.25, 4.0, 0.0), Tier(1000.0, np.inf, 0.5, 2.0, 250.0)]}

    def run(self, shock):
        return stress_test(np.array([1.0]), ["BTCUSDT"], {"BTCUSDT": np.array([1.0])},
                           scenarios=[Scenario("s", shock, reference="BTCUSDT")],
                           leverage=2.0, tiers=self.tiers, account_usdt=1000.0, buffer=0.0)

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

    def test_nan_rows_are_skipped_per_pair(self):
        """Each beta uses the rows where BOTH the symbol and the reference (column 1 here: a named
        reference, not column 0) have a return; other columns' gaps do not shrink it."""
        ref = np.array([0.01, -0.02, np.nan, 0.03, 0.00, -0.01, 0.02])
        a = np.array([0.02, np.nan, 0.01, 0.05, -0.01, -0.02, 0.01])
        b = np.array([np.nan, 0.01, 0.02, -0.03, 0.01, 0.00, np.nan])
        returns = np.column_stack([a, ref, b])
        betas = rolling_betas(returns, reference=1)
        # by hand for a: rows 0, 3, 4, 5, 6 -> x = [.01, .03, 0, -.01, .02], y = [.02, .05, -.01, -.02, .01]
        x, y = np.array([0.01, 0.03, 0.0, -0.01, 0.02]), np.array([0.02, 0.05, -0.01, -0.02, 0.01])
        dx, dy = x - x.mean(), y - y.mean()  # means .01 and .01: dx = [0, .02, -.01, -.02, .01], dy = [.01, .04, -.02, -.03, 0]
        assert betas[0] == pytest.approx((dx @ dy) / (dx @ dx), rel=1e-12)
        assert betas[0] == pytest.approx(0.0016 / 0.001, rel=1e-12)  # (.0008 + .0002 + .0006) / (.0004 + .0001 + .0004 + .0001)
        m = np.isfinite(ref) & np.isfinite(b)  # rows 1, 3, 4, 5
        assert betas[2] == pytest.approx(np.polyfit(ref[m], b[m], 1)[0], rel=1e-12)
        listwise = np.isfinite(returns).all(axis=1)  # the old rule: only rows 3, 4, 5
        assert betas[2] != pytest.approx(np.polyfit(ref[listwise], b[listwise], 1)[0], rel=1e-3)
        assert betas[1] == 1.0

    def test_a_reference_without_returns_gives_no_betas(self):
        returns = np.column_stack([np.full(5, np.nan), np.linspace(-0.01, 0.01, 5)])
        assert np.isnan(rolling_betas(returns, reference=0)).all()
        assert np.isnan(rolling_betas(np.ones((5, 2)), reference=0)).all()  # a flat reference: no beta either

    def test_vols_skip_each_columns_own_gaps(self):
        r = np.array([[0.01, np.nan, np.nan], [-0.02, 0.03, 0.01], [0.015, np.nan, np.nan], [0.0, -0.01, np.nan]])
        vols = bar_vols(r)
        assert vols[0] == pytest.approx(np.std([0.01, -0.02, 0.015, 0.0], ddof=1), rel=1e-12)
        assert vols[1] == pytest.approx(np.std([0.03, -0.01], ddof=1), rel=1e-12)
        assert np.isnan(vols[2])  # one return is no volatility


class TestScenarios:
    def test_many_leverages_and_modes_in_one_call_equal_one_call_each(self, tiers):
        # the grid the evaluation asks for at once: rows of (leverage, margin mode, scenario) in that order
        w, betas = np.array([0.9, -0.5, 0.6]), {"BTCUSDT": np.array([1.0, 1.3, 1.8])}
        kwargs = dict(tiers=tiers, account_usdt=1e8, vols=np.array([0.01, 0.015, 0.02]), bar_hours=1, buffer=0.05)
        grid = stress_test(w, BOOK, betas, leverage=(1.0, 5.0, 40.0), margin_mode=("cross", "isolated"), **kwargs)
        one_by_one = pl.concat([stress_test(w, BOOK, betas, leverage=lev, margin_mode=mode, **kwargs)
                                for lev in (1.0, 5.0, 40.0) for mode in ("cross", "isolated")])
        assert grid.equals(one_by_one)
        assert grid["liquidated"].any() and not grid["liquidated"].all()  # the grid spans both verdicts
        assert grid["oversized"].is_not_null().any()  # 40x on 100M USDT exceeds the last brackets
        with pytest.raises(ConfigError, match="leverage"):
            stress_test(w, BOOK, betas, leverage=(1.0, 0.0), **kwargs)
        with pytest.raises(ConfigError, match="margin_mode"):
            stress_test(w, BOOK, betas, leverage=1.0, margin_mode=("cross", "portfolio"), **kwargs)

    def test_all_long_book_loses_leverage_times_ten_percent(self, tiers):
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, {"BTCUSDT": np.array([1.0, 1.2, 1.5])}, leverage=3.0,
                          tiers=tiers)
        row = out.filter(out["scenario"] == "all_-10pct").row(0, named=True)
        assert row["reference"] == JOINT and row["account_usdt"] == 100_000.0
        assert row["pnl_frac"] == pytest.approx(-0.3, abs=1e-15)
        assert row["pnl"] == pytest.approx(-30_000.0, abs=1e-9)
        assert row["equity_after_frac"] == pytest.approx(0.7, abs=1e-15)

    def test_beta_scaled_shock_by_hand(self, tiers):
        w, betas = np.array([0.6, -0.4, 0.8]), {"BTCUSDT": np.array([1.0, 1.5, 2.0])}
        out = stress_test(w, BOOK, betas, leverage=2.0, tiers=tiers, account_usdt=10_000.0, buffer=0.1)
        row = out.filter(out["scenario"] == "btc_-10pct_1h").row(0, named=True)
        pnl = 12000 * -0.10 + -8000 * -0.15 + 16000 * -0.20  # positions 2 x 10k x w; -1200 + 1200 - 3200 = -3200
        mm = 10800 * 0.004 + 6800 * 0.004 + 12800 * 0.005  # post-shock notionals, all in the first brackets
        assert row["pnl"] == pytest.approx(pnl, abs=1e-9)
        assert row["maintenance_margin"] == pytest.approx(mm, abs=1e-9)
        assert row["margin_ratio"] == pytest.approx(mm / (10_000 + pnl), rel=1e-12)
        assert row["capital_sufficient"] is (10_000 + pnl >= mm + 1_000)
        assert row["proxied"] is None and row["oversized"] is None

    def test_named_reference_other_than_btc(self, tiers):
        """A price scenario shocks ITS reference and moves the others by their betas to it."""
        sc = [Scenario("eth_-10", -0.10, reference="ETHUSDT")]
        betas = {"ETHUSDT": np.array([0.8, 1.0, 1.4])}
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, betas, scenarios=sc, leverage=1.0, tiers=tiers)
        assert out["pnl_frac"][0] == pytest.approx(0.5 * -0.08 + 0.3 * -0.10 + 0.2 * -0.14, abs=1e-15)
        with pytest.raises(ConfigError, match="no betas against its reference ETHUSDT"):
            stress_test(np.array([0.5, 0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=1.0, tiers=tiers)

    def test_a_held_symbol_without_a_beta_moves_by_the_shock_and_says_so(self, tiers):
        betas = {"BTCUSDT": np.array([1.0, np.nan, 2.0])}
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, betas, scenarios=DEFAULT_SCENARIOS[1:2], leverage=1.0,
                          tiers=tiers)
        row = out.row(0, named=True)
        assert row["pnl_frac"] == pytest.approx(0.5 * -0.1 + 0.3 * -0.1 + 0.2 * -0.2, abs=1e-15)
        assert row["proxied"] == "ETHUSDT (beta 1: no beta to BTCUSDT)"

    def test_short_book_gains_in_a_sell_off(self, tiers):
        out = stress_test(np.array([-1.0, 0.0, 0.0]), BOOK, ONES, leverage=1.0, tiers=tiers)
        assert out["pnl_frac"].to_list() == pytest.approx([0.05, 0.10, 0.10])
        assert out["scenario"].to_list() == [s.name for s in DEFAULT_SCENARIOS]

    def test_capital_insufficient_before_liquidation(self, tiers):
        # 9x long BTC, -10%: equity 100k - 90k = 10k; MM = 810k * 0.0065 - 1500 = 3765 (third bracket)
        out = stress_test(np.array([1.0, 0, 0]), BOOK, ONES, scenarios=DEFAULT_SCENARIOS[1:2],
                          leverage=9.0, tiers=tiers, buffer=0.07)
        row = out.row(0, named=True)
        assert row["maintenance_margin"] == pytest.approx(810_000 * 0.0065 - 1500, abs=1e-6)
        assert row["liquidated"] is False and row["capital_sufficient"] is False  # 10k < 3765 + 7k

    def test_a_price_scenario_needs_a_reference(self, tiers):
        with pytest.raises(ConfigError, match="reference None not in symbols"):
            stress_test(np.array([1.0, 0, 0]), BOOK, ONES, scenarios=[Scenario("x", -0.1)], leverage=1.0, tiers=tiers)


class TestOversized:
    """A notional beyond the last bracket is a finding in the row, margined with that bracket extended."""

    small = {"BTCUSDT": [Tier(0.0, 1000.0, 0.01, 100.0, 0.0), Tier(1000.0, 2000.0, 0.02, 50.0, 10.0)]}

    def run(self, w, leverage, shock):
        return stress_test(np.array([w]), ["BTCUSDT"], {"BTCUSDT": np.ones(1)}, leverage=leverage, tiers=self.small,
                           account_usdt=1000.0, scenarios=[Scenario("s", shock, reference="BTCUSDT")]).row(0, named=True)

    def test_position_beyond_the_table(self):
        row = self.run(1.0, 3.0, 0.0)  # 3000 USDT against a last bracket ending at 2000
        assert row["oversized"] == "BTCUSDT" and row["capital_sufficient"] is False
        assert row["maintenance_margin"] == pytest.approx(3000 * 0.02 - 10, abs=1e-12)  # last bracket extended
        assert row["liquidated"] is False  # equity 1000 >> 50: the only problem is the size

    def test_a_short_that_grows_past_the_table_in_a_rally(self):
        assert self.run(-1.0, 1.9, 0.10)["oversized"] == "BTCUSDT"  # 1900 -> 2090
        assert self.run(-1.0, 1.9, -0.10)["oversized"] is None  # 1900 -> 1710
        assert self.run(-1.0, 1.9, -0.10)["capital_sufficient"] is True

    def test_liquidation_rows_flag_it(self):
        levels = liquidation_levels(np.array([1.0, -0.5]), ["BTCUSDT", "ETHUSDT"], leverage=2.5,
                                    tiers={**self.small, "ETHUSDT": self.small["BTCUSDT"]}, account_usdt=1000.0)
        assert levels["exceeds_max_notional"].to_list() == [True, False]  # 2500 > 2000, 1250 within
        assert levels["notional"].to_list() == [2500.0, -1250.0]


class TestUnknownSymbols:
    def test_unknown_held_symbol_raises(self, tiers):
        with pytest.raises(ConfigError, match="no leverage tiers for symbol NOTLISTEDUSDT; resolve them"):
            stress_test(np.array([0.5, 0.5]), ["BTCUSDT", "NOTLISTEDUSDT"], {"BTCUSDT": np.ones(2)}, leverage=1.0,
                        tiers=tiers)

    def test_unknown_symbol_with_zero_weight_is_fine(self, tiers):
        out = stress_test(np.array([1.0, 0.0]), ["BTCUSDT", "NOTLISTEDUSDT"], {"BTCUSDT": np.array([1.0, np.nan])},
                          leverage=1.0, tiers=tiers)
        assert out["pnl_frac"].to_list() == pytest.approx([-0.05, -0.10, -0.10])

    def test_reference_missing_from_book(self, tiers):
        with pytest.raises(ConfigError, match="reference BTCUSDT not in symbols"):
            stress_test(np.array([1.0]), ["ETHUSDT"], {"BTCUSDT": np.ones(1)}, leverage=1.0, tiers=tiers)


class TestMarginModes:
    """Two longs of 1000 USDT each on an account of 1000 (2x), one flat 10% bracket each."""

    flat = {s: [Tier(0.0, np.inf, 0.1, 10.0, 0.0)] for s in ("BTCUSDT", "ETHUSDT")}

    def run(self, mode):
        return stress_test(np.array([0.5, 0.5]), ["BTCUSDT", "ETHUSDT"], {"BTCUSDT": np.array([1.0, 0.0])},
                           scenarios=[Scenario("btc_-45", -0.45, reference="BTCUSDT")], leverage=2.0, tiers=self.flat,
                           account_usdt=1000.0, buffer=0.0, margin_mode=mode).row(0, named=True)

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
                                  account_usdt=1000.0)

    def shock(self, tiers, s, w=1.0, leverage=2.0):
        return stress_test(np.array([w]), ["BTCUSDT"], {"BTCUSDT": np.ones(1)}, leverage=leverage, tiers=tiers,
                           scenarios=[Scenario("s", s, reference="BTCUSDT")], account_usdt=1000.0,
                           buffer=0.0).row(0, named=True)

    def test_matches_the_boundary_case(self):
        # 2000 long on 1000: 1000 + 2000 s = 1500 * 0.5 - 250 at s = -0.25 (the liquidation test above)
        row = self.levels(self.boundary).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(-0.25, abs=1e-15)
        assert row["liquidation_price_ratio"] == pytest.approx(0.75, abs=1e-15)
        assert row["distance"] == pytest.approx(0.25, abs=1e-15)
        assert row["exceeds_max_notional"] is False and row["tier_source"] is None

    def test_liquidation_falls_back_into_the_lower_bracket(self):
        # upper bracket would give s = (1000 - 400 - 1000) / 1000 = -0.4 -> notional 1200 < 1600: not its bracket.
        # lower: s = (500 - 1000) / (2000 - 500) = -1/3 -> notional 1333.33 in [0, 1600); MM = 333.33 = equity.
        row = self.levels(self.crossing).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(-1 / 3, abs=1e-15)
        out = self.shock(self.crossing, -1 / 3)
        assert out["equity_after"] == pytest.approx(out["maintenance_margin"], abs=1e-9)

    def test_short_liquidation_price_is_above(self):
        # short 2000 on 1000: a rally grows the notional past 1600 into the 50% bracket:
        # 1000 - 2000 s = 2000 (1 + s) 0.5 - 400 -> s = 400 / 3000 (notional 2266.67 >= 1600); the 25% bracket
        # would give s = 500 / 2500 = 0.2 -> notional 2400, outside [0, 1600): rejected
        row = self.levels(self.crossing, w=(-1.0,)).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(2 / 15, abs=1e-15)
        assert row["liquidation_price_ratio"] == pytest.approx(17 / 15) and row["distance"] == pytest.approx(2 / 15)

    def test_whole_position_table_liquidates_a_growing_short_at_the_boundary(self):
        """OKX-style brackets (no deduction: the whole notional at its bracket's rate) make MM jump
        at 1000 from 100 to 950. A 900 short on 1000: below the boundary equity 1000 - 900 s stays far
        above 0.1 x 900 (1 + s); at s = 1/9 the notional is 1000 and MM 950 > equity 900: liquidated
        there, though neither bracket's line has a root inside its bracket."""
        whole = {"BTCUSDT": [Tier(0.0, 1000.0, 0.1, 10.0, 0.0), Tier(1000.0, np.inf, 0.95, 1.0, 0.0)]}
        row = self.levels(whole, w=(-1.0,), leverage=0.9).row(0, named=True)
        assert row["liquidation_move"] == pytest.approx(1 / 9, rel=1e-12)
        assert row["distance"] == pytest.approx(1 / 9, rel=1e-12)
        assert self.shock(whole, 1 / 9, w=-1.0, leverage=0.9)["liquidated"] is True
        assert self.shock(whole, 1 / 9 - 1e-9, w=-1.0, leverage=0.9)["liquidated"] is False

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
                    alone = stress_test(w, BOOK, {row["symbol"]: np.eye(3)[i]}, leverage=8.0, tiers=tiers,
                                        margin_mode=mode, buffer=0,
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
        long_ = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=3.0, tiers=tiers)
        short = stress_test(np.array([-1.0, 0, 0]), BOOK, ONES, scenarios=sc, leverage=3.0, tiers=tiers)
        assert long_["pnl_frac"][0] == pytest.approx(-0.045, abs=1e-15) and long_["shock"][0] == 0.005
        assert short["pnl_frac"][0] == pytest.approx(0.045, abs=1e-15)
        # notionals unchanged: BTC 150k and ETH 90k in their first brackets, SOL 60k in its second (cum 75)
        assert long_["maintenance_margin"][0] == pytest.approx(150_000 * 0.004 + 90_000 * 0.004
                                                               + 60_000 * 0.0065 - 75, abs=1e-9)

    def test_volatility_spike_on_hourly_bars(self, tiers):
        sc = [Scenario("v", kind="volatility", sigmas=3.0, vol_multiplier=2.0, hours=4)]
        vols = np.array([0.01, 0.02, 0.03])
        out = stress_test(np.array([0.5, -0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=1.0, tiers=tiers,
                          vols=vols, bar_hours=1)
        moves = 3 * 2 * vols * 2  # sqrt(4 h / 1 h) = 2
        assert out["pnl_frac"][0] == pytest.approx(-(0.5 * moves[0] + 0.3 * moves[1] + 0.2 * moves[2]), abs=1e-15)
        with pytest.raises(DataError, match="needs the per-bar volatility of BTCUSDT"):
            stress_test(np.array([0.5, -0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=1.0, tiers=tiers, bar_hours=1)
        with pytest.raises(ConfigError, match="needs bar_hours > 0"):
            stress_test(np.array([0.5, -0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=1.0, tiers=tiers, vols=vols)

    def test_volatility_spike_on_4h_bars_by_hand(self, tiers):
        """Regression: on 4 h bars the per-bar (4 h) sd was multiplied by sqrt(hours) again, so a 4 h
        3-sigma move came out 2x too large. By hand: sd per 4 h bar [2%, 3%, 5%], 3 sigmas x 2 over 4 h
        = one bar: moves 6 x [2%, 3%, 5%] = [12%, 18%, 30%] against a 0.5 long, 0.3 short, 0.2 long:
        pnl = -(0.06 + 0.054 + 0.06) = -0.174. Over 24 h (6 bars) the move is sqrt(6) times that."""
        vols = np.array([0.02, 0.03, 0.05])
        w = np.array([0.5, -0.3, 0.2])
        run = lambda hours, bar_hours, v: stress_test(  # noqa: E731
            w, BOOK, ONES, leverage=1.0, tiers=tiers, vols=v, bar_hours=bar_hours,
            scenarios=[Scenario("v", kind="volatility", sigmas=3.0, vol_multiplier=2.0, hours=hours)])["pnl_frac"][0]
        assert run(4, 4, vols) == pytest.approx(-0.174, abs=1e-15)
        assert run(24, 4, vols) == pytest.approx(-0.174 * np.sqrt(6), rel=1e-12)
        # the same random walk seen on 1 h bars has a quarter of the variance per bar: the same move
        assert run(4, 1, vols / 2) == pytest.approx(-0.174, abs=1e-15)

    def test_volatility_of_a_held_symbol_without_one_is_the_largest_held(self, tiers):
        sc = [Scenario("v", kind="volatility", sigmas=1.0, hours=1)]
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, ONES, scenarios=sc, leverage=1.0, tiers=tiers,
                          vols=np.array([0.01, np.nan, 0.03]), bar_hours=1).row(0, named=True)
        assert out["pnl_frac"] == pytest.approx(-(0.5 * 0.01 + 0.3 * 0.03 + 0.2 * 0.03), abs=1e-15)
        assert out["proxied"] == "ETHUSDT (largest held volatility)"

    def test_worst_bars_replay(self, tiers):
        ts = np.datetime64("2025-01-01T00", "us") + np.arange(5) * np.timedelta64(4, "h")
        r = np.array([[0.0, 0.0, 0.0], [-0.05, -0.04, np.nan], [0.01, 0.0, 0.0], [-0.02, -0.01, -0.12],
                      [np.nan, np.nan, np.nan]])
        replays = worst_bars(ts, r, BOOK, count=2, bar_hours=4, reference="BTCUSDT")
        assert [s.name for s in replays] == ["replay:2025-01-01T12:00Z/PT4H", "replay:2025-01-01T04:00Z/PT4H"]
        assert dict(replays[1].moves) == {"BTCUSDT": -0.05, "ETHUSDT": -0.04}
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, ONES, scenarios=replays[:1], leverage=2.0, tiers=tiers)
        assert out["pnl_frac"][0] == pytest.approx(2 * (0.5 * -0.02 + 0.3 * -0.01 + 0.2 * -0.12), abs=1e-15)
        assert out["proxied"][0] is None and out["reference"][0] == "BTCUSDT"

    def test_replay_proxies_a_held_symbol_without_a_move(self, tiers):
        """Regression: a replayed bar in which a held symbol had no bar (not listed yet, an outage)
        failed with "replay ... has no move for held symbol". Now it moves by its beta x the
        reference's move in that bar, or by the bar's mean move without one, and the row says so."""
        betas = {"BTCUSDT": np.array([1.0, 1.1, 1.5])}
        sol_missing = Scenario("r1", kind="replay", reference="BTCUSDT", moves=(("BTCUSDT", -0.05), ("ETHUSDT", -0.04)))
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, betas, scenarios=[sol_missing], leverage=1.0,
                          tiers=tiers).row(0, named=True)
        assert out["pnl_frac"] == pytest.approx(0.5 * -0.05 + 0.3 * -0.04 + 0.2 * (1.5 * -0.05), abs=1e-15)
        assert out["proxied"] == "SOLUSDT (beta x BTCUSDT)"
        btc_missing = Scenario("r2", kind="replay", reference="BTCUSDT", moves=(("ETHUSDT", -0.06), ("SOLUSDT", -0.02)))
        out = stress_test(np.array([0.5, 0.3, 0.2]), BOOK, betas, scenarios=[btc_missing], leverage=1.0,
                          tiers=tiers).row(0, named=True)
        assert out["pnl_frac"] == pytest.approx(0.5 * -0.04 + 0.3 * -0.06 + 0.2 * -0.02, abs=1e-15)  # mean -0.04
        assert out["proxied"] == "BTCUSDT (bar mean)"


class TestScenarioFile:
    def test_checked_in_file(self):
        scenarios, worst = load_scenarios(CONFIG, symbols=BOOK, reference="BTCUSDT")
        kinds = {s.name: s.kind for s in scenarios}
        assert kinds == {"btc_-5pct_1h": "price", "btc_-10pct_1h": "price", "all_-10pct": "price",
                         "funding_+0.5pct_8h_24h": "funding", "vol_x3_3sigma_1h": "volatility"}
        assert tuple(s for s in scenarios if s.kind == "price") == DEFAULT_SCENARIOS
        assert worst == 3

    def test_a_scenario_without_reference_shocks_the_stress_reference(self, tmp_path):
        path = tmp_path / "s.toml"
        path.write_text('[[scenario]]\nname = "a"\nshock = -0.1\n[[scenario]]\nname = "b"\nshock = -0.2\nreference = "all"\n')
        (a, b), _ = load_scenarios(path, symbols=BOOK, reference="SOLUSDT")
        assert (a.reference, b.reference) == ("SOLUSDT", JOINT)

    @pytest.mark.parametrize("body, message", [
        ('[[scenario]]\nname = "a"\nkind = "price"\n', r"missing \['shock'\]"),
        ('[[scenario]]\nname = "a"\nkind = "meteor"\nshock = 1\n', "kind must be one of"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\nshok = 2\n', r"unknown keys \['shok'\]"),
        ('[[scenario]]\nname = "a"\nshock = -1.5\n', "shock > -1"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\n[[scenario]]\nname = "a"\nshock = -0.2\n', "unique names"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\n[replay]\nworst_bars = -1\n', "worst_bars"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\n[replay]\nworst_hours = 3\n', "worst_hours was renamed"),
        ('[[scenario]]\nname = "a"\nshock = -0.1\nreference = "DOGEUSDT"\n',
         r"s.toml: scenario 'a': reference 'DOGEUSDT' is not a configured symbol \['BTCUSDT', 'ETHUSDT', 'SOLUSDT'\]"),
    ])
    def test_bad_files_name_the_problem(self, tmp_path, body, message):
        path = tmp_path / "s.toml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_scenarios(path, symbols=BOOK, reference="BTCUSDT")

    def test_an_unconfigured_stress_reference_is_named_as_such(self, tmp_path):
        path = tmp_path / "s.toml"
        path.write_text('[[scenario]]\nname = "a"\nshock = -0.1\n')
        with pytest.raises(ConfigError, match=r"'XRPUSDT' \(the stress reference, used where a scenario names none\)"):
            load_scenarios(path, symbols=BOOK, reference="XRPUSDT")


class TestSolverNoise:
    def test_noise_weights_are_no_position(self, tiers):
        """Regression (found by the range-vs-daily equivalence test): a 1e-10 weight left by the solver
        counted as a position, so the isolated margin ratio and the liquidation rows changed between
        runs that solved the same problem along different iterates."""
        clean, noisy = np.array([0.6, 0.4, 0.0]), np.array([0.6, 0.4 - 1e-10, 1e-10])
        for mode in ("cross", "isolated"):
            a = stress_test(clean, BOOK, ONES, leverage=5.0, tiers=tiers, margin_mode=mode)
            b = stress_test(noisy, BOOK, ONES, leverage=5.0, tiers=tiers, margin_mode=mode)
            assert a["margin_ratio"].to_list() == pytest.approx(b["margin_ratio"].to_list(), rel=1e-8)
            la = liquidation_levels(clean, BOOK, leverage=5.0, tiers=tiers, margin_mode=mode)
            lb = liquidation_levels(noisy, BOOK, leverage=5.0, tiers=tiers, margin_mode=mode)
            assert la["symbol"].to_list() == lb["symbol"].to_list() == ["BTCUSDT", "ETHUSDT"]


def test_fully_collateralized_longs_have_no_liquidation_price(tiers):
    """Regression: at leverage 1 in isolated margin each long is backed by its whole notional and
    is liquidated only at price 0. The root 1 + s* came out as 1.1e-16 or as no root depending on
    rounding, so the range-vs-daily equality test saw a number against a null. Ratios within 1e-9
    of 0 are no price."""
    w = np.array([0.6652300066862088, 0.021254131078561812, 0.31351586223522954])  # sums to exactly 1.0
    levels = liquidation_levels(w, BOOK, leverage=1.0, tiers=tiers, margin_mode="isolated")
    assert levels.height == 3
    assert levels["liquidation_price_ratio"].is_null().all() and levels["distance"].is_null().all()


def test_the_2025_golden_numbers_from_the_real_ccxt_file():
    """The numbers of the old packaged table (Binance, 2025-01-02) still come out when its source,
    the real ccxt-structure snapshot, is given as a tier file: 9x long BTC, -10%: MM of 810k in the
    third bracket = 810k x 0.65% - 950."""
    if not REAL_TIERS.exists():
        print(f"skipping: real leverage-tier snapshot not found at {REAL_TIERS}")
        pytest.skip(f"real leverage-tier snapshot not found at {REAL_TIERS}")
    old = load_tier_file(REAL_TIERS).tiers
    out = stress_test(np.array([1.0, 0, 0]), BOOK, ONES, scenarios=DEFAULT_SCENARIOS[1:2], leverage=9.0, tiers=old,
                      buffer=0.06)
    assert out["maintenance_margin"][0] == pytest.approx(810_000 * 0.0065 - 950, abs=1e-6)
    assert out["capital_sufficient"][0] is False  # 10k < 4315 + 6k

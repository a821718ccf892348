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
    load_leverage_tiers,
    maintenance_margin,
    rolling_betas,
    stress_test,
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
        assert row["liquidated"] is True
        assert row["capital_sufficient"] is True  # buffer 0: equity_after >= MM + 0

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

"""Tests of perpfolio.backtest against hand-worked numbers and an independent per-bar loop."""

import numpy as np
import polars as pl
import pytest

from perpfolio.backtest import baseline_weights, monthly_metrics, performance_metrics, rebalance_plan, simulate
from perpfolio.errors import ConfigError, DataError


@pytest.fixture
def rng():
    return np.random.default_rng(20250102)


def hourly(n: int) -> np.ndarray:
    return np.datetime64("2025-01-01T00", "us") + np.arange(n) * np.timedelta64(1, "h")


def per_bar_loop(r, f, reb, w, *, fee_bps, slippage_bps, lag_bars, e0=1.0):
    """Reference: the accounting written out bar by bar, one symbol at a time (plain Python)."""
    n_bars, n_sym = r.shape
    execute = {b + lag_bars: j for j, b in enumerate(reb) if b + lag_bars < n_bars}
    x, equity, rows = [0.0] * n_sym, e0, []
    for t in range(n_bars):
        price = sum(x[i] * r[t, i] for i in range(n_sym))
        funding = sum(x[i] * f[t, i] for i in range(n_sym))
        x = [x[i] * (1 + r[t, i]) for i in range(n_sym)]
        equity += price + funding
        traded = 0.0
        if t in execute:
            target = [w[execute[t], i] * equity for i in range(n_sym)]
            traded = sum(abs(target[i] - x[i]) for i in range(n_sym))
            x, equity = target, equity - (fee_bps + slippage_bps) / 1e4 * traded
        rows.append((equity, price, funding, fee_bps / 1e4 * traded, slippage_bps / 1e4 * traded,
                     sum(abs(v) for v in x) / equity))
    return np.array(rows)


class TestCompounding:
    def test_weight_one_rebalanced_every_bar_is_product_of_net_returns(self, rng):
        n = 500
        r = rng.normal(0, 0.01, (n, 1))
        f = rng.normal(-1e-5, 1e-5, (n, 1))
        out = simulate(hourly(n), r, f, np.arange(n), np.ones((n, 1)), fee_bps=0, slippage_bps=0, lag_bars=0)
        # Trade at the close of bar 0, so bar 0 is flat and bar t >= 1 earns 1 + r_t + f_t.
        expected = np.concatenate([[1.0], np.cumprod(1 + r[1:, 0] + f[1:, 0])])
        np.testing.assert_allclose(out["equity"].to_numpy(), expected, rtol=1e-12, atol=0)


class TestReconciliation:
    @pytest.fixture
    def case(self, rng):
        n, k = 24 * 10, 5
        r = rng.normal(0, 0.01, (n, k))
        f = rng.normal(0, 5e-5, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb)) * rng.choice([-1.0, 1.0], (len(reb), k)) * 2
        return r, f, reb, w

    def test_final_equity_is_initial_plus_components(self, case):
        r, f, reb, w = case
        out = simulate(hourly(len(r)), r, f, reb, w, fee_bps=5, slippage_bps=2, initial_equity=3.0)
        total = 3.0 + out["price_pnl"].sum() + out["funding_pnl"].sum() - out["fees"].sum() - out["slippage"].sum()
        assert abs(out["equity"][-1] - total) < 1e-9
        assert out["fees"].sum() > 0 and abs(out["funding_pnl"].sum()) > 0

    def test_matches_per_bar_loop(self, case):
        r, f, reb, w = case
        out = simulate(hourly(len(r)), r, f, reb, w, fee_bps=5, slippage_bps=2, lag_bars=1)
        ref = per_bar_loop(r, f, reb, w, fee_bps=5, slippage_bps=2, lag_bars=1)
        got = out.select("equity", "price_pnl", "funding_pnl", "fees", "slippage", "gross_leverage").to_numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


class TestHandWorked:
    """2 assets, 3 bars, lag 1, fee 10 bps, slippage 5 bps; every number computed below by hand."""

    r = np.array([[0.10, -0.05], [0.02, 0.04], [-0.10, 0.20]])
    f = np.array([[0.0, 0.0], [0.001, -0.002], [0.0005, 0.001]])

    def run(self):
        w = np.array([[0.5, 0.5], [1.0, -0.5]])
        return simulate(hourly(3), self.r, self.f, np.array([0, 1]), w, fee_bps=10, slippage_bps=5, lag_bars=1)

    def test_bar_by_bar(self):
        out = self.run()
        # bar 0: flat.  bar 1: still flat (asof-0 weights trade at bar 1's close): bar 1 returns unearned.
        # trade at close of bar 1: E_pre = 1, x* = [0.5, 0.5], traded 1.0
        fees1, slip1 = 0.001 * 1.0, 0.0005 * 1.0
        e1 = 1.0 - fees1 - slip1  # 0.9985
        # bar 2 earns [0.5, 0.5]
        price2 = 0.5 * -0.10 + 0.5 * 0.20  # 0.05
        fund2 = 0.5 * 0.0005 + 0.5 * 0.001  # 0.00075
        e_pre2 = e1 + price2 + fund2  # 1.04925
        drifted = np.array([0.5 * 0.9, 0.5 * 1.2])  # [0.45, 0.6]
        target = np.array([1.0, -0.5]) * e_pre2
        traded2 = abs(target[0] - 0.45) + abs(target[1] - 0.6)  # 0.59925 + 1.124625
        fees2, slip2 = 0.001 * traded2, 0.0005 * traded2
        e2 = e_pre2 - fees2 - slip2
        np.testing.assert_allclose(out["equity"].to_numpy(), [1.0, e1, e2], rtol=0, atol=1e-15)
        np.testing.assert_allclose(out["price_pnl"].to_numpy(), [0, 0, price2], atol=1e-15)
        np.testing.assert_allclose(out["funding_pnl"].to_numpy(), [0, 0, fund2], atol=1e-15)
        np.testing.assert_allclose(out["fees"].to_numpy(), [0, fees1, fees2], atol=1e-15)
        np.testing.assert_allclose(out["slippage"].to_numpy(), [0, slip1, slip2], atol=1e-15)
        np.testing.assert_allclose(out["turnover"].to_numpy(), [0, 1.0, traded2 / e_pre2], atol=1e-15)
        np.testing.assert_allclose(out["gross_leverage"].to_numpy(), [0, 1.0 / e1, 1.5 * e_pre2 / e2], atol=1e-14)
        np.testing.assert_allclose(out["drawdown"].to_numpy(), [0, e1 - 1.0, 0.0], atol=1e-15)
        assert abs(traded2 - 1.723875) < 1e-12 and abs(drifted.sum() - 1.05) < 1e-15
        assert out["ts"].dtype == pl.Datetime("us", "UTC")


class TestFundingAndFees:
    def test_short_receives_positive_funding(self):
        rate = np.array([0.0, 1e-4, 0.0, 3e-4])  # positive rates: longs pay shorts
        out = simulate(hourly(4), np.zeros((4, 1)), -rate[:, None], np.array([0]), np.array([[-1.0]]),
                       fee_bps=0, slippage_bps=0, lag_bars=0, initial_equity=2.0)
        np.testing.assert_allclose(out["funding_pnl"].to_numpy(), 2.0 * rate, atol=1e-18)
        assert out["equity"][-1] == pytest.approx(2.0 + 2.0 * 4e-4, abs=1e-15)

    def test_fees_on_traded_notional(self):
        # no price moves: positions x = w * E. Trade 1: 0 -> [0.6, -0.4]; trade 2: -> w2 * E1.
        w = np.array([[0.6, -0.4], [0.1, 0.3]])
        out = simulate(hourly(4), np.zeros((4, 2)), np.zeros((4, 2)), np.array([0, 2]), w,
                       fee_bps=20, slippage_bps=0, lag_bars=1)
        e1 = 1.0 - 0.002 * 1.0
        traded2 = abs(0.1 * e1 - 0.6) + abs(0.3 * e1 + 0.4)
        np.testing.assert_allclose(out["fees"].to_numpy(), [0, 0.002, 0, 0.002 * traded2], atol=1e-16)
        assert out["slippage"].sum() == 0.0

    def test_rebalance_executing_after_the_last_bar_is_not_traded(self):
        out = simulate(hourly(3), np.zeros((3, 1)), np.zeros((3, 1)), np.array([2]), np.array([[1.0]]), lag_bars=1)
        assert out["fees"].sum() == 0.0 and out["gross_leverage"].sum() == 0.0


class TestRuin:
    def test_ruined_account_closes_out_and_stops_trading(self):
        # 2x long, -60% bar: E = 1 - 1.2 = -0.2 <= 0, so the rebalances close the position (x* = 0),
        # pay costs on the closed notional 2 * 0.4 = 0.8, and never reopen.
        r = np.array([[0.0], [-0.6], [0.1], [0.2]])
        out = simulate(hourly(4), r, np.zeros((4, 1)), np.arange(4), np.full((4, 1), 2.0),
                       fee_bps=10, slippage_bps=0, lag_bars=0)
        e1 = 1.0 - 0.002 - 2.0 * 0.6  # costs of the first trade (2.0 notional), then the loss
        np.testing.assert_allclose(out["fees"].to_numpy(), [0.002, 0.001 * 2.0 * 0.4, 0, 0], atol=1e-15)
        np.testing.assert_allclose(out["equity"].to_numpy(), [0.998, e1 - 0.0008, e1 - 0.0008, e1 - 0.0008],
                                   atol=1e-15)
        with pytest.raises(DataError, match="equity reaches <= 0"):
            performance_metrics(out, periods_per_year=8760)


class TestMissingPrices:
    """Issue 12: a symbol without a price is carried (outage) or closed at its last price (delisting),
    never a crash and never a position held without a price."""

    def test_an_outage_is_carried_and_the_spanning_return_applies(self):
        # one long of 1.0 from the close of bar 0; bars 2-3 missing, bar 4 brings the move over the gap
        r = np.array([[0.0], [0.01], [np.nan], [np.nan], [0.05], [-0.02]])
        out = simulate(hourly(6), r, np.zeros((6, 1)), np.array([0]), np.array([[1.0]]), fee_bps=0, slippage_bps=0,
                       lag_bars=0)
        expected = np.cumprod([1.0, 1.01, 1.0, 1.0, 1.05, 0.98])
        np.testing.assert_allclose(out["equity"].to_numpy(), expected, rtol=1e-14)
        assert out["delisting_closes"].sum() == 0 and out["untraded"].sum() == 0

    def test_a_delisted_position_is_closed_at_its_last_price_with_costs(self):
        n = 40
        r = np.full((n, 2), 0.001)
        r[11:, 1] = np.nan  # ETH's last bar is 10, 29 bars before the end: delisted
        w = np.array([[0.5, 0.5]])
        out = simulate(hourly(n), r, np.zeros((n, 2)), np.array([0]), w, fee_bps=10, slippage_bps=0, lag_bars=0,
                       symbols=["BTCUSDT", "ETHUSDT"], delisted_after=24)
        # by hand: 0.5 of the pre-trade equity (1.0) in each, 0.001 of fees; ETH drifts 10 bars, then is
        # sold at bar 10's close paying 10 bps on its drifted notional; BTC drifts to the end
        eth_at_close = 0.5 * 1.001**10
        fees = out["fees"].to_numpy()
        assert fees[10] == pytest.approx(0.001 * eth_at_close, rel=1e-12)
        assert out["delisting_closes"].to_list() == [0] * 10 + [1] + [0] * (n - 11)
        btc_final = 0.5 * 1.001 ** (n - 1)
        pnl = (btc_final - 0.5) + (eth_at_close - 0.5)
        assert out["equity"][-1] == pytest.approx(1.0 - 0.001 + pnl - 0.001 * eth_at_close, rel=1e-12)
        assert out["gross_leverage"][-1] == pytest.approx(btc_final / out["equity"][-1], rel=1e-12)

    def test_a_short_silence_at_the_end_is_an_outage_in_progress(self):
        r = np.full((30, 1), 0.001)
        r[25:, 0] = np.nan  # last bar 24, 5 bars before the end: carried at its last price, not closed
        out = simulate(hourly(30), r, np.zeros((30, 1)), np.array([0]), np.array([[1.0]]), fee_bps=10,
                       slippage_bps=0, lag_bars=0, delisted_after=24)
        assert out["delisting_closes"].sum() == 0 and out["fees"][1:].sum() == 0
        assert out["gross_leverage"][-1] > 0.99

    def test_an_execution_without_a_price_keeps_the_drifted_position(self):
        r = np.array([[0.0, 0.0], [0.02, 0.0], [np.nan, 0.01], [0.03, 0.0], [0.0, 0.0]])
        # asof 1 asks to leave symbol 0, but bar 2 (its execution with lag 1) has no price for it
        out = simulate(hourly(5), r, np.zeros((5, 2)), np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]),
                       fee_bps=0, slippage_bps=0, lag_bars=1)
        assert out["untraded"].to_list() == [0, 0, 1, 0, 0]
        x0 = 1.0  # symbol 0 bought at bar 1's close (equity 1.0), not sold at bar 2 (no price), held through bar 3
        assert out["price_pnl"][3] == pytest.approx(x0 * 0.03, rel=1e-12)

    def test_nan_funding_on_a_priced_bar_names_bar_and_symbol(self):
        f = np.zeros((5, 2))
        f[3, 1] = np.nan
        with pytest.raises(DataError, match=r"funding_return is NaN at bar 3 .*'ETHUSDT'"):
            simulate(hourly(5), np.zeros((5, 2)), f, np.array([0]), np.array([[0.5, 0.5]]),
                     symbols=["BTCUSDT", "ETHUSDT"])

    def test_nan_in_unheld_symbol_is_ignored(self, rng):
        r = rng.normal(0, 0.01, (6, 2))
        f = np.zeros((6, 2))
        r[4, 1] = np.nan
        w = np.array([[1.0, 0.0]])
        both = simulate(hourly(6), r, f, np.array([1]), w)
        alone = simulate(hourly(6), r[:, :1], f[:, :1], np.array([1]), w[:, :1])
        np.testing.assert_allclose(both["equity"].to_numpy(), alone["equity"].to_numpy(), rtol=0, atol=0)

    def test_nan_before_the_first_trade_is_ignored(self):
        r = np.zeros((4, 1))
        r[1, 0] = np.nan  # bar 1 is flat: asof 0 trades at bar 1's close
        out = simulate(hourly(4), r, np.zeros((4, 1)), np.array([0]), np.array([[1.0]]))
        assert out["equity"].is_finite().all()


class TestValidation:
    def test_rebalance_bars_must_ascend(self):
        with pytest.raises(DataError, match="rebalance_bars must be strictly ascending"):
            simulate(hourly(4), np.zeros((4, 1)), np.zeros((4, 1)), np.array([2, 1]), np.ones((2, 1)))

    def test_weights_shape(self):
        with pytest.raises(DataError, match=r"target_weights shape \(1, 2\) != \(1, 1\)"):
            simulate(hourly(4), np.zeros((4, 1)), np.zeros((4, 1)), np.array([0]), np.ones((1, 2)))

    def test_nan_weight(self):
        with pytest.raises(DataError, match=r"target_weights\[0\] for column 0 is nan"):
            simulate(hourly(4), np.zeros((4, 1)), np.zeros((4, 1)), np.array([0]), np.array([[np.nan]]))


class TestDrawdown:
    def test_known_path(self):
        r = np.array([[0.0], [0.1], [-0.1], [0.5], [-0.5]])
        out = simulate(hourly(5), r, np.zeros((5, 1)), np.arange(5), np.ones((5, 1)),
                       fee_bps=0, slippage_bps=0, lag_bars=0)
        np.testing.assert_allclose(out["equity"].to_numpy(), [1.0, 1.1, 0.99, 1.485, 0.7425], rtol=1e-15)
        np.testing.assert_allclose(out["drawdown"].to_numpy(), [0.0, 0.0, -0.1, 0.0, -0.5], atol=1e-15)
        assert performance_metrics(out, periods_per_year=8760)["max_drawdown"] == pytest.approx(0.5, abs=1e-15)

    def test_first_bar_loss_counts_against_initial_equity(self):
        r = np.array([[0.0], [-0.2]])
        out = simulate(hourly(2), r, np.zeros((2, 1)), np.array([0]), np.ones((1, 1)),
                       fee_bps=0, slippage_bps=0, lag_bars=0)
        assert out["drawdown"].to_list() == pytest.approx([0.0, -0.2], abs=1e-15)


class TestMetrics:
    def test_against_numpy_formulas(self, rng):
        n, ppy, e0 = 400, 8760.0, 2.0
        ret = rng.normal(2e-4, 0.01, n)
        path = e0 * np.cumprod(1 + ret)
        pnl = np.diff(np.concatenate([[e0], path]))
        turnover = np.where(np.arange(n) % 24 == 0, 0.3, 0.0)
        fees = 0.0005 * turnover
        gross = rng.uniform(0.5, 2.0, n)
        funding = np.full(n, 1e-5)
        price = pnl - funding + 1.5 * fees  # so that price + funding - fees - slippage = pnl
        frame = pl.DataFrame({"ts": hourly(n), "equity": path, "pnl": pnl, "price_pnl": price,
                              "funding_pnl": funding, "fees": fees, "slippage": fees / 2,
                              "turnover": turnover, "gross_leverage": gross})
        m = performance_metrics(frame, periods_per_year=ppy)

        full = np.concatenate([[e0], path])
        worst_drop = max(1 - full[j] / full[: j + 1].max() for j in range(n + 1))
        traded = turnover * (path + fees + fees / 2)
        underwater, longest = 0, 0
        for j in range(1, n + 1):  # bars below the running peak (start included in the peak)
            underwater = underwater + 1 if full[j] < full[: j + 1].max() else 0
            longest = max(longest, underwater)
        day_ends = [e0] + [path[d * 24 + 23] for d in range(n // 24)] + ([path[-1]] if n % 24 else [])
        expected = {
            "total_return": path[-1] / e0 - 1,
            "max_drawdown_duration_h": float(longest),
            "max_loss_day": -min(b / a - 1 for a, b in zip(day_ends[:-1], day_ends[1:])),
            "cvar_99": -np.sort(ret)[:4].mean(),
            "fees": fees.sum(),
            "slippage": fees.sum() / 2,
            "avg_gross_leverage": gross.mean(),
            "max_gross_leverage": gross.max(),
            "ret_price": price.sum() / e0,
            "ret_funding": n * 1e-5 / e0,
            "ret_costs": -1.5 * fees.sum() / e0,
            "ret_interest": 0.0,  # the frame has no interest column: cash earns nothing
            "stops": 0.0,
            "delisting_closes": 0.0,
            "avg_sizing_leverage": 1.0,  # no sizing columns: the weights ran as given
            "avg_cash_fraction": 0.0,
            "sharpe": ret.mean() / ret.std(ddof=1) * np.sqrt(ppy),
            "sortino": ret.mean() / np.sqrt(np.mean(np.minimum(ret, 0) ** 2)) * np.sqrt(ppy),
            "ann_return": np.prod(1 + ret) ** (ppy / n) - 1,
            "ann_vol": ret.std(ddof=1) * np.sqrt(ppy),
            "max_drawdown": worst_drop,
            "max_loss": -ret.min(),
            "turnover": traded.sum() / path.mean() * ppy / n,
            "cvar_95": -np.sort(ret)[:20].mean(),
            "funding_pnl": n * 1e-5,
            "costs": 1.5 * fees.sum(),
        }
        assert set(m) == set(expected)
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
        assert m["ret_price"] + m["ret_funding"] + m["ret_costs"] == pytest.approx(m["total_return"], abs=1e-12)
        assert longest > 24 and m["cvar_99"] > m["cvar_95"] > 0

    def test_turnover_round_trip_through_simulate(self):
        # constant prices, weight 1 then 0 then 1 with cost rate c: buy 1 (E -> 1 - c), sell the
        # position of 1 (E -> 1 - 2c), buy 1 - 2c: traded notional = 1 + 1 + (1 - 2c)
        out = simulate(hourly(6), np.zeros((6, 1)), np.zeros((6, 1)), np.array([0, 2, 4]),
                       np.array([[1.0], [0.0], [1.0]]), fee_bps=10, slippage_bps=0, lag_bars=0)
        c = 0.001
        traded = 1 + 1 + (1 - 2 * c)
        m = performance_metrics(out, periods_per_year=8760)
        assert m["turnover"] == pytest.approx(traded / out["equity"].mean() * 8760 / 6, rel=1e-12)
        assert m["costs"] == pytest.approx(c * traded, rel=1e-12)

    def test_rejects_multiple_strategies_in_one_frame(self):
        one = simulate(hourly(3), np.zeros((3, 1)), np.zeros((3, 1)), np.array([0]), np.ones((1, 1)))
        with pytest.raises(DataError, match="strictly increasing"):
            performance_metrics(pl.concat([one, one]), periods_per_year=8760)


class TestStopLoss:
    """Hand-worked stop-loss: 2 symbols, lag 0, cost 10 bps, stop at 10% against the position."""

    r = np.array([[0.0, 0.0], [-0.06, 0.05], [-0.05, 0.04], [0.50, -0.20], [0.0, 0.0]])
    f = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, -0.001], [0.0, 0.0], [0.0, 0.0]])

    def run(self, stop, reb=np.array([0])):
        w = np.tile([[0.5, -0.5]], (len(reb), 1))
        return simulate(hourly(5), self.r, self.f, reb, w, fee_bps=10, slippage_bps=0, lag_bars=0, stop_loss=stop)

    def test_long_stopped_short_kept(self):
        out = self.run(0.10)
        c = 0.001
        e0 = 1.0 - c * 1.0  # buy 0.5, sell 0.5 at the close of bar 0
        x = np.array([0.5, -0.5]) * 1.0
        # bar 1: long -6% (not yet -10%), short loses 5% of 0.5
        e1 = e0 + x @ self.r[1]
        x1 = x * (1 + self.r[1])  # [0.47, -0.525]
        # bar 2: long cumulative 0.94 * 0.95 - 1 = -10.7% <= -10%: stopped at the close; it still earns bar 2
        pnl2 = x1 @ self.r[2] + x1 @ self.f[2]
        closed = abs(x1[0] * (1 + self.r[2, 0]))  # 0.4465
        e2 = e1 + pnl2 - c * closed
        x2 = np.array([0.0, x1[1] * (1 + self.r[2, 1])])
        # bar 3: only the short is held: loses nothing on the long's +50%
        e3 = e2 + x2 @ self.r[3]
        np.testing.assert_allclose(out["equity"].to_numpy(), [e0, e1, e2, e3, e3], rtol=0, atol=1e-15)
        np.testing.assert_allclose(out["fees"].to_numpy(), [c, 0, c * closed, 0, 0], atol=1e-16)
        assert out["stops"].to_list() == [0, 0, 1, 0, 0]
        assert out["gross_leverage"][3] == pytest.approx(abs(x2[1] * 0.8) / e3, rel=1e-14)
        assert out["turnover"][2] == pytest.approx(closed / (e2 + c * closed), rel=1e-14)
        total = 1.0 + out["price_pnl"].sum() + out["funding_pnl"].sum() - out["fees"].sum() - out["slippage"].sum()
        assert abs(out["equity"][-1] - total) < 1e-12

    def test_short_stopped_by_a_rally(self):
        out = self.run(0.08)  # short: +5% then 1.05 * 1.04 - 1 = +9.2% >= 8% at bar 2; long -10.7% too
        assert out["stops"].to_list() == [0, 0, 2, 0, 0]
        assert out["gross_leverage"][3] == 0.0 and out["price_pnl"][3] == 0.0

    def test_off_by_default_and_reopened_at_the_next_rebalance(self):
        assert self.run(None)["stops"].sum() == 0
        out = self.run(0.10, reb=np.array([0, 3]))
        assert out["stops"].to_list() == [0, 0, 1, 0, 0]
        assert out["gross_leverage"][3] == pytest.approx(1.0 * (out["equity"][3] + out["fees"][3]) / out["equity"][3])

    def test_stop_at_the_next_execution_bar_is_left_to_the_rebalance(self):
        out = self.run(0.10, reb=np.array([0, 2]))  # the long crosses -10% at bar 2 = the next execution
        assert out["stops"].sum() == 0

    def test_invalid_stop(self):
        with pytest.raises(DataError, match="stop_loss must be in"):
            self.run(1.5)


class TestRebalancePlan:
    bars = np.array([23, 47, 71, 95, 119, 143, 167, 191, 215])
    w = np.arange(9, dtype=float)[:, None] * np.ones((1, 2))

    def test_daily_is_identity(self):
        reb, w = rebalance_plan(self.bars, self.w, n_bars=240, frequency="daily")
        assert reb.tolist() == self.bars.tolist() and np.array_equal(w, self.w)

    def test_weekly_every_seventh_decision(self):
        reb, w = rebalance_plan(self.bars, self.w, n_bars=240, frequency="weekly")
        assert reb.tolist() == [23, 191] and w[:, 0].tolist() == [0.0, 7.0]

    def test_hourly_holds_the_latest_decision(self):
        reb, w = rebalance_plan(self.bars, self.w, n_bars=240, frequency="hourly")
        assert reb.tolist() == list(range(23, 240))
        assert w[0, 0] == 0 and w[23, 0] == 0 and w[24, 0] == 1 and w[-1, 0] == 8

    def test_hourly_rebalancing_of_constant_weights_matches_per_bar_loop(self, rng):
        r, f = rng.normal(0, 0.01, (96, 3)), np.zeros((96, 3))
        reb, w = rebalance_plan(np.array([23, 47]), np.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]), n_bars=96,
                                frequency="hourly")
        out = simulate(hourly(96), r, f, reb, w, fee_bps=5, slippage_bps=2, lag_bars=1)
        ref = per_bar_loop(r, f, reb, w, fee_bps=5, slippage_bps=2, lag_bars=1)
        np.testing.assert_allclose(out["equity"].to_numpy(), ref[:, 0], rtol=1e-12)

    def test_unknown_frequency(self):
        with pytest.raises(ConfigError, match="hourly, daily, weekly or adaptive"):
            rebalance_plan(self.bars, self.w, n_bars=240, frequency="monthly")


class TestBaselines:
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]

    def test_rows(self):
        assert baseline_weights("equal_weight", self.symbols, 2).tolist() == [[1 / 3] * 3] * 2
        assert baseline_weights("btc_only", self.symbols, 1).tolist() == [[1.0, 0.0, 0.0]]
        got = baseline_weights("static", self.symbols, 1, static={"SOLUSDT": 0.2, "BTCUSDT": 0.8})
        assert got.tolist() == [[0.8, 0.0, 0.2]]

    def test_errors_name_the_cause(self):
        with pytest.raises(ConfigError, match="BTCUSDT is not among"):
            baseline_weights("btc_only", ["ETHUSDT"], 1)
        with pytest.raises(ConfigError, match=r"weights for \['XRPUSDT'\]"):
            baseline_weights("static", self.symbols, 1, static={"XRPUSDT": 1.0})
        with pytest.raises(ConfigError, match="unknown baseline 'nope'"):
            baseline_weights("nope", self.symbols, 1)


class TestMonthly:
    def test_months_chain_and_attribution_adds_up(self, rng):
        n = 24 * 70  # Jan 1 .. Mar 11
        r = rng.normal(0, 0.01, (n, 2))
        f = rng.normal(0, 1e-4, (n, 2))
        out = simulate(hourly(n), r, f, np.arange(23, n, 24), np.tile([[0.7, 0.5]], (70, 1)))
        months = monthly_metrics(out)
        assert [str(m) for m in months["month"]] == ["2025-01-01", "2025-02-01", "2025-03-01"]
        growth = np.prod(1 + months["total_return"].to_numpy())
        assert growth == pytest.approx(out["equity"][-1], rel=1e-12)
        parts = months.select(pl.sum_horizontal("ret_price", "ret_funding", "ret_costs", "ret_interest"))
        np.testing.assert_allclose(parts.to_series().to_numpy(), months["total_return"].to_numpy(), atol=1e-13)
        feb = out.filter(pl.col("ts").dt.month() == 2)
        e0 = feb["equity"][0] - feb["pnl"][0]
        path = np.concatenate([[e0], feb["equity"].to_numpy()])
        assert months["max_loss"][1] == pytest.approx(-(path[1:] / path[:-1] - 1).min(), rel=1e-12)


class TestCompare:
    def test_by_hand(self):
        from perpfolio.backtest import compare
        metrics = pl.DataFrame({"strategy": ["a", "baseline:equal_weight"], "total_return": [0.10, 0.04],
                                "sharpe": [0.5, 1.5], "max_drawdown": [0.1, 0.2], "max_loss_day": [0.03, 0.05],
                                "cvar_99": [0.01, 0.02]})
        rows = []
        for s, lev, mode, sc, eq, liq, ok in [
            ("a", 1.0, "cross", "x", 0.95, False, True), ("a", 1.0, "cross", "y", 0.90, False, True),
            ("a", 1.0, "isolated", "y", 0.50, False, True), ("a", 5.0, "cross", "y", 0.40, False, True),
            ("a", 5.0, "isolated", "y", 0.30, True, False),
            ("baseline:equal_weight", 1.0, "cross", "x", 0.80, False, True),
            ("baseline:equal_weight", 5.0, "cross", "x", 0.10, False, True),
            ("baseline:equal_weight", 5.0, "isolated", "x", 0.10, False, True),
        ]:
            rows.append({"strategy": s, "leverage": lev, "margin_mode": mode, "scenario": sc, "equity_after": eq,
                         "liquidated": liq, "capital_sufficient": ok, "account_usdt": 25_000.0})
        out = compare(metrics, pl.DataFrame(rows))
        assert out["account_usdt"].to_list() == [25_000.0, 25_000.0]  # the account max_safe_leverage assumes
        assert out["strategy"].to_list() == ["baseline:equal_weight", "a"]
        a = out.row(1, named=True)
        assert (a["kind"], a["rank"], a["worst_scenario"], a["worst_equity_after"]) == ("strategy", 2, "y", 0.90)
        assert a["excess_vs_equal_weight"] == pytest.approx(0.06, abs=1e-15)
        assert (a["liquidations"], a["max_safe_leverage"]) == (1, 1.0)
        b = out.row(0, named=True)
        assert (b["kind"], b["max_safe_leverage"], b["liquidations"], b["excess_vs_equal_weight"]) == (
            "baseline", 5.0, 0, 0.0)


def test_compare_ranks_equal_sharpe_by_name():
    """Regression: two books with the same Sharpe got ranks in input order, so a rerun that read the
    metrics back in another order stored a different backtest.comparison."""
    from perpfolio.backtest import compare
    base = {"total_return": 0.1, "sharpe": 1.0, "max_drawdown": 0.1, "max_loss_day": 0.01, "cvar_99": 0.01}
    stress = pl.DataFrame({"strategy": ["b", "a"], "scenario": ["x", "x"], "leverage": [1.0, 1.0],
                           "margin_mode": ["cross", "cross"], "equity_after": [0.9, 0.9], "liquidated": [False] * 2,
                           "capital_sufficient": [True] * 2, "account_usdt": [1e5] * 2})
    for order in (["a", "b"], ["b", "a"]):
        out = compare(pl.DataFrame([{"strategy": s, **base} for s in order]), stress)
        assert dict(out.select("strategy", "rank").iter_rows()) == {"a": 1, "b": 2}


class TestAdaptiveRebalancing:
    def test_calm_trades_every_decision_and_turbulence_every_seventh(self):
        bars = np.arange(20) * 24
        w = np.arange(20, dtype=float)[:, None] * np.ones((1, 2))
        turbulent = np.array([False] * 3 + [True] * 12 + [False] * 5)
        got_bars, got_w = rebalance_plan(bars, w, n_bars=500, frequency="adaptive", turbulent=turbulent)
        # calm 0,1,2; turbulent from 3: last trade was 2, so 9 (2 + 7) trades, then nothing until calm at 15
        assert (got_bars // 24).tolist() == [0, 1, 2, 9, 15, 16, 17, 18, 19]
        np.testing.assert_array_equal(got_w[:, 0], [0, 1, 2, 9, 15, 16, 17, 18, 19])

    def test_first_decision_trades_even_when_turbulent_and_flags_are_required(self):
        bars, w = np.arange(3) * 24, np.ones((3, 1))
        got, _ = rebalance_plan(bars, w, n_bars=100, frequency="adaptive", turbulent=np.array([True, True, True]))
        assert got.tolist() == [0]
        with pytest.raises(DataError, match="adaptive needs one regime flag per decision"):
            rebalance_plan(bars, w, n_bars=100, frequency="adaptive")


class TestSlippageScale:
    """Slippage scaled per rebalance and symbol (e.g. by volatility)."""

    def test_unit_scale_is_the_default(self, rng):
        r, f = rng.normal(0, 0.01, (96, 3)), rng.normal(0, 5e-5, (96, 3))
        reb, w = np.array([23, 47, 71]), rng.dirichlet(np.ones(3), 3)
        plain = simulate(hourly(96), r, f, reb, w, stop_loss=0.02)
        ones = simulate(hourly(96), r, f, reb, w, stop_loss=0.02, slippage_scale=np.ones((3, 3)))
        assert plain.equals(ones)

    def test_hand_worked_first_trade(self):
        """From flat at equity 1: trade 0.6 and 0.4 at the close of bar 1 (lag 1); slippage
        2 bps x (3 x 0.6 + 1 x 0.4) = 2e-4 x 2.2 = 4.4e-4, fees 5 bps x 1.0 = 5e-4."""
        r, f = np.zeros((4, 2)), np.zeros((4, 2))
        out = simulate(hourly(4), r, f, np.array([0]), np.array([[0.6, 0.4]]), fee_bps=5, slippage_bps=2,
                       slippage_scale=np.array([[3.0, 1.0]]))
        assert out["slippage"].to_list() == pytest.approx([0.0, 4.4e-4, 0.0, 0.0], abs=1e-15)
        assert out["fees"][1] == pytest.approx(5e-4, abs=1e-15)
        assert out["equity"][-1] == pytest.approx(1.0 - 5e-4 - 4.4e-4, abs=1e-15)

    def test_reconciles_with_stops_and_scales(self, rng):
        n, k = 24 * 8, 4
        r, f = rng.normal(0, 0.012, (n, k)), rng.normal(0, 5e-5, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb)) * rng.choice([-1.0, 1.0], (len(reb), k))
        scale = rng.uniform(0.5, 4.0, w.shape)
        out = simulate(hourly(n), r, f, reb, w, fee_bps=5, slippage_bps=3, stop_loss=0.015, slippage_scale=scale)
        total = 1.0 + out["price_pnl"].sum() + out["funding_pnl"].sum() - out["fees"].sum() - out["slippage"].sum()
        assert abs(out["equity"][-1] - total) < 1e-9
        assert out["stops"].sum() > 0  # the stop path is exercised
        plain = simulate(hourly(n), r, f, reb, w, fee_bps=5, slippage_bps=3, stop_loss=0.015)
        assert out["slippage"].sum() > plain["slippage"].sum()  # mean scale 2.25 > 1

    def test_bad_scale_is_refused(self):
        with pytest.raises(DataError, match="slippage_scale must be \\(1, 2\\) finite positive"):
            simulate(hourly(3), np.zeros((3, 2)), np.zeros((3, 2)), np.array([0]), np.array([[0.5, 0.5]]),
                     slippage_scale=np.array([[1.0, -1.0]]))


class TestCashRate:
    """Equity earns c per bar: E_t = E_{t-1} (1 + c) + trading pnl_t."""

    def test_flat_book_compounds_exactly(self):
        out = simulate(hourly(48), np.zeros((48, 2)), np.zeros((48, 2)), np.array([0]),
                       np.array([[0.0, 0.0]]), cash_rate_per_bar=1e-4)
        assert out["equity"][-1] == pytest.approx(1.0001 ** 48, rel=1e-14)
        assert out["interest"][0] == pytest.approx(1e-4, rel=1e-14)

    def test_matches_a_per_bar_recursion_and_reconciles(self, rng):
        n, k, c = 24 * 6, 3, 2e-5
        r, f = rng.normal(0, 0.01, (n, k)), rng.normal(0, 5e-5, (n, k))
        reb = np.arange(23, n, 24)
        w = rng.dirichlet(np.ones(k), len(reb))
        out = simulate(hourly(n), r, f, reb, w, fee_bps=5, slippage_bps=2, cash_rate_per_bar=c, stop_loss=0.02)
        trading = (out["price_pnl"] + out["funding_pnl"] - out["fees"] - out["slippage"]).to_numpy()
        e = 1.0
        for t in range(n):  # the recursion, bar by bar
            e = e * (1 + c) + trading[t]
            assert out["equity"][t] == pytest.approx(e, rel=1e-12)
        total = 1.0 + out["interest"].sum() + trading.sum()
        assert out["equity"][-1] == pytest.approx(total, abs=1e-12)
        m = performance_metrics(out, periods_per_year=8760)
        parts = m["ret_price"] + m["ret_funding"] + m["ret_costs"] + m["ret_interest"]
        assert parts == pytest.approx(m["total_return"], abs=1e-12) and m["ret_interest"] > 0

    def test_zero_rate_is_the_default(self, rng):
        out = simulate(hourly(72), rng.normal(0, 0.01, (72, 2)), np.zeros((72, 2)), np.array([10, 40]),
                       rng.dirichlet(np.ones(2), 2))
        assert (out["interest"] == 0).all()

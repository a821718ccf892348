"""The point-in-time universe (issue 12): who is in at each asof and why, estimates on the members'
complete bars, optimization on the members only, universe-aware baselines."""

import re
import tomllib
from datetime import UTC, datetime

import duckdb
import numpy as np
import pandera.errors
import polars as pl
import pytest
from sklearn.covariance import OAS, LedoitWolf

from assets import schemas
from assets.schemas import conform
from perpfolio.backtest import baseline_weights
from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import age_weights, moments_from_rows, moments_to_rows, rolling_estimates
from perpfolio.optimize import AsofInputs, parse_strategies
from perpfolio.optimize.walk_forward import optimize_walk_forward
from perpfolio.universe import complete_rows, members_at, point_in_time_universe, universe_frame

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "OPUSDT"]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12)


def market(rng, t=60, n=4):
    """One-bar returns and presence of a clean market (every symbol has every bar)."""
    r = rng.normal(0.0, 0.01, (t, n))
    return r, np.ones((t, n), dtype=bool)


class TestMembership:
    def test_each_reason_by_hand(self, rng):
        r, present = market(rng)
        window = 10
        # ETH: listed at row 35 (no bar before): not_listed before, insufficient_history until its window is covered
        r[:35, 1], present[:35, 1] = np.nan, False
        # SOL: a 3-bar outage at rows 20..22 (no bar), then the return spanning it at 23 (a bar, not one bar's return)
        r[20:24, 2], present[20:23, 2] = np.nan, False
        # OP: delisted after row 40
        r[41:, 3], present[41:, 3] = np.nan, False
        u = point_in_time_universe(r, present, np.array([5, 21, 25, 40, 44, 45, 50]), window=window, max_missing=2)
        assert u.reason[:, 0].tolist() == ["insufficient_history"] + ["in"] * 6
        assert u.reason[:, 1].tolist() == ["not_listed"] * 3 + ["insufficient_history", "in", "in", "in"]
        # row 21: no bar at the asof; row 25: 4 bars of the window lack a one-bar return (> 2 allowed)
        assert u.reason[:, 2].tolist() == ["insufficient_history", "no_price_at_asof", "too_many_missing",
                                           "in", "in", "in", "in"]
        assert u.bars_missing[2, 2] == 4 and u.bars_missing[4, 2] == 0
        assert u.reason[:, 3].tolist() == ["insufficient_history", "in", "in", "in", "no_price_at_asof",
                                           "no_price_at_asof", "no_price_at_asof"]
        np.testing.assert_array_equal(u.member, u.reason == "in")

    def test_a_stale_feed_is_out_and_re_enters_when_it_moves_again(self, rng):
        r, present = market(rng, t=40)
        r[10:25, 1] = 0.0  # a constant price: every one-bar return is 0
        u = point_in_time_universe(r, present, np.array([20, 24, 25, 34]), window=10, max_missing=0)
        assert u.reason[:, 1].tolist() == ["constant_price", "constant_price", "in", "in"]

    def test_joint_missing_drops_the_member_with_most_missing_bars(self, rng):
        r, present = market(rng, t=30, n=3)
        r[20:22, 0] = np.nan  # 2 missing one-bar returns (e.g. spanning returns) each, at different bars
        r[24:26, 1] = np.nan
        r[27, 2] = np.nan
        u = point_in_time_universe(r, present, np.array([29]), window=10, max_missing=2)
        # alone each is within 2, together 5 rows are incomplete: drop the worst (first of the ties) until <= 2
        assert u.reason[0].tolist() == ["joint_missing", "joint_missing", "in"]
        assert complete_rows(np.isfinite(r), u.member[0], 20, 29).size >= 8

    def test_no_look_ahead(self, rng):
        r, present = market(rng, t=50)
        ends = np.array([20, 30])
        before = point_in_time_universe(r, present, ends, window=10, max_missing=1)
        r2, p2 = r.copy(), present.copy()
        r2[31:, 1], p2[31:, 1] = np.nan, False  # the future changes completely
        after = point_in_time_universe(r2, p2, ends, window=10, max_missing=1)
        np.testing.assert_array_equal(before.reason, after.reason)

    def test_bad_arguments(self, rng):
        r, present = market(rng)
        with pytest.raises(ConfigError, match="max_missing must be an integer in"):
            point_in_time_universe(r, present, np.array([30]), window=10, max_missing=9)
        p = present.copy()
        p[3, 1] = False
        with pytest.raises(DataError, match="a return at row 3, column 1 where the symbol has no bar"):
            point_in_time_universe(r, p, np.array([30]), window=10, max_missing=0)

    def test_frame_round_trip(self, rng):
        r, present = market(rng)
        r[:30, 1], present[:30, 1] = np.nan, False
        asofs = np.array(["2025-01-02T23:00", "2025-01-03T23:00"], dtype="datetime64[us]")
        u = point_in_time_universe(r, present, np.array([35, 59]), window=10, max_missing=0)
        frame = universe_frame(asofs, SYMBOLS, u, window=10)
        assert frame.height == 8 and frame["reason"].to_list()[:4] == ["in", "insufficient_history", "in", "in"]
        np.testing.assert_array_equal(members_at(frame, asofs, SYMBOLS), u.member)
        with pytest.raises(DataError, match="features.universe has no row for symbol OPUSDT"):
            members_at(frame.filter(pl.col("symbol") != "OPUSDT"), asofs, SYMBOLS)


class TestEstimatesOnTheMembers:
    def test_equal_numpy_and_sklearn_on_the_complete_rows(self, rng):
        r = rng.normal(0.0, 0.01, (80, 4)) * np.array([1.0, 2.0, 0.5, 1.5])
        r[:50, 3] = np.nan  # not a member (listed late)
        r[70, 1] = np.nan  # one incomplete row of a member
        members = np.array([[True, True, True, False]])
        ends = np.array([79])
        est = rolling_estimates(r, ends, window=20, members=members, max_missing=2, half_life=5.0)
        rows = np.setdiff1d(np.arange(60, 80), [70])
        x = r[rows][:, :3]
        sample = est["sample"]
        assert sample.status.tolist() == ["ok"] and sample.n_obs.tolist() == [19]
        np.testing.assert_allclose(sample.mean[0, :3], x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sample.cov[0, :3, :3], np.cov(x, rowvar=False, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(est["ledoit_wolf"].cov[0, :3, :3], LedoitWolf().fit(x).covariance_, rtol=1e-10)
        np.testing.assert_allclose(est["oas"].cov[0, :3, :3], OAS().fit(x).covariance_, rtol=1e-10)
        # EWMA weights by calendar age: the skipped row 70 still counts as a bar of decay
        a = age_weights(79 - rows, 5.0)
        np.testing.assert_allclose(est["ewma"].cov[0, :3, :3], np.cov(x, rowvar=False, aweights=a, ddof=1), rtol=1e-10)
        for name, m in est.items():
            assert np.isnan(m.mean[0, 3]) and np.isnan(m.cov[0, 3]).all() and np.isnan(m.cov[0, :, 3]).all(), name
            assert np.isfinite(m.cov[0, :3, :3]).all(), name

    def test_too_many_incomplete_rows_or_no_member_is_missing_data(self, rng):
        r = rng.normal(0.0, 0.01, (40, 2))
        r[30:33, 0] = np.nan
        est = rolling_estimates(r, np.array([39, 39]), window=10, members=np.array([[True, True], [False, False]]),
                                max_missing=2, estimators=("sample",))["sample"]
        assert est.status.tolist() == ["missing_data", "missing_data"]
        assert np.isnan(est.mean).all()

    def test_stored_rows_hold_only_the_members_and_read_back(self, rng):
        r = rng.normal(0.0, 0.01, (60, 4))
        r[:45, 2] = np.nan
        members = np.array([[True, True, False, True], [True, True, False, True], [True, True, True, True]])
        ends = np.array([40, 50, 59])
        m = rolling_estimates(r, ends, window=10, members=members, estimators=("sample",))["sample"]
        asofs = np.array(["2025-01-01T23:00", "2025-01-02T23:00", "2025-01-03T23:00"], dtype="datetime64[us]")
        rows = moments_to_rows(asofs, SYMBOLS, m, window_bars=10)
        assert rows["symbols"].to_list() == [[SYMBOLS[i] for i in (0, 1, 3)]] * 2 + [SYMBOLS]
        assert rows["cov"].list.len().to_list() == [9, 9, 16]
        _, symbols, back = moments_from_rows(rows, symbols=SYMBOLS)
        assert symbols == SYMBOLS
        np.testing.assert_array_equal(np.isnan(back.mean), np.isnan(m.mean))
        np.testing.assert_array_equal(back.cov[np.isfinite(m.cov)], m.cov[np.isfinite(m.cov)])


STRATEGIES = """
[[strategy]]
name = "min_variance"
objective = "min_variance"
solver = "OSQP"
[strategy.constraints]
budget = 1.0
min_weight = 0.0
max_weight = 0.5

[[strategy]]
name = "hybrid"
objective = "hybrid"
[strategy.parameters]
baseline = "min_variance"
overlay_cap = 0.2
[strategy.constraints]
budget = 1.0
min_weight = 0.0
max_weight = 0.5
"""


def inputs(rng, members_per_asof):
    """AsofInputs with random annualized moments; NaN for non-members, as features.estimates gives them."""
    out = []
    for k, members in enumerate(members_per_asof):
        n = len(members)
        a = rng.normal(size=(n, n))
        cov = a @ a.T / n + 0.1 * np.eye(n)
        mu = rng.normal(0.1, 0.2, n)
        keep = np.outer(members, members)
        cov, mu = np.where(keep, cov, np.nan), np.where(members, mu, np.nan)
        out.append(AsofInputs(asof=datetime(2025, 1, 1 + k, 23, tzinfo=UTC),
                              mu=mu, cov=cov, downside=np.where(members, 0.1, np.nan), semicov=cov * 0.5,
                              vrp=np.full(n, np.nan), status="ok", members=np.array(members)))
    return out


class TestOptimizationOnTheMembers:
    def test_members_only_and_the_same_as_solving_the_subset(self, rng):
        specs = parse_strategies(tomllib.loads(STRATEGIES)["strategy"])
        items = inputs(rng, [[True, True, True, False], [True, False, True, True]])
        frame = optimize_walk_forward(specs, SYMBOLS, items)
        for k, item in enumerate(items):
            rows = frame.filter((pl.col("as_of").dt.day() == 1 + k) & (pl.col("strategy") == "min_variance"))
            w = dict(zip(rows["symbol"], rows["weight"]))
            cols = np.flatnonzero(item.members)
            alone = optimize_walk_forward(specs[:1], [SYMBOLS[i] for i in cols], [AsofInputs(
                asof=item.asof, mu=item.mu[cols], cov=item.cov[np.ix_(cols, cols)], downside=item.downside[cols],
                semicov=item.semicov[np.ix_(cols, cols)], vrp=item.vrp[cols], status="ok")])
            for s, weight in zip(alone["symbol"], alone["weight"]):
                assert w[s] == pytest.approx(weight, abs=1e-9)
            assert all(w[SYMBOLS[i]] == 0.0 for i in np.flatnonzero(~item.members))
            assert rows["status"].unique().to_list() == ["optimal"]
        hybrid = frame.filter(pl.col("strategy") == "hybrid")
        assert hybrid.filter(pl.col("symbol") == "OPUSDT")["weight"].to_list()[0] == 0.0

    def test_too_few_members_hold_the_capped_equal_weight_and_say_why(self, rng):
        specs = parse_strategies(tomllib.loads(STRATEGIES)["strategy"])
        frame = optimize_walk_forward(specs, SYMBOLS, inputs(rng, [[True, False, False, False],
                                                                     [False, False, False, False]]))
        first = frame.filter(pl.col("as_of").dt.day() == 1)
        assert set(first["status"]) == {"fallback:equal_capped:universe_too_small"}
        assert first.filter(pl.col("strategy") == "min_variance")["weight"].to_list() == [0.5, 0.0, 0.0, 0.0]
        second = frame.filter(pl.col("as_of").dt.day() == 2)
        assert set(second["status"]) == {"fallback:flat:empty_universe"} and second["weight"].abs().sum() == 0.0

    def test_previous_weights_in_a_symbol_that_left_are_not_held(self, rng):
        specs = parse_strategies(tomllib.loads(STRATEGIES)["strategy"])[:1]
        items = inputs(rng, [[True, True, True, True]])
        item = items[0]
        item = AsofInputs(asof=item.asof, mu=item.mu, cov=item.cov, downside=item.downside, semicov=item.semicov,
                          vrp=item.vrp, status="missing_data", members=np.array([True, True, True, False]))
        frame = optimize_walk_forward(specs, SYMBOLS, [item], previous={"min_variance": np.array([0.25] * 4)})
        # the previous weights hold OP, which left: the chain goes on to equal weights over the members
        assert frame["status"].unique().to_list() == ["fallback:equal:missing_data"]
        assert frame["weight"].to_list() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


class TestBaselines:
    def test_follow_the_universe(self):
        members = np.array([[True, True, False], [True, True, True], [False, True, True]])
        symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
        np.testing.assert_allclose(baseline_weights("equal_weight", symbols, 3, members=members),
                                   [[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]])
        np.testing.assert_allclose(baseline_weights("btc_only", symbols, 3, members=members),
                                   [[1, 0, 0], [1, 0, 0], [0, 0, 0]])
        static = {"BTCUSDT": 0.5, "ETHUSDT": 0.3, "SOLUSDT": 0.2}
        np.testing.assert_allclose(baseline_weights("static", symbols, 3, static=static, members=members),
                                   [[0.625, 0.375, 0], [0.5, 0.3, 0.2], [0, 0.6, 0.4]])


class TestEstimatesTable:
    """features.estimates as stored: the pandera model's checks and the long view people query."""

    @pytest.fixture
    def stored(self, rng):
        r = rng.normal(0.0, 0.01, (60, 4))
        r[:45, 2] = np.nan
        members = np.array([[True, True, False, True], [True, True, True, True], [True, True, True, True]])
        ends = np.array([40, 59, 5])  # members without SOL; all four; too early (insufficient_history)
        m = rolling_estimates(r, ends, window=10, members=members, estimators=("sample",))["sample"]
        asofs = np.array(["2025-01-01T23:00", "2025-01-02T23:00", "2025-01-03T23:00"], dtype="datetime64[us]")
        return m, conform(moments_to_rows(asofs, SYMBOLS, m, window_bars=10), schemas.Estimates)

    def test_model_accepts_the_writer_and_names_each_fault(self, stored):
        _, rows = stored
        schemas.Estimates.validate(rows)
        faults = {
            "array lengths must match symbols": rows.with_columns(cov=pl.col("cov").list.head(3)),
            "present exactly when status is ok": rows.with_columns(status=pl.lit("ok")),
            "array values must be finite": rows.with_columns(mean=pl.col("mean").list.eval(pl.element() / 0.0)),
            "a symbol listed twice": rows.with_columns(symbols=pl.col("symbols").list.eval(pl.element().first().repeat_by(4).explode())),
            "duplicate (as_of, estimator)": pl.concat([rows, rows.head(1)]),
        }
        for message, bad in faults.items():
            with pytest.raises(pandera.errors.SchemaErrors, match=re.escape(message)):
                schemas.Estimates.validate(bad, lazy=True)

    def test_long_view_shows_every_cell(self, stored):
        m, rows = stored
        con = duckdb.connect()
        con.execute("CREATE SCHEMA features")
        con.register("rows", rows.to_arrow())
        con.execute("CREATE TABLE features.estimates AS SELECT * FROM rows")
        con.execute(f"CREATE VIEW {schemas.ESTIMATES_LONG_VIEW} AS {schemas.ESTIMATES_LONG_SQL}")
        long = pl.from_arrow(con.execute(f"SELECT * FROM {schemas.ESTIMATES_LONG_VIEW}").arrow())
        assert long.columns == ["as_of", "estimator", "quantity", "symbol", "symbol_j", "value", "window_bars", "n_obs", "status"]
        # 3 members (2*3 + 2*9 cells), 4 members (2*4 + 2*16), and 4 symbols of nulls for the early asof
        assert long.height == 24 + 40 + 40
        assert long.filter(pl.col("status") != "ok")["value"].null_count() == 40
        position = {s: i for i, s in enumerate(SYMBOLS)}
        asofs = sorted(rows["as_of"].unique())
        for row in long.filter(pl.col("status") == "ok").iter_rows(named=True):
            k, i = asofs.index(row["as_of"]), position[row["symbol"]]
            quantity = getattr(m, row["quantity"])
            expected = quantity[k, i] if row["symbol_j"] is None else quantity[k, i, position[row["symbol_j"]]]
            assert row["value"] == expected, row
        assert long.filter(pl.col("symbol") == "SOLUSDT")["as_of"].unique().len() == 2  # not a member at the first asof

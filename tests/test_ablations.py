"""The article's ablations (issue 15): metrics by regime, a VRP book on the proxy beside the one on
real implied vol, and the hybrid's overlay alone."""

import tomllib
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from perpfolio.backtest import regime_metrics
from perpfolio.errors import ConfigError
from perpfolio.optimize import AsofInputs, load_strategies, parse_strategies
from perpfolio.optimize.walk_forward import optimize_walk_forward
from pipelines.settings import PROJECT_ROOT

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def equity_frame(returns: list[float]) -> pl.DataFrame:
    eq = np.cumprod(1.0 + np.array(returns))
    prev = np.concatenate([[1.0], eq[:-1]])
    return pl.DataFrame({"ts": [T0 + timedelta(hours=h) for h in range(len(returns))], "equity": eq, "pnl": eq - prev})


class TestRegimeMetrics:
    def test_by_hand(self):
        r = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02]
        # asof at bar 0 calm, at bar 3 turbulent. A regime is known only after its asof's bar (that bar
        # helped decide it): bar 0 has none and is left out, bars 1-3 calm, bars 4-5 turbulent
        out = regime_metrics(equity_frame(r), [T0, T0 + timedelta(hours=3)], ["calm", "turbulent"], periods_per_year=8760)
        calm, turb = np.array(r[1:4]), np.array(r[4:])
        rows = {row["regime"]: row for row in out.iter_rows(named=True)}
        assert rows["calm"]["bars"] == 3 and rows["turbulent"]["bars"] == 2 and rows["turbulent"]["share"] == 0.4
        assert rows["calm"]["ann_return"] == pytest.approx(calm.mean() * 8760, rel=1e-12)
        assert rows["turbulent"]["ann_vol"] == pytest.approx(turb.std(ddof=1) * np.sqrt(8760), rel=1e-12)
        assert rows["calm"]["sharpe"] == pytest.approx(calm.mean() / calm.std(ddof=1) * np.sqrt(8760), rel=1e-12)
        assert rows["calm"]["max_loss"] == pytest.approx(0.02) and rows["turbulent"]["cvar_95"] == pytest.approx(0.01)

    def test_no_bar_is_labelled_by_a_regime_it_helped_decide(self):
        # bars up to and including the only asof have no regime decided before them: nothing to split
        out = regime_metrics(equity_frame([0.01, 0.02, -0.01]), [T0 + timedelta(hours=2)], ["turbulent"],
                             periods_per_year=8760)
        assert out.is_empty() and out.columns[:2] == ["regime", "bars"]
        out = regime_metrics(equity_frame([0.01, 0.02, -0.01, 0.04]), [T0 + timedelta(hours=2)], ["turbulent"],
                             periods_per_year=8760)
        assert out["bars"].to_list() == [1] and out["max_loss"].item() == pytest.approx(-0.04)


STRATEGIES = """
[[strategy]]
name = "vrp_tilt"
objective = "vrp_tilt"
[strategy.parameters]
beta = 1.0
risk_aversion = 5.0
[strategy.constraints]
budget = 1.0
min_weight = 0.0
max_weight = 1.0

[[strategy]]
name = "vrp_tilt_proxy"
objective = "vrp_tilt"
vrp_source = "with_proxy"
[strategy.parameters]
beta = 1.0
risk_aversion = 5.0
[strategy.constraints]
budget = 1.0
min_weight = 0.0
max_weight = 1.0
"""


class TestVrpSource:
    def test_a_strategy_reads_the_proxied_vrp_only_when_it_asks(self):
        specs = parse_strategies(tomllib.loads(STRATEGIES)["strategy"])
        cov = np.diag([0.04, 0.04])
        item = AsofInputs(asof=T0, mu=np.zeros(2), cov=cov, downside=np.zeros(2), semicov=cov, status="ok",
                          vrp=np.array([0.0, np.nan]), vrp_with_proxy=np.array([0.0, 0.1]))
        frame = optimize_walk_forward(specs, ["BTCUSDT", "SOLUSDT"], [item])
        w = {s: dict(zip(part["symbol"], part["weight"])) for (s,), part in frame.group_by("strategy")}
        assert w["vrp_tilt"]["SOLUSDT"] == pytest.approx(0.5, abs=1e-6)  # no signal for SOL: the same mean
        # with_proxy: mu_SOL = 0.1: max 0.1 w - 2.5 * 0.04 (w^2 + (1-w)^2), so 0.1 - 0.4 w + 0.2 = 0 and w = 0.75
        assert w["vrp_tilt_proxy"]["SOLUSDT"] == pytest.approx(0.75, abs=1e-6)

    def test_an_unknown_source_is_rejected(self):
        with pytest.raises(ConfigError, match="vrp_source='implied' is not one of"):
            parse_strategies([{"name": "s", "objective": "vrp_tilt", "vrp_source": "implied"}])

    def test_the_default_file_holds_the_ablation_books(self):
        specs = {s.name: s for s in load_strategies(PROJECT_ROOT / "config" / "strategies.toml")}
        assert specs["vrp_tilt_proxy"].vrp_source == "with_proxy" and specs["vrp_tilt"].vrp_source == "signal"
        overlay, hybrid = specs["overlay"], specs["hybrid"]
        assert overlay.parameters.overlay_cap == 1.0 and hybrid.parameters.overlay_cap < 1.0
        assert overlay.parameters.baseline == hybrid.parameters.baseline


def test_the_ablation_pairs_of_the_default_file():
    from perpfolio.significance import ablation_pairs

    pairs = ablation_pairs(load_strategies(PROJECT_ROOT / "config" / "strategies.toml"))
    assert pairs == [("downside", "min_variance"), ("vrp_tilt_proxy", "vrp_tilt"), ("hybrid", "overlay")]

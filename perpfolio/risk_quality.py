"""Risk-model quality: did a covariance forecast predict the risk the book then ran?

For one book (target weights ``w_k``, fractions of equity, at decision bars ``a_k``) and one
estimator (ANNUALIZED covariance ``S_k`` stored at each asof), per decision k and held bar t::

    sigma_k = sqrt(w_k' S_k w_k / ppy)              predicted volatility PER BAR
    r_t     = sum_i w_k,i r_t,i                     realized one-bar return of the TARGET portfolio
    z_t     = r_t / sigma_k                         standardized return (unitless)

``ppy`` is the number of bars a year (``perpfolio.returns.periods_per_year``); ``r_t,i`` the
one-bar net returns (price + funding) the estimator itself is fitted on, simple or log as
stored. The portfolio is the target, not the positions that drift between rebalances: the
standard risk-model test asks whether the forecast for the portfolio it was made for held,
whatever the execution did with it.

Held bars (no look-ahead; the same timing as ``perpfolio.backtest.simulate``): the estimate of
decision k saw the returns through its asof bar ``a_k``; the book trades at the close of bar
``a_k + L`` (``lag_bars`` L = 1), so its target earns bars ``a_k + L + 1 .. a_{k+1} + L``
(inclusive: the next execution bar itself still earns the old positions), the last decision
through the last bar. Neither the asof bar nor the execution bar is in decision k's window.
The decisions are scored as made (every decision asof), whatever PERPFOLIO_REBALANCE does with
them: a weekly book is still a daily forecast of that day's target.

NaN policy: a bar is skipped when a symbol the target holds (``w_k,i != 0``) has no one-bar return
in it (no bar, or a return spanning a gap); symbols with weight 0 are ignored, present or not.
A decision is not scored when its ``sigma_k`` is unknown (a non-finite covariance entry between
held symbols: the estimator has no estimate at that asof) or 0 (a flat book).

The statistics over the T scored bars of a book:

* **Bias statistic** ``b = std(z)`` (ddof = 1). A correct forecast has ``b ~ 1``; ``b > 1`` means the
  risk was under-predicted. For T iid normal z the sample standard deviation has standard
  error ``sqrt(1 / (2T))`` (delta method: ``Var(s^2) = 2 / (T - 1)`` and ``ds = ds^2 / 2``), so the
  approximate 95 % band is ``1 +- 1.96 sqrt(1 / (2T))``: the bias-statistic test of the Barra
  risk-model notes (e.g. Menchero, Orr and Wang, *The Barra US Equity Model (USE4)*, MSCI 2011,
  who round it to ``1 +- sqrt(2 / T)``). That band assumes normal z. For any z with kurtosis
  ``kappa = m4 / m2^2`` the sample variance has ``Var(s^2) ~ (kappa - 1) / T`` (the standard
  large-sample variance of s^2, ``(mu_4 - sigma^4) / T`` for unit variance), so
  ``se(b) ~ sqrt((kappa - 1) / (4T))``; the **robust band** ``1 +- 1.96 sqrt((kappa_hat - 1) / (4T))``
  uses the sample kurtosis of z (= the normal band when kappa = 3). Jumps put kappa far above 3
  (about 90-120 for every book on the default synthetic run): there the normal band rejects even
  a correct model, the robust one does not.
* **QLIKE** per decision window, with the window's realized variance ``v_k = mean_t r_t^2``
  (a conditionally unbiased proxy of the variance over the window)::

      q_k = v_k / sigma_k^2 - ln(v_k / sigma_k^2) - 1      (>= 0; 0 when v_k = sigma_k^2)

  averaged over the windows (``v_k = 0`` windows skipped). QLIKE is the loss that ranks
  volatility forecasts consistently despite the noise of the proxy (Patton, *Volatility forecast
  comparison using imperfect volatility proxies*, J. Econometrics 160, 2011), and it punishes
  under-prediction more than over-prediction.
* **VaR coverage** at confidence ``alpha`` (0.95, 0.99): the Gaussian one-bar VaR with mean 0,
  ``VaR_k = -Phi^-1(1 - alpha) sigma_k`` (a positive loss), is exceeded when ``r_t < -VaR_k``, i.e.
  ``z_t < Phi^-1(1 - alpha)``. With x exceedances in T bars and ``p = 1 - alpha``:

  - Kupiec's unconditional coverage (Kupiec, *Techniques for verifying the accuracy of risk
    measurement models*, J. Derivatives 3, 1995), chi^2(1)::

        LR_uc = -2 ln[(1 - p)^(T - x) p^x] + 2 ln[(1 - x/T)^(T - x) (x/T)^x]

  - Christoffersen's independence (Christoffersen, *Evaluating interval forecasts*, Int.
    Economic Review 39, 1998), chi^2(1), from the transition counts ``n_ij`` (exceedance state i
    at bar t, j at bar t + 1) over the pairs of scored bars that are adjacent on the bar grid,
    ``pi_01 = n01 / (n00 + n01)``, ``pi_11 = n11 / (n10 + n11)``, ``pi = (n01 + n11) / n``::

        LR_ind = -2 ln[(1 - pi)^(n00 + n10) pi^(n01 + n11)]
                 + 2 ln[(1 - pi_01)^n00 pi_01^n01 (1 - pi_11)^n10 pi_11^n11]

  - the conditional coverage ``LR_cc = LR_uc + LR_ind``, chi^2(2).

  ``0^0 = 1`` throughout (no exceedance, or no bar after an exceedance, is a valid count).
  p-values: ``P(chi^2(1) > x) = erfc(sqrt(x / 2))``, ``P(chi^2(2) > x) = exp(-x / 2)``. The chi^2
  laws are asymptotic: on simulated correct models of 4,800 bars (the default run) the tests
  reject at about their 5 % size, except the 99 % independence test, which is conservative (about
  0.5 expected 1 -> 1 transitions); with 1,000 bars the 95 % independence test rejects 6-11 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError

VAR_LEVELS = (0.95, 0.99)
BAND_LEVEL = 0.95
TEST_SIZE = 0.05  # a VaR test "passes" when its p-value is at least this


@dataclass(frozen=True)
class Realized:
    """The scored bars of one book under one estimator, in time order.

    ``bar``: index on the bar grid; ``decision``: the decision k held over it; ``ret``: the target
    portfolio's one-bar return r_t; ``sigma``: the predicted per-bar vol sigma_k; ``z = ret / sigma``."""

    bar: np.ndarray
    decision: np.ndarray
    ret: np.ndarray
    sigma: np.ndarray

    @property
    def z(self) -> np.ndarray:
        return self.ret / self.sigma

    def __repr__(self) -> str:
        return f"Realized(bars={len(self.bar)}, decisions={len(np.unique(self.decision))})"


def held_decision(decision_bars: np.ndarray, *, n_bars: int, lag_bars: int = 1) -> np.ndarray:
    """Length ``n_bars``: the decision k whose target is held over each bar (-1 before the first):
    bars ``a_k + lag + 1 .. a_{k+1} + lag``, the last decision through the last bar."""
    bars = np.asarray(decision_bars, dtype=np.int64)
    if lag_bars < 0:
        raise ConfigError(f"held_decision: lag_bars must be >= 0, got {lag_bars}")
    if len(bars) and (np.diff(bars) <= 0).any():
        raise DataError(f"held_decision: decision bars must be strictly increasing, got {bars.tolist()}")
    return np.searchsorted(bars + lag_bars + 1, np.arange(n_bars), side="right") - 1


def predicted_vol(weights: np.ndarray, cov: np.ndarray, *, periods_per_year: float) -> np.ndarray:
    """K: ``sigma_k = sqrt(w_k' S_k w_k / ppy)``, per-bar vol of each target from its ANNUALIZED
    covariance (K x N x N). Only entries between held symbols (``w_k,i != 0``) are read: NaN where
    one of them is not finite, 0 for a flat target. A negative variance is a ``DataError``."""
    w = np.asarray(weights, dtype=float)
    held = w != 0.0
    pair = held[:, :, None] & held[:, None, :]
    unknown = (pair & ~np.isfinite(cov)).any(axis=(1, 2))
    var = np.einsum("ki,kij,kj->k", w, np.where(pair, cov, 0.0), w)
    scale = np.einsum("ki,kij,kj->k", np.abs(w), np.where(pair, np.abs(cov), 0.0), np.abs(w))
    if (var < -1e-12 * scale).any():  # beyond rounding
        k = int(np.argmin(var))
        raise DataError(f"predicted_vol: negative predicted variance {var[k]:.3g} at decision {k} (covariance not PSD)")
    return np.where(unknown, np.nan, np.sqrt(np.clip(var, 0.0, None) / periods_per_year))


def realized_returns(returns: np.ndarray, weights: np.ndarray, sigma: np.ndarray, decision_bars: np.ndarray, *,
                     lag_bars: int = 1) -> Realized:
    """The scored bars: held by some decision (:func:`held_decision`), with a finite positive
    ``sigma_k`` and a one-bar return for every held symbol. ``returns``: T x N one-bar returns on the
    complete bar grid (NaN where missing); ``weights``: K x N targets; ``sigma``: K per-bar vols."""
    r = np.asarray(returns, dtype=float)
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(decision_bars), r.shape[1]) or len(sigma) != len(decision_bars):
        raise DataError(f"realized_returns: {len(decision_bars)} decisions, weights {w.shape}, {len(sigma)} "
                        f"vols and returns {r.shape} do not line up")
    k = held_decision(decision_bars, n_bars=len(r), lag_bars=lag_bars)
    bars = np.flatnonzero(k >= 0)
    k = k[bars]
    held = w[k] != 0.0
    complete = ~(held & ~np.isfinite(r[bars])).any(axis=1)
    ret = (w[k] * np.where(held, r[bars], 0.0)).sum(axis=1)
    s = np.asarray(sigma, dtype=float)[k]
    keep = complete & np.isfinite(s) & (s > 0)
    return Realized(bar=bars[keep], decision=k[keep], ret=ret[keep], sigma=s[keep])


def bias_statistic(z: np.ndarray, *, level: float = BAND_LEVEL) -> tuple[float, float, float]:
    """``(b, lower, upper)``: ``b = std(z)`` (ddof = 1) and its band under a correct model,
    ``1 -+ Phi^-1((1 + level) / 2) sqrt(1 / (2T))``; all NaN for fewer than 2 values."""
    z = np.asarray(z, dtype=float)
    if not 0 < level < 1:
        raise ConfigError(f"bias_statistic: level must be in (0, 1), got {level}")
    if len(z) < 2:
        return math.nan, math.nan, math.nan
    half = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(1.0 / (2 * len(z)))
    return float(np.std(z, ddof=1)), 1.0 - half, 1.0 + half


def robust_bias_band(z: np.ndarray, *, level: float = BAND_LEVEL) -> tuple[float, float, float]:
    """``(lower, upper, kappa)``: the band of ``b = std(z)`` under a correct model whatever the
    tails, ``1 -+ Phi^-1((1 + level) / 2) sqrt((kappa - 1) / (4T))``, with ``kappa = m4 / m2^2`` the
    sample kurtosis of z (central moments, not excess: 3 for normal z); all NaN for fewer than 2
    values."""
    z = np.asarray(z, dtype=float)
    if not 0 < level < 1:
        raise ConfigError(f"robust_bias_band: level must be in (0, 1), got {level}")
    if len(z) < 2:
        return math.nan, math.nan, math.nan
    d = z - z.mean()
    m2 = float(np.mean(d**2))
    kappa = float(np.mean(d**4)) / m2**2 if m2 > 0 else math.nan
    half = NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(max(kappa - 1.0, 0.0) / (4 * len(z)))
    return 1.0 - half, 1.0 + half, kappa


def qlike(realized: Realized) -> float:
    """Mean over decision windows of ``v/s^2 - ln(v/s^2) - 1`` (``v``: mean r_t^2 over the window's
    scored bars, ``s``: its sigma_k); windows with ``v = 0`` skipped; NaN without a window."""
    if not len(realized.bar):
        return math.nan
    _, first, at = np.unique(realized.decision, return_index=True, return_inverse=True)
    v = np.bincount(at, weights=realized.ret**2) / np.bincount(at)
    ratio = (v / realized.sigma[first] ** 2)[v > 0]  # sigma is constant within a window
    return float(np.mean(ratio - np.log(ratio) - 1.0)) if len(ratio) else math.nan


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0 else x * math.log(y)


def chi2_sf(statistic: float, *, dof: int) -> float:
    """``P(chi^2(dof) > statistic)`` for 1 or 2 degrees of freedom (closed forms)."""
    if dof == 1:
        return math.erfc(math.sqrt(max(statistic, 0.0) / 2.0))
    if dof == 2:
        return math.exp(-max(statistic, 0.0) / 2.0)
    raise ConfigError(f"chi2_sf: dof must be 1 or 2, got {dof}")


def kupiec_test(exceedances: int, n: int, *, p: float) -> tuple[float, float]:
    """``(LR_uc, p-value)`` of Kupiec's unconditional coverage test: x exceedances in n bars against
    a rate p; NaN for n = 0."""
    if not 0 < p < 1:
        raise ConfigError(f"kupiec_test: p must be in (0, 1), got {p}")
    if not 0 <= exceedances <= n:
        raise DataError(f"kupiec_test: {exceedances} exceedances in {n} bars")
    if n == 0:
        return math.nan, math.nan
    x = exceedances
    lr = -2.0 * (_xlogy(n - x, 1 - p) + _xlogy(x, p)) + 2.0 * (_xlogy(n - x, 1 - x / n) + _xlogy(x, x / n))
    lr = max(lr, 0.0)  # rounding at x = pn
    return lr, chi2_sf(lr, dof=1)


def transition_counts(hits: np.ndarray, bars: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """``(n00, n01, n10, n11)``: pairs (t, t + 1) of consecutive hits with states i -> j, only where
    ``bars`` (the hits' bar indices, default 0, 1, 2, ...) are adjacent."""
    h = np.asarray(hits, dtype=bool)
    adjacent = np.ones(max(len(h) - 1, 0), dtype=bool) if bars is None else np.diff(np.asarray(bars)) == 1
    a, b = h[:-1][adjacent], h[1:][adjacent]
    return int((~a & ~b).sum()), int((~a & b).sum()), int((a & ~b).sum()), int((a & b).sum())


def christoffersen_test(hits: np.ndarray, bars: np.ndarray | None = None) -> tuple[float, float]:
    """``(LR_ind, p-value)`` of Christoffersen's independence test on an exceedance indicator
    (transitions as in :func:`transition_counts`); NaN without a transition."""
    n00, n01, n10, n11 = transition_counts(hits, bars)
    n = n00 + n01 + n10 + n11
    if n == 0:
        return math.nan, math.nan
    pi = (n01 + n11) / n
    pi01 = n01 / (n00 + n01) if n00 + n01 else 0.0
    pi11 = n11 / (n10 + n11) if n10 + n11 else 0.0
    restricted = _xlogy(n00 + n10, 1 - pi) + _xlogy(n01 + n11, pi)
    free = _xlogy(n00, 1 - pi01) + _xlogy(n01, pi01) + _xlogy(n10, 1 - pi11) + _xlogy(n11, pi11)
    lr = max(-2.0 * restricted + 2.0 * free, 0.0)
    return lr, chi2_sf(lr, dof=1)


def var_coverage(realized: Realized, *, confidence: float) -> dict[str, float | int | None]:
    """Exceedances of the Gaussian one-bar VaR at ``confidence`` and its three tests; the keys are
    prefixed ``var<100 confidence>_`` (e.g. ``var99_kupiec_p``); p-values None without bars."""
    if not 0.5 < confidence < 1:
        raise ConfigError(f"var_coverage: confidence must be in (0.5, 1), got {confidence}")
    p = 1.0 - confidence
    hits = realized.z < NormalDist().inv_cdf(p)
    x, n = int(hits.sum()), len(hits)
    lr_uc, p_uc = kupiec_test(x, n, p=p)
    lr_ind, p_ind = christoffersen_test(hits, realized.bar)
    p_cc = chi2_sf(lr_uc + lr_ind, dof=2) if math.isfinite(lr_uc + lr_ind) else math.nan
    tag = f"var{round(100 * confidence):d}"
    return {f"{tag}_exceedances": x, f"{tag}_expected": p * n, f"{tag}_kupiec_p": _or_none(p_uc),
            f"{tag}_independence_p": _or_none(p_ind), f"{tag}_cc_p": _or_none(p_cc)}


def forecast_quality(returns: np.ndarray, weights: np.ndarray, cov: np.ndarray, decision_bars: np.ndarray, *,
                     periods_per_year: float, lag_bars: int = 1,
                     var_levels: Sequence[float] = VAR_LEVELS) -> dict[str, float | int | None]:
    """One ``backtest.risk_model`` row (without its keys) for one book and estimator: scored
    windows and bars, predicted and realized vol (annualized), the bias statistic and its band,
    QLIKE and the VaR coverage tests (see the module docstring). ``returns``: T x N one-bar returns
    on the bar grid; ``weights``: K x N targets at ``decision_bars``; ``cov``: K x N x N annualized.
    Statistics without enough bars are None."""
    sigma = predicted_vol(weights, cov, periods_per_year=periods_per_year)
    realized = realized_returns(returns, weights, sigma, decision_bars, lag_bars=lag_bars)
    z, n = realized.z, len(realized.bar)
    bias, lower, upper = bias_statistic(z)
    robust_lower, robust_upper, kappa = robust_bias_band(z)
    row = {
        "windows": len(np.unique(realized.decision)), "skipped_windows": len(sigma) - len(np.unique(realized.decision)),
        "n_bars": n,
        "predicted_vol": _or_none(math.sqrt(periods_per_year * np.mean(realized.sigma**2)) if n else math.nan),
        "realized_vol": _or_none(math.sqrt(periods_per_year) * np.std(realized.ret, ddof=1) if n > 1 else math.nan),
        "bias": _or_none(bias), "bias_lower": _or_none(lower), "bias_upper": _or_none(upper),
        "bias_in_band": None if math.isnan(bias) else bool(lower <= bias <= upper),
        "z_kurtosis": _or_none(kappa), "bias_lower_robust": _or_none(robust_lower),
        "bias_upper_robust": _or_none(robust_upper),
        "bias_in_robust_band": None if math.isnan(robust_lower) else bool(robust_lower <= bias <= robust_upper),
        "qlike": _or_none(qlike(realized)),
    }
    for level in var_levels:
        row |= var_coverage(realized, confidence=level)
    return row


SORT_DECIMALS = 10  # ranking keys are compared at this many decimals: noise below it never reorders


def rank_estimators(table: pl.DataFrame, *, test_size: float = TEST_SIZE) -> pl.DataFrame:
    """Per estimator of a ``backtest.risk_model`` table: which forecasts this market's risk best.

    Over the books with a bias statistic: ``mean_qlike`` (the ranking loss), ``mean_abs_bias_error =
    mean |b - 1|``, ``books_in_band`` / ``books_in_robust_band`` (b inside its normal / kurtosis-robust
    95 % band) and, per VaR level,
    ``books_var<level>_pass`` (conditional coverage p-value >= ``test_size``). ``rank`` 1 is the lowest
    mean QLIKE, ties broken by the mean |b - 1|, then by name; both are compared at ``SORT_DECIMALS``
    decimals, so estimators equal up to rounding (``shrinkage`` has ``ledoit_wolf``'s covariance) rank
    the same way in every run."""
    levels = sorted({c.split("_")[0] for c in table.columns if c.startswith("var") and c.endswith("_cc_p")})
    scored = table.filter(pl.col("bias").is_not_null())
    out = scored.group_by("estimator").agg(
        books=pl.len(), mean_qlike=pl.col("qlike").mean(), mean_abs_bias_error=(pl.col("bias") - 1.0).abs().mean(),
        mean_bias=pl.col("bias").mean(), books_in_band=pl.col("bias_in_band").sum().cast(pl.Int64),
        books_in_robust_band=pl.col("bias_in_robust_band").sum().cast(pl.Int64),
        **{f"books_{tag}_pass": (pl.col(f"{tag}_cc_p") >= test_size).sum().cast(pl.Int64) for tag in levels},
    ).sort(pl.col("mean_qlike").round(SORT_DECIMALS), pl.col("mean_abs_bias_error").round(SORT_DECIMALS), "estimator",
           nulls_last=True)
    return out.with_columns(rank=pl.int_range(1, out.height + 1, dtype=pl.Int64)).select("rank", pl.exclude("rank"))

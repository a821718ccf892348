r"""Position sizing on top of the optimized weights: how much of the book to run.

The optimizer decides the *shape* of the book (weights summing to the budget); sizing decides its
*scale* at each rebalance, from information available at that time:

- :func:`vol_target_leverage`: gross exposure toward a target volatility, capped,
  :math:`\lambda = \min(L_{max}, \sigma^* / \hat\sigma_p)`, :math:`\hat\sigma_p = \sqrt{w^\top \hat\Sigma w}`
  with :math:`\hat\Sigma` the predicted (annualized) covariance: lower leverage when predicted
  volatility is high.
- :func:`drawdown_cash_buffer`: a cash reserve that grows as the account draws down and as
  predicted risk rises above target,
  :math:`c = \min(c_{max},\; c_0 + k_{dd}\,|\mathrm{DD}| + k_{vol} (\hat\sigma_p/\sigma^* - 1)^+)`.

The exposure multiplier applied to the weights is :math:`\lambda (1 - c)`; :class:`SizingRule`
holds the parameters of both and is what :func:`perpfolio.backtest.simulate` applies at each
execution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perpfolio.errors import ConfigError, DataError


def predicted_vol(weights: np.ndarray, predicted_cov: np.ndarray) -> np.ndarray:
    r"""Predicted book volatility :math:`\hat\sigma_p = \sqrt{w^\top\hat\Sigma w}` per row.

    ``weights`` K x N (fractions of equity), ``predicted_cov`` K x N x N (annualized) -> K
    annualized vols; NaN where the row's weights or covariance are not finite (unknown), a
    (numerically) negative variance counts as 0.
    """
    w = np.asarray(weights, dtype=float)
    cov = np.asarray(predicted_cov, dtype=float)
    if w.ndim != 2 or cov.shape != (*w.shape, w.shape[1]):
        raise DataError(f"predicted_vol: need K x N weights and K x N x N covariances, got {w.shape} and {cov.shape}")
    known = np.isfinite(w).all(axis=1) & np.isfinite(cov).all(axis=(1, 2))
    with np.errstate(invalid="ignore", over="ignore"):  # row k depends on row k only: unknown rows become NaN below
        variance = np.einsum("km,km->k", np.matmul(w[:, None, :], cov)[:, 0, :], w)
    return np.where(known, np.sqrt(np.maximum(variance, 0.0, where=known, out=np.zeros_like(variance))), np.nan)


def vol_target_leverage(
    weights: np.ndarray, predicted_cov: np.ndarray, *, target_vol: float, max_leverage: float
) -> float:
    r"""Leverage :math:`\min(L_{max}, \sigma^*/\sqrt{w^\top\hat\Sigma w})` (annualized vols, decimals).

    ``weights`` N, ``predicted_cov`` N x N. A book with no predicted risk gets ``max_leverage``.
    Raises DataError for non-finite inputs.
    """
    if target_vol <= 0 or max_leverage <= 0:
        raise ConfigError(f"target_vol={target_vol} and max_leverage={max_leverage} must be > 0")
    vol = float(predicted_vol(np.atleast_2d(weights), np.asarray(predicted_cov, dtype=float)[None])[0])
    if not math.isfinite(vol):
        raise DataError("vol_target_leverage: weights or predicted covariance are not finite")
    return max_leverage if vol == 0 else float(min(max_leverage, target_vol / vol))


def drawdown_cash_buffer(
    drawdown: float, predicted_vol: float, *, target_vol: float | None, base: float = 0.0,
    per_drawdown: float = 1.0, per_excess_vol: float = 0.5, max_cash: float = 0.5,
) -> float:
    r"""Cash fraction :math:`\min(c_{max}, c_0 + k_{dd}\,|DD| + k_{vol}(\hat\sigma/\sigma^* - 1)^+)`.

    ``drawdown`` is the account's drawdown as a non-positive fraction (equity / peak - 1) or its
    magnitude; ``predicted_vol`` and ``target_vol`` are annualized decimals. An unknown predicted
    vol (NaN) adds no excess-vol term; ``target_vol=None`` is allowed only with
    ``per_excess_vol=0`` (a drawdown-only buffer).
    """
    if not 0.0 <= base <= max_cash < 1.0:
        raise ConfigError(f"need 0 <= base ({base}) <= max_cash ({max_cash}) < 1")
    if not (per_drawdown >= 0 and per_excess_vol >= 0 and math.isfinite(per_drawdown) and math.isfinite(per_excess_vol)):
        raise ConfigError(f"per_drawdown={per_drawdown} and per_excess_vol={per_excess_vol} must be finite and >= 0")
    if target_vol is None:
        if per_excess_vol > 0:
            raise ConfigError(f"per_excess_vol={per_excess_vol} compares predicted vol with a target: set target_vol "
                              "or per_excess_vol=0")
        excess = 0.0
    elif not target_vol > 0:
        raise ConfigError(f"target_vol={target_vol} must be > 0")
    else:
        excess = max(0.0, predicted_vol / target_vol - 1.0) if math.isfinite(predicted_vol) else 0.0
    return float(min(max_cash, base + per_drawdown * abs(drawdown) + per_excess_vol * excess))


@dataclass(frozen=True)
class SizingRule:
    r"""How a backtest scales the target weights ``w`` of each rebalance: ``x* = \lambda (1 - c) w E``.

    * ``target_vol`` (annualized decimal, e.g. 0.2; None = off): :math:`\lambda =
      \min(L_{max}, \sigma^*/\hat\sigma_p)` from the predicted covariance at the decision asof;
      where no finite prediction exists, :math:`\lambda = \min(1, L_{max})` (unknown risk is not
      levered up). Off: :math:`\lambda = 1`.
    * ``max_leverage`` :math:`L_{max}` (> 0): the cap on :math:`\lambda` (multiplies the weights;
      a book with gross :math:`\sum|w_i| = g` reaches at most :math:`L_{max} g` at the trade).
    * ``cash_buffer`` (off by default): :math:`c` of :func:`drawdown_cash_buffer` with
      ``cash_buffer_base`` :math:`c_0`, ``cash_buffer_per_drawdown`` :math:`k_{dd}`,
      ``cash_buffer_per_excess_vol`` :math:`k_{vol}` (0 when ``target_vol`` is off) and
      ``cash_buffer_max`` :math:`c_{max} < 1`; off: :math:`c = 0`.
    """

    target_vol: float | None = None
    max_leverage: float = 3.0
    cash_buffer: bool = False
    cash_buffer_base: float = 0.0
    cash_buffer_per_drawdown: float = 1.0
    cash_buffer_per_excess_vol: float = 0.5
    cash_buffer_max: float = 0.5

    def __post_init__(self) -> None:
        if self.target_vol is not None and not (math.isfinite(self.target_vol) and self.target_vol > 0):
            raise ConfigError(f"target_vol must be an annualized decimal > 0 (or off), got {self.target_vol}")
        if not (math.isfinite(self.max_leverage) and self.max_leverage > 0):
            raise ConfigError(f"max_leverage must be a finite number > 0, got {self.max_leverage}")
        if self.cash_buffer:
            try:
                self.cash_fraction(0.0, float("nan"))  # the buffer's own parameter checks
            except ConfigError as exc:
                raise ConfigError(
                    f"cash_buffer: {exc} (base = cash_buffer_base, per_drawdown = cash_buffer_per_drawdown, "
                    "per_excess_vol = cash_buffer_per_excess_vol, max_cash = cash_buffer_max)") from exc

    def describe(self) -> str:
        """One line with the formulas and parameters in force, e.g. for an asset description."""
        lam = ("lambda = 1" if self.target_vol is None
               else f"lambda = min({self.max_leverage:g}, {self.target_vol:g} / predicted vol)")
        if not self.cash_buffer:
            return f"{lam}, no cash buffer"
        vol_term = "" if self.target_vol is None else f" + {self.cash_buffer_per_excess_vol:g} (vol / {self.target_vol:g} - 1)+"
        return (f"{lam}, cash c = min({self.cash_buffer_max:g}, {self.cash_buffer_base:g} + "
                f"{self.cash_buffer_per_drawdown:g} |drawdown|{vol_term}); book = lambda (1 - c) x weights")

    @property
    def needs_covariance(self) -> bool:
        """True when the rule reads a predicted covariance (vol targeting, or the excess-vol term)."""
        return self.target_vol is not None

    def leverage(self, weights: np.ndarray, predicted_cov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        r"""(:math:`\lambda`, :math:`\hat\sigma_p`) per row of K x N ``weights``; ``predicted_cov``
        K x N x N annualized (required when ``target_vol`` is set, else ignored: :math:`\lambda = 1`,
        :math:`\hat\sigma_p` NaN). A book with zero predicted risk gets :math:`L_{max}`."""
        w = np.asarray(weights, dtype=float)
        if self.target_vol is None:
            return np.ones(len(w)), np.full(len(w), np.nan)
        if predicted_cov is None:
            raise DataError("SizingRule.leverage: target_vol is set, so a predicted covariance per rebalance is needed")
        vol = predicted_vol(w, predicted_cov)
        with np.errstate(divide="ignore"):
            lev = np.minimum(self.max_leverage, self.target_vol / vol)
        return np.where(np.isfinite(vol), lev, min(1.0, self.max_leverage)), vol

    def cash_fraction(self, drawdown: float, predicted_vol: float) -> float:
        """Cash fraction ``c`` for an account ``drawdown`` (<= 0) and predicted book vol (NaN = unknown)."""
        if not self.cash_buffer:
            return 0.0
        per_excess = self.cash_buffer_per_excess_vol if self.target_vol is not None else 0.0
        return drawdown_cash_buffer(
            drawdown, predicted_vol, target_vol=self.target_vol, base=self.cash_buffer_base,
            per_drawdown=self.cash_buffer_per_drawdown, per_excess_vol=per_excess, max_cash=self.cash_buffer_max)

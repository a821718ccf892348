r"""Position sizing on top of the optimized weights: how much of the book to run.

The optimizer decides the *shape* of the book (weights summing to the budget); sizing decides its
*scale* at each rebalance, from information available at that time:

- :func:`vol_target_leverage`: gross exposure toward a target volatility, capped,
  :math:`\lambda = \min(L_{max}, \sigma^* / \hat\sigma_p)`, :math:`\hat\sigma_p = \sqrt{w^\top \hat\Sigma w}`
  with :math:`\hat\Sigma` the predicted (annualized) covariance: lower leverage when predicted
  volatility is high.
- :func:`drawdown_cash_buffer`: a cash reserve that grows as the account draws down and as
  predicted risk rises above target,
  :math:`c = \min(c_{max},\; c_0 + k_{dd}\,\mathrm{DD} + k_{vol} (\hat\sigma_p/\sigma^* - 1)^+)`.

The exposure multiplier applied to the weights is :math:`\lambda (1 - c)`.
"""

from __future__ import annotations

import numpy as np

from perpfolio.errors import ConfigError, DataError


def vol_target_leverage(
    weights: np.ndarray, predicted_cov: np.ndarray, *, target_vol: float, max_leverage: float
) -> float:
    r"""Leverage :math:`\min(L_{max}, \sigma^*/\sqrt{w^\top\hat\Sigma w})` (annualized vols, decimals).

    A book with no predicted risk gets ``max_leverage``. Raises DataError for non-finite inputs.
    """
    if target_vol <= 0 or max_leverage <= 0:
        raise ConfigError(f"target_vol={target_vol} and max_leverage={max_leverage} must be > 0")
    if not (np.isfinite(weights).all() and np.isfinite(predicted_cov).all()):
        raise DataError("vol_target_leverage: weights or predicted covariance are not finite")
    variance = float(weights @ predicted_cov @ weights)
    if variance <= 0:
        return max_leverage
    return float(min(max_leverage, target_vol / np.sqrt(variance)))


def drawdown_cash_buffer(
    drawdown: float, predicted_vol: float, *, target_vol: float, base: float = 0.0,
    per_drawdown: float = 1.0, per_excess_vol: float = 0.5, max_cash: float = 0.5,
) -> float:
    r"""Cash fraction :math:`\min(c_{max}, c_0 + k_{dd}\,|DD| + k_{vol}(\hat\sigma/\sigma^* - 1)^+)`.

    ``drawdown`` is the account's drawdown as a non-positive fraction (equity / peak - 1) or its
    magnitude; ``predicted_vol`` and ``target_vol`` are annualized decimals.
    """
    if not 0.0 <= base <= max_cash < 1.0:
        raise ConfigError(f"need 0 <= base ({base}) <= max_cash ({max_cash}) < 1")
    if target_vol <= 0:
        raise ConfigError(f"target_vol={target_vol} must be > 0")
    excess = max(0.0, predicted_vol / target_vol - 1.0)
    return float(min(max_cash, base + per_drawdown * abs(drawdown) + per_excess_vol * excess))

r"""Objective and constraint terms: small composable objects (cvxportfolio style).

Every term has one lifecycle:

- ``compile(w, kappa)`` runs ONCE per problem and creates the ``cp.Parameter`` s it needs;
- ``update(data, scale)`` runs before every solve and sets those parameters from the data;
- constraints have ``violation(w, data) -> float`` in the ORIGINAL units (used to verify a
  solution), objective terms have ``value(w, data) -> float`` in the original units;
- ``reads`` names the :class:`SolveData` moment fields the term reads, which must be finite
  before a solve (the problem checks them all, so a NaN never reaches a solver).

Units: ``data`` holds ANNUALIZED moments (mean and D_i as annualized decimals/variances,
covariances as annualized variances). Before solving, the problem multiplies the whole objective
and every return-like constraint by ``scale`` = n / trace(risk matrix) > 0, so the risk matrix has
unit average variance whatever the input scale (hourly-scale matrices ~1e-5 make solvers stop
early). Multiplying an objective by a positive constant does not move its minimizer.

``kappa`` is 1 for ordinary problems; for the homogenized max-Sharpe problem the decision
variable is :math:`y = \kappa w` with :math:`\kappa \ge 0` a variable, and every constraint is
written homogeneously (right-hand sides times ``kappa``), so the same terms serve both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cvxpy as cp
import numpy as np
from scipy import signal, sparse

from perpfolio.errors import DataError

HOURS_PER_YEAR = 8760.0  # funding forecasts are per hour whatever the bar size


@dataclass(frozen=True)
class SolveData:
    """Original (unscaled) inputs of one solve; all moments annualized, N assets.

    ``vrp`` may hold NaN (unknown: no tilt). ``w_prev`` is None when there is no previous
    portfolio (then max-rebalance is skipped and costs are charged from cash). ``w_base`` is the
    hybrid's baseline. ``target_return`` overrides the strategy's target (frontier sweeps).
    ``scenarios`` (T x N) are the estimation window's per-bar net returns (for CVaR) and
    ``window_years`` its length in years (for the standard error of the mean). ``tradable``
    (N bools, None = all) is the liquid universe; other assets are held at 0. ``funding_1h`` (N)
    is the forecast funding rate per hour (+ = longs pay; NaN = unknown, no tilt).
    """

    mu: np.ndarray
    cov: np.ndarray
    downside: np.ndarray
    semicov: np.ndarray
    vrp: np.ndarray
    w_prev: np.ndarray | None = None
    w_base: np.ndarray | None = None
    target_return: float | None = None
    scenarios: np.ndarray | None = None
    window_years: float | None = None
    tradable: np.ndarray | None = None
    funding_1h: np.ndarray | None = None


class NotPSDError(DataError):
    """A risk matrix is not symmetric positive semidefinite (solve status "not_psd")."""


def psd_factor(matrix: np.ndarray, *, name: str) -> np.ndarray:
    r"""Upper-triangular square-root factor :math:`R` with :math:`R^\top R = M` (M symmetric PSD).

    Cholesky (:math:`M = LL^\top`, :math:`R = L^\top`) when M is positive definite; otherwise
    (singular PSD, e.g. fewer observations than assets) the eigen factor
    :math:`\Lambda_+^{1/2} V^\top` (eigenvalues clipped at 0) is made triangular by a QR
    decomposition, which keeps :math:`R^\top R = M` without jitter. A triangular factor halves the
    solver's matrix (a sparse parameter in :class:`QuadraticRisk`). Raises DataError naming
    ``name`` when M is not symmetric or has an eigenvalue below :math:`-10^{-10}\lambda_{max}`.
    """
    size = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    if np.max(np.abs(matrix - matrix.T), initial=0.0) > 1e-10 * size:
        raise NotPSDError(f"{name}: matrix is not symmetric")
    matrix = (matrix + matrix.T) / 2
    try:
        return np.linalg.cholesky(matrix).T
    except np.linalg.LinAlgError:
        eigval, eigvec = np.linalg.eigh(matrix)
    if eigval[0] < -1e-10 * max(eigval[-1], 0.0):
        raise NotPSDError(f"{name}: matrix is not positive semidefinite (min eigenvalue {eigval[0]:.3g})")
    return np.linalg.qr(np.sqrt(np.clip(eigval, 0.0, None))[:, None] * eigvec.T, mode="r")


# --------------------------------------------------------------------------- objective terms


class QuadraticRisk:
    r"""Quadratic risk :math:`c\, w^\top M w = c\,\|F w\|_2^2` with :math:`M` = ``cov`` (Σ) or
    ``semicov`` (Σ⁻, the downside semicovariance), both annualized variances.

    ``F`` is a sparse upper-triangular ``cp.Parameter`` holding :math:`\sqrt{s}` times the
    factor of :func:`psd_factor`.
    """

    def __init__(self, weight: float, *, matrix: Literal["cov", "semicov"] = "cov") -> None:
        self.weight = weight
        self.matrix = matrix
        self.reads = (matrix,)

    def __repr__(self) -> str:
        return f"QuadraticRisk(weight={self.weight}, matrix={self.matrix!r})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.upper = np.triu_indices(w.size)
        self.factor = cp.Parameter((w.size, w.size), sparsity=self.upper, name=f"F_{self.matrix}")
        return self.weight * cp.sum_squares(self.factor @ w), []

    def update(self, data: SolveData, scale: float) -> None:
        factor = np.sqrt(scale) * psd_factor(getattr(data, self.matrix), name=self.matrix)
        self.factor.value_sparse = sparse.coo_array((factor[self.upper], self.upper), shape=factor.shape)

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return self.weight * float(w @ getattr(data, self.matrix) @ w)

    def qp(self, data: SolveData, scale: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(P, q) of this term in the QP form ½ wᵀPw + qᵀw, scaled."""
        return 2.0 * self.weight * scale * getattr(data, self.matrix), None


class LinearDownside:
    r"""Linear downside penalty :math:`c \sum_i w_i D_i`, :math:`D_i = \overline{\min(0, r_i-\tau)^2}`
    annualized (the article's composite; it rewards shorts, so use it long-only)."""

    reads = ("downside",)

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __repr__(self) -> str:
        return f"LinearDownside(weight={self.weight})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.d = cp.Parameter(w.size, name="downside")
        return self.weight * (self.d @ w), []

    def update(self, data: SolveData, scale: float) -> None:
        self.d.value = scale * data.downside

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return self.weight * float(w @ data.downside)

    def qp(self, data: SolveData, scale: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        return None, self.weight * scale * data.downside


def tilted_mean(data: SolveData, beta: float, funding_beta: float = 0.0) -> np.ndarray:
    r""":math:`\tilde\mu_i = \mu_i^{hist} + \beta\,\mathrm{VRP}_i - \beta_f \cdot 8760\,\hat f_i`
    (annualized): the VRP tilt, and the funding tilt toward perps whose forecast funding
    :math:`\hat f_i` (per hour, + = longs pay) favours a long; a NaN VRP or forecast is no tilt."""
    mu = data.mu + beta * np.where(np.isnan(data.vrp), 0.0, data.vrp)
    if funding_beta:
        if data.funding_1h is None:
            raise DataError("funding_beta needs the funding forecast (signals.signals.funding_forecast_1h)")
        mu = mu - funding_beta * HOURS_PER_YEAR * np.where(np.isnan(data.funding_1h), 0.0, data.funding_1h)
    return mu


class ExpectedReturn:
    r"""Negative expected return :math:`-\tilde\mu^\top w` with :math:`\tilde\mu` of
    :func:`tilted_mean` (annualized); minimizing risk terms plus this one maximizes a mean-risk utility."""

    reads = ("mu",)  # and vrp / funding_1h, where NaN means no tilt (never inf; see PortfolioProblem)

    def __init__(self, *, beta: float = 0.0, funding_beta: float = 0.0) -> None:
        self.beta, self.funding_beta = beta, funding_beta

    def __repr__(self) -> str:
        return f"ExpectedReturn(beta={self.beta}, funding_beta={self.funding_beta})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.mu = cp.Parameter(w.size, name="mu_tilted")
        return -(self.mu @ w), []

    def update(self, data: SolveData, scale: float) -> None:
        self.mu.value = scale * tilted_mean(data, self.beta, self.funding_beta)

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return -float(w @ tilted_mean(data, self.beta, self.funding_beta))

    def qp(self, data: SolveData, scale: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        return None, -scale * tilted_mean(data, self.beta, self.funding_beta)


def vrp_charge(data: SolveData) -> np.ndarray:
    r""":math:`\max(0, -\mathrm{VRP}_i)`: how unfavourable each asset's VRP is (annualized variance;
    0 for a non-negative or unknown VRP)."""
    return np.maximum(0.0, -np.where(np.isnan(data.vrp), 0.0, data.vrp))


class VrpPenalty:
    r"""Penalty on allocations with unfavourable VRP, :math:`\eta \sum_i \max(0, -\mathrm{VRP}_i)\,|w_i|`
    (``vrp_penalty`` = η, unitless; VRP annualized variance, implied − realized): holding, long or
    short, an asset whose realized variance exceeds its implied variance costs η per unit of that
    excess. Compiled with an epigraph :math:`t \ge |w|` so the parameter multiplies a parameter-free
    expression (DPP)."""

    reads = ()  # vrp, where NaN means no charge (never inf; see PortfolioProblem)

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def __repr__(self) -> str:
        return f"VrpPenalty(eta={self.eta})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.charge = cp.Parameter(w.size, nonneg=True, name="vrp_charge")
        size = cp.Variable(w.size, name="abs_weight")
        return self.charge @ size, [size >= w, size >= -w]

    def update(self, data: SolveData, scale: float) -> None:
        self.charge.value = scale * self.eta * vrp_charge(data)

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return self.eta * float(vrp_charge(data) @ np.abs(w))


class TransactionCost:
    r"""Linear trading cost :math:`\sum_i c\,|w_i - w^{prev}_i|`, :math:`c` = ``cost_bps``/10⁴
    per unit of traded equity; from cash (:math:`w^{prev}=0`) when there is no previous portfolio.

    Compiled with an epigraph variable :math:`t \ge |w - w^{prev}|` so that the scaled cost
    parameter multiplies a parameter-free expression (DPP).
    """

    reads = ()

    def __init__(self, cost_bps: float) -> None:
        self.rate = cost_bps * 1e-4

    def __repr__(self) -> str:
        return f"TransactionCost(cost_bps={self.rate * 1e4})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.w_prev = cp.Parameter(w.size, name="w_prev_cost")
        self.rate_scaled = cp.Parameter(nonneg=True, name="cost_rate")
        trade = cp.Variable(w.size, name="trade")
        return self.rate_scaled * cp.sum(trade), [trade >= w - self.w_prev, trade >= self.w_prev - w]

    def update(self, data: SolveData, scale: float) -> None:
        self.w_prev.value = np.zeros(self.w_prev.size) if data.w_prev is None else data.w_prev
        self.rate_scaled.value = scale * self.rate

    def value(self, w: np.ndarray, data: SolveData) -> float:
        prev = 0.0 if data.w_prev is None else data.w_prev
        return self.rate * float(np.abs(w - prev).sum())


class L2Regularization:
    r"""Ridge penalty :math:`\gamma \|w\|_2^2` (``l2_gamma``, annualized-variance units): spreads
    weight across assets when the covariance is nearly singular."""

    reads = ()

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __repr__(self) -> str:
        return f"L2Regularization(gamma={self.gamma})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.gamma_scaled = cp.Parameter(nonneg=True, name="l2_gamma")
        return self.gamma_scaled * cp.sum_squares(w), []

    def update(self, data: SolveData, scale: float) -> None:
        self.gamma_scaled.value = scale * self.gamma

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return self.gamma * float(w @ w)

    def qp(self, data: SolveData, scale: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        return 2.0 * scale * self.gamma * np.eye(len(data.mu)), None


class RobustMean:
    r"""Worst case of the expected return over the ellipsoid of its estimation error:
    :math:`\min_{\mu \in U} \mu^\top w = \hat\mu^\top w - \kappa \sqrt{w^\top \Sigma_\mu w}`,
    :math:`\Sigma_\mu = \Sigma / Y` the covariance of an annualized sample mean over a window of
    Y years (``window_years``). Added to the objective as :math:`+\kappa \|G w\|_2`,
    :math:`G^\top G = \Sigma_\mu`; ``kappa`` (``robust_kappa``) is the ellipsoid's radius in
    standard errors."""

    reads = ("cov",)

    def __init__(self, kappa: float) -> None:
        self.kappa = kappa

    def __repr__(self) -> str:
        return f"RobustMean(kappa={self.kappa})"

    def compile(self, w: cp.Variable, kappa) -> tuple[cp.Expression, list[cp.Constraint]]:
        self.factor = cp.Parameter((w.size, w.size), name="mean_error_factor")
        return self.kappa * cp.norm2(self.factor @ w), []

    def _years(self, data: SolveData) -> float:
        if data.window_years is None or not data.window_years > 0:
            raise DataError(f"robust_kappa needs window_years > 0 (the estimation window), got {data.window_years}")
        return data.window_years

    def update(self, data: SolveData, scale: float) -> None:
        self.factor.value = scale * psd_factor(data.cov / self._years(data), name="cov")

    def value(self, w: np.ndarray, data: SolveData) -> float:
        return self.kappa * float(np.sqrt(max(w @ data.cov @ w, 0.0) / self._years(data)))


# --------------------------------------------------------------------------- constraint terms


class Budget:
    r"""Budget :math:`\sum_i w_i = b` (fractions of equity; b = 1 fully invested)."""

    reads = ()

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def __repr__(self) -> str:
        return f"Budget({self.budget})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        return [cp.sum(w) == self.budget * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        pass

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return abs(float(w.sum()) - self.budget)

    def qp_rows(self, data: SolveData, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, l, u): rows of the QP constraint l <= A w <= u."""
        return np.ones((1, n)), np.array([self.budget]), np.array([self.budget])


class Bounds:
    r"""Per-asset bounds :math:`w_{min} \le w_i \le w_{max}` (long-only: :math:`w_{min} = 0`);
    an asset outside the tradable universe (``data.tradable`` False, see
    :func:`perpfolio.optimize.universe.liquid_universe`) is held at :math:`w_i = 0`."""

    qp_pattern = "identity"  # its QP rows are the identity matrix (see perpfolio.optimize.direct)
    reads = ()

    def __init__(self, min_weight: float, max_weight: float) -> None:
        self.min_weight = min_weight
        self.max_weight = max_weight

    def __repr__(self) -> str:
        return f"Bounds({self.min_weight}, {self.max_weight})"

    def limits(self, data: SolveData, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) per asset: the bounds, or 0 for an untradable asset."""
        tradable = np.ones(n, dtype=bool) if data.tradable is None else np.asarray(data.tradable, dtype=bool)
        return np.where(tradable, self.min_weight, 0.0), np.where(tradable, self.max_weight, 0.0)

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.lower = cp.Parameter(w.size, name="lower_bounds")
        self.upper = cp.Parameter(w.size, name="upper_bounds")
        return [w >= cp.multiply(self.lower, kappa), w <= cp.multiply(self.upper, kappa)]

    def update(self, data: SolveData, scale: float) -> None:
        self.lower.value, self.upper.value = self.limits(data, self.lower.size)

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        lower, upper = self.limits(data, len(w))
        return max(0.0, float(np.max(lower - w)), float(np.max(w - upper)))

    def qp_rows(self, data: SolveData, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.eye(n), *self.limits(data, n)


class GrossLeverage:
    r"""Gross leverage :math:`\sum_i |w_i| \le L`."""

    reads = ()

    def __init__(self, max_leverage: float) -> None:
        self.max_leverage = max_leverage

    def __repr__(self) -> str:
        return f"GrossLeverage({self.max_leverage})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        return [cp.norm1(w) <= self.max_leverage * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        pass

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, float(np.abs(w).sum()) - self.max_leverage)


class MaxRebalance:
    r"""Max trade per asset and rebalance :math:`|w_i - w^{prev}_i| \le \delta`.

    Skipped when there is no previous portfolio: then :math:`w^{prev} = 0` and the limit is
    relaxed to ``relaxed`` = max(|w_min|, |w_max|), which the bounds already imply.
    """

    depends_on_data = True  # may not hold for fallback weights (see walk_forward.decide)
    reads = ()

    def __init__(self, max_rebalance: float, *, relaxed: float) -> None:
        self.max_rebalance = max_rebalance
        self.relaxed = relaxed

    def __repr__(self) -> str:
        return f"MaxRebalance({self.max_rebalance})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.w_prev = cp.Parameter(w.size, name="w_prev_rebalance")
        self.delta = cp.Parameter(nonneg=True, name="max_rebalance")
        return [cp.abs(w - kappa * self.w_prev) <= self.delta * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        skip = data.w_prev is None
        self.w_prev.value = np.zeros(self.w_prev.size) if skip else data.w_prev
        self.delta.value = self.relaxed if skip else self.max_rebalance

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        if data.w_prev is None:
            return 0.0
        return max(0.0, float(np.max(np.abs(w - data.w_prev))) - self.max_rebalance)


class TargetReturn:
    r"""Minimum expected return :math:`\mu^\top w \ge \mu_p` (annualized decimal target).

    Compiled as :math:`(s\mu)^\top w \ge s\,\mu_p` with both sides parameters.
    """

    reads = ("mu",)

    def __init__(self, target_return: float) -> None:
        self.target_return = target_return

    def __repr__(self) -> str:
        return f"TargetReturn({self.target_return})"

    def _target(self, data: SolveData) -> float:
        return self.target_return if data.target_return is None else data.target_return

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.mu = cp.Parameter(w.size, name="mu_target")
        self.target = cp.Parameter(name="target_return")
        return [self.mu @ w >= self.target * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        self.mu.value = scale * data.mu
        self.target.value = scale * self._target(data)

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, self._target(data) - float(w @ data.mu))

    def qp_rows(self, data: SolveData, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return scale * data.mu[None, :], np.array([scale * self._target(data)]), np.array([np.inf])


class OverlayCap:
    r"""Overlay cap :math:`\tfrac12 \|w - w^{base}\|_1 \le c`: at most a fraction c of equity
    moves away from the baseline portfolio."""

    reads = ()

    def __init__(self, overlay_cap: float) -> None:
        self.overlay_cap = overlay_cap

    def __repr__(self) -> str:
        return f"OverlayCap({self.overlay_cap})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.w_base = cp.Parameter(w.size, name="w_base")
        return [0.5 * cp.norm1(w - kappa * self.w_base) <= self.overlay_cap * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        if data.w_base is None:
            raise DataError("w_base: the overlay cap needs the baseline weights, got None")
        self.w_base.value = data.w_base

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, 0.5 * float(np.abs(w - data.w_base).sum()) - self.overlay_cap)


class MarginBuffer:
    r"""Initial margin within a buffer: :math:`\sum_i |w_i| / \ell \le 1 - b`.

    With every position opened at leverage :math:`\ell` (``margin_leverage``), a notional of
    :math:`|w_i|` times equity needs :math:`|w_i|/\ell` of equity as initial margin; keeping the
    book's initial margin at most :math:`(1-b)` of equity leaves the fraction :math:`b`
    (``margin_buffer``) free to absorb losses and funding before maintenance margin is touched.
    """

    reads = ()

    def __init__(self, leverage: float, buffer: float) -> None:
        self.leverage, self.buffer = leverage, buffer

    def __repr__(self) -> str:
        return f"MarginBuffer(leverage={self.leverage}, buffer={self.buffer})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        return [cp.norm1(w) / self.leverage <= (1.0 - self.buffer) * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        pass

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, float(np.abs(w).sum()) / self.leverage - (1.0 - self.buffer))


def scenario_shocks(cov: np.ndarray, shock: float) -> np.ndarray:
    r"""Instant returns of two scenarios (rows): the reference asset (index 0, BTC by default)
    moves by ``shock`` and asset i by :math:`\beta_i \cdot` shock,
    :math:`\beta_i = \Sigma_{i0}/\Sigma_{00}`; and every asset moves by ``shock``. A reference asset
    without variance (:math:`\Sigma_{00} = 0`, so :math:`\Sigma_{i0} = 0` for a PSD matrix) explains
    no other asset: :math:`\beta = e_0`."""
    beta = cov[:, 0] / cov[0, 0] if cov[0, 0] > 0 else np.eye(len(cov))[0]
    return np.vstack([beta * shock, np.full(len(beta), shock)])


class StressLoss:
    r"""Worst instant stress loss bounded: :math:`\max_s\, -(\mathrm{shock}_s^\top w) \le L_{max}`
    over the scenarios of :func:`scenario_shocks` (``stress_shock``, e.g. -0.10), as a fraction of
    equity. Linear in w: one row per scenario."""

    depends_on_data = True  # may not hold for fallback weights (see walk_forward.decide)
    reads = ("cov",)  # the betas of the reference-asset scenario

    def __init__(self, max_loss: float, shock: float) -> None:
        self.max_loss, self.shock = max_loss, shock

    def __repr__(self) -> str:
        return f"StressLoss(max_loss={self.max_loss}, shock={self.shock})"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.shocks = cp.Parameter((2, w.size), name="stress_shocks")
        return [-(self.shocks @ w) <= self.max_loss * kappa]

    def update(self, data: SolveData, scale: float) -> None:
        self.shocks.value = scenario_shocks(data.cov, self.shock)

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, float(np.max(-(scenario_shocks(data.cov, self.shock) @ w))) - self.max_loss)

    def qp_rows(self, data: SolveData, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return -scenario_shocks(data.cov, self.shock), np.full(2, -np.inf), np.full(2, self.max_loss)


def stressed_scenarios(returns: np.ndarray, half_life: float) -> np.ndarray:
    r"""Scenarios replayed at today's volatility where it is higher (volatility-updated historical
    simulation, never scaled down): :math:`\tilde r_{s,i} = r_{s,i}\,\max(1, \sigma_{T,i}/\sigma_{s,i})`
    with :math:`\sigma_{s,i}` the EWMA forecast made before bar s,
    :math:`\sigma^2_{s+1,i} = \lambda\sigma^2_{s,i} + (1-\lambda) r^2_{s,i}` (:math:`\lambda = 2^{-1/h}`,
    h = ``half_life`` bars, :math:`\sigma^2_{0,i}` the sample's mean square), and
    :math:`\sigma_{T,i}` the forecast after the last bar. A crash bar is thus scaled by the calm
    volatility before it, not by its own. An asset with :math:`\sigma_{s,i} = 0` keeps its returns.
    Input and output: T x N per-bar returns."""
    r = np.asarray(returns, dtype=float)
    lam = 0.5 ** (1.0 / half_life)
    start = (r**2).mean(axis=0)
    # the recursion as a linear filter: after[s] = lam * after[s-1] + (1 - lam) r[s]^2, after[-1] = start
    after, _ = signal.lfilter([1.0 - lam], [1.0, -lam], r**2, axis=0, zi=lam * start[None, :])
    before = np.vstack([start[None, :], after[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(before > 0, np.sqrt(after[-1] / before), 1.0)
    return r * np.maximum(1.0, factor)


class CVaRLimit:
    r"""Tail risk: the CVaR at level α of the per-bar portfolio loss :math:`-r_s^\top w` over the
    last ``n_scenarios`` bars of the estimation window is at most ``limit`` (per-bar decimal, e.g.
    0.02 = 2% in one bar). Rockafellar-Uryasev form, exact for the empirical distribution:
    :math:`t + \frac{1}{1-\alpha} \sum_s p_s u_s \le L`, :math:`u_s \ge -r_s^\top w - t`,
    :math:`u_s \ge 0`, :math:`p_s = 1/T` (0 on padding rows when the window is shorter). With
    ``stress_half_life`` the scenarios are the stressed ones of :func:`stressed_scenarios`."""

    depends_on_data = True  # may not hold for fallback weights (see walk_forward.decide)
    reads = ()  # the scenarios, checked when set (missing or non-finite: DataError)

    def __init__(self, alpha: float, limit: float, n_scenarios: int, *, stress_half_life: float | None = None) -> None:
        self.alpha, self.limit, self.n_scenarios = alpha, limit, n_scenarios
        self.stress_half_life = stress_half_life

    def __repr__(self) -> str:
        return (f"CVaRLimit(alpha={self.alpha}, limit={self.limit}, n_scenarios={self.n_scenarios}, "
                f"stress_half_life={self.stress_half_life})")

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.returns = cp.Parameter((self.n_scenarios, w.size), name="scenario_returns")
        self.prob = cp.Parameter(self.n_scenarios, nonneg=True, name="scenario_probabilities")
        t = cp.Variable(name="var_level")
        u = cp.Variable(self.n_scenarios, nonneg=True, name="excess_loss")
        return [u >= -(self.returns @ w) - t, t + self.prob @ u / (1.0 - self.alpha) <= self.limit * kappa]

    def _window(self, data: SolveData) -> np.ndarray:
        if data.scenarios is None or len(data.scenarios) == 0:
            raise DataError("cvar_limit needs the window's return scenarios, got none")
        window = np.asarray(data.scenarios, dtype=float)[-self.n_scenarios:]
        if not np.isfinite(window).all():
            raise DataError("cvar_limit: the return scenarios contain NaN or inf")
        return window if self.stress_half_life is None else stressed_scenarios(window, self.stress_half_life)

    def update(self, data: SolveData, scale: float) -> None:
        window = self._window(data)
        padded, prob = np.zeros((self.n_scenarios, window.shape[1])), np.zeros(self.n_scenarios)
        padded[: len(window)], prob[: len(window)] = window, 1.0 / len(window)
        self.returns.value, self.prob.value = padded, prob

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return max(0.0, empirical_cvar(-(self._window(data) @ w), self.alpha) - self.limit)


def empirical_cvar(losses: np.ndarray, alpha: float) -> float:
    r"""CVaR of an empirical loss sample: :math:`\min_t\; t + \mathbb{E}[(L - t)^+]/(1-\alpha)`,
    attained at the α-quantile; equals the mean of the worst (1-α) tail with the boundary sample
    weighted fractionally."""
    ordered = np.sort(losses)[::-1]
    tail = (1.0 - alpha) * len(ordered)
    whole = int(np.floor(tail))
    total = ordered[:whole].sum() + (tail - whole) * (ordered[whole] if whole < len(ordered) else 0.0)
    return float(total / tail)


class SharpeNormalization:
    r"""Normalization of the homogenized max-Sharpe problem: :math:`\hat\mu^\top y = 1`,
    :math:`\hat\mu = \mu / \max_i|\mu_i|` (rf = 0; the positive rescaling of μ does not move
    :math:`w = y/\kappa`). Infeasible when no allowed portfolio has positive expected return."""

    reads = ("mu",)

    def __repr__(self) -> str:
        return "SharpeNormalization()"

    def compile(self, w: cp.Variable, kappa) -> list[cp.Constraint]:
        self.mu = cp.Parameter(w.size, name="mu_sharpe")
        return [self.mu @ w == 1.0]

    def update(self, data: SolveData, scale: float) -> None:
        self.mu.value = data.mu / np.max(np.abs(data.mu))

    def violation(self, w: np.ndarray, data: SolveData) -> float:
        return 0.0


def constraint_violations(w: np.ndarray, constraints: list, data: SolveData) -> dict[str, float]:
    """Violation of each constraint term at weights ``w``, in original units (0 = satisfied)."""
    return {repr(term): term.violation(w, data) for term in constraints}

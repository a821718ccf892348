"""GARCH(1,1) fitted on many windows at once: normal QMLE of a zero-mean model, vectorized across
windows (numpy), so thousands of rolling fits cost seconds instead of one optimizer call each.

Model, on a window ``y_0 .. y_{L-1}`` (scaled to unit variance by the caller):

    sigma2_0 = omega + (alpha + beta) * backcast,   backcast = sum_{i<tau} w_i y_i^2,  w_i ∝ 0.94^i, tau = min(75, L)
    sigma2_t = omega + alpha * y_{t-1}^2 + beta * sigma2_{t-1}                          (t = 1 .. L-1)
    NLL      = (1 / 2L) * sum_t [ log sigma2_t + y_t^2 / sigma2_t ]                     (mean, without log 2 pi)

with ``1e-8 v <= omega <= 10 v`` (v = mean y^2), ``alpha, beta >= 0`` and ``alpha + beta <= 1``:
the specification, backcast and bounds of ``arch``'s ``arch_model(y, mean="Zero", vol="GARCH",
p=1, q=1)`` (arch also clips sigma2 to 1e-6..1e6 times an EWMA of y^2, which never binds on
unit-variance data and is left out). ``tests/test_garch.py`` checks the optimum against arch and
against SLSQP at 1e-14.

Optimizer: damped Newton (Levenberg-Marquardt) steps on the exact gradient and Hessian (both by
recursion alongside sigma2_t), in unconstrained coordinates
``omega = exp(u0)``, ``alpha + beta = logistic(u1)``, ``alpha / (alpha + beta) = logistic(u2)``
(``omega`` clipped to its bounds), from the best of a 4 x 4 grid of starting points. Each window
has its own damping and stops on its own: a window's result never depends on the other windows
of the batch (a range run equals daily runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKCAST_DECAY, BACKCAST_BARS = 0.94, 75
START_ALPHAS = (0.01, 0.05, 0.1, 0.2)
START_PERSISTENCE = (0.5, 0.7, 0.9, 0.98)


@dataclass(frozen=True)
class Garch11:
    """Per-window results (arrays of length B): parameters, mean NLL at the optimum, whether the
    window converged, and the next bar's conditional variance ``sigma2_L`` (the one-step forecast)."""

    omega: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    nll: np.ndarray
    converged: np.ndarray
    next_variance: np.ndarray

    def forecast(self, horizon: int) -> np.ndarray:
        """Mean of the 1..``horizon`` bar-ahead variance forecasts, B values:
        ``E sigma2_{L+1} = next_variance``, ``E sigma2_{L+k} = omega + (alpha + beta) E sigma2_{L+k-1}``."""
        var, total = self.next_variance.copy(), np.zeros_like(self.next_variance)
        for _ in range(horizon):
            total += var
            var = self.omega + (self.alpha + self.beta) * var
        return total / horizon


def backcast(y: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``sum_{i<tau} w_i y_i^2`` per row of the left-aligned B x T windows, ``tau = min(75, L)``."""
    tau = np.minimum(BACKCAST_BARS, lengths)
    w = BACKCAST_DECAY ** np.arange(min(BACKCAST_BARS, y.shape[1]))
    w = np.where(np.arange(w.size)[None, :] < tau[:, None], w[None, :], 0.0)
    return np.sum(y[:, : w.shape[1]] ** 2 * w, axis=1) / w.sum(axis=1)


def _theta(u: np.ndarray, omega_bounds: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(omega, alpha, beta) from the unconstrained coordinates (a logistic of -inf is exactly 0)."""
    with np.errstate(over="ignore"):
        omega = np.clip(np.exp(np.clip(u[:, 0], -700, 700)), *omega_bounds)
        p = 1 / (1 + np.exp(-u[:, 1]))
        s = 1 / (1 + np.exp(-u[:, 2]))
    return omega, p * s, p * (1 - s)


def _recursion(y2: np.ndarray, mask: np.ndarray, lengths: np.ndarray, bc: np.ndarray, omega: np.ndarray,
               alpha: np.ndarray, beta: np.ndarray, *, derivatives: bool):
    """Mean NLL per window; with ``derivatives`` also its gradient (B x 3), its exact Hessian
    (B x 3 x 3) in (omega, alpha, beta) and the next bar's variance.

    ``d_t = d sigma2_t / d theta`` follows ``d_t = (1, y_{t-1}^2, sigma2_{t-1}) + beta d_{t-1}`` from
    ``d_0 = (1, b, b)``; its derivatives are zero except ``D_{t}[i][2] = beta D_{t-1}[i][2] + d_{t-1}[i]``
    (i = omega, alpha) and ``D_t[2][2] = beta D_{t-1}[2][2] + 2 d_{t-1}[2]``. Per bar,
    ``dl/dtheta = (1 - z)/sigma2 d`` and ``d2l = (1 - z)/sigma2 D + (2z - 1)/sigma2^2 d d'`` with
    ``z = y^2 / sigma2``.
    """
    b, t_max = y2.shape
    sigma2 = omega + (alpha + beta) * bc
    nll = np.zeros(b)
    if not derivatives:
        for t in range(t_max):
            nll += mask[:, t] * (np.log(sigma2) + y2[:, t] / sigma2)
            sigma2 = omega + alpha * y2[:, t] + beta * sigma2
        return nll * (0.5 / lengths)
    nxt = np.zeros(b)
    d0, d1, d2 = np.ones(b), bc.copy(), bc.copy()
    e0, e1, e2 = np.zeros(b), np.zeros(b), np.zeros(b)  # D[0][2], D[1][2], D[2][2]
    g = np.zeros((3, b))
    h = np.zeros((6, b))  # 00 01 02 11 12 22
    for t in range(t_max):
        m, obs = mask[:, t], y2[:, t]
        inv = m / sigma2
        z = obs / sigma2
        nll += m * np.log(sigma2) + m * z
        first = (1 - z) * inv
        second = (2 * z - 1) * inv * inv
        g[0] += first * d0
        g[1] += first * d1
        g[2] += first * d2
        h[0] += second * d0 * d0
        h[1] += second * d0 * d1
        h[2] += second * d0 * d2 + first * e0
        h[3] += second * d1 * d1
        h[4] += second * d1 * d2 + first * e1
        h[5] += second * d2 * d2 + first * e2
        following = omega + alpha * obs + beta * sigma2
        nxt = np.where(m, following, nxt)
        e0, e1, e2 = beta * e0 + d0, beta * e1 + d1, beta * e2 + 2 * d2
        d0, d1, d2 = 1 + beta * d0, obs + beta * d1, sigma2 + beta * d2
        sigma2 = following
    scale = 0.5 / lengths
    hess = np.empty((b, 3, 3))
    for k, (i, j) in enumerate(((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))):
        hess[:, i, j] = hess[:, j, i] = h[k] * scale
    return nll * scale, (g * scale).T, hess, nxt


def fit_garch11(y: np.ndarray, lengths: np.ndarray, *, max_iter: int = 200, tol: float = 1e-12) -> Garch11:
    """GARCH(1,1) QMLE of every row of ``y`` (B x T, each row's ``lengths[b]`` observations first,
    then anything: it is masked). A window converges when a step improves its mean NLL by less
    than ``tol`` or no damped step improves it; one still improving after ``max_iter`` steps is
    reported with ``converged = False``."""
    y = np.asarray(y, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    b, t_max = y.shape
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    y2 = np.where(mask, y, 0.0) ** 2
    bc = backcast(y, lengths)
    v = y2.sum(axis=1) / lengths
    bounds = (1e-8 * v, 10.0 * v)

    best_nll, u = np.full(b, np.inf), np.zeros((b, 3))
    for alpha0 in START_ALPHAS:
        for p0 in START_PERSISTENCE:
            omega0 = np.clip((1 - p0) * v, *bounds)
            nll = _recursion(y2, mask, lengths, bc, omega0, np.full(b, alpha0), np.full(b, p0 - alpha0), derivatives=False)
            better = nll < best_nll
            best_nll = np.where(better, nll, best_nll)
            start = np.stack([np.log(omega0), np.full(b, np.log(p0 / (1 - p0))),
                              np.full(b, np.log(alpha0 / (p0 - alpha0)))], axis=1)
            u = np.where(better[:, None], start, u)

    def evaluate(u_rows: np.ndarray, rows: np.ndarray):
        omega, alpha, beta = _theta(u_rows, (bounds[0][rows], bounds[1][rows]))
        nll, grad, hess, nxt = _recursion(y2[rows], mask[rows], lengths[rows], bc[rows], omega, alpha, beta, derivatives=True)
        # chain rule to u: omega' = omega (0 where clipped), d(alpha, beta)/d(u1, u2) through p and s
        p, s = alpha + beta, np.divide(alpha, alpha + beta, out=np.zeros_like(alpha), where=(alpha + beta) > 0)
        inside = (omega > bounds[0][rows]) & (omega < bounds[1][rows])
        jac = np.zeros((rows.size, 3, 3))
        jac[:, 0, 0] = np.where(inside, omega, 0.0)
        dp, ds = p * (1 - p), s * (1 - s)
        jac[:, 1, 1], jac[:, 1, 2] = s * dp, p * ds
        jac[:, 2, 1], jac[:, 2, 2] = (1 - s) * dp, -p * ds
        g_u = np.einsum("bij,bi->bj", jac, grad)
        h_u = np.einsum("bij,bik,bkl->bjl", jac, hess, jac)
        dp2, ds2 = dp * (1 - 2 * p), ds * (1 - 2 * s)  # second derivatives of the logistic maps
        h_u[:, 0, 0] += grad[:, 0] * jac[:, 0, 0]
        h_u[:, 1, 1] += grad[:, 1] * s * dp2 + grad[:, 2] * (1 - s) * dp2
        h_u[:, 2, 2] += (grad[:, 1] - grad[:, 2]) * p * ds2
        cross = (grad[:, 1] - grad[:, 2]) * dp * ds
        h_u[:, 1, 2] += cross
        h_u[:, 2, 1] += cross
        return nll, g_u, h_u, nxt

    rows = np.arange(b)
    nll, g_u, h_u, nxt = evaluate(u, rows)
    damping = np.full(b, 1e-3)
    converged = np.zeros(b, dtype=bool)
    active = np.ones(b, dtype=bool)
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        h = h_u[rows]
        diag = np.abs(np.einsum("bii->bi", h))
        system = h + (damping[rows][:, None] * (diag + 1e-12))[:, :, None] * np.eye(3)[None]
        try:
            step = -np.linalg.solve(system, g_u[rows][:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # an exactly singular system somewhere: least squares, row by row
            step = -np.stack([np.linalg.lstsq(m, g, rcond=None)[0] for m, g in zip(system, g_u[rows])])
        trial = u[rows] + step
        t_nll, t_g, t_h, t_nxt = evaluate(trial, rows)
        improved = np.isfinite(t_nll) & (t_nll < nll[rows])
        gain = np.where(improved, nll[rows] - t_nll, 0.0)
        keep = rows[improved]
        u[keep], nll[keep], g_u[keep], h_u[keep], nxt[keep] = (trial[improved], t_nll[improved], t_g[improved],
                                                                t_h[improved], t_nxt[improved])
        damping[rows] = np.where(improved, np.maximum(damping[rows] / 3, 1e-12), damping[rows] * 8)
        done = (improved & (gain < tol)) | (damping[rows] > 1e12)
        converged[rows[done]] = True
        active[rows[done]] = False
    omega, alpha, beta = _theta(u, bounds)
    return Garch11(omega=omega, alpha=alpha, beta=beta, nll=nll, converged=converged, next_variance=nxt)

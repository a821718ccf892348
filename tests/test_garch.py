"""The batched GARCH(1,1) fit against arch, against SLSQP at 1e-14 and against its own finite
differences; window independence and masking."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize

from perpfolio.garch import _recursion, backcast, fit_garch11

T = 720


def simulate(rng: np.random.Generator, alpha: float, beta: float, n: int = T, dof: float = 5.0) -> np.ndarray:
    """A zero-mean GARCH(1,1) path with unit-variance t innovations, scaled to unit sample variance."""
    y, s2 = np.empty(n), 1.0
    for t in range(n):
        y[t] = np.sqrt(s2) * rng.standard_t(dof) / np.sqrt(dof / (dof - 2))
        s2 = (1 - alpha - beta) + alpha * y[t] ** 2 + beta * s2
    return y / y.std()


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    rng = np.random.default_rng(11)
    params = [(0.05, 0.9), (0.1, 0.85), (0.2, 0.6), (0.02, 0.97), (0.15, 0.84), (0.0, 0.0), (0.3, 0.3), (0.08, 0.91)]
    return np.array([simulate(rng, a, b) for a, b in params] + [rng.standard_normal(T) for _ in range(2)])


def mean_nll(y: np.ndarray, theta: np.ndarray) -> float:
    """The objective by a plain loop (arch's recursion and backcast), mean over bars, no log 2 pi."""
    omega, alpha, beta = theta
    w = 0.94 ** np.arange(75)
    sigma2 = omega + (alpha + beta) * np.sum(y[:75] ** 2 * w) / w.sum()
    total = 0.0
    for obs in y:
        total += np.log(sigma2) + obs**2 / sigma2
        sigma2 = omega + alpha * obs**2 + beta * sigma2
    return 0.5 * total / y.size


def test_backcast_is_archs(windows):
    from arch.univariate import GARCH

    lengths = np.array([T, 50, T, 75, T, T, T, T, 10, T])
    got = backcast(windows, lengths)
    for y, length, value in zip(windows, lengths, got):
        assert value == pytest.approx(GARCH().backcast(y[:length]), rel=1e-13)


def test_the_optimum_is_at_least_archs_and_forecasts_agree(windows):
    from arch import arch_model

    fit = fit_garch11(windows, np.full(len(windows), T))
    assert fit.converged.all()
    forecast = fit.forecast(24)
    same_optimum = 0
    for b, y in enumerate(windows):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = arch_model(y, mean="Zero", vol="GARCH", p=1, q=1, rescale=False).fit(disp="off", show_warning=False)
        arch_nll = -res.loglikelihood / T - 0.5 * np.log(2 * np.pi)
        assert fit.nll[b] <= arch_nll + 1e-9  # never a worse likelihood than arch's SLSQP
        assert fit.nll[b] == pytest.approx(mean_nll(y, [fit.omega[b], fit.alpha[b], fit.beta[b]]), rel=1e-12)
        if arch_nll - fit.nll[b] < 1e-9:  # the same optimum: the same forecast
            arch_var = res.forecast(horizon=24, reindex=False).variance.to_numpy()[-1].mean()
            assert forecast[b] == pytest.approx(arch_var, rel=2e-3)
            same_optimum += 1
    assert same_optimum >= 8  # incl. optima on the alpha = 0 boundary (the i.i.d. windows)


def test_the_optimum_is_within_1e_9_of_slsqp_at_1e_14(windows):
    """Reference: SLSQP on the same objective (plain loop) with ftol 1e-14 from four starts, under
    arch's bounds and the stationarity constraint alpha + beta <= 1."""
    fit = fit_garch11(windows, np.full(len(windows), T))
    for b, y in enumerate(windows[:6]):
        v = np.mean(y**2)
        best = np.inf
        for start in ([0.1 * v, 0.05, 0.85], [0.5 * v, 0.2, 0.3], [0.02 * v, 0.05, 0.93], [0.9 * v, 0.01, 0.05]):
            res = minimize(lambda th: mean_nll(y, th), start, method="SLSQP",
                           bounds=[(1e-8 * v, 10 * v), (0, 1), (0, 1)],
                           constraints=[{"type": "ineq", "fun": lambda th: 1 - th[1] - th[2]}],
                           options={"ftol": 1e-14, "maxiter": 1000})
            best = min(best, res.fun)
        assert fit.nll[b] <= best + 1e-9
        assert fit.alpha[b] >= 0 and fit.beta[b] >= 0 and fit.alpha[b] + fit.beta[b] <= 1


def test_gradient_and_hessian_equal_finite_differences(windows):
    y = windows[:3]
    y2, mask, lengths, bc = y**2, np.ones_like(y, dtype=bool), np.full(3, T), backcast(y, np.full(3, T))
    theta = np.array([[0.1, 0.08, 0.8], [0.3, 0.15, 0.5], [0.05, 0.03, 0.9]])
    _, grad, hess, _ = _recursion(y2, mask, lengths, bc, *theta.T, derivatives=True)

    def value_and_grad(th):
        nll, g, _, _ = _recursion(y2, mask, lengths, bc, *th.T, derivatives=True)
        return nll, g

    h = 1e-6
    for j in range(3):
        step = np.zeros_like(theta)
        step[:, j] = h
        (up, g_up), (down, g_down) = value_and_grad(theta + step), value_and_grad(theta - step)
        np.testing.assert_allclose(grad[:, j], (up - down) / (2 * h), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(hess[:, :, j], (g_up - g_down) / (2 * h), rtol=1e-5, atol=1e-7)


def test_a_window_fits_the_same_alone_or_in_any_batch(windows):
    together = fit_garch11(windows, np.full(len(windows), T))
    for b in (0, 3, 7):
        alone = fit_garch11(windows[b : b + 1], np.array([T]))
        for name in ("omega", "alpha", "beta", "nll", "next_variance"):
            assert getattr(alone, name)[0] == pytest.approx(getattr(together, name)[b], rel=1e-10, abs=1e-14)


def test_masked_bars_are_ignored(windows):
    """A row with L observations then padding fits like the L observations alone."""
    short = 500
    padded = windows[:2].copy()
    padded[:, short:] = 99.0  # garbage after each row's length: masked
    masked = fit_garch11(padded, np.array([short, short]))
    alone = fit_garch11(windows[:2, :short], np.array([short, short]))
    np.testing.assert_allclose(masked.nll, alone.nll, rtol=1e-12)
    np.testing.assert_allclose(masked.next_variance, alone.next_variance, rtol=1e-10)


def test_forecast_follows_the_garch_recursion():
    from perpfolio.garch import Garch11

    fit = Garch11(omega=np.array([0.1]), alpha=np.array([0.1]), beta=np.array([0.8]), nll=np.array([0.0]),
                  converged=np.array([True]), next_variance=np.array([2.0]))
    expected = [2.0]
    for _ in range(2):
        expected.append(0.1 + 0.9 * expected[-1])
    assert fit.forecast(3)[0] == pytest.approx(np.mean(expected), rel=1e-15)


def test_degenerate_windows_neither_crash_nor_pass_as_fits():
    """A window of zeros but one spike, and one alternating +-1 (no volatility clustering, a ridge of
    optima): the batch still returns, with finite parameters inside the bounds."""
    spike = np.zeros(T)
    spike[T // 2] = np.sqrt(T)
    alternating = np.where(np.arange(T) % 2 == 0, 1.0, -1.0)
    fit = fit_garch11(np.array([spike, alternating]), np.array([T, T]))
    assert np.isfinite(fit.omega).all() and np.isfinite(fit.nll).all()
    assert ((fit.alpha >= 0) & (fit.beta >= 0) & (fit.alpha + fit.beta <= 1)).all()
    # y^2 = 1 throughout: every theta with omega + alpha + beta = 1 keeps sigma2 = 1, the minimum 1/2
    assert fit.nll[1] == pytest.approx(0.5, abs=1e-9)


def test_predicted_vol_is_the_same_in_any_chunking(windows):
    """garch_predicted_vol fits its windows a chunk at a time (memory); the chunk size changes nothing,
    and a window with a missing bar (not allowed by default) stays NaN in every chunking."""
    from perpfolio.signals import garch_predicted_vol

    r = np.column_stack([windows[0], windows[1]]) * 0.01
    r = np.vstack([r, r[:72]])
    r[T + 30, 1] = np.nan
    ends = np.array([T - 1, T + 23, T + 47, T + 71])
    kwargs = dict(window=T, horizon=24, periods_per_year=8760.0)
    whole, stats = garch_predicted_vol(r, ends, **kwargs)
    pieces, _ = garch_predicted_vol(r, ends, chunk=3, **kwargs)
    np.testing.assert_allclose(pieces, whole, rtol=1e-10)
    assert stats["garch_fits"] == 6 and np.isnan(whole[2:, 1]).all() and np.isfinite(whole[:2, 1]).all()
    assert np.isfinite(whole[:, 0]).all()

"""keras_ncssl.theory against the equations of [DP] (Tian, Chen & Ganguli, ICML 2021).

Each test re-derives what it checks from the paper's equations (written out here, not imported)
or from an exact solution, with fresh random parameters from the `rng` fixture.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from keras_ncssl import diagnostics, theory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def _psd(rng, n, floor=0.0, scale=1.0):
    a = rng.normal(size=(n, n))
    return scale * a @ a.T / n + floor * np.eye(n)


def _p_dot(p, tau, eta, sigma2):
    """[DP] Eq. on the invariant parabola: p_dot = p^2 (tau - (1 + sigma2) p) - eta p."""
    return p ** 2 * (tau - (1.0 + sigma2) * p) - eta * p


def _random_regime(rng):
    tau = rng.uniform(0.6, 1.0)
    sigma2 = rng.uniform(0.0, 0.5)
    boundary = tau ** 2 / (4.0 * (1.0 + sigma2))
    return tau, sigma2, boundary


# --------------------------------------------------------------------------------------------
# Fixed points, stability, collapse boundary
# --------------------------------------------------------------------------------------------

def test_fixed_points_are_zeros_with_the_right_stability(rng):
    for _ in range(20):
        tau, sigma2, boundary = _random_regime(rng)
        eta = rng.uniform(0.02, 0.95) * boundary
        p_minus, p_plus = theory.fixed_points(tau, eta, sigma2)
        assert 0.0 < p_minus < p_plus
        for p in (p_minus, p_plus):
            assert abs(_p_dot(p, tau, eta, sigma2)) < 1e-14
        # Stability from the sign of the slope, by central differences of the test's own p_dot.
        h = 1e-6
        slope = [(_p_dot(p + h, tau, eta, sigma2) - _p_dot(p - h, tau, eta, sigma2)) / (2 * h)
                 for p in (p_minus, p_plus)]
        assert slope[0] > 0, "p_minus must be unstable"
        assert slope[1] < 0, "p_plus must be stable"
        np.testing.assert_allclose(
            theory.parabola_flow_derivative([p_minus, p_plus], tau, eta, sigma2), slope,
            rtol=1e-6, atol=1e-9)
        # No other positive zero: p_dot > 0 strictly between them, < 0 beyond p_plus.
        inside = np.linspace(p_minus, p_plus, 50)[1:-1]
        assert np.all(_p_dot(inside, tau, eta, sigma2) > 0)
        assert np.all(_p_dot(np.linspace(p_plus, 3.0, 50)[1:], tau, eta, sigma2) < 0)
        assert np.all(_p_dot(np.linspace(0.0, p_minus, 50)[1:-1], tau, eta, sigma2) < 0)


def test_collapse_condition_switches_exactly_at_the_boundary(rng):
    for _ in range(20):
        tau, sigma2, boundary = _random_regime(rng)
        np.testing.assert_allclose(theory.collapse_eta(tau, sigma2), boundary, rtol=1e-15)
        at = theory.collapse_eta(tau, sigma2)
        above = np.nextafter(at, np.inf)
        double = theory.fixed_points(tau, at, sigma2)
        assert len(double) == 2
        np.testing.assert_allclose(double, [tau / (2 * (1 + sigma2))] * 2, rtol=1e-6)
        assert theory.fixed_points(tau, above, sigma2) == ()
        assert len(theory.fixed_points(tau, np.nextafter(at, 0.0), sigma2)) == 2
        # Above the boundary p_dot < 0 for every p > 0: zero is the only fixed point.
        p = np.linspace(1e-4, 2.0, 2000)
        assert np.all(_p_dot(p, tau, rng.uniform(1.0001, 3.0) * boundary, sigma2) < 0)


def test_fixed_points_at_zero_weight_decay_and_monotonicity(rng):
    tau, sigma2, boundary = _random_regime(rng)
    p_minus, p_plus = theory.fixed_points(tau, 0.0, sigma2)
    assert p_minus == 0.0
    np.testing.assert_allclose(p_plus, tau / (1 + sigma2), rtol=1e-15)
    etas = np.sort(rng.uniform(0.01, 0.99, 10)) * boundary
    p_minus_eta = [theory.fixed_points(tau, e, sigma2)[0] for e in etas]
    assert np.all(np.diff(p_minus_eta) > 0), "p_minus rises with eta"
    eta = 0.5 * boundary
    taus = np.sort(rng.uniform(tau, 2.0, 10))
    p_minus_tau = [theory.fixed_points(t, eta, sigma2)[0] for t in taus]
    assert np.all(np.diff(p_minus_tau) < 0), "p_minus falls with tau"


def test_starts_above_p_minus_reach_p_plus_and_below_collapse(rng):
    tau, sigma2, boundary = _random_regime(rng)
    eta = rng.uniform(0.4, 0.7) * boundary
    alpha_p = rng.uniform(0.5, 2.0)
    p_minus, p_plus = theory.fixed_points(tau, eta, sigma2)
    factors = np.array([0.5, 0.9, 0.97, 1.03, 1.1, 2.0, p_plus / p_minus * 1.5])
    p0 = p_minus * factors
    # On the invariant parabola (c = 0) the (p, s) system reduces exactly to the 1-D flow.
    run = theory.simulate_modes(p0, p0 ** 2 / alpha_p, tau, alpha_p=alpha_p, eta=eta,
                                sigma2=sigma2, t_end=400.0, dt=0.2, record_every=100)
    above = factors > 1
    np.testing.assert_allclose(run.p[-1, above], p_plus, rtol=1e-6)
    assert np.all(np.abs(run.p[-1, ~above]) < 1e-3 * p_minus)
    np.testing.assert_allclose(run.s, run.p ** 2 / alpha_p, rtol=1e-6, atol=1e-12)
    # The same with the 1-D integrator.
    _, p = theory.simulate_parabola(p0, tau, eta, sigma2, t_end=400.0, dt=0.2, record_every=100)
    np.testing.assert_allclose(p[-1, above], p_plus, rtol=1e-6)
    assert np.all(np.abs(p[-1, ~above]) < 1e-3 * p_minus)


# --------------------------------------------------------------------------------------------
# Decoupled modes and the integral of motion
# --------------------------------------------------------------------------------------------

def test_mode_flow_is_the_scalar_network_by_the_chain_rule(rng):
    alpha_p, eta, sigma2, beta = rng.uniform(0.2, 3.0), rng.uniform(0, 0.3), rng.uniform(0, 1), \
        rng.uniform(0.1, 1.0)
    w, wp, wa = rng.normal(size=(3, 50))
    a = 1 + sigma2
    # Scalar network ([DP] App. D with lambda_d = 1, lambda_s = 1 + sigma2).
    dwp = alpha_p * (wa - wp * w * a) * w - eta * wp
    dw = wp * (wa - wp * w * a) - eta * w
    dwa = beta * (w - wa)
    dp, ds, dtau = theory.mode_flow(wp, w ** 2, wa / w, alpha_p=alpha_p, eta=eta, sigma2=sigma2,
                                    beta=beta)
    np.testing.assert_allclose(dp, dwp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ds, 2 * w * dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dtau, dwa / w - wa * dw / w ** 2, rtol=1e-9, atol=1e-9)


def test_lemma1_flow_on_diagonal_matrices_is_the_mode_flow(rng):
    n = 5
    alpha_p, eta, sigma2, beta = rng.uniform(0.2, 3.0), rng.uniform(0, 0.3), rng.uniform(0, 1), \
        rng.uniform(0.1, 1.0)
    w, p, wa = rng.uniform(0.2, 1.5, n), rng.normal(size=n), rng.normal(size=n)
    dW, dWp, dWa = theory.linear_flow(np.diag(w), np.diag(p), np.diag(wa), noise=sigma2,
                                      alpha_p=alpha_p, eta=eta, beta=beta)
    for matrix in (dW, dWp, dWa):
        np.testing.assert_allclose(matrix - np.diag(np.diag(matrix)), 0.0, atol=1e-14)
    dp, ds, dtau = theory.mode_flow(p, w ** 2, wa / w, alpha_p=alpha_p, eta=eta, sigma2=sigma2,
                                    beta=beta)
    np.testing.assert_allclose(np.diag(dWp), dp, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(2 * w * np.diag(dW), ds, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose((np.diag(dWa) - wa / w * np.diag(dW)) / w, dtau, rtol=1e-9,
                               atol=1e-12)


def test_simulated_modes_follow_the_mode_flow(rng):
    # simulate_modes advances the scalar network; its (p, s, tau) must solve mode_flow.
    n = 6
    alpha_p, eta = rng.uniform(0.3, 2.0), rng.uniform(0.0, 0.2)
    sigma2, beta = rng.uniform(0.0, 0.5), rng.uniform(0.2, 1.0)
    p0, s0, tau0 = rng.uniform(0.1, 1.0, n), rng.uniform(0.1, 1.0, n), rng.uniform(0.2, 1.0, n)
    dt = 1e-3
    run = theory.simulate_modes(p0, s0, tau0, alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta,
                                t_end=2.0, dt=dt)
    middle = (run.p[1:-1], run.s[1:-1], run.tau[1:-1])
    expected = theory.mode_flow(*middle, alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta)
    for series, derivative in zip((run.p, run.s, run.tau), expected):
        central = (series[2:] - series[:-2]) / (2 * dt)  # O(dt^2) accurate
        np.testing.assert_allclose(central, derivative, rtol=0, atol=1e-5)
    assert np.abs(run.tau[-1] - tau0).max() > 1e-2


def test_integral_of_motion_holds_along_a_trajectory(rng):
    n = 12
    alpha_p, eta = rng.uniform(0.3, 3.0), rng.uniform(0.02, 0.2)
    sigma2, beta = rng.uniform(0.0, 0.5), rng.uniform(0.2, 1.0)
    p0, s0, tau0 = rng.uniform(-0.5, 1.0, n), rng.uniform(0.01, 1.0, n), rng.uniform(0, 1, n)
    run = theory.simulate_modes(p0, s0, tau0, alpha_p=alpha_p, eta=eta, sigma2=sigma2, beta=beta,
                                t_end=10.0, dt=0.01, record_every=10)
    c = s0 - p0 ** 2 / alpha_p  # the corrected sign; [DP] prints p0^2/alpha_p - s0
    predicted = c * np.exp(-2 * eta * run.t)[:, None]
    # RK4 keeps the quadratic invariant only to O(dt^4): ~1e-8 here.
    np.testing.assert_allclose(run.s - run.p ** 2 / alpha_p, predicted, rtol=0, atol=1e-7)
    np.testing.assert_allclose(theory.motion_constant(p0, s0, alpha_p), c, rtol=1e-15)
    np.testing.assert_allclose(
        theory.invariant_s(run.p, run.t[:, None], c, alpha_p=alpha_p, eta=eta), run.s,
        rtol=0, atol=1e-7)
    # The printed sign would be wrong wherever c != 0.
    paper = (p0 ** 2 / alpha_p - s0) * np.exp(-2 * eta * run.t)[:, None]
    assert np.max(np.abs(run.s - run.p ** 2 / alpha_p - paper)) > 1e-2
    # With the EMA, tau actually moved (else this would not test the general case).
    assert np.nanmax(np.abs(run.tau[-1] - tau0)) > 1e-2


# --------------------------------------------------------------------------------------------
# Full Lemma 1 flow: balancing, stop-gradient, predictor, integrator
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [None, 0.5])
def test_balancing_residual_decays_at_rate_two_eta(rng, beta):
    n1, n2 = 6, 4
    eta, alpha_p = rng.uniform(0.05, 0.3), rng.uniform(0.3, 2.0)
    W0 = rng.normal(size=(n2, n1)) / np.sqrt(n1)
    Wp0 = rng.normal(size=(n2, n2)) / np.sqrt(n2)
    run = theory.simulate_linear(W0, Wp0, X=_psd(rng, n1, 0.1, 0.5), noise=_psd(rng, n1, 0.0, 0.3),
                                 alpha_p=alpha_p, eta=eta, beta=beta, t_end=8.0, dt=0.005,
                                 record_every=80)
    residual = diagnostics.balancing_residual(run.W, run.Wp, alpha_p)
    rate = -np.polyfit(run.t, np.log(np.linalg.norm(residual, axis=(1, 2))), 1)[0]
    # Exact in continuous time; what is left is RK4's O(dt^4) error (<~1e-8 here).
    np.testing.assert_allclose(rate, 2 * eta, rtol=1e-7)
    # Thm 1 in full: R(t) = exp(-2 eta t) R(0) entry by entry.
    np.testing.assert_allclose(residual, np.exp(-2 * eta * run.t)[:, None, None] * residual[0],
                               rtol=0, atol=1e-7 * np.abs(residual[0]).max())
    assert np.linalg.norm(run.W[-1] - W0) > 0.05, "the weights must actually move"


def test_without_stop_gradient_w_decays_to_zero_thm2(rng):
    n1, n2 = 5, 3
    X = _psd(rng, n1, 0.2)
    noise = _psd(rng, n1, rng.uniform(0.2, 0.4), 0.2)
    eta = rng.uniform(0.0, 0.02)
    W0 = rng.normal(size=(n2, n1)) / np.sqrt(n1)
    Wp0 = np.eye(n2) + 0.1 * rng.normal(size=(n2, n2))
    common = dict(X=X, noise=noise, alpha_p=1.0, eta=eta, t_end=30.0, dt=0.02, record_every=50)
    free = theory.simulate_linear(W0, Wp0, stop_gradient=False, **common)
    norms = np.linalg.norm(free.W, axis=(1, 2))
    # H >= (lambda_min(X') + eta) I, so ||W(t)|| <= exp(-(lambda_min(X') + eta) t) ||W(0)||.
    lambda0 = np.linalg.eigvalsh(noise)[0] + eta
    assert np.all(norms <= np.exp(-lambda0 * free.t) * norms[0] * (1 + 1e-9))
    assert norms[-1] < 1e-3 * norms[0]
    # Same start with stop-gradient: no collapse.
    held = theory.simulate_linear(W0, Wp0, stop_gradient=True, **common)
    assert np.linalg.norm(held.W[-1]) > 0.3 * norms[0]


def test_no_stop_gradient_flow_is_minus_h_vec_w(rng):
    n1, n2 = 4, 3
    X, noise = _psd(rng, n1, 0.1), _psd(rng, n1, 0.05)
    eta = rng.uniform(0.0, 0.3)
    W, Wp = rng.normal(size=(n2, n1)), rng.normal(size=(n2, n2))
    dW, _ = theory.linear_flow(W, Wp, X=X, noise=noise, eta=eta, stop_gradient=False)
    tilde = Wp - np.eye(n2)
    H = (np.kron(noise, Wp.T @ Wp + np.eye(n2)) + np.kron(X, tilde.T @ tilde)
         + eta * np.eye(n1 * n2))
    np.testing.assert_allclose(dW.reshape(-1, order="F"), -H @ W.reshape(-1, order="F"),
                               rtol=1e-10, atol=1e-12)


def test_without_predictor_w_collapses_exactly_as_expm(rng):
    n1, n2 = 5, 3
    noise, eta = _psd(rng, n1, 0.2, 0.5), rng.uniform(0.0, 0.1)
    W0 = rng.normal(size=(n2, n1))
    run = theory.simulate_linear(W0, X=_psd(rng, n1, 0.1), noise=noise, eta=eta,
                                 predictor="identity", t_end=40.0, dt=0.05, record_every=100)
    # Wp = I, Wa = W: dW/dt = -W (X' + eta I), solved by the matrix exponential.
    for t, W in zip(run.t, run.W):
        np.testing.assert_allclose(W, W0 @ scipy.linalg.expm(-(noise + eta * np.eye(n1)) * t),
                                   rtol=0, atol=1e-8)
    assert np.linalg.norm(run.W[-1]) < 1e-3 * np.linalg.norm(W0)
    np.testing.assert_array_equal(run.Wp, np.broadcast_to(np.eye(n2), run.Wp.shape))
    # With an EMA target (BYOL), X = I, X' = sigma2 I and no predictor, (w, wa) per entry obey
    # the 2 x 2 system [[-(1 + sigma2), 1], [beta, -beta]], whose eigenvalues are both < 0.
    sigma2, beta = rng.uniform(0.3, 0.5), rng.uniform(0.5, 1.0)
    slowest = np.linalg.eigvals([[-(1 + sigma2), 1.0], [beta, -beta]]).real.max()
    byol = theory.simulate_linear(W0, noise=sigma2, eta=0.0, beta=beta, predictor="identity",
                                  t_end=150.0, dt=0.05, record_every=100)
    assert np.linalg.norm(byol.W[-1]) < 1e-3 * np.linalg.norm(W0)
    assert np.linalg.norm(byol.Wa[-1]) < 1e-3 * np.linalg.norm(W0)
    late = byol.t > 75
    rate = np.polyfit(byol.t[late], np.log(np.linalg.norm(byol.W[late], axis=(1, 2))), 1)[0]
    np.testing.assert_allclose(rate, slowest, rtol=1e-4)


@pytest.mark.parametrize("method, order", [("rk4", 4), ("euler", 1)])
def test_integrator_has_its_stated_order(rng, method, order):
    n1, n2 = 4, 2
    noise = _psd(rng, n1, 0.5)
    W0 = rng.normal(size=(n2, n1))
    exact = W0 @ scipy.linalg.expm(-noise * 3.0)
    errors = [np.abs(theory.simulate_linear(W0, noise=noise, predictor="identity", t_end=3.0,
                                            dt=dt, method=method).W[-1] - exact).max()
              for dt in (0.1, 0.05)]
    assert 2 ** order * 0.75 < errors[0] / errors[1] < 2 ** order * 1.25


# --------------------------------------------------------------------------------------------
# Symmetric (F, Wp) flow and eigenspace alignment (Thm 3)
# --------------------------------------------------------------------------------------------

def test_symmetric_flow_is_lemma1_with_symmetric_predictor(rng):
    n1, n2 = 6, 4
    sigma2, alpha_p, eta = rng.uniform(0, 0.5), rng.uniform(0.3, 2.0), rng.uniform(0, 0.2)
    W = rng.normal(size=(n2, n1)) / np.sqrt(n1)
    A = rng.normal(size=(n2, n2)) / np.sqrt(n2)
    Wp = (A + A.T) / 2
    dW, dWp = theory.linear_flow(W, Wp, noise=sigma2, alpha_p=alpha_p, eta=eta,
                                 predictor="symmetric")
    dF, dWp_sym = theory.symmetric_flow(W @ W.T, Wp, tau=1.0, sigma2=sigma2, alpha_p=alpha_p,
                                        eta=eta)
    np.testing.assert_allclose(dF, dW @ W.T + W @ dW.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dWp_sym, dWp, rtol=1e-10, atol=1e-12)
    full = theory.simulate_linear(W, Wp, noise=sigma2, alpha_p=alpha_p, eta=eta,
                                  predictor="symmetric", t_end=4.0, dt=0.005, record_every=100)
    t, F, Wp_t = theory.simulate_symmetric(W @ W.T, Wp, sigma2=sigma2, alpha_p=alpha_p, eta=eta,
                                           t_end=4.0, dt=0.005, record_every=100)
    np.testing.assert_allclose(t, full.t)
    # Same flow in different variables: they differ only by RK4's O(dt^4) error.
    np.testing.assert_allclose(F, full.F, atol=2e-7)
    np.testing.assert_allclose(Wp_t, full.Wp, atol=2e-7)
    assert np.abs(F[-1] - F[0]).max() > 1e-2, "the state must actually move"


def test_commutator_obeys_the_thm3_equation(rng):
    n = 5
    tau, sigma2 = rng.uniform(0.2, 1.0), rng.uniform(0.0, 0.5)
    alpha_p, eta = rng.uniform(0.2, 3.0), rng.uniform(0.0, 0.3)
    F = _psd(rng, n)
    A = rng.normal(size=(n, n))
    Wp = A + A.T
    dF, dWp = theory.symmetric_flow(F, Wp, tau=tau, sigma2=sigma2, alpha_p=alpha_p, eta=eta)
    C = F @ Wp - Wp @ F
    dC = dF @ Wp + F @ dWp - dWp @ F - Wp @ dF
    a = 1 + sigma2
    K = a * (alpha_p / 2 * F + Wp @ Wp - tau / a * Wp) + 1.5 * eta * np.eye(n)
    np.testing.assert_allclose(
        theory.alignment_operator(F, Wp, tau=tau, sigma2=sigma2, alpha_p=alpha_p, eta=eta), K,
        rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dC, -(C @ K + K @ C), rtol=1e-10, atol=1e-10)


def test_commutator_decays_when_k_is_positive_definite(rng):
    n = 5
    tau, sigma2, alpha_p = 1.0, rng.uniform(0.0, 0.3), rng.uniform(0.5, 2.0)
    a = 1 + sigma2
    # tau^2/(6a) < eta < tau^2/(4a) makes K >= (1.5 eta - tau^2/(4a)) I > 0 for every F >= 0,
    # while non-zero fixed points still exist.
    eta = tau ** 2 / (5 * a)
    Q1, Q2 = _orthogonal(rng, n), _orthogonal(rng, n)
    Wp0 = Q1 @ np.diag(rng.uniform(0.35, 1.2, n) / a) @ Q1.T
    F0 = Q2 @ np.diag(rng.uniform(0.5, 1.5, n)) @ Q2.T
    t, F, Wp = theory.simulate_symmetric(F0, Wp0, tau=tau, sigma2=sigma2, alpha_p=alpha_p,
                                         eta=eta, t_end=60.0, dt=0.05, record_every=10)
    K = theory.alignment_operator(F, Wp, tau=tau, sigma2=sigma2, alpha_p=alpha_p, eta=eta)
    lambda0 = np.linalg.eigvalsh(K)[:, 0].min()
    assert lambda0 > 0
    norms = diagnostics.commutator_norm(F, Wp)
    assert norms[0] > 0.01
    assert np.all(norms <= np.exp(-2 * lambda0 * t) * norms[0] * (1 + 1e-8) + 1e-13)
    assert norms[-1] < 1e-3 * norms[0]
    assert diagnostics.spectrum(F[-1])[0] > 0.1, "alignment must not come from collapse"


def test_full_flow_aligns_symmetrises_and_reaches_p_plus(rng):
    n1, n2 = 8, 4
    alpha_p, beta, eta, sigma2 = rng.uniform(0.7, 1.5), 0.4, 0.04, rng.uniform(0.0, 0.2)
    W0 = rng.normal(size=(n2, n1)) / np.sqrt(n1)
    Wp0 = np.eye(n2) * 0.6 + 0.3 * rng.normal(size=(n2, n2))
    run = theory.simulate_linear(W0, Wp0, noise=sigma2, alpha_p=alpha_p, eta=eta, beta=beta,
                                 t_end=120.0, dt=0.05, record_every=40)
    d = theory.linear_diagnostics(run)
    live = d["spectrum"][-1] > 1e-2 * d["spectrum"][-1, 0]
    assert live.sum() >= 2
    assert np.all(d["alignment"][-1, live] > 1 - 1e-4)
    assert d["skew_norm"][-1] < 1e-2 * d["skew_norm"][0]
    assert d["commutator"][-1] < 1e-2 * d["commutator"][0]
    # With tau -> 1 the surviving modes sit at p+ with s = p+^2 / alpha_p (X = I here).
    a = 1 + sigma2
    p_plus = (1 + np.sqrt(1 - 4 * eta * a)) / (2 * a)
    np.testing.assert_allclose(d["wp_spectrum"][-1, :live.sum()], p_plus, rtol=1e-3)
    np.testing.assert_allclose(d["spectrum"][-1, live], p_plus ** 2 / alpha_p, rtol=2e-3)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

W34, WP3 = np.ones((3, 4)), np.eye(3)


@pytest.mark.parametrize("call, match", [
    (lambda: theory.simulate_linear(W34, WP3, alpha_p=-1.0),
     r"alpha_p must be a finite number >= 0, got -1.0"),
    (lambda: theory.simulate_linear(W34, WP3, eta=-0.1), r"eta must be .*>= 0, got -0.1"),
    (lambda: theory.simulate_linear(W34, WP3, beta=-0.5), r"beta must be .* or None, got -0.5"),
    (lambda: theory.simulate_linear(W34, WP3, X=np.diag([1.0, -1.0, 1.0, 1.0])),
     r"X must be positive semi-definite.*-1"),
    (lambda: theory.simulate_linear(W34, WP3, noise=-np.eye(4)),
     r"noise must be positive semi-definite"),
    (lambda: theory.simulate_linear(W34, WP3, noise=-0.1), r"noise must be .*>= 0, got -0.1"),
    (lambda: theory.simulate_linear(W34, WP3, X=np.triu(np.ones((4, 4)))),
     r"X must be symmetric"),
    (lambda: theory.simulate_linear(W34, np.eye(4)), r"Wp has shape \(4, 4\); it must be \(3, 3\)"),
    (lambda: theory.simulate_linear(W34, WP3, X=np.eye(3)), r"X has shape \(3, 3\); .*\(4, 4\)"),
    (lambda: theory.simulate_linear(W34, WP3, np.ones((3, 4))), r"Wa is only used"),
    (lambda: theory.simulate_linear(W34, WP3, beta=0.5, Wa0=np.ones((2, 4))),
     r"Wa has shape \(2, 4\); it must be \(3, 4\)"),
    (lambda: theory.simulate_linear(W34, WP3, beta=0.5, stop_gradient=False),
     r"stop_gradient=False needs"),
    (lambda: theory.simulate_linear(W34, WP3, predictor="mlp"), r"predictor must be one of"),
    (lambda: theory.simulate_linear(W34, None), r"Wp is required"),
    (lambda: theory.simulate_linear(W34, 2 * WP3, predictor="identity"), r"fixes Wp = I"),
    (lambda: theory.simulate_linear(W34, WP3, method="rk45"), r"method must be one of"),
    (lambda: theory.simulate_linear(W34, WP3, dt=0.0), r"dt must be a finite number > 0"),
    (lambda: theory.simulate_linear(W34, WP3, record_every=0), r"record_every"),
    (lambda: theory.simulate_linear(np.full((3, 4), np.nan), WP3), r"W contains NaN"),
    (lambda: theory.linear_flow(W34, WP3, beta=0.5), r"needs the current Wa"),
    (lambda: theory.simulate_modes([0.1], [-1.0]), r"s must be >= 0"),
    (lambda: theory.simulate_modes([0.1, 0.2], [1.0, 1.0, 1.0]), r"broadcast"),
    (lambda: theory.simulate_modes([0.1], [1.0], alpha_p=-2.0), r"alpha_p must be"),
    (lambda: theory.simulate_symmetric(-np.eye(3), np.eye(3)), r"F must be positive semi-def"),
    (lambda: theory.simulate_symmetric(np.eye(3), np.triu(np.ones((3, 3)))),
     r"Wp must be symmetric"),
    (lambda: theory.fixed_points(0.0, 0.1), r"tau must be a finite number > 0, got 0.0"),
    (lambda: theory.fixed_points(1.0, -0.1), r"eta must be a finite number >= 0, got -0.1"),
    (lambda: theory.fixed_points(1.0, 0.1, -0.5), r"sigma2 must be"),
    (lambda: theory.fixed_points(1.0, float("nan")), r"eta must be"),
    (lambda: theory.collapse_eta(-1.0), r"tau must be finite and > 0"),
    (lambda: theory.motion_constant(0.1, 0.2, alpha_p=0.0), r"alpha_p must be .*> 0"),
    (lambda: theory.parabola_flow(0.1, eta=-1.0), r"eta must be finite and >= 0"),
    (lambda: theory.simulate_parabola([0.1, 0.2], tau=[1.0, 1.0, 1.0]), r"must broadcast"),
])
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_divergence_and_large_steps_are_reported():
    with pytest.raises(FloatingPointError, match="non-finite"):
        theory.simulate_parabola([100.0], 1.0, 0.0, t_end=10.0, dt=1.0)
    with pytest.warns(RuntimeWarning, match="dt = 1 may be too large"):
        theory.simulate_linear(10 * W34, WP3, t_end=0.0, dt=1.0)


# --------------------------------------------------------------------------------------------
# The experiment script
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_experiment_script_writes_figures_and_numbers(tmp_path):
    workdir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Run from elsewhere, without PYTHONPATH: the script must find the package by itself.
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "theory.py"), f"--workdir={workdir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("fig2_alignment", "fig3_phase_portraits", "fig4_fixed_points",
                 "fig5_decoupled", "collapse_boundary"):
        data = (workdir / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    text = (workdir / "theory.md").read_text()

    def root(tau, eta, sign):
        return (tau + sign * np.sqrt(tau ** 2 - 4 * eta)) / 2

    # Fig. 3 and Fig. 4 fixed points, from the closed form written out here.
    assert f"p- = {root(1, 0.01, -1):.4f}, p+ = {root(1, 0.01, +1):.4f}" in text
    agree = re.search(r"simulation agrees on (\d+)/900 starts", text)
    assert agree and int(agree.group(1)) >= 0.95 * 900
    p = root(1, 0.1, -1)
    assert f"| 0.1 | {p:.4f} | {p * (2 - 3 * p) - 0.1:+.4f} | unstable |" in text
    p = root(1, 0.1, +1)
    assert f"| 0.1 | {p:.4f} | {p * (2 - 3 * p) - 0.1:+.4f} | stable |" in text
    assert "eta = 1: 100.0% collapse" in text
    assert f"eta* = {0.25:.4f}" in text
    # Fig. 2: Thm 1 rate for the unsymmetrised predictor, alignment of surviving modes.
    row = re.search(r"\| linear \| (\d+)/8 \| ([0-9.]+) \| .* \| ([0-9.]+) \|", text)
    assert row, text
    assert int(row.group(1)) >= 1
    assert float(row.group(2)) > 0.99
    np.testing.assert_allclose(float(row.group(3)), 0.08, rtol=1e-4)
    # Fig. 5: with weight decay the survivors sit at p+ = 0.9583 and on the parabola.
    row = re.search(r"\| weight decay .*? \| (\d+)/16 \| ([0-9.e+-]+) \| ([0-9.]+) \.\.\. "
                    r"([0-9.]+) \|", text)
    assert row, text
    assert float(row.group(2)) < 1e-3
    assert row.group(3) == row.group(4) == f"{root(1, 0.04, +1):.4f}"
    # Collapse boundary: simulation agrees with eta <= tau^2 / 4 almost everywhere.
    agree = re.search(r"agrees with eta <= tau\^2/4 on (\d+)/(\d+)", text)
    assert agree and int(agree.group(1)) >= 0.99 * int(agree.group(2))

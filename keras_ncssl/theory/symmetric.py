"""Level 2: the closed (F, Wp) flow under [DP] assumptions 1-3, and the alignment operator K of
[DP] Thm 3."""
import numpy as np

from keras_ncssl.theory.common import check_symmetric, check_covariance, integrate, check_matrix, check_number


def _symmetric_setup(F, Wp, tau, sigma2, alpha_p, eta):
    F = check_matrix("F", F)
    n = F.shape[0]
    F = check_covariance("F", F, n)
    Wp = check_matrix("Wp", Wp, (n, n))
    check_symmetric("Wp", Wp)
    return (F, 0.5 * (Wp + Wp.T), check_number("tau", tau), check_number("sigma2", sigma2),
            check_number("alpha_p", alpha_p), check_number("eta", eta))


def _symmetric_rhs(tau, sigma2, alpha_p, eta):
    a = 1.0 + sigma2

    def rhs(F, Wp):
        FWp = F @ Wp
        anti_FWp = FWp + FWp.T        # {Wp, F} for symmetric F, Wp
        Wp2 = Wp @ Wp
        FWp2 = F @ Wp2
        dWp = -0.5 * alpha_p * a * anti_FWp + alpha_p * tau * F - eta * Wp
        dF = -a * (FWp2 + FWp2.T) + tau * anti_FWp - 2.0 * eta * F
        return dF, dWp
    return rhs


def symmetric_flow(F, Wp, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0):
    r"""The (F, Wp) flow under [DP] assumptions 1-3 (§3.2, Eqs. 6-7).

    With Wa = tau W (tau constant here), X = I, X' = sigma2 I and a symmetric Wp, F = W W^T
    and Wp obey the closed system

    .. math::
        \dot W_p &= -\tfrac{\alpha_p}{2}(1+\sigma^2)\{W_p, F\} + \alpha_p \tau F - \eta W_p \\
        \dot F   &= -(1+\sigma^2)\{W_p^2, F\} + \tau \{W_p, F\} - 2\eta F

    with {A, B} = AB + BA.  It equals the Lemma 1 flow with ``predictor="symmetric"``,
    ``beta=None`` (tau = 1), X = I, X' = sigma2 I.

    Returns
    -------
    (dF, dWp)
    """
    F, Wp, tau, sigma2, alpha_p, eta = _symmetric_setup(F, Wp, tau, sigma2, alpha_p, eta)
    return _symmetric_rhs(tau, sigma2, alpha_p, eta)(F, Wp)


def simulate_symmetric(F0, Wp0, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0, t_end=10.0,
                       dt=0.01, method="rk4", record_every=1):
    """Integrate ``symmetric_flow``; returns (t (T,), F (T, n, n), Wp (T, n, n))."""
    F, Wp, tau, sigma2, alpha_p, eta = _symmetric_setup(F0, Wp0, tau, sigma2, alpha_p, eta)
    t, (F_t, Wp_t) = integrate(_symmetric_rhs(tau, sigma2, alpha_p, eta), (F, Wp), t_end, dt,
                                method, record_every)
    return t, F_t, Wp_t


def alignment_operator(F, Wp, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0):
    r"""The matrix K of [DP] Thm 3 (eigenspace alignment).

    .. math:: K = (1+\sigma^2)\Big[\tfrac{\alpha_p}{2} F + W_p^2
              - \tfrac{\tau}{1+\sigma^2} W_p\Big] + \tfrac32 \eta I,

    so that along ``symmetric_flow`` the commutator C = [F, Wp] = F Wp - Wp F obeys
    dC/dt = -(C K + K C), and if lambda_min(K(t)) >= lambda_0 > 0 for all t then
    ||C(t)||_F <= exp(-2 lambda_0 t) ||C(0)||_F.

    Parameters
    ----------
    F, Wp : array_like, shape (..., n, n) (stacks allowed, e.g. a whole trajectory)

    Returns
    -------
    ndarray, shape (..., n, n)
    """
    F = np.asarray(F, dtype=np.float64)
    Wp = np.asarray(Wp, dtype=np.float64)
    if F.shape[-2:] != Wp.shape[-2:] or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F {F.shape} and Wp {Wp.shape} must be square matrices of one size")
    tau, sigma2 = check_number("tau", tau), check_number("sigma2", sigma2)
    alpha_p, eta = check_number("alpha_p", alpha_p), check_number("eta", eta)
    a = 1.0 + sigma2
    return (a * (0.5 * alpha_p * F + Wp @ Wp) - tau * Wp
            + 1.5 * eta * np.eye(F.shape[-1]))

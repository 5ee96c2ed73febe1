"""keras_ncssl.diagnostics against independent numpy computations and constructed matrices."""
import numpy as np
import pytest

from keras_ncssl import diagnostics


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def _distinct(rng, n, low=0.1, high=3.0):
    """n well-separated values in (low, high), shuffled."""
    values = np.linspace(low, high, n) + rng.uniform(0.0, 0.5 * (high - low) / n, n)
    return rng.permutation(values)


def test_spectrum_is_descending_eigvalsh_of_the_symmetric_part(rng):
    n = 7
    A = rng.normal(size=(n, n))
    F = A @ A.T + 0.05 * rng.normal(size=(n, n))  # slightly asymmetric, like a running estimate
    expected = np.sort(np.linalg.eigvals(0.5 * (F + F.T)).real)[::-1]
    np.testing.assert_allclose(diagnostics.spectrum(F), expected, rtol=1e-10, atol=1e-12)
    # The symmetric part of [[1, 2], [0, 1]] is [[1, 1], [1, 1]] with eigenvalues 2 and 0.
    np.testing.assert_allclose(diagnostics.spectrum([[1.0, 2.0], [0.0, 1.0]]), [2.0, 0.0],
                               atol=1e-12)


def test_alignment_is_sign_of_eigenvalue_when_eigenvectors_are_shared(rng):
    n = 6
    Q = _orthogonal(rng, n)
    lam = _distinct(rng, n)
    mu = rng.uniform(0.2, 2.0, n) * rng.choice([-1.0, 1.0], n)
    F = Q @ np.diag(lam) @ Q.T
    Wp = Q @ np.diag(mu) @ Q.T
    alignment, eigenvalues = diagnostics.eigen_alignment(F, Wp)
    order = np.argsort(-lam)
    np.testing.assert_allclose(eigenvalues, lam[order], rtol=1e-12)
    np.testing.assert_allclose(alignment, np.sign(mu[order]), atol=1e-10)


def test_alignment_matches_direct_computation_on_known_eigenvectors(rng):
    n = 5
    Q = _orthogonal(rng, n)
    lam = _distinct(rng, n)
    F = Q @ np.diag(lam) @ Q.T
    Wp = rng.normal(size=(n, n))
    alignment, _ = diagnostics.eigen_alignment(F, Wp)
    expected = []
    for j in np.argsort(-lam):  # loop over columns of the *constructed* basis, not eigh's
        u = Q[:, j]
        image = Wp @ u
        expected.append(u @ image / np.linalg.norm(image))
    np.testing.assert_allclose(alignment, expected, atol=1e-10)


def test_alignment_of_a_rotation_is_the_cosine_of_its_angle(rng):
    theta = rng.uniform(-np.pi, np.pi)
    scale = rng.uniform(0.5, 3.0)
    rotation = scale * np.array([[np.cos(theta), -np.sin(theta)],
                                 [np.sin(theta), np.cos(theta)]])
    F = np.diag([2.0, 0.5])
    alignment, eigenvalues = diagnostics.eigen_alignment(F, rotation)
    np.testing.assert_allclose(alignment, [np.cos(theta)] * 2, atol=1e-12)
    np.testing.assert_allclose(eigenvalues, [2.0, 0.5])


def test_alignment_is_zero_where_the_predictor_maps_to_zero():
    F = np.diag([3.0, 1.0])
    Wp = np.diag([2.0, 0.0])
    alignment, _ = diagnostics.eigen_alignment(F, Wp)
    np.testing.assert_array_equal(alignment, [1.0, 0.0])


def test_commutator_norm_matches_kronecker_form_and_known_values(rng):
    n = 5
    F = rng.normal(size=(n, n))
    F = F @ F.T
    Wp = rng.normal(size=(n, n))
    # vec(F Wp - Wp F) = (I (x) F - F^T (x) I) vec(Wp), column-major vec.
    operator = np.kron(np.eye(n), F) - np.kron(F.T, np.eye(n))
    expected = np.linalg.norm(operator @ Wp.reshape(-1, order="F"))
    np.testing.assert_allclose(diagnostics.commutator_norm(F, Wp), expected, rtol=1e-10)
    a, b, c = rng.uniform(-2.0, 2.0, 3)
    np.testing.assert_allclose(
        diagnostics.commutator_norm(np.diag([a, b]), [[0.0, c], [0.0, 0.0]]), abs((a - b) * c),
        rtol=1e-12)
    Q = _orthogonal(rng, n)
    commuting = diagnostics.commutator_norm(Q @ np.diag(_distinct(rng, n)) @ Q.T,
                                            Q @ np.diag(rng.normal(size=n)) @ Q.T)
    assert commuting < 1e-10


def test_symmetric_and_skew_norms(rng):
    n = 6
    Wp = rng.normal(size=(n, n))
    sym, skew = diagnostics.symmetric_skew_norms(Wp)
    np.testing.assert_allclose(sym ** 2 + skew ** 2, np.sum(Wp ** 2), rtol=1e-12)
    np.testing.assert_allclose(sym, np.sqrt(np.sum(((Wp + Wp.T) / 2) ** 2)), rtol=1e-12)
    S = Wp + Wp.T
    assert diagnostics.symmetric_skew_norms(S)[1] == 0.0
    assert diagnostics.symmetric_skew_norms(Wp - Wp.T)[0] == 0.0
    np.testing.assert_allclose(diagnostics.symmetric_skew_norms([[0.0, 1.0], [0.0, 0.0]]),
                               [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-12)


def test_balancing_residual(rng):
    n2, n1 = 4, 7
    alpha_p = rng.uniform(0.1, 5.0)
    W = rng.normal(size=(n2, n1))
    Wp = rng.normal(size=(n2, n2))
    expected = np.einsum("ik,jk->ij", W, W) - np.einsum("ki,kj->ij", Wp, Wp) / alpha_p
    np.testing.assert_allclose(diagnostics.balancing_residual(W, Wp, alpha_p), expected,
                               rtol=1e-12, atol=1e-12)
    # Balanced by construction: W with orthonormal rows, Wp = sqrt(alpha_p) * orthogonal.
    rows = _orthogonal(rng, n1)[:n2]
    balanced = diagnostics.balancing_residual(rows, np.sqrt(alpha_p) * _orthogonal(rng, n2),
                                              alpha_p)
    np.testing.assert_allclose(balanced, np.zeros((n2, n2)), atol=1e-12)


def test_effective_rank_known_values_and_formula(rng):
    n = 8
    c = rng.uniform(0.1, 10.0)
    np.testing.assert_allclose(diagnostics.effective_rank(c * np.eye(n)), n, rtol=1e-12)
    k = int(rng.integers(1, n))
    basis = _orthogonal(rng, n)[:, :k]
    np.testing.assert_allclose(diagnostics.effective_rank(c * basis @ basis.T), k, rtol=1e-9)
    x, y = rng.uniform(0.1, 1.0, 2)
    q = np.array([x, y]) / (x + y)
    np.testing.assert_allclose(diagnostics.effective_rank(np.diag([x, y, 0.0])),
                               np.exp(-np.sum(q * np.log(q))), rtol=1e-12)
    A = rng.normal(size=(n, 3))
    F = A @ A.T
    rank = diagnostics.effective_rank(F)
    assert 1.0 <= rank <= 3.0 + 1e-9
    np.testing.assert_allclose(diagnostics.effective_rank(c * F), rank, rtol=1e-10)
    assert diagnostics.effective_rank(np.zeros((n, n))) == 0.0


def test_stacks_are_processed_like_single_matrices(rng):
    stack_F = np.stack([(lambda a: a @ a.T)(rng.normal(size=(4, 4))) for _ in range(3)])
    stack_W = rng.normal(size=(3, 4, 4))
    alignment, eigenvalues = diagnostics.eigen_alignment(stack_F, stack_W)
    sym, skew = diagnostics.symmetric_skew_norms(stack_W)
    for i in range(3):
        single_alignment, single_eigenvalues = diagnostics.eigen_alignment(stack_F[i], stack_W[i])
        np.testing.assert_allclose(alignment[i], single_alignment, atol=1e-12)
        np.testing.assert_allclose(eigenvalues[i], single_eigenvalues, rtol=1e-12)
        np.testing.assert_allclose(diagnostics.commutator_norm(stack_F, stack_W)[i],
                                   diagnostics.commutator_norm(stack_F[i], stack_W[i]))
        np.testing.assert_allclose(diagnostics.effective_rank(stack_F)[i],
                                   diagnostics.effective_rank(stack_F[i]))
        np.testing.assert_allclose([sym[i], skew[i]],
                                   diagnostics.symmetric_skew_norms(stack_W[i]))


def test_accepts_tf_tensors_and_keras_variables(rng):
    import keras
    import tensorflow as tf

    A = rng.normal(size=(5, 5))
    F = A @ A.T
    Wp = rng.normal(size=(5, 5))
    expected = diagnostics.eigen_alignment(F, Wp)[0]
    from_tf = diagnostics.eigen_alignment(tf.constant(F), keras.Variable(Wp))[0]
    np.testing.assert_allclose(from_tf, expected, atol=1e-12)
    np.testing.assert_allclose(diagnostics.commutator_norm(tf.constant(F, tf.float32), Wp),
                               diagnostics.commutator_norm(F, Wp), rtol=1e-5)
    np.testing.assert_allclose(diagnostics.spectrum(keras.Variable(F)), diagnostics.spectrum(F))


@pytest.mark.parametrize("call, match", [
    (lambda: diagnostics.spectrum(np.ones(3)), "F must be a matrix"),
    (lambda: diagnostics.spectrum(np.ones((2, 3))), "F must be square"),
    (lambda: diagnostics.eigen_alignment(np.eye(3), np.eye(4)), "F has shape .* Wp has shape"),
    (lambda: diagnostics.commutator_norm(np.eye(2), np.eye(3)), "F has shape .* Wp has shape"),
    (lambda: diagnostics.effective_rank([[np.nan, 0.0], [0.0, 1.0]]), "F contains NaN"),
    (lambda: diagnostics.symmetric_skew_norms("abc"), "Wp must be a real matrix"),
    (lambda: diagnostics.balancing_residual(np.ones((3, 4)), np.eye(4), 1.0),
     "Wp must be \\(3, 3\\)"),
    (lambda: diagnostics.balancing_residual(np.ones((3, 4)), np.eye(3), -1.0),
     "alpha_p must be a finite number > 0, got -1.0"),
    (lambda: diagnostics.balancing_residual(np.ones((3, 4)), np.eye(3), 0.0), "alpha_p"),
])
def test_invalid_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_collapse_threshold_is_a_tenth_of_the_healthy_projection_std(rng):
    d = 64
    healthy = rng.normal(size=(4096, d))
    healthy /= np.linalg.norm(healthy, axis=1, keepdims=True)
    std = healthy.std(axis=0).mean()  # models.projection_std of spread-out unit vectors: ~1/sqrt(d)
    assert np.isclose(std, 1 / np.sqrt(d), rtol=0.02)
    assert np.isclose(diagnostics.collapse_threshold(d), 0.1 * std, rtol=0.02)
    with pytest.raises(ValueError, match="projection_dim=0"):
        diagnostics.collapse_threshold(0)

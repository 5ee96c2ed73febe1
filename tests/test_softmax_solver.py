"""The linear probe's solver (keras_ncssl.evaluation.softmax) against independent references:
a float64 numpy/scipy objective, finite differences and scikit-learn's lbfgs run to 1e-10."""
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from keras_ncssl import evaluation as ev
from keras_ncssl.evaluation.softmax import (KroneckerPreconditioner, SoftmaxObjective, gradient_max,
                                            minimize_softmax)


def _reference_loss(x, y, weights, bias, l2):
    logits = x.astype(np.float64) @ weights + bias
    return np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]) + 0.5 * l2 * np.sum(
        weights ** 2)


def _ill_conditioned(rng, n, dim=30, num_classes=4):
    """Correlated features whose covariance spans about four orders of magnitude, as raw
    pixels' do, with labels from a noisy linear teacher."""
    mixing = rng.normal(size=(dim, dim)) * np.logspace(0, -2, dim)[:, None]
    x = rng.normal(size=(n, dim)) @ mixing
    x = (x - x.mean(0)) / x.std(0)
    teacher = rng.normal(size=(dim, num_classes))
    y = np.argmax(x @ teacher + rng.gumbel(size=(n, num_classes)), axis=1)
    return x, y


def _sklearn(x, y, l2):
    clf = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x.astype(np.float64), y)
    return clf


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_and_gradient_match_float64_reference_and_finite_differences(rng, dtype, blocks):
    x, y = _ill_conditioned(rng, 500)
    weights, bias, l2 = rng.normal(size=(30, 4)) * 0.3, rng.normal(size=4), 1e-2
    objective = SoftmaxObjective(x, y, 4, dtype=dtype, blocks=blocks)
    assert len(objective.x) == blocks
    loss, grad_w, grad_b = objective.evaluate(weights, bias, l2)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    assert loss == pytest.approx(_reference_loss(x, y, weights, bias, l2), rel=tolerance)
    step = 1e-6
    for i, j in [(0, 0), (7, 3), (29, 1)]:
        shifted = weights.copy()
        shifted[i, j] += step
        numeric = (_reference_loss(x, y, shifted, bias, l2)
                   - _reference_loss(x, y, weights, bias, l2)) / step
        assert grad_w[i, j] == pytest.approx(numeric, abs=1e-5)
    shifted = bias.copy()
    shifted[2] += step
    numeric = (_reference_loss(x, y, weights, shifted, l2)
               - _reference_loss(x, y, weights, bias, l2)) / step
    assert grad_b[2] == pytest.approx(numeric, abs=1e-5)


@pytest.mark.parametrize("rows", [200, 12])  # full-rank S, and N < D (the few-label case)
def test_preconditioner_is_an_invertible_change_of_variables_with_its_adjoint(rng, rows):
    x, y = _ill_conditioned(rng, rows)
    y[:4] = np.arange(4)  # every class present
    objective = SoftmaxObjective(x, y, 4)
    weights, bias = rng.normal(size=(30, 4)), rng.normal(size=4)
    precondition = KroneckerPreconditioner(objective, weights * 0.1, bias, l2=1e-3)
    w_back, b_back = precondition.to_params(precondition.from_params(weights, bias))
    # N < D: W comes back projected onto the span of the rows (the minimiser lies there).
    _, singular, rows_basis = np.linalg.svd(x, full_matrices=False)
    span = rows_basis[singular > 1e-6 * singular.max()] if rows < 30 else np.eye(30)
    np.testing.assert_allclose(w_back, span.T @ (span @ weights), atol=1e-9)
    # The bias is identified up to a constant added to every class (f does not see it).
    np.testing.assert_allclose(b_back - b_back.mean(), bias - bias.mean(), atol=1e-9)
    # gradient() is the transpose of to_params(): <J^T g, u> = <g, J u>.
    u = rng.normal(size=precondition.from_params(weights, bias).shape)
    grad_w, grad_b = rng.normal(size=(30, 4)), rng.normal(size=4)
    w_u, b_u = precondition.to_params(u)
    assert precondition.gradient(grad_w, grad_b) @ u == pytest.approx(
        np.sum(grad_w * w_u) + grad_b @ b_u, rel=1e-9)


@pytest.mark.parametrize("rows, l2", [(3000, 1e-4), (3000, 1e-1), (40, 1e-2)])
def test_solution_matches_sklearn_lbfgs_at_tight_tolerance(rng, rows, l2):
    x, y = _ill_conditioned(rng, rows + 2000)
    x_fit, y_fit, x_test = x[:rows], y[:rows], x[rows:]
    objective = SoftmaxObjective(x_fit, y_fit, 4, dtype=np.float32)  # the large-problem path
    weights, bias, info = minimize_softmax(objective, np.zeros((30, 4)), np.zeros(4), l2,
                                           tol=1e-6, max_iter=2000)
    assert info["converged"] and info["gradient_max"] <= 1e-6, str(info)
    # The reported gradient is the float64 gradient at the returned point.
    check = SoftmaxObjective(x_fit, y_fit, 4, dtype=np.float64).evaluate(weights, bias, l2)
    assert gradient_max(*check[1:]) == pytest.approx(info["gradient_max"], rel=1e-2, abs=1e-8)
    reference = _sklearn(x_fit, y_fit, l2)
    logits = x_test @ weights + bias
    probabilities = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    assert np.abs(probabilities - reference.predict_proba(x_test)).max() < 1e-3
    agreement = np.mean(np.argmax(logits, 1) == reference.predict(x_test))
    assert agreement >= 0.998  # the +-0.1-point goal on 2000 test points


def test_not_converged_is_reported_with_where_it_stopped(rng):
    x, y = _ill_conditioned(rng, 2000)
    objective = SoftmaxObjective(x, y, 4)
    weights, bias, info = minimize_softmax(objective, np.zeros((30, 4)), np.zeros(4), 1e-5,
                                           tol=1e-9, max_iter=3)
    assert not info["converged"] and info["n_iter"] == 3
    loss, grad_w, grad_b = SoftmaxObjective(x, y, 4).evaluate(weights, bias, 1e-5)
    assert info["gradient_max"] == pytest.approx(gradient_max(grad_w, grad_b), rel=1e-9)
    assert info["gradient_max"] > 1e-9


def test_linear_probe_on_digits_agrees_with_sklearn_and_reports_convergence():
    """Real data (scikit-learn's 8x8 digits): the probe at its default tolerance picks the same
    L2 on validation as cold-started scikit-learn fits at 1e-10 and scores the same test
    accuracy to 0.1 points."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    train, val, test = (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])
    grid = (1e-1, 1e-2, 1e-3, 1e-4)
    result = ev.linear_probe(train, val, test, l2_grid=grid)
    assert result["converged"] and result["tol"] == ev.DEFAULT_TOL
    assert result["test_tol"] == ev.DEFAULT_TEST_TOL
    assert all(result["gradient_max"][l2] <= ev.DEFAULT_TOL for l2 in grid)
    assert result["gradient_max"]["tested"] <= ev.DEFAULT_TEST_TOL
    standardize = ev.Standardizer(train[0])
    reference = {l2: _sklearn(standardize(train[0]), train[1], l2) for l2 in grid}
    val_top1 = {l2: float(np.mean(m.predict(standardize(val[0])) == val[1]))
                for l2, m in reference.items()}
    # Selection fits stop at 1e-4. Near-separable at l2 = 1e-4 (train accuracy 1), the
    # objective is so flat that 3 of 300 validation images flipped against the 1e-10 fit
    # (BUILD_NOTES "Fast, converged evaluation"); at l2 >= 1e-3 at most one.
    assert result["val_top1"] == pytest.approx(val_top1, abs=3 / 300 + 1e-12)
    assert {l2: v for l2, v in result["val_top1"].items() if l2 >= 1e-3} == pytest.approx(
        {l2: v for l2, v in val_top1.items() if l2 >= 1e-3}, abs=1 / 300 + 1e-12)
    # The tested model, solved on to 1e-5: the same test accuracy to 0.1 points.
    test_top1 = np.mean(reference[result["l2"]].predict(standardize(test[0])) == test[1])
    assert abs(result["top1"] - test_top1) <= 1e-3


def test_row_blocks_give_the_class_covariance_and_spectrum_of_the_whole_matrix(rng):
    """The K-FAC factors summed over row blocks (side by side on the inter-op pool) are those
    of the whole matrix, against float64 numpy."""
    x, y = _ill_conditioned(rng, 301)
    weights, bias = rng.normal(size=(30, 4)) * 0.3, rng.normal(size=4)
    logits = x @ weights + bias
    prob = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    want_a = (np.diag(prob.sum(0)) - prob.T @ prob) / len(x)
    want_s = np.linalg.eigvalsh(x.T @ x / len(x))
    for blocks in (1, 4):
        objective = SoftmaxObjective(x, y, 4, dtype=np.float64, blocks=blocks)
        np.testing.assert_allclose(objective.class_covariance(weights, bias), want_a, atol=1e-12)
        np.testing.assert_allclose(objective.spectrum()[0], want_s, rtol=1e-9, atol=1e-12)


def test_solver_runs_numpy_blas_on_one_thread(rng):
    """Multithreaded BLAS between TensorFlow's products steals the cores from them (its threads
    spin after each call); the solver limits it to one thread while it runs, and only then."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, y = _ill_conditioned(rng, 200)
    objective = SoftmaxObjective(x, y, 4)
    seen = []
    evaluate = objective.evaluate

    def spy(*args):
        seen.append({d["num_threads"] for d in threadpoolctl.threadpool_info()
                     if d["user_api"] == "blas"})
        return evaluate(*args)

    objective.evaluate = spy
    before = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
    minimize_softmax(objective, np.zeros((30, 4)), np.zeros(4), 1e-2, tol=1e-6, max_iter=50)
    assert seen and all(threads == {1} for threads in seen)
    assert [d["num_threads"] for d in threadpoolctl.threadpool_info()
            if d["user_api"] == "blas"] == before

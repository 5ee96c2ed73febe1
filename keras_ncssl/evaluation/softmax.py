"""The linear probe's solver: multinomial logistic regression by K-FAC-preconditioned L-BFGS.

Objective (per-sample L2 on the weights, none on the bias; scikit-learn's C = 1 / (l2 N)):

    f(W, b) = 1/N sum_i [logsumexp(x_i W + b) - (x_i W + b)_{y_i}] + l2/2 ||W||_F^2
    grad_W = X^T (P - Y) / N + l2 W,    grad_b = 1^T (P - Y) / N

**Converged** means ``max |grad f| <= tol``: the largest entry of the gradient of the
regularised objective over the weights and the bias, at the returned point. This is the
quantity scikit-learn's lbfgs stops on (its ``tol``, default 1e-4, on the same mean loss).

Each evaluation is two products of the [N, D] features with [D, K] matrices (TensorFlow, all
cores: in row blocks where ops get one intra-op thread each), in float32 for large problems
(over ``FLOAT64_MAX_ENTRIES`` feature entries, where they are most of the time; float32
products keep the gradient's rounding near 1e-7 of its scale, far below the tolerances used)
and in float64 otherwise; the softmax, the loss and the [N, K] residuals are always float64.

Preconditioning is what keeps the iteration count down on raw pixels, whose feature
covariance spans five orders of magnitude. The Hessian is approximated by its Kronecker
factorisation (Martens & Grosse 2015, K-FAC):

    H ~ A (x) S + l2 I,   A = mean_i diag(p_i) - p_i p_i^T  (K x K),   S = X^T X / N  (D x D)

whose inverse is diagonal in the eigenbases of A and S: (alpha_c lambda_j + l2)^-1. L-BFGS
(scipy's L-BFGS-B, Moré-Thuente line search) runs on the variables U with
W = V_S (U / sqrt(alpha lambda + l2)) V_A^T, a linear change of variables that leaves the
minimiser unchanged and makes the K-FAC part of the curvature the identity. A is taken at
the starting point of each solve (warm starts along the L2 path make it a good one).
"""
import numpy as np
import tensorflow as tf
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from keras_ncssl.evaluation.blocks import block_count, split_rows


# Feature matrices up to this many entries (32 MB in float64) are kept in float64.
FLOAT64_MAX_ENTRIES = 1 << 22
# Fewer rows than this per block cost more in dispatch than they gain side by side.
MIN_BLOCK_ROWS = 4096


class SoftmaxObjective:
    """f and its gradient on fixed features. ``features`` [N, D], ``class_ids`` [N] in
    0..num_classes-1; ``dtype`` of the products: None picks float64 up to
    ``FLOAT64_MAX_ENTRIES`` feature entries, float32 above. ``blocks``: row blocks of the
    products (:mod:`keras_ncssl.evaluation.blocks`; None picks them from the thread pools).

    The passes are TensorFlow ops (one compiled function for all objectives): on 2 cores
    2.6x numpy's per evaluation on Fashion-MNIST pixels, whose elementwise float64 softmax
    numpy runs on one core.
    """

    def __init__(self, features, class_ids, num_classes, dtype=None, blocks=None):
        features = np.asarray(features)
        if dtype is None:
            dtype = np.float64 if features.size <= FLOAT64_MAX_ENTRIES else np.float32
        self.dtype = np.dtype(dtype)
        self.shape = tuple(features.shape)
        self.num_classes = int(num_classes)
        # Row blocks: side by side on the inter-op pool where ops get one intra-op thread each.
        blocks = block_count(len(features), MIN_BLOCK_ROWS) if blocks is None else int(blocks)
        self.x = tuple(tf.constant(block, dtype=self.dtype) for block in split_rows(features, blocks))
        onehot = np.eye(self.num_classes)[np.asarray(class_ids, dtype=np.int64)]
        self.onehot = tuple(tf.constant(block, tf.float64) for block in split_rows(onehot, blocks))
        self.evaluations = 0
        self._spectrum = None

    def promote(self):
        """Switches the products to float64 (for the rest of this objective's life)."""
        self.dtype = np.dtype(np.float64)
        self.x = tuple(tf.cast(block, tf.float64) for block in self.x)

    def evaluate(self, weights, bias, l2):
        """(loss, grad_weights [D, K], grad_bias [K]) at (weights, bias), float64 numpy."""
        loss, grad_w, grad_b = _loss_and_gradient(self.x, self.onehot, tf.constant(weights),
                                                  tf.constant(bias),
                                                  tf.constant(l2, tf.float64))
        self.evaluations += 1
        return float(loss), grad_w.numpy(), grad_b.numpy()

    def class_covariance(self, weights, bias):
        """A = mean_i diag(p_i) - p_i p_i^T, the class factor of K-FAC."""
        return _class_covariance(self.x, tf.constant(weights), tf.constant(bias)).numpy()

    def spectrum(self):
        """Eigenvalues and eigenvectors of S = X^T X / N, computed once.

        With fewer rows than features (the few-label probe) only the N directions the data
        spans are returned, from the N x N Gram matrix; S is zero on the rest.
        """
        if self._spectrum is None:
            n, dim = self.shape
            if n >= dim:
                gram = _gram(self.x).numpy().astype(np.float64)
                eigvals, eigvecs = np.linalg.eigh(gram / n)
            else:
                x = np.concatenate([block.numpy() for block in self.x]).astype(np.float64)
                eigvals, u = np.linalg.eigh(x @ x.T / n)
                keep = eigvals > 1e-10 * max(float(eigvals.max()), 1e-300)
                eigvals, u = eigvals[keep], u[:, keep]
                eigvecs = (x.T @ u) / np.sqrt(n * eigvals)
            self._spectrum = np.maximum(eigvals, 0.0), eigvecs
        return self._spectrum


def _logits(x, weights, bias):
    return tf.cast(tf.matmul(x, tf.cast(weights, x.dtype)), tf.float64) + bias


def _rows(blocks):
    return tf.cast(tf.add_n([tf.shape(x)[0] for x in blocks]), tf.float64)


@tf.function(reduce_retracing=True)
def _loss_and_gradient(x_blocks, onehot_blocks, weights, bias, l2):
    """The sums over rows are per row block (independent ops), added in block order."""
    n = _rows(x_blocks)
    losses, grads_w, grads_b = [], [], []
    for x, onehot in zip(x_blocks, onehot_blocks):
        logits = _logits(x, weights, bias)
        log_partition = tf.reduce_logsumexp(logits, axis=1)
        losses.append(tf.reduce_sum(log_partition - tf.reduce_sum(logits * onehot, axis=1)))
        residual = tf.exp(logits - log_partition[:, None]) - onehot  # P - Y
        grads_w.append(tf.cast(tf.matmul(x, tf.cast(residual, x.dtype), transpose_a=True), tf.float64))
        grads_b.append(tf.reduce_sum(residual, axis=0))
    loss = tf.add_n(losses) / n + 0.5 * l2 * tf.reduce_sum(weights * weights)
    return loss, tf.add_n(grads_w) / n + l2 * weights, tf.add_n(grads_b) / n


@tf.function(reduce_retracing=True)
def _class_covariance(x_blocks, weights, bias):
    parts = []
    for x in x_blocks:
        prob = tf.nn.softmax(_logits(x, weights, bias), axis=1)
        parts.append(tf.linalg.diag(tf.reduce_sum(prob, axis=0)) - tf.matmul(prob, prob, transpose_a=True))
    return tf.add_n(parts) / _rows(x_blocks)


@tf.function(reduce_retracing=True)
def _gram(x_blocks):
    return tf.add_n([tf.matmul(x, x, transpose_a=True) for x in x_blocks])


class KroneckerPreconditioner:
    """The change of variables W = V_S (U * scale) V_A^T, b = V_A (u_b * bias_scale): the
    inverse square root of A (x) S + l2 I.

    With fewer rows than features V_S spans only the data's directions. That is exact, not
    an approximation: the data term sees only P W (P the projection onto the span of the
    rows) and ||W||^2 = ||P W||^2 + ||(I - P) W||^2, so the minimiser has (I - P) W = 0.
    """

    def __init__(self, objective, weights, bias, l2):
        eigvals, self.basis = objective.spectrum()
        class_eigvals, self.class_basis = np.linalg.eigh(objective.class_covariance(weights,
                                                                                    bias))
        class_eigvals = np.maximum(class_eigvals, 0.0)
        self.scale = 1.0 / np.sqrt(np.outer(eigvals, class_eigvals) + l2)
        # The bias is unpenalised; A is singular along the all-ones direction, on which f is
        # flat in b (a constant added to every logit), so that direction gets a unit scale.
        floor = 1e-3 * max(float(class_eigvals.max()), 1e-12)
        self.bias_scale = 1.0 / np.sqrt(np.maximum(class_eigvals, floor))

    def to_params(self, u):
        k = len(self.bias_scale)
        head = u[:-k].reshape(self.scale.shape)
        return (self.basis @ (head * self.scale) @ self.class_basis.T,
                self.class_basis @ (u[-k:] * self.bias_scale))

    def from_params(self, weights, bias):
        """The inverse of :meth:`to_params` (on the span of V_S)."""
        head = (self.basis.T @ weights @ self.class_basis) / self.scale
        return np.concatenate([head.ravel(), (self.class_basis.T @ bias) / self.bias_scale])

    def gradient(self, grad_w, grad_b):
        """The gradient with respect to U (the transpose of :meth:`to_params` applied)."""
        return np.concatenate([((self.basis.T @ grad_w @ self.class_basis) * self.scale).ravel(),
                               (self.class_basis.T @ grad_b) * self.bias_scale])


class _Converged(Exception):
    pass


def gradient_max(grad_w, grad_b):
    """max |grad f| over the weights and the bias: the convergence measure."""
    return max(float(np.abs(grad_w).max(initial=0.0)), float(np.abs(grad_b).max()))


def minimize_softmax(objective, weights, bias, l2, *, tol, max_iter):
    """Minimises ``objective`` at strength ``l2`` from (weights, bias) (a warm start).

    Stops as soon as an evaluated point has ``max |grad f| <= tol`` and returns that point.
    Returns ``(weights, bias, info)``; info: ``n_iter`` (L-BFGS iterations),
    ``evaluations``, ``gradient_max`` (at the returned point), ``converged``
    (gradient_max <= tol), ``status``, ``dtype`` (of the products at the end: a float32
    objective whose line search stalls on rounding is promoted to float64 and continues).
    """
    # Between TensorFlow's products the solver's numpy work is on [D, K] matrices. Multithreaded
    # BLAS gains nothing there, and its threads spin after each call, taking the cores from
    # TensorFlow's next product: 1.7x slower per evaluation on 2 cores (BUILD_NOTES).
    with threadpool_limits(limits=1, user_api="blas"):
        return _minimize_softmax(objective, weights, bias, l2, tol=tol, max_iter=max_iter)


def _minimize_softmax(objective, weights, bias, l2, *, tol, max_iter):
    weights = np.array(weights, dtype=np.float64)
    bias = np.array(bias, dtype=np.float64)
    evaluations_before = objective.evaluations
    precondition = KroneckerPreconditioner(objective, weights, bias, l2)
    best = {"gradient_max": np.inf}
    nonfinite = f"non-finite loss or gradient at l2={l2}"
    iterations = [0]

    def count_iteration(*_):
        iterations[0] += 1

    def loss_and_grad(u):
        w, b = precondition.to_params(u)
        loss, grad_w, grad_b = objective.evaluate(w, b, l2)
        size = gradient_max(grad_w, grad_b)
        if not np.isfinite(loss) or not np.isfinite(size):
            raise FloatingPointError(nonfinite)
        if size < best["gradient_max"]:
            best.update(weights=w, bias=b, gradient_max=size)
        if size <= tol:
            raise _Converged
        return loss, precondition.gradient(grad_w, grad_b)

    # scipy's own stopping rules are switched off (gtol, ftol = 0): only max_iter and ours.
    status = ""
    while True:
        start = (best["weights"], best["bias"]) if "weights" in best else (weights, bias)
        try:
            result = minimize(loss_and_grad, precondition.from_params(*start), jac=True,
                              method="L-BFGS-B", callback=count_iteration,
                              options={"maxiter": max_iter - iterations[0], "maxcor": 20,
                                       "gtol": 0.0, "ftol": 0.0, "maxls": 40})
            status = str(result.message)
        except _Converged:
            status = "converged"
        except FloatingPointError:
            status = nonfinite
        # Stopping short of tol and max_iter (a failed line search, no decrease of f) in
        # float32 means the rounding of float32 logits (about 1e-7 of the loss) was met; the
        # same point in float64 products goes on.
        stalled = status not in ("converged", nonfinite) and iterations[0] < max_iter
        if not (stalled and objective.dtype == np.float32):
            break
        objective.promote()
    evaluations = objective.evaluations - evaluations_before
    if "weights" not in best:  # the starting point itself was non-finite
        best.update(weights=weights, bias=bias)
    info = {"n_iter": iterations[0], "evaluations": evaluations,
            "gradient_max": float(best["gradient_max"]),
            "converged": bool(best["gradient_max"] <= tol), "status": status,
            "dtype": str(objective.dtype)}
    return best["weights"], best["bias"], info

"""Closed-form predictor rules: a correlation matrix in, a predictor kernel out.

A rule is a pure function ``rule(correlation, *, eps, **options) -> kernel`` registered in
:data:`RULES`. ``correlation`` is F = E[f f^T] (d x d) of the online projections f; rules
that need the online/target cross-correlation C = E[f f'^T] take it as the keyword
``cross_correlation``. Kernels use the row convention of the layer, ``y = x @ kernel``,
which is also the convention of [EO] (Z P ~ Z').

Every rule is written as ``base(F) + eps * I``: DirectPred's p_j = r_j^power + eps is
U diag(r^power) U^T + eps I, DirectCopy adds eps I, and [EO] adds its ridge alpha I. Every
base is scale-free (F -> cF gives the same kernel) because the BYOL/SimSiam loss is
l2-normalised, so only the size of ``eps`` relative to the normalised base matters.

Sources: [DP] Tian, Chen & Ganguli, ICML 2021 (arXiv 2102.06810) and its official code
(luckmatters ``boost_scale``); [DC] Wang et al., arXiv 2110.04947; [EO] Richemond et al.,
"The Edge of Orthogonality", ICML 2023 (arXiv 2302.04817).

Rules accept numpy arrays or tensors; a numpy input gives a numpy output.
"""
import functools

import numpy as np
import tensorflow as tf

RULES = {}
"""Registry: rule name -> rule function. Add your own with :func:`register_rule`."""

EIGENVALUE_FLOOR = 1e-4  # [DP] code: p is clamped at 1e-4 before rebuilding Wp.
_NORMALIZATIONS = ("spectral", "frobenius", "none")


def register_rule(name, needs_cross_correlation=False, uses_eigh=False):
    """Decorator: register ``fn`` under ``name`` in :data:`RULES`.

    ``needs_cross_correlation``: the rule reads ``cross_correlation`` (the predictor layer
    then accumulates E[f_online f_target^T]). ``uses_eigh``: documentation and the benchmark
    (matrix-multiply-only rules must never call an eigendecomposition).
    """
    def decorate(fn):
        @functools.wraps(fn)
        def rule(correlation, *args, **kwargs):
            was_numpy = not tf.is_tensor(correlation)
            correlation = _as_square(correlation, "correlation")
            if kwargs.get("cross_correlation") is not None:
                cross = _as_square(kwargs["cross_correlation"], "cross_correlation")
                if cross.shape[-1] != correlation.shape[-1]:
                    raise ValueError(
                        f"cross_correlation has shape {cross.shape}, but correlation has "
                        f"shape {correlation.shape}; they must be the same d x d.")
                kwargs["cross_correlation"] = tf.cast(cross, correlation.dtype)
            elif needs_cross_correlation:
                raise ValueError(f"rule {name!r} needs cross_correlation (E[f_online f_target^T]); got None.")
            kernel = fn(correlation, *args, **kwargs)
            return kernel.numpy() if was_numpy else kernel

        rule.rule_name = name
        rule.needs_cross_correlation = needs_cross_correlation
        rule.uses_eigh = uses_eigh
        RULES[name] = rule
        return rule

    return decorate


def get_rule(name):
    """The rule registered as ``name``; a ValueError lists the registered names."""
    if callable(name):
        return name
    if name not in RULES:
        raise ValueError(f"unknown predictor rule {name!r}; registered rules: {sorted(RULES)}")
    return RULES[name]


def _as_square(matrix, what):
    if not tf.is_tensor(matrix):
        matrix = np.asarray(matrix)
        if not np.issubdtype(matrix.dtype, np.floating):
            matrix = matrix.astype(np.float32)
    matrix = tf.convert_to_tensor(matrix)
    if matrix.dtype not in (tf.float32, tf.float64):
        raise ValueError(f"{what} must be float32 or float64 (never float16 for eigh); got {matrix.dtype.name}.")
    shape = matrix.shape
    if shape.rank != 2 or (shape[0] is not None and shape[0] != shape[1]):
        raise ValueError(f"{what} must be a square d x d matrix; got shape {tuple(shape)}.")
    return matrix


def _check_eps(eps, allow_negative=False):
    if not np.isfinite(eps) or (eps < 0 and not allow_negative):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}.")


def _symmetrize(matrix):
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


def _identity_like(matrix):
    return tf.eye(tf.shape(matrix)[-1], dtype=matrix.dtype)


def _frobenius(matrix):
    # Guard the all-zero matrix (no statistics yet): divide by a tiny number, not zero.
    return tf.maximum(tf.norm(matrix), tf.constant(np.finfo(np.float32).tiny, matrix.dtype))


@register_rule("directpred", uses_eigh=True)
def direct_pred_kernel(correlation, eps=0.1, power=0.5, eps_inside=False):
    r"""DirectPred [DP §4, Eq. 18 as implemented by the official code's ``boost_scale``].

    With the symmetrised F = U diag(s) U^T and r_j = max(s_j, 0) / max_k s_k:

        p_j = max(r_j^power + eps, 1e-4)            (default)
        p_j = max(r_j + eps, 1e-4)^power            (eps_inside=True, [DP] Tab. 7's shift)

    and W_p = U diag(p) U^T. This is the code's scale-free form; the printed Eq. 18,
    p_j = sqrt(s_j) + eps max_k s_k, agrees with it only when max_k s_k = 1. ``power`` = 1/2
    is DirectPred; ``power`` = 1 gives the clamped DirectCopy of [DC] (DirectSet(alpha)).
    ``eps`` may be negative only with ``eps_inside`` (the shift c_j = -eps of Tab. 7).
    """
    _check_eps(eps, allow_negative=eps_inside)
    if not power > 0:
        raise ValueError(f"power must be > 0 (0.5 = DirectPred, 1 = DirectCopy); got {power!r}.")
    correlation = tf.stop_gradient(correlation)
    s, u = tf.linalg.eigh(_symmetrize(correlation))
    tiny = tf.constant(np.finfo(np.float32).tiny, s.dtype)
    ratio = tf.maximum(s, 0.0) / tf.maximum(tf.reduce_max(s), tiny)
    floor = tf.constant(EIGENVALUE_FLOOR, s.dtype)
    if eps_inside:
        p = tf.maximum(ratio + eps, floor) ** power
    else:
        p = tf.maximum(ratio ** power + eps, floor)
    return tf.matmul(u * p[None, :], u, transpose_b=True)


@register_rule("directcopy", uses_eigh=False)
def direct_copy_kernel(correlation, eps=0.1, normalize="spectral"):
    r"""DirectCopy [DC]: W_p = F / ||F|| + eps I, no eigendecomposition of the kernel.

    ``normalize``: "spectral" (||F||_2, which matches DirectPred's division by lambda_max;
    computed with eigvalsh, values only), "frobenius" (||F||_F, as the [Re] reproduction did;
    matrix-multiply only) or "none" (the raw F + eps I of the official code's
    ``balance_type=direct``).
    """
    _check_eps(eps)
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}; got {normalize!r}.")
    f = _symmetrize(tf.stop_gradient(correlation))
    if normalize == "spectral":
        tiny = tf.constant(np.finfo(np.float32).tiny, f.dtype)
        f = f / tf.maximum(tf.reduce_max(tf.abs(tf.linalg.eigvalsh(f))), tiny)
    elif normalize == "frobenius":
        f = f / _frobenius(f)
    return f + eps * _identity_like(f)


@register_rule("lrp", needs_cross_correlation=True)
def least_squares_kernel(correlation, cross_correlation=None, eps=0.0, jitter=1e-6):
    r"""LRP, the linear regression predictor of [EO]: P = (Z^T Z)^{-1} Z^T Z' + eps I.

    With F = Z^T Z / b and C = Z^T Z' / b (online x target), P solves F P = C. F is often
    rank-deficient (b < d, or a collapsing run), so we solve (F + jitter tr(F)/d I) P = C by
    Cholesky: ``jitter`` is relative to F's mean eigenvalue, which keeps the rule scale-free.
    """
    _check_eps(eps)
    f = _symmetrize(tf.stop_gradient(correlation))
    c = tf.stop_gradient(cross_correlation)
    identity = _identity_like(f)
    d = tf.cast(tf.shape(f)[-1], f.dtype)
    ridge = jitter * tf.maximum(tf.linalg.trace(f) / d, tf.constant(np.finfo(np.float32).tiny, f.dtype))
    chol = tf.linalg.cholesky(f + ridge * identity)
    return tf.linalg.cholesky_solve(chol, c) + eps * identity


@register_rule("neumann", needs_cross_correlation=True)
def neumann_kernel(correlation, cross_correlation=None, eps=0.0):
    r"""NE [EO]: LRP with (Z^T Z)^{-1} replaced by its first-order Neumann series 2I - Z^T Z.

    [EO] leaves the scaling unspecified; the series needs the eigenvalues of the matrix in
    (0, 2), so we apply it to F~ = F / ||F||_F (eigenvalues in [0, 1]):
    P = (2I - F~) (C / ||F||_F) + eps I. Matrix multiplies only.
    """
    _check_eps(eps)
    f = _symmetrize(tf.stop_gradient(correlation))
    scale = _frobenius(f)
    identity = _identity_like(f)
    return tf.matmul(2.0 * identity - f / scale, tf.stop_gradient(cross_correlation) / scale) + eps * identity


@register_rule("visser")
def visser_kernel(correlation, eps=0.0, iterations=40, step=0.5):
    r"""Visser iteration for F^{1/2} [EO]: P_0 = I / (2 step), P_{k+1} = P_k + step (F~ - P_k^2).

    Applied to F~ = F / ||F||_F (eigenvalues in [0, 1]) so that, with ``step`` = 0.5, P_0 = I
    starts above every root and each eigen-mode p <- p + step (s - p^2) contracts to sqrt(s)
    at rate |1 - 2 step sqrt(s)|: fast for large s, slow for s -> 0 ([EO] runs "several
    dozen" iterations; its step size is not in the main text). Returns P + eps I.
    Matrix multiplies only.
    """
    _check_eps(eps)
    if int(iterations) < 1 or not 0 < step <= 1:
        raise ValueError(f"visser needs iterations >= 1 and 0 < step <= 1; got iterations={iterations!r}, step={step!r}.")
    f = _symmetrize(tf.stop_gradient(correlation))
    f = f / _frobenius(f)
    identity = _identity_like(f)
    p = identity / (2.0 * step)
    for _ in range(int(iterations)):
        p = p + step * (f - tf.matmul(p, p))
    return p + eps * identity


def newton_schulz_sqrt(matrix, iterations):
    r"""Coupled Newton-Schulz iteration [EO] for the square root of a symmetric PSD matrix.

    A_0 = M / ||M||_F, B_0 = I; with T = 3I - B_k A_k: A_{k+1} = A_k T / 2, B_{k+1} = T B_k / 2.
    A_k -> (M / ||M||_F)^{1/2} and B_k -> (M / ||M||_F)^{-1/2}; 3 matmuls per iteration.
    Returns (A_n, B_n, ||M||_F), i.e. the normalised root; multiply A_n by sqrt(||M||_F)
    for the root of M itself.
    """
    scale = _frobenius(matrix)
    a = matrix / scale
    identity = _identity_like(matrix)
    b = identity
    for _ in range(int(iterations)):
        t = 3.0 * identity - tf.matmul(b, a)
        a, b = 0.5 * tf.matmul(a, t), 0.5 * tf.matmul(t, b)
    return a, b, scale


def _check_iterations(iterations):
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations!r}.")


@register_rule("newton_schulz")
def newton_schulz_kernel(correlation, eps=0.0, iterations=9):
    r"""NS [EO]: P = (F / ||F||_F)^{1/2} by n = 9 coupled Newton-Schulz iterations, + eps I.

    The normalised root (no sqrt(||F||_F) rescale) keeps the rule scale-free.
    """
    _check_eps(eps)
    _check_iterations(iterations)
    f = _symmetrize(tf.stop_gradient(correlation))
    root, _, _ = newton_schulz_sqrt(f, iterations)
    return root + eps * _identity_like(f)


@register_rule("ns2")
def ns2_kernel(correlation, eps=0.0, iterations=7):
    r"""NS^2 [EO]: Newton-Schulz applied twice (n = 7 each), P ~ (F / ||F||_F)^{1/4} up to scale, + eps I."""
    _check_eps(eps)
    _check_iterations(iterations)
    f = _symmetrize(tf.stop_gradient(correlation))
    root, _, _ = newton_schulz_sqrt(f, iterations)
    root, _, _ = newton_schulz_sqrt(_symmetrize(root), iterations)
    return root + eps * _identity_like(f)


@register_rule("stiefel")
def stiefel_kernel(correlation, eps=0.0, iterations=9):
    r"""Stiefel [EO]: P = (F^T F)^{-1/2} F^T / ||(F^T F)^{-1/2}||_F + eps I.

    Newton-Schulz on F^T F gives B_n ~ (F^T F / ||F^T F||_F)^{-1/2}; B_n F^T is then the
    orthogonal polar factor of F (a projection for a PSD, rank-deficient F) up to scale, and
    dividing by ||B_n||_F fixes the scale as [EO] does. [EO] recommends this rule: robust
    across the ridge and training length. Matrix multiplies only.
    """
    _check_eps(eps)
    _check_iterations(iterations)
    f = _symmetrize(tf.stop_gradient(correlation))
    f = f / _frobenius(f)
    _, inverse_root, _ = newton_schulz_sqrt(tf.matmul(f, f, transpose_a=True), iterations)
    p = tf.matmul(inverse_root, f, transpose_b=True)
    return p / _frobenius(inverse_root) + eps * _identity_like(f)

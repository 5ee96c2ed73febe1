"""Closed-form predictor rules: a correlation matrix in, a predictor kernel out.

A rule is a pure function ``rule(correlation, *, eps, **options) -> kernel`` registered in
:data:`RULES`. ``correlation`` is F = E[f f^T] (d x d) of the online projections f; rules
that need the online/target cross-correlation C = E[f f'^T] take it as the keyword
``cross_correlation``. Kernels use the row convention of the layer, ``y = x @ kernel``,
which is also the convention of [EO] (Z P ~ Z').

Every rule is written as ``base(F) + eps * I``: DirectPred's p_j = r_j^power + eps is
U diag(r^power) U^T + eps I, DirectCopy adds eps I, and [EO] adds its ridge alpha I. The
BYOL/SimSiam loss is l2-normalised, so only the size of ``eps`` relative to the base matters:
by default every base is scale-free (F -> cF gives the same kernel) with its top eigenvalue
~1 (DirectPred's r_max = 1, DirectCopy's F / ||F||_2, the [EO] rules' scale="spectral"), so
one eps means the same ridge for every rule.

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


# -- Edge of Orthogonality ([EO] §3.2, §4.3, §5.2, Table 1) -------------------------------------
#
# [EO] writes every predictor on the raw batch statistics Sigma = Z^T Z / b (and Z^T Z'), adds a
# ridge alpha I swept over [0, 0.9], and says (§3.1) that the loss being scale-invariant, "we can
# assume its maximal eigenvalue to be 1 at all times by spectral normalization". The absolute
# scale of its ImageNet latents is unknown, so the printed formulas alone do not fix what alpha
# means. scale="spectral" (default) applies each formula to F~ = F / ||F||_2 (C~ = C / ||F||_2),
# which makes every base's top eigenvalue ~1, as DirectPred's and DirectCopy's are, so that
# eps = alpha is a ridge of the same size for every rule. scale="paper" applies the printed
# formulas to the raw F and C (the kernel then depends on the scale of the projections).

_SCALES = ("spectral", "paper")
SPECTRAL_SQUARINGS = 6  # ||F||_2 estimate within a factor rank^(1/128) (<= 1.05 for d <= 512)


def spectral_norm_estimate(matrix, squarings=SPECTRAL_SQUARINGS):
    r"""Matrix-multiply-only estimate of ||M||_2 for a symmetric M: its Schatten-2^(k+1) norm.

    With k = ``squarings``, ||M^(2^k)||_F^(1/2^k) = (sum_i |s_i|^(2^(k+1)))^(1/2^(k+1)) lies in
    [||M||_2, rank(M)^(1/2^(k+1)) ||M||_2]; each square is renormalised by its Frobenius norm
    (the log-scales are accumulated), so nothing over- or underflows. k matmuls, no eigh.
    """
    if int(squarings) != squarings or squarings < 0:
        raise ValueError(f"squarings must be an integer >= 0; got {squarings!r}.")
    scale = _frobenius(matrix)
    x = matrix / scale
    log_norm = tf.zeros([], matrix.dtype)  # log ||(M / ||M||_F)^(2^j)||_F, j = 0 .. k
    for _ in range(int(squarings)):
        x = tf.matmul(x, x)
        norm = _frobenius(x)
        x = x / norm
        log_norm = 2.0 * log_norm + tf.math.log(norm)
    return scale * tf.exp(log_norm / 2.0 ** int(squarings))


def _check_scale(scale):
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES} ('spectral': top eigenvalue of the base ~1, "
                         f"so eps is [EO]'s ridge alpha; 'paper': the printed formula on the raw F); "
                         f"got {scale!r}.")


def _eo_statistics(correlation, cross_correlation, scale):
    """(F, C) as an [EO] formula sees them: divided by ||F||_2 under scale="spectral"."""
    _check_scale(scale)
    f = _symmetrize(tf.stop_gradient(correlation))
    c = None if cross_correlation is None else tf.stop_gradient(cross_correlation)
    if scale == "spectral":
        top = tf.maximum(spectral_norm_estimate(f), tf.constant(np.finfo(np.float32).tiny, f.dtype))
        f = f / top
        c = None if c is None else c / top
    return f, c


@register_rule("lrp", needs_cross_correlation=True)
def least_squares_kernel(correlation, cross_correlation=None, eps=0.0, jitter=1e-6):
    r"""LRP, the linear regression predictor of [EO] Eq. 5: P = (Z^T Z)^{-1} Z^T Z' + eps I.

    With F = Z^T Z / b and C = Z^T Z' / b (online x target), P solves F P = C: already
    scale-free, and ~I on the range of F when the target tracks the online network (C ~ F), so
    eps is a ridge of the same size as for the other rules. F is often rank-deficient (b < d,
    or a collapsing run), so we solve (F + jitter tr(F) I) P = C by Cholesky: relative to
    tr(F) >= ||F||_2, which keeps the rule scale-free and the shift above float32 round-off
    of F's top eigenvalues (relative to the *mean* eigenvalue, 1e-6 fell below it for a
    few dominant eigenvalues and d >= 64: the solve then amplified round-off, ||P||_2 ~ 2).
    """
    _check_eps(eps)
    f = _symmetrize(tf.stop_gradient(correlation))
    c = tf.stop_gradient(cross_correlation)
    identity = _identity_like(f)
    ridge = jitter * tf.maximum(tf.linalg.trace(f), tf.constant(np.finfo(np.float32).tiny, f.dtype))
    chol = tf.linalg.cholesky(f + ridge * identity)
    return tf.linalg.cholesky_solve(chol, c) + eps * identity


@register_rule("neumann", needs_cross_correlation=True)
def neumann_kernel(correlation, cross_correlation=None, eps=0.0, scale="spectral"):
    r"""NE [EO Prop. 4, Eq. 6]: P = 2 Z^T Z' - Z^T Z Z^T Z' = (2I - F) C, + eps I.

    LRP with (Z^T Z)^{-1} replaced by its first-order Neumann series 2I - Z^T Z, which [EO]
    says needs small latents "with well-chosen normalization". scale="spectral" applies it to
    F~ = F / ||F||_2 and C~ = C / ||F||_2: F~'s eigenvalues lie in [0, 1], where the series is
    valid, and for C ~ F the eigenvalues 2s - s^2 of the base peak at 1 (s = 1).
    scale="paper": the raw 2C - FC. Matrix multiplies only.
    """
    _check_eps(eps)
    f, c = _eo_statistics(correlation, cross_correlation, scale)
    identity = _identity_like(f)
    return tf.matmul(2.0 * identity - f, c) + eps * identity


@register_rule("visser")
def visser_kernel(correlation, eps=0.0, iterations=40, step=0.5, scale="spectral"):
    r"""Visser iteration [EO Prop. 6]: P_0 = I / (2 step), P_{k+1} = P_k + step (F - P_k^2) -> F^{1/2}.

    [EO] gives neither the step nor the count ("several dozens" of iterations; the appendix is
    not accessible here). With scale="spectral" (F~ = F / ||F||_2, top eigenvalue ~1) and
    ``step`` = 0.5, P_0 = I starts on the top root and above every other; each eigen-mode
    p <- p + step (s - p^2) contracts to sqrt(s) at rate |1 - 2 step sqrt(s)|: at once for
    s ~ 1, slowly for s -> 0, where p ~ 1 / (step (k + 2)) (0.05 after 40 steps). A smaller
    step starts from a larger multiple of I, which [EO] §6 credits for Visser's insensitivity
    to the ridge. Returns P_n + eps I. Matrix multiplies only.
    """
    _check_eps(eps)
    if int(iterations) != iterations or iterations < 1 or not 0 < step <= 1:
        raise ValueError(f"visser needs an integer iterations >= 1 and 0 < step <= 1; "
                         f"got iterations={iterations!r}, step={step!r}.")
    f, _ = _eo_statistics(correlation, None, scale)
    identity = _identity_like(f)
    p = identity / (2.0 * step)
    for _ in range(int(iterations)):
        p = p + step * (f - tf.matmul(p, p))
    return p + eps * identity


def newton_schulz_sqrt(matrix, iterations):
    r"""Coupled Newton-Schulz iteration [EO Prop. 7] for the square root of a symmetric PSD matrix.

    A_0 = M / ||M||_F, B_0 = I; with T = 3I - B_k A_k: A_{k+1} = A_k T / 2, B_{k+1} = T B_k / 2.
    A_k -> (M / ||M||_F)^{1/2} and B_k -> (M / ||M||_F)^{-1/2}; 3 matmuls per iteration.
    Returns (A_n, B_n, ||M||_F); [EO]'s root of M itself is A_n sqrt(||M||_F).
    """
    scale = _frobenius(matrix)
    a = matrix / scale
    identity = _identity_like(matrix)
    b = identity
    for _ in range(int(iterations)):
        t = 3.0 * identity - tf.matmul(b, a)
        a, b = 0.5 * tf.matmul(a, t), 0.5 * tf.matmul(t, b)
    return a, b, scale


def _newton_schulz_root(matrix, iterations):
    """[EO]'s NS predictor of ``matrix``: A_n sqrt(||M||_F) ~ M^{1/2}."""
    root, _, scale = newton_schulz_sqrt(matrix, iterations)
    return root * tf.sqrt(scale)


def _check_iterations(iterations):
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations!r}.")


@register_rule("newton_schulz")
def newton_schulz_kernel(correlation, eps=0.0, iterations=9, scale="spectral"):
    r"""NS [EO Prop. 7]: P = A_n sqrt(||F||_F) ~ F^{1/2} by n = 9 coupled Newton-Schulz iterations, + eps I.

    scale="spectral": of F~ = F / ||F||_2, so P ~ (F / ||F||_2)^{1/2}, top eigenvalue ~1.
    (Eigen-modes far below the top converge slowly: after n steps a mode s << ||F||_F of
    F / ||F||_F is only multiplied by ~1.5^n instead of sent to sqrt(s).)
    """
    _check_eps(eps)
    _check_iterations(iterations)
    f, _ = _eo_statistics(correlation, None, scale)
    return _newton_schulz_root(f, iterations) + eps * _identity_like(f)


@register_rule("ns2")
def ns2_kernel(correlation, eps=0.0, iterations=7, scale="spectral"):
    r"""NS^2 [EO §4.3]: the NS predictor applied twice (n = 7 each), P ~ F^{1/4}, + eps I.

    scale="spectral": of F~ = F / ||F||_2, so P ~ (F / ||F||_2)^{1/4}, top eigenvalue ~1.
    """
    _check_eps(eps)
    _check_iterations(iterations)
    f, _ = _eo_statistics(correlation, None, scale)
    root = _newton_schulz_root(f, iterations)
    return _newton_schulz_root(_symmetrize(root), iterations) + eps * _identity_like(f)


@register_rule("stiefel")
def stiefel_kernel(correlation, eps=0.0, iterations=9, scale="spectral"):
    r"""Stiefel [EO Prop. 10]: the projection (F^T F)^{-1/2} F^T of F onto the Stiefel manifold, + eps I.

    [EO] orthonormalises the covariance of the *online* latents (F, not the online/target
    cross-correlation): B_n from n = 9 Newton-Schulz iterations on F^T F, with
    A_0 = F^T F / ||F^T F||_F, approximates (F^T F / ||F^T F||_F)^{-1/2}, and
    P = B_n F^T / s. For a symmetric PSD F every eigen-mode that has converged has eigenvalue
    sqrt(||F^T F||_F) in B_n F^T; modes too small to converge in n steps stay below it and
    F's null modes stay 0. So B_n F^T is, up to that constant, the polar factor of F: a
    projection onto F's dominant eigen-space.

    scale="spectral": s = sqrt(||F^T F||_F), so converged modes are exactly 1 (P^T P = I on
    them) and every eigenvalue lies in [0, 1]. scale="paper": s = ||B_n||_F as printed; that
    divides by a norm dominated by F's small and null modes (B_n ~ 1.5^n there), which leaves
    the base at 1e-3..1e-2 for d = 16..128 and makes any ridge >= 0.15 an identity predictor.
    Both are the same matrix up to a positive factor (the same kernel at eps = 0). Matrix
    multiplies only.
    """
    _check_eps(eps)
    _check_iterations(iterations)
    _check_scale(scale)
    f = _symmetrize(tf.stop_gradient(correlation))
    gram = tf.matmul(f, f, transpose_a=True)
    _, inverse_root, gram_norm = newton_schulz_sqrt(gram, iterations)
    p = tf.matmul(inverse_root, f, transpose_b=True)
    divisor = tf.sqrt(gram_norm) if scale == "spectral" else _frobenius(inverse_root)
    return p / divisor + eps * _identity_like(f)

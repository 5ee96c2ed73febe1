"""Diagnostics of a predictor Wp and its input correlation F, shared by theory and training.

These are the quantities that [DP] tracks to show *why* a linear predictor works:

* the spectrum of F = E[f f^T] (collapse shows as eigenvalues going to 0),
* the eigen-alignment cos(u_j, Wp u_j) of Wp with each eigenvector u_j of F ([DP] Fig. 2, Thm 3),
* the commutator norm ||F Wp - Wp F||_F ([DP] Thm 3, Fig. 9),
* the norms of the symmetric and skew parts of Wp ([DP] Fig. 8),
* the balancing residual W W^T - Wp^T Wp / alpha_p ([DP] Thm 1),
* the effective rank of F (Roy & Vetterli 2007), a one-number collapse monitor.

[DP] Y. Tian, X. Chen, S. Ganguli, "Understanding self-supervised learning dynamics without
contrastive pairs", ICML 2021, arXiv:2102.06810.

All functions take numpy arrays or anything ``np.asarray`` converts (tf tensors, Keras
variables), compute in float64 and return numpy values.  Every function also accepts a stack of
matrices with leading batch axes (``(..., n, n)``), so a whole recorded trajectory is analysed in
one vectorised call; the result then carries the same leading axes.
"""
import numpy as np

__all__ = [
    "spectrum",
    "eigen_alignment",
    "commutator_norm",
    "symmetric_skew_norms",
    "balancing_residual",
    "effective_rank",
    "collapse_threshold",
]


def _as_matrix(value, name, *, square=True):
    """float64 array of shape (..., m, n), finite; ValueError naming `name` otherwise."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be a real matrix (numpy array, tf tensor or Keras variable), "
            f"got {type(value).__name__}") from error
    if array.ndim < 2:
        raise ValueError(
            f"{name} must be a matrix of shape (..., n, n) (leading axes are a batch), "
            f"got shape {array.shape}")
    if square and array.shape[-1] != array.shape[-2]:
        raise ValueError(f"{name} must be square (..., n, n), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        # A NaN here usually means training already diverged; eigh would fail obscurely.
        raise ValueError(f"{name} contains NaN or inf; diagnostics need finite values")
    return array


def _check_broadcast(a, b, names):
    """Raise ValueError unless a and b are stacks of matrices that broadcast together."""
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; they must "
            "have the same matrix size and broadcastable leading (batch) axes") from None


def _symmetrize(a):
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def _check_alpha_p(alpha_p):
    if not (np.ndim(alpha_p) == 0 and np.isfinite(alpha_p) and alpha_p > 0):
        raise ValueError(f"alpha_p must be a finite number > 0, got {alpha_p!r}")
    return float(alpha_p)


def spectrum(F):
    r"""Eigenvalues of the symmetrised correlation, in descending order.

    .. math:: \operatorname{eigvalsh}\big(\tfrac12 (F + F^\top)\big), \quad
              \lambda_1 \ge \lambda_2 \ge \dots

    Running estimates of F = E[f f^T] drift slightly from symmetry in floating point, so the
    symmetric part is used (the skew part carries no variance); this is the quantity plotted as
    "eig(F)" in [DP] Fig. 2.

    Parameters
    ----------
    F : array_like, shape (..., n, n)

    Returns
    -------
    ndarray, shape (..., n)
    """
    F = _as_matrix(F, "F")
    return np.linalg.eigvalsh(_symmetrize(F))[..., ::-1]


def eigen_alignment(F, Wp):
    r"""Cosine between each eigenvector u_j of F and its image under the predictor.

    .. math:: a_j = \cos(u_j, W_p u_j) = \frac{u_j^\top W_p u_j}{\lVert W_p u_j \rVert},
              \qquad \tfrac12(F + F^\top) u_j = \lambda_j u_j,\ \lVert u_j\rVert = 1,

    [DP] Fig. 2 (third column) and Thm 3: with weight decay Wp comes to share F's eigenvectors,
    so every a_j tends to 1 (to -1 for a mode where Wp has a negative eigenvalue).  The value
    does not depend on the sign chosen for u_j.  Where Wp u_j = 0 the cosine is undefined and
    0 is returned (the predictor carries nothing along that direction).

    Parameters
    ----------
    F : array_like, shape (..., n, n)
        Predictor-input correlation (symmetrised internally).
    Wp : array_like, shape (..., n, n)
        Predictor matrix (need not be symmetric).

    Returns
    -------
    alignment : ndarray, shape (..., n)
        a_j, ordered by eigenvalue of F, largest first.
    eigenvalues : ndarray, shape (..., n)
        lambda_j in the same (descending) order, i.e. ``spectrum(F)``.
    """
    F = _as_matrix(F, "F")
    Wp = _as_matrix(Wp, "Wp")
    _check_broadcast(F, Wp, ("F", "Wp"))
    eigenvalues, U = np.linalg.eigh(_symmetrize(F))
    eigenvalues, U = eigenvalues[..., ::-1], U[..., ::-1]
    images = Wp @ U                                      # column j is Wp u_j
    numerator = np.sum(U * images, axis=-2)               # u_j^T Wp u_j
    denominator = np.linalg.norm(images, axis=-2)
    alignment = np.divide(numerator, denominator, out=np.zeros_like(numerator),
                          where=denominator > 0)
    # Rounding can push |cos| a hair above 1.
    return np.clip(alignment, -1.0, 1.0), eigenvalues


def commutator_norm(F, Wp):
    r"""Frobenius norm of the commutator, :math:`\lVert F W_p - W_p F \rVert_F`.

    Zero exactly when (symmetric) F and Wp share an eigenbasis; [DP] Thm 3 shows it decays like
    :math:`e^{-2\lambda_0 t}` when the matrix K of the theorem stays positive definite
    (see ``keras_ncssl.theory.alignment_operator``), and [DP] Fig. 9 plots it during training.

    Parameters
    ----------
    F, Wp : array_like, shape (..., n, n)

    Returns
    -------
    float or ndarray, shape (...)
    """
    F = _as_matrix(F, "F")
    Wp = _as_matrix(Wp, "Wp")
    _check_broadcast(F, Wp, ("F", "Wp"))
    return np.linalg.norm(F @ Wp - Wp @ F, axis=(-2, -1))


def symmetric_skew_norms(Wp):
    r"""Frobenius norms of the symmetric and skew-symmetric parts of Wp.

    .. math:: \lVert \tfrac12(W_p + W_p^\top) \rVert_F, \quad
              \lVert \tfrac12(W_p - W_p^\top) \rVert_F

    [DP] Fig. 8: during training the skew part decays, i.e. Wp becomes symmetric (for eta > 0
    the fixed point of the flow is symmetric, [DP] §3).  The two parts are orthogonal in the
    Frobenius inner product, so their squared norms add up to ``||Wp||_F**2``.

    Parameters
    ----------
    Wp : array_like, shape (..., n, n)

    Returns
    -------
    symmetric_norm, skew_norm : float or ndarray, shape (...)
    """
    Wp = _as_matrix(Wp, "Wp")
    transposed = np.swapaxes(Wp, -1, -2)
    return (np.linalg.norm(0.5 * (Wp + transposed), axis=(-2, -1)),
            np.linalg.norm(0.5 * (Wp - transposed), axis=(-2, -1)))


def balancing_residual(W, Wp, alpha_p):
    r"""Residual of the balancing law, :math:`W W^\top - \alpha_p^{-1} W_p^\top W_p`.

    [DP] Thm 1: under the gradient flow of Lemma 1 with weight decay eta,
    :math:`W W^\top - \alpha_p^{-1} W_p^\top W_p = e^{-2\eta t} C`, so the residual decays at
    rate 2 eta whatever the data, and with eta > 0 the online weights end up tied to the
    predictor (this is what motivates p_j proportional to sqrt(s_j) in DirectPred).

    Parameters
    ----------
    W : array_like, shape (..., n2, n1)
        Online (linear) network.
    Wp : array_like, shape (..., n2, n2)
        Predictor.
    alpha_p : float > 0
        Relative learning rate of the predictor.

    Returns
    -------
    ndarray, shape (..., n2, n2)
    """
    alpha_p = _check_alpha_p(alpha_p)
    W = _as_matrix(W, "W", square=False)
    Wp = _as_matrix(Wp, "Wp")
    if W.shape[-2] != Wp.shape[-1]:
        raise ValueError(
            f"W has shape {W.shape} (output size {W.shape[-2]}) but Wp has shape {Wp.shape}; "
            f"Wp must be ({W.shape[-2]}, {W.shape[-2]})")
    try:
        np.broadcast_shapes(W.shape[:-2], Wp.shape[:-2])
    except ValueError:
        raise ValueError(f"W {W.shape} and Wp {Wp.shape} have incompatible batch axes") from None
    return W @ np.swapaxes(W, -1, -2) - np.swapaxes(Wp, -1, -2) @ Wp / alpha_p


def effective_rank(F):
    r"""Entropy-based effective rank (Roy & Vetterli, EUSIPCO 2007).

    .. math:: \operatorname{erank}(F) = \exp\Big(-\sum_k q_k \log q_k\Big), \qquad
              q_k = \sigma_k / \textstyle\sum_i \sigma_i,

    with :math:`\sigma_k` the singular values (for a correlation matrix, its eigenvalues) and
    :math:`0 \log 0 = 0`.  It lies in [1, rank(F)], equals n for a multiple of the identity and
    k for a rank-k projector, and is scale invariant, so it serves as a collapse monitor for
    the representation correlation ([DP] Fig. 2 shows the spectrum itself).  An all-zero matrix
    (complete collapse) has effective rank 0 by convention here.

    Parameters
    ----------
    F : array_like, shape (..., m, n)

    Returns
    -------
    float or ndarray, shape (...)
    """
    F = _as_matrix(F, "F", square=False)
    singular = np.linalg.svd(F, compute_uv=False)
    total = singular.sum(axis=-1, keepdims=True)
    q = np.divide(singular, total, out=np.zeros_like(singular), where=total > 0)
    logs = np.log(q, out=np.zeros_like(q), where=q > 0)
    entropy = -np.sum(q * logs, axis=-1)
    rank = np.where(total[..., 0] > 0, np.exp(entropy), 0.0)
    return float(rank) if rank.ndim == 0 else rank


def collapse_threshold(projection_dim):
    r"""The projection std below which a representation counts as collapsed: :math:`0.1/\sqrt{d}`.

    ``projection_std`` (`keras_ncssl.losses.projection_std`) of l2-normalised d-dimensional
    projections is about :math:`1/\sqrt{d}` when they spread over the sphere and 0 when they
    collapse to a point ([SimSiam] Chen & He, CVPR 2021, Fig. 2); a tenth of the healthy value
    separates the two with a wide margin. One threshold for the training monitor
    (`keras_ncssl.callbacks.SpectrumMonitor`) and the studies' collapse claims.
    """
    d = int(projection_dim)
    if d < 1:
        raise ValueError(f"projection_dim={projection_dim!r}: must be an integer >= 1.")
    return 0.1 / float(np.sqrt(d))

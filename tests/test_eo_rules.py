"""Edge-of-Orthogonality rules ([EO], arXiv 2302.04817) against float64 numpy transcriptions.

Each reference below is a line-by-line numpy float64 transcription of the formula quoted in
BUILD_NOTES "Edge of Orthogonality at the paper's scale"; the converged cases are checked
against eigendecomposition-based closed forms (F^{1/2}, F^{1/4}, the projection onto range F).
"""
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl.predictors import RULES
from keras_ncssl.predictors import rules as rules_module
from test_predictor_rules import correlations, np_sqrtm, spd

EO_RULES = ["lrp", "neumann", "visser", "newton_schulz", "ns2", "stiefel"]
SCALED_RULES = ["neumann", "visser", "newton_schulz", "ns2", "stiefel"]  # those with scale=


def realistic_correlation(rng, d):
    """F as a trained projector gives it: 3 eigenvalues of order 1, the rest decaying to 1e-5,
    d/8 exactly zero, in random directions and at a random overall scale."""
    n_zero = d // 8
    decaying = np.logspace(-1.5, -5, d - 3 - n_zero)
    eigenvalues = np.concatenate([[1.0, 0.6, 0.3], decaying, np.zeros(n_zero)])
    return spd(rng, d, eigenvalues) * 10 ** rng.uniform(-3, 3)


def target_like(rng, f):
    """C = E[f f'^T] for a target net near the online one: f' = R^T f, R = I + small noise."""
    d = len(f)
    return f @ (np.eye(d) + 0.05 * rng.normal(size=(d, d)) / np.sqrt(d))


def call(name, f, c=None, **options):
    if RULES[name].needs_cross_correlation:
        options["cross_correlation"] = c
    return RULES[name](f, **options)


# -- float64 transcriptions of [EO]'s formulas ------------------------------------------------

def np_spectral_estimate(f, squarings=6):
    """The Schatten-2^(k+1) norm, from eigenvalues (the rule gets it by repeated squaring)."""
    s = np.abs(np.linalg.eigvalsh(0.5 * (f + f.T)))
    top, p = s.max(), 2.0 ** (squarings + 1)
    return top * np.sum((s / top) ** p) ** (1.0 / p)


def np_statistics(f, c, scale):
    f = 0.5 * (f + f.T)
    if scale == "spectral":
        top = np_spectral_estimate(f)
        return f / top, None if c is None else c / top
    return f, c


def np_newton_schulz(m, n):
    """[EO] Prop. 7: A_0 = M/||M||_F, B_0 = I; A <- A(3I - BA)/2, B <- (3I - BA)B/2."""
    norm = np.linalg.norm(m)
    a, b, eye = m / norm, np.eye(len(m)), np.eye(len(m))
    for _ in range(n):
        a, b = 0.5 * a @ (3 * eye - b @ a), 0.5 * (3 * eye - b @ a) @ b
    return a, b, norm


def np_ns_root(m, n):
    a, _, norm = np_newton_schulz(m, n)
    return a * np.sqrt(norm)  # P = A_n sqrt(||Sigma||_F)


def np_neumann(f, c, eps=0.0, scale="spectral"):
    f, c = np_statistics(f, c, scale)
    return 2 * c - f @ c + eps * np.eye(len(f))  # 2 Z^T Z' - Z^T Z Z^T Z'


def np_visser(f, eps=0.0, iterations=40, step=0.5, scale="spectral"):
    f, _ = np_statistics(f, None, scale)
    p = np.eye(len(f)) / (2 * step)
    for _ in range(iterations):
        p = p + step * (f - p @ p)
    return p + eps * np.eye(len(f))


def np_ns(f, eps=0.0, iterations=9, scale="spectral"):
    f, _ = np_statistics(f, None, scale)
    return np_ns_root(f, iterations) + eps * np.eye(len(f))


def np_ns2(f, eps=0.0, iterations=7, scale="spectral"):
    f, _ = np_statistics(f, None, scale)
    root = np_ns_root(f, iterations)
    return np_ns_root(0.5 * (root + root.T), iterations) + eps * np.eye(len(f))


def np_stiefel(f, eps=0.0, iterations=9, scale="spectral"):
    f = 0.5 * (f + f.T)
    _, b, gram_norm = np_newton_schulz(f.T @ f, iterations)  # B_n ~ (Sigma^T Sigma)^(-1/2)
    divisor = np.sqrt(gram_norm) if scale == "spectral" else np.linalg.norm(b)  # paper: ||B_n||_F
    return b @ f.T / divisor + eps * np.eye(len(f))


REFERENCES = {"neumann": np_neumann, "visser": np_visser, "newton_schulz": np_ns, "ns2": np_ns2,
              "stiefel": np_stiefel}


# -- the scale: every base of order 1 ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("name", EO_RULES)
def test_every_eo_base_has_spectral_norm_of_order_one(rng, name, d, dtype):
    f = realistic_correlation(rng, d)
    c = target_like(rng, f)
    base = call(name, f.astype(dtype), c.astype(dtype), eps=0.0)
    norm = np.linalg.norm(base.astype(np.float64), 2)
    assert 0.5 <= norm <= 2.0, f"{name}: ||base||_2 = {norm:.3g} at d = {d}"
    # so the ridge is a ridge: at eps = 0.3 the kernel is far from 0.3 I (the old Stiefel's fate)
    kernel = call(name, f.astype(dtype), c.astype(dtype), eps=0.3)
    assert np.linalg.norm(kernel - 0.3 * np.eye(d), 2) >= 0.5


@pytest.mark.parametrize("d", [16, 64, 128])
def test_paper_scale_stiefel_is_the_same_matrix_but_tiny(rng, d):
    """Printed Prop. 10 divides by ||B_n||_F: the same direction as ours, 1e-3..1e-2 in size."""
    f = realistic_correlation(rng, d)
    ours = RULES["stiefel"](f, eps=0.0)
    paper = RULES["stiefel"](f, eps=0.0, scale="paper")
    ratio = np.sum(paper * ours) / np.sum(ours * ours)
    np.testing.assert_allclose(paper, ratio * ours, atol=1e-9 * np.abs(paper).max())
    assert ratio > 0
    # the printed base is linear in F's scale; relative to F's top eigenvalue it is far below 1
    assert np.linalg.norm(paper, 2) / np.abs(np.linalg.eigvalsh(f)).max() < 0.1


def test_spectral_norm_estimate_brackets_the_top_eigenvalue(rng):
    for d in (4, 32, 200):
        f = spd(rng, d, rng.normal(size=d) * 10 ** rng.uniform(-4, 4, size=d))  # signs and scales
        top = np.abs(np.linalg.eigvalsh(f)).max()
        got = float(rules_module.spectral_norm_estimate(tf.constant(f)))
        assert top * (1 - 1e-12) <= got <= top * d ** (1 / 128) * (1 + 1e-12)
        assert got == pytest.approx(np_spectral_estimate(f), rel=1e-10)
        assert float(rules_module.spectral_norm_estimate(tf.constant(f), squarings=0)) == \
            pytest.approx(np.linalg.norm(f), rel=1e-12)  # k = 0: the Frobenius norm
    assert float(rules_module.spectral_norm_estimate(tf.zeros([5, 5]))) == 0.0


# -- each rule against its transcription -------------------------------------------------------

@pytest.mark.parametrize("scale", ["spectral", "paper"])
@pytest.mark.parametrize("kind", ["spd", "rank_deficient", "realistic"])
@pytest.mark.parametrize("name", SCALED_RULES)
def test_eo_rule_matches_float64_transcription(rng, name, kind, scale):
    mats = correlations(rng)
    f = realistic_correlation(rng, 12) if kind == "realistic" else mats[kind]
    if scale == "paper":
        # the printed Visser/NE need ||F|| < ~1 to converge ([EO]: "small-magnitude latents")
        f = f / (2 * np.abs(np.linalg.eigvalsh(f)).max())
    c = target_like(rng, f)
    options = {"cross_correlation": c} if name == "neumann" else {}
    got = RULES[name](f, eps=0.2, scale=scale, **options)
    expected = REFERENCES[name](f, *([c] if name == "neumann" else []), eps=0.2, scale=scale)
    np.testing.assert_allclose(got, expected, atol=1e-10 * max(1.0, np.abs(expected).max()))


def test_lrp_on_realistic_f_is_the_regression_of_the_target(rng):
    """C = F R with R ~ I (target ~ online): LRP = F^+ C = R on range F (float64, tiny jitter)."""
    d = 32
    f = realistic_correlation(rng, d)
    r = np.eye(d) + 0.05 * rng.normal(size=(d, d)) / np.sqrt(d)
    got = RULES["lrp"](f, cross_correlation=f @ r, eps=0.1, jitter=1e-12)
    s, u = np.linalg.eigh(f)
    kept = u[:, s > 1e-9 * s.max()]
    np.testing.assert_allclose(kept.T @ (got - 0.1 * np.eye(d)), kept.T @ r, atol=1e-6)


def test_neumann_eigenvalues_are_two_s_minus_s_squared(rng):
    """With C = F, NE's base is (2I - F~) F~: eigenvalues 2s - s^2 of F~ = F/||F||_2, top ~1."""
    f = realistic_correlation(rng, 20)
    s = np.linalg.eigvalsh(f) / np_spectral_estimate(f)
    got = np.linalg.eigvalsh(RULES["neumann"](f, cross_correlation=f, eps=0.0))
    np.testing.assert_allclose(np.sort(got), np.sort(2 * s - s ** 2), atol=1e-12)
    assert np.max(got) > 0.99


def well_conditioned(rng, d=16, low=0.1):
    return spd(rng, d, rng.uniform(low, 1.0, size=d))


def test_visser_converges_to_square_root_of_normalised_f(rng):
    f = well_conditioned(rng) * 1e3
    root = np_sqrtm(f / np_spectral_estimate(f))
    np.testing.assert_allclose(RULES["visser"](f, eps=0.0, iterations=300), root, atol=1e-8)
    # the default 40 iterations: within 1e-3 for this conditioning (rate |1 - sqrt(s)| per step)
    np.testing.assert_allclose(RULES["visser"](f, eps=0.0), root, atol=1e-3)


def test_newton_schulz_converges_to_square_root_of_normalised_f(rng):
    f = well_conditioned(rng) * 1e-3
    root = np_sqrtm(f / np_spectral_estimate(f))
    np.testing.assert_allclose(RULES["newton_schulz"](f, eps=0.0, iterations=30), root, atol=1e-10)
    err9 = np.abs(RULES["newton_schulz"](f, eps=0.0) - root).max()  # n = 9, [EO]'s setting
    err12 = np.abs(RULES["newton_schulz"](f, eps=0.0, iterations=12) - root).max()
    assert err9 < 1e-2 and err12 < 1e-6  # quadratic convergence
    paper = RULES["newton_schulz"](f, eps=0.0, iterations=30, scale="paper")
    np.testing.assert_allclose(paper, np_sqrtm(f), atol=1e-10)  # [EO]: A_n sqrt(||Sigma||_F) = Sigma^(1/2)
    a, b, norm = rules_module.newton_schulz_sqrt(tf.constant(f), 30)
    np.testing.assert_allclose(b.numpy(), np.linalg.inv(np_sqrtm(f / np.linalg.norm(f))), atol=1e-8)
    assert float(norm) == pytest.approx(np.linalg.norm(f))


def test_ns2_converges_to_fourth_root(rng):
    f = well_conditioned(rng, low=0.3) * 50.0
    fourth = np_sqrtm(np_sqrtm(f / np_spectral_estimate(f)))
    np.testing.assert_allclose(RULES["ns2"](f, eps=0.0, iterations=30), fourth, atol=1e-8)
    paper = RULES["ns2"](f, eps=0.0, iterations=30, scale="paper")
    np.testing.assert_allclose(paper, np_sqrtm(np_sqrtm(f)), atol=1e-8)  # Sigma^(1/4)


def test_stiefel_converges_to_the_projection_onto_range_f(rng):
    """[EO] Prop. 10 orthonormalises F itself: for a PSD F of rank r, (F^T F)^(-1/2) F^T is the
    orthogonal projection onto range F, eigenvalues exactly 1 (r of them) and 0."""
    d, r = 10, 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.concatenate([rng.uniform(0.5, 1.0, r), np.zeros(d - r)])
    f = (q * s) @ q.T * 7.0
    projection = q[:, :r] @ q[:, :r].T
    got = RULES["stiefel"](f, eps=0.0, iterations=30)
    np.testing.assert_allclose(got, projection, atol=1e-8)
    with_ridge = RULES["stiefel"](f, eps=0.3, iterations=30)
    np.testing.assert_allclose(with_ridge - got, 0.3 * np.eye(d), atol=1e-12)
    # n = 9 on a wide spectrum: every eigenvalue in [0, 1], the top modes at 1
    p = np.linalg.eigvalsh(RULES["stiefel"](realistic_correlation(rng, 64), eps=0.0))
    assert p.min() > -1e-6 and p.max() <= 1 + 1e-6 and np.sum(p > 0.99) >= 3


@pytest.mark.parametrize("name", EO_RULES)
def test_spectral_scale_is_scale_free(rng, name):
    f = realistic_correlation(rng, 16)
    c = target_like(rng, f)
    factor = 10 ** rng.uniform(-3, 3)
    np.testing.assert_allclose(call(name, factor * f, factor * c, eps=0.1), call(name, f, c, eps=0.1),
                               atol=1e-8)


@pytest.mark.parametrize("name", SCALED_RULES)
def test_invalid_scale_names_the_choices(name):
    options = {"cross_correlation": np.eye(3)} if name == "neumann" else {}
    with pytest.raises(ValueError, match=r"scale must be one of \('spectral', 'paper'\).*'frobenius'"):
        RULES[name](np.eye(3), scale="frobenius", **options)


def test_invalid_squarings():
    with pytest.raises(ValueError, match="squarings must be an integer >= 0; got -1"):
        rules_module.spectral_norm_estimate(tf.eye(3), squarings=-1)

"""Predictor rules against independent float64 numpy references."""
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl.predictors import RULES, get_rule, register_rule
from keras_ncssl.predictors import rules as rules_module


def spd(rng, d, eigenvalues=None):
    """A random symmetric matrix with the given eigenvalues (default: random positive)."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = rng.uniform(0.1, 2.0, size=d) if eigenvalues is None else np.asarray(eigenvalues, float)
    return (q * s) @ q.T


def correlations(rng, d=12):
    """SPD, rank-deficient (b < d samples) and badly scaled correlation matrices."""
    z = rng.normal(size=(5, d))
    return {
        "spd": spd(rng, d),
        "rank_deficient": z.T @ z / 5,
        "badly_scaled": spd(rng, d, np.logspace(-6, 6, d)) * 1e3,
    }


def np_sqrtm(m):
    s, u = np.linalg.eigh(0.5 * (m + m.T))
    return (u * np.sqrt(np.maximum(s, 0))) @ u.T


def np_direct_pred(f, eps, power=0.5, eps_inside=False):
    s, u = np.linalg.eigh(0.5 * (f + f.T))
    r = np.maximum(s, 0) / s.max()
    p = np.maximum(r + eps, 1e-4) ** power if eps_inside else np.maximum(r ** power + eps, 1e-4)
    return (u * p) @ u.T


@pytest.mark.parametrize("kind", ["spd", "rank_deficient", "badly_scaled"])
@pytest.mark.parametrize("eps,power,eps_inside", [(0.1, 0.5, False), (0.0, 0.5, False),
                                                  (0.3, 1.0, False), (-0.05, 0.5, True)])
def test_direct_pred_matches_numpy(rng, kind, eps, power, eps_inside):
    f = correlations(rng)[kind]
    got = RULES["directpred"](f, eps=eps, power=power, eps_inside=eps_inside)
    # sqrt turns round-off on zero eigenvalues (~1e-16) into ~1e-8: hence atol 1e-7
    np.testing.assert_allclose(got, np_direct_pred(f, eps, power, eps_inside), atol=1e-7)
    # float32 input: same rule, float32 precision (relative to the unit top eigenvalue)
    got32 = RULES["directpred"](f.astype(np.float32), eps=eps, power=power, eps_inside=eps_inside)
    assert got32.dtype == np.float32
    tolerance = 1e-4 if kind == "spd" else 2e-3  # sqrt amplifies tiny-eigenvalue error
    np.testing.assert_allclose(got32, np_direct_pred(f, eps, power, eps_inside), atol=tolerance)


def test_direct_pred_is_the_codes_scale_free_form_not_printed_eq18(rng):
    f = spd(rng, 6, [4.0, 2.0, 1.0, 0.5, 0.1, -0.2])  # s_max = 4 != 1 and a negative eigenvalue
    kernel = RULES["directpred"](f, eps=0.1)
    p = np.sort(np.linalg.eigvalsh(kernel))[::-1]
    expected = np.sqrt(np.array([4.0, 2.0, 1.0, 0.5, 0.1, 0.0]) / 4.0) + 0.1
    np.testing.assert_allclose(p, expected, atol=1e-10)
    printed_eq18 = np.sqrt(np.maximum([4.0, 2.0, 1.0, 0.5, 0.1, 0.0], 0)) + 0.1 * 4.0
    assert not np.allclose(p, printed_eq18, atol=1e-2)


def test_direct_pred_floor(rng):
    f = spd(rng, 4, [1.0, 0.0, 0.0, -1.0])
    p = np.linalg.eigvalsh(RULES["directpred"](f, eps=0.0))
    assert p.min() == pytest.approx(1e-4)


def np_direct_copy(f, eps, normalize):
    f = 0.5 * (f + f.T)
    scale = {"spectral": np.abs(np.linalg.eigvalsh(f)).max(), "frobenius": np.linalg.norm(f),
             "none": 1.0}[normalize]
    return f / scale + eps * np.eye(len(f))


@pytest.mark.parametrize("normalize", ["spectral", "frobenius", "none"])
@pytest.mark.parametrize("kind", ["spd", "rank_deficient", "badly_scaled"])
def test_direct_copy_matches_numpy(rng, normalize, kind):
    f = correlations(rng)[kind]
    got = RULES["directcopy"](f, eps=0.25, normalize=normalize)
    np.testing.assert_allclose(got, np_direct_copy(f, 0.25, normalize), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["directpred", "directcopy"])
def test_direct_kernels_commute_with_f(rng, name):
    for f in correlations(rng).values():
        kernel = RULES[name](f, eps=0.1)
        commutator = f @ kernel - kernel @ f
        assert np.linalg.norm(commutator) <= 1e-9 * np.linalg.norm(f) * np.linalg.norm(kernel)


@pytest.mark.parametrize("name", ["directpred", "visser", "newton_schulz", "ns2", "stiefel"])
def test_rules_are_invariant_to_scaling_f(rng, name):
    f = correlations(rng)["spd"]
    c = 10 ** rng.uniform(-3, 3)
    np.testing.assert_allclose(RULES[name](c * f, eps=0.1), RULES[name](f, eps=0.1), atol=1e-8)


def test_lrp_solves_least_squares(rng):
    d, b = 8, 64
    z = rng.normal(size=(b, d))
    z_target = z @ rng.normal(size=(d, d)) + 0.1 * rng.normal(size=(b, d))
    f, c = z.T @ z / b, z.T @ z_target / b
    expected = np.linalg.lstsq(z, z_target, rcond=None)[0]  # argmin ||Z P - Z'||
    got = RULES["lrp"](f, cross_correlation=c, eps=0.0, jitter=0.0)
    np.testing.assert_allclose(got, expected, atol=1e-8)
    ridge = RULES["lrp"](f, cross_correlation=c, eps=0.3, jitter=0.0)
    np.testing.assert_allclose(ridge, expected + 0.3 * np.eye(d), atol=1e-8)


def test_lrp_survives_rank_deficient_f(rng):
    z = rng.normal(size=(3, 8))
    kernel = RULES["lrp"](z.T @ z / 3, cross_correlation=z.T @ z / 3)
    assert np.all(np.isfinite(kernel))


MATMUL_ONLY = ["directcopy_frobenius", "neumann", "visser", "newton_schulz", "ns2", "stiefel"]
DECOMPOSITIONS = {"SelfAdjointEigV2", "Eig", "Svd", "Qr", "MatrixInverse", "Cholesky"}


@pytest.mark.parametrize("name", MATMUL_ONLY)
def test_matrix_multiply_only_rules_never_decompose(name):
    rule, options = (RULES["directcopy"], {"normalize": "frobenius"}) if name.startswith("directcopy") \
        else (RULES[name], {})
    if rule.needs_cross_correlation:
        options["cross_correlation"] = tf.eye(8)
    graph = tf.function(lambda f: rule(f, **options)).get_concrete_function(
        tf.TensorSpec([8, 8], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    assert name == "directcopy_frobenius" or "MatMul" in ops or "BatchMatMulV2" in ops
    assert not ops & DECOMPOSITIONS, ops & DECOMPOSITIONS


def test_directpred_uses_eigh_not_general_eig():
    graph = tf.function(lambda f: RULES["directpred"](f)).get_concrete_function(
        tf.TensorSpec([8, 8], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    assert "SelfAdjointEigV2" in ops and "Eig" not in ops


def test_rules_do_not_backpropagate(rng):
    f = tf.Variable(correlations(rng)["spd"])
    for name, rule in RULES.items():
        options = {"cross_correlation": f} if rule.needs_cross_correlation else {}
        with tf.GradientTape() as tape:
            kernel = rule(f, **options)
        assert tape.gradient(kernel, f) is None, name


@pytest.mark.parametrize("bad,match", [
    (dict(name="directpred", f=np.eye(3), eps=-0.1), "eps must be"),
    (dict(name="directpred", f=np.eye(3), power=0.0), "power must be"),
    (dict(name="directcopy", f=np.eye(3), normalize="l1"), "normalize must be one of"),
    (dict(name="directpred", f=np.ones((3, 4))), "square"),
    (dict(name="directpred", f=np.ones((3, 3, 3))), "square"),
    (dict(name="directpred", f=np.eye(3, dtype=np.float16)), "float16"),
    (dict(name="lrp", f=np.eye(3)), "needs cross_correlation"),
    (dict(name="lrp", f=np.eye(3), cross_correlation=np.eye(4)), "same d x d"),
    (dict(name="newton_schulz", f=np.eye(3), iterations=0), "iterations"),
])
def test_invalid_rule_arguments(bad, match):
    bad = dict(bad)
    name, f = bad.pop("name"), bad.pop("f")
    with pytest.raises(ValueError, match=match):
        RULES[name](f, **bad)


def test_unknown_rule_lists_choices():
    with pytest.raises(ValueError, match="unknown predictor rule 'direkt'.*directpred"):
        get_rule("direkt")


def test_register_custom_rule(rng):
    @register_rule("test_identity_plus_eps")
    def identity_rule(correlation, eps=0.0):
        return tf.eye(tf.shape(correlation)[0], dtype=correlation.dtype) * (1 + eps)

    try:
        np.testing.assert_allclose(get_rule("test_identity_plus_eps")(np.eye(3), eps=1.0), 2 * np.eye(3))
    finally:
        RULES.pop("test_identity_plus_eps")

"""experiments/probe_variants.py: the feature preprocessings against a float64 numpy reference."""

import numpy as np
import pytest

import probe_variants


@pytest.fixture
def features():
    rng = np.random.default_rng()
    reference = rng.normal(3.0, 2.0, (200, 7)) * rng.uniform(0.1, 5.0, 7)
    reference[:, 4] = 1.5  # a constant column: its std is replaced by 1, not divided by ~0
    return reference, rng.normal(1.0, 3.0, (50, 7))


def test_standardise_uses_the_reference_statistics(features):
    reference, x = features
    out = probe_variants.preprocess("standardise", reference, x)
    std = reference.std(0)
    std[4] = 1.0
    np.testing.assert_allclose(out, (x - reference.mean(0)) / std, rtol=1e-12)
    ref_out = probe_variants.preprocess("standardise", reference, reference)
    np.testing.assert_allclose(ref_out.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.delete(ref_out.std(0), 4), 1.0, rtol=1e-9)


@pytest.mark.parametrize("kind,centre,scale", [("l2", False, False), ("centre+l2", True, False),
                                               ("standardise+l2", True, True)])
def test_unit_norm_variants_have_norm_sqrt_d_and_keep_direction(features, kind, centre, scale):
    reference, x = features
    out = probe_variants.preprocess(kind, reference, x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.sqrt(x.shape[1]), rtol=1e-12)
    z = x - reference.mean(0) if centre else x.copy()
    if scale:
        std = reference.std(0)
        std[4] = 1.0
        z = z / std
    cosine = np.sum(out * z, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(z, axis=1))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)

"""Tests for keras_ncssl.augment: the two-view pipeline, its seeding, and each operation."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import augment as A, distribute
from keras_ncssl.augment.views import shift_hue


def _np_images(rng, n=8, size=16, channels=3):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _image_ds(images):
    return tf.data.Dataset.from_tensor_slices(images)


def _planar(x):
    """NHWC <-> the [B, H, C, W] layout the internal ops use (the map is its own inverse)."""
    return tf.transpose(x, [0, 1, 3, 2])


# -- configuration -----------------------------------------------------------------------------

def test_unknown_preset_names_it_and_lists_choices():
    with pytest.raises(ValueError, match=r"'nope'.*byol.*grayscale"):
        A.get_preset("nope")
    with pytest.raises(ValueError, match="nope"):
        A.pretrain_dataset(_image_ds(np.zeros((4, 8, 8, 1), np.uint8)), "nope", batch_size=2)


@pytest.mark.parametrize("kwargs, name", [
    ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
    ({"jitter_prob": 1.5}, "jitter_prob"),
    ({"hue": 0.7}, "hue"),
    ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"),
])
def test_view_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        A.ViewConfig(**kwargs)


def test_presets_follow_the_papers():
    byol1, byol2 = A.PRESETS["byol"]
    assert (byol1.blur_prob, byol1.solarize_prob) == (1.0, 0.0)
    assert (byol2.blur_prob, byol2.solarize_prob) == (0.1, 0.2)
    stl = A.PRESETS["stl10"][0]
    assert (stl.brightness, stl.contrast, stl.saturation, stl.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (stl.jitter_prob, stl.grayscale_prob) == (0.8, 0.2) and stl.blur_prob > 0
    cifar = A.PRESETS["cifar10"][0]
    assert (cifar.brightness, cifar.contrast, cifar.saturation, cifar.hue) == (0.4, 0.4, 0.4, 0.1)
    assert cifar.blur_prob == 0.0
    gray = A.PRESETS["grayscale"][0]
    assert gray.saturation == gray.hue == gray.grayscale_prob == 0.0
    strong = A.PRESETS["grayscale_strong"][0]
    assert strong.crop_scale == (0.08, 1.0) and dataclasses.replace(strong, crop_scale=gray.crop_scale) == gray
    assert A.blur_kernel_size(96) == 9  # 10% of 96 px, odd, as the [LM] helper



def test_view_options_override_one_or_both_views():
    v1, v2 = A.with_view_options("byol", "crop_scale=0.3:1, brightness=0.2,2.solarize_prob=0.5")
    b1, b2 = A.PRESETS["byol"]
    assert v1 == dataclasses.replace(b1, crop_scale=(0.3, 1.0), brightness=0.2)
    assert v2 == dataclasses.replace(b2, crop_scale=(0.3, 1.0), brightness=0.2, solarize_prob=0.5)
    assert A.with_view_options("grayscale", "") == A.PRESETS["grayscale"]


@pytest.mark.parametrize("text, match", [
    ("nope=1", r"'nope=1'.*crop_scale"),          # unknown field, lists the allowed ones
    ("brightness", r"FIELD=VALUE"),                # no value
    ("crop_scale=0.3", r"low:high pair"),          # a pair field given one number
    ("brightness=0.1:0.2", r"one number"),         # a number field given a pair
    ("brightness=high", r"'high' is not a number"),
    ("3.brightness=0.1", r"3.brightness"),         # only views 1 and 2 exist
    ("erase_prob=1.5", r"erase_prob=1.5 must be in \[0.0, 1.0\]"),  # ViewConfig's own check
])
def test_view_options_reject_bad_text_with_the_reason(text, match):
    with pytest.raises(ValueError, match=match):
        A.with_view_options("grayscale", text)

# -- single operations ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale, ratio, height, width", [
    ((0.08, 1.0), (3 / 4, 4 / 3), 32, 32),
    ((0.2, 0.5), (0.5, 2.0), 32, 32),
    ((0.08, 1.0), (3 / 4, 4 / 3), 24, 40),
])
def test_crop_boxes_within_scale_and_ratio(scale, ratio, height, width):
    boxes = A.sample_crop_boxes(tf.constant([3, 4], tf.int64), 4000, scale, ratio,
                                height, width).numpy()
    y1, x1, y2, x2 = boxes.T
    assert np.all(boxes >= -1e-6) and np.all(boxes <= 1 + 1e-6)
    area = (y2 - y1) * (x2 - x1)
    assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
    aspect = (x2 - x1) * width / ((y2 - y1) * height)  # in pixels
    assert aspect.min() >= ratio[0] - 1e-4 and aspect.max() <= ratio[1] + 1e-4
    # the sampler explores the range rather than sitting at one end
    assert area.max() - area.min() > 0.5 * (scale[1] - scale[0])


def test_crop_box_fallback_is_centred_with_clamped_aspect():
    # A 10x100 strip: a square crop of >= 50% area never fits, so torchvision's fallback
    # (centre crop, aspect clamped into `ratio`) must be used: a centred 10x10 square.
    boxes = A.sample_crop_boxes(tf.constant([1, 2], tf.int64), 64, (0.5, 1.0), (1.0, 1.0),
                                10, 100).numpy()
    np.testing.assert_allclose(boxes[:, [0, 2]], [[0.0, 1.0]] * 64, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 0.1, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 1], 0.45, atol=1e-6)


def test_resample_full_box_is_identity_and_flip_mirrors(rng):
    x = rng.uniform(size=(4, 10, 12, 3)).astype(np.float32)
    flip = tf.constant([False, True, False, True])
    rows = A.resample_matrix(tf.zeros([4]), tf.ones([4]), 10, 10)
    cols = A.resample_matrix(tf.zeros([4]), tf.ones([4]), 12, 12, flip)
    y = _planar(A.apply_separable(_planar(x), rows, cols)).numpy()
    np.testing.assert_allclose(y[0], x[0], atol=1e-6)
    np.testing.assert_allclose(y[1], x[1][:, ::-1], atol=1e-6)


def test_resample_matches_tf_image_resize(rng):
    x = rng.uniform(size=(2, 10, 12, 3)).astype(np.float32)
    # shrinking the whole image: antialiased bilinear, as tf.image.resize(antialias=True)
    rows = A.resample_matrix(tf.zeros([2]), tf.ones([2]), 10, 5)
    cols = A.resample_matrix(tf.zeros([2]), tf.ones([2]), 12, 6)
    y = _planar(A.apply_separable(_planar(x), rows, cols)).numpy()
    ref = tf.image.resize(x, (5, 6), antialias=True).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # enlarging a pixel-aligned crop: bilinear; away from the border (where the crop reads
    # its real neighbours instead of clamping) it equals resizing the cut-out pixels
    rows = A.resample_matrix(tf.fill([2], 0.2), tf.fill([2], 0.5), 10, 10)
    cols = A.resample_matrix(tf.fill([2], 0.25), tf.fill([2], 0.5), 12, 12)
    y = _planar(A.apply_separable(_planar(x), rows, cols)).numpy()
    ref = tf.image.resize(x[:, 2:7, 3:9], (10, 12)).numpy()
    np.testing.assert_allclose(y[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)


def test_hue_shift_matches_tf_adjust_hue(rng):
    x = rng.uniform(size=(4, 6, 7, 3)).astype(np.float32)
    x[0, 0, 0] = [0.5, 0.5, 0.5]  # gray pixel: hue undefined, must stay put
    deltas = np.array([0.1, -0.3, 0.45, 0.0], np.float32)
    got = _planar(shift_hue(_planar(x), tf.reshape(deltas, [-1, 1, 1, 1]))).numpy()
    ref = np.stack([tf.image.adjust_hue(x[i], deltas[i]).numpy() for i in range(4)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_blur_matches_reflect_padded_gaussian(rng):
    x = rng.uniform(size=(3, 9, 11, 2)).astype(np.float32)
    sigma = np.array([0.5, 2.0, 1.0], np.float32)
    apply = tf.constant([True, True, False])
    k, r = 5, 2
    y = _planar(A.apply_separable(_planar(x), A.blur_matrix(sigma, apply, 9, k),
                                  A.blur_matrix(sigma, apply, 11, k))).numpy()
    for i in range(3):
        taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma[i] ** 2))
        taps = taps / taps.sum() if bool(apply[i]) else np.eye(k)[r]
        p = np.pad(x[i], [[r, r], [r, r], [0, 0]], mode="reflect")
        ref = sum(taps[a] * p[a:a + 9] for a in range(k))
        ref = sum(taps[a] * ref[:, a:a + 11] for a in range(k))
        np.testing.assert_allclose(y[i], ref, atol=1e-5)


def test_grayscale_and_solarize_when_forced(rng):
    x = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    cfg = A.ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                       jitter_prob=0.0, grayscale_prob=1.0, solarize_prob=1.0)
    y = A.augment_batch(x, cfg, tf.constant([0, 1], tf.int64)).numpy()
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    expected = np.where(luma >= 0.5, 1.0 - luma, luma)
    for c in range(3):
        np.testing.assert_allclose(y[..., c], expected, atol=1e-5)



def test_random_erasing_matches_a_numpy_reference(rng):
    """Forced erasing zeroes exactly the pixels whose centres lie in each drawn box, inside
    scale/ratio, and leaves every other pixel (and the other draws) unchanged."""
    x = rng.uniform(0.05, 1.0, size=(64, 12, 12, 1)).astype(np.float32)
    plain = A.ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0)
    erasing = dataclasses.replace(plain, erase_prob=1.0, erase_scale=(0.1, 0.3), erase_ratio=(0.5, 2.0),
                                  erase_value=0.25)
    seed = tf.constant([3, 4], tf.int64)
    y = A.augment_batch(x, erasing, seed).numpy()
    np.testing.assert_allclose(A.augment_batch(x, plain, seed).numpy(), x, atol=1e-6)
    params = A.sample_view_params(erasing, seed, 64, 12, 12)
    boxes, applied = params["erase_boxes"].numpy(), params["erase"].numpy()
    assert applied.all()  # every draw fits at these settings
    centres = (np.arange(12) + 0.5) / 12
    for i, (y1, x1, y2, x2) in enumerate(boxes):
        area, aspect = (y2 - y1) * (x2 - x1), (x2 - x1) / (y2 - y1)
        assert 0.1 - 1e-6 <= area <= 0.3 + 1e-6 and 0.5 - 1e-4 <= aspect <= 2.0 + 1e-4
        inside = ((centres >= y1) & (centres < y2))[:, None] & ((centres >= x1) & (centres < x2))[None, :]
        np.testing.assert_allclose(y[i, ..., 0], np.where(inside, 0.25, x[i, ..., 0]), atol=1e-6)


def test_random_erasing_erases_nothing_when_no_box_fits():
    """A box that cannot fit (area 0.9 at aspect 10) leaves the image whole, as torchvision
    does, instead of the crop sampler's whole-image fallback erasing everything."""
    x = np.ones((16, 8, 8, 1), np.float32)
    cfg = A.ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                       erase_prob=1.0, erase_scale=(0.9, 0.9), erase_ratio=(10.0, 10.0))
    np.testing.assert_allclose(A.augment_batch(x, cfg, tf.constant([0, 1], tf.int64)).numpy(), x)

def test_convert_images_resize_pad_and_channels():
    x = np.full((2, 28, 28, 1), 255, np.uint8)
    up = A.convert_images(x, 32, 3).numpy()
    assert up.shape == (2, 32, 32, 3) and up.dtype == np.float32
    np.testing.assert_allclose(up, 1.0, atol=1e-6)
    pad = A.convert_images(x, 32, 1, method="pad").numpy()
    assert pad.shape == (2, 32, 32, 1)
    assert pad[:, :2].max() == 0.0 and pad[:, 2:30, 2:30].min() == 1.0
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    np.testing.assert_allclose(A.convert_images(rgb, 4, 1).numpy(), 0.299, atol=1e-6)
    with pytest.raises(ValueError, match="'crop'"):
        A.convert_images(x, 32, 3, method="crop")
    with pytest.raises(ValueError, match="channels=2"):
        A.convert_images(x, 32, 2)


# -- the two views ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(A.PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_preset_shapes_dtypes_ranges(preset, channels, rng):
    x = A.convert_images(_np_images(rng, n=6, size=16, channels=channels), 16, channels)
    for cfg in A.get_preset(preset):
        y = A.augment_batch(x, cfg, tf.constant([5, 6], tf.int64)).numpy()
        assert y.shape == (6, 16, 16, channels) and y.dtype == np.float32
        assert y.min() >= 0.0 and y.max() <= 1.0
    mean, std = (0.4,) * channels, (0.2,) * channels
    v1, v2 = A.make_view_fn(preset, mean, std, channels, jit_compile=False)(
        x, tf.constant([1, 2], tf.int64))
    for v in (v1, v2):
        v = v.numpy()
        assert v.shape == (6, 16, 16, channels) and v.dtype == np.float32
        assert v.min() >= -2.0 - 1e-5 and v.max() <= 3.0 + 1e-5  # (0 - .4)/.2, (1 - .4)/.2


def test_xla_and_plain_paths_give_the_same_views(rng):
    x = A.convert_images(_np_images(rng, n=8, size=16), 16, 3)
    seed = tf.constant([7, 8], tf.int64)
    plain = A.make_view_fn("byol", (0.5,), (0.25,), 3, jit_compile=False)(x, seed)
    xla = A.make_view_fn("byol", (0.5,), (0.25,), 3, jit_compile=True)(x, seed)
    for a, b in zip(plain, xla):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_one_channel_fast_path_is_exact(rng):
    """Augmenting a gray batch in 1 channel and repeating it equals augmenting it as RGB."""
    gray = _np_images(rng, n=8, size=16, channels=1)
    seed = tf.constant([3, 1], tf.int64)
    fast = A.two_views(gray, "byol", seed, 16, 3, (0.3,), (0.3,))
    slow = A.make_view_fn("byol", (0.3,), (0.3,), 3, jit_compile=False)(
        A.convert_images(np.repeat(gray, 3, axis=-1), 16, 3), seed)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_views_of_one_element_depend_only_on_that_element(rng):
    """Changing element j changes views j of both views and nothing else: each view is drawn
    from its own element, and both views from the same one."""
    x = _np_images(rng, n=8, size=16)
    x2 = x.copy()
    x2[3] = 255 - x2[3]
    seed = tf.constant([9, 9], tf.int64)
    a = A.two_views(x, "byol", seed, 16, 3)
    b = A.two_views(x2, "byol", seed, 16, 3)
    for va, vb in zip(a, b):
        diff = np.abs(va.numpy() - vb.numpy()).reshape(8, -1).max(axis=1)
        assert diff[3] > 0.1
        assert np.all(np.delete(diff, 3) == 0.0)
    assert np.abs(a[0].numpy() - a[1].numpy()).mean() > 0.05  # the two views differ


def test_pipeline_pairs_views_of_the_same_element():
    """Marker images: each element is one flat grey level, which survives crop and flip. Through
    shuffle + batch + map, both views of a sample must show the same level, and each level
    (element) appears once per pass."""
    n = 64
    levels = np.arange(n, dtype=np.uint8) * 4
    images = np.broadcast_to(levels[:, None, None, None], (n, 12, 12, 1)).copy()
    geometric = A.ViewConfig(jitter_prob=0.0, grayscale_prob=0.0)
    ds = A.pretrain_dataset(_image_ds(images), (geometric, geometric), batch_size=16,
                            seed=3, shuffle_buffer=64)
    seen = []
    for v1, v2 in ds:
        m1 = v1.numpy().reshape(16, -1)
        m2 = v2.numpy().reshape(16, -1)
        np.testing.assert_allclose(m1, m1[:, :1] * np.ones_like(m1), atol=1e-4)  # flat
        np.testing.assert_allclose(m1[:, 0], m2[:, 0], atol=1e-4)  # paired
        seen.extend(np.round(m1[:, 0] * 255).astype(int))
    assert sorted(seen) == sorted(levels.astype(int))  # every element once, shuffled
    assert seen != sorted(seen)


@pytest.mark.slow
def test_views_differ_and_seeding_is_reproducible(rng):
    images = _np_images(rng, n=32, size=16)

    def batches(seed, ds=None):
        ds = ds or A.pretrain_dataset(_image_ds(images), "cifar10", batch_size=8, seed=seed,
                                      shuffle_buffer=0, jit_compile=False)
        return [(a.numpy(), b.numpy()) for a, b in ds]

    first = batches(1)
    assert len(first) == 4
    for v1, v2 in first:
        assert np.abs(v1 - v2).mean() > 0.05
    again = batches(1)  # a fresh pipeline with the same seed: the same views
    for (a1, a2), (b1, b2) in zip(first, again):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    other = batches(2)
    assert np.abs(first[0][0] - other[0][0]).mean() > 0.05
    # Epochs: iterating the same dataset again (no shuffling, so the same images per batch)
    # draws new augmentations; so do consecutive batches of a repeated pipeline.
    ds = A.pretrain_dataset(_image_ds(images), "cifar10", batch_size=8, seed=1, shuffle_buffer=0,
                            jit_compile=False)
    epoch1, epoch2 = batches(None, ds), batches(None, ds)
    np.testing.assert_array_equal(epoch1[0][0], first[0][0])
    assert np.abs(epoch1[0][0] - epoch2[0][0]).mean() > 0.05
    rep = A.pretrain_dataset(_image_ds(images[:8]), "cifar10", batch_size=8, seed=1,
                             shuffle_buffer=0, repeat=True, jit_compile=False)
    steps = [v1.numpy() for v1, _ in rep.take(3)]
    assert np.abs(steps[0] - steps[1]).mean() > 0.05 and np.abs(steps[1] - steps[2]).mean() > 0.05


def test_local_views_leave_the_global_views_unchanged(rng):
    """Multi-crop adds M smaller views drawn from their own streams: the two global views are
    the very same as without them, and the locals follow the local config (here: no jitter,
    crops inside the scale range, so each local is a resampled crop of its image)."""
    x = rng.uniform(size=(6, 16, 16, 1)).astype(np.float32)
    seed = tf.constant([5, 6], tf.int64)
    local_cfg = A.ViewConfig(crop_scale=(0.2, 0.4), jitter_prob=0.0, flip_prob=0.0)
    v1, v2 = A.make_view_fn("grayscale", (0.0,), (1.0,), 1, jit_compile=False)(x, seed)
    w1, w2, locals_ = A.make_view_fn("grayscale", (0.0,), (1.0,), 1, jit_compile=False, local_views=3,
                                     local_size=8, local_config=local_cfg)(x, seed)
    np.testing.assert_array_equal(v1.numpy(), w1.numpy())
    np.testing.assert_array_equal(v2.numpy(), w2.numpy())
    assert len(locals_) == 3 and all(tuple(v.shape) == (6, 8, 8, 1) for v in locals_)
    assert not np.allclose(locals_[0].numpy(), locals_[1].numpy())  # own randomness per local
    for m, local in enumerate(locals_):
        params = A.sample_view_params(local_cfg, tf.random.experimental.stateless_fold_in(seed, m + 3), 6, 16, 16)
        np.testing.assert_allclose(local.numpy(), A.apply_view(x, params, local_cfg, 8).numpy(), atol=1e-6)
    default = A.local_view_config(A.PRESETS["grayscale"])
    assert default == dataclasses.replace(A.PRESETS["grayscale"][0], crop_scale=A.LOCAL_CROP_SCALE)


@pytest.mark.slow
def test_pretrain_dataset_with_local_views_yields_dicts():
    x = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 1)).astype(np.uint8)
    ds = A.pretrain_dataset(_image_ds(x), "grayscale", batch_size=4, image_size=16, channels=3,
                            local_views=2, local_size=8, seed=3)
    element = next(iter(ds))
    assert set(element) == {"view1", "view2", "local_views"}
    assert element["view1"].shape == (4, 16, 16, 3) and len(element["local_views"]) == 2
    assert all(v.shape == (4, 8, 8, 3) for v in element["local_views"])
    plain = next(iter(A.pretrain_dataset(_image_ds(x), "grayscale", batch_size=4, image_size=16, channels=3,
                                         seed=3)))
    np.testing.assert_allclose(plain[0].numpy(), element["view1"].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="local_size=None must be an integer >= 2"):
        A.pretrain_dataset(_image_ds(x), "grayscale", batch_size=4, local_views=2)
    with pytest.raises(ValueError, match="local_views=-1 must be an integer >= 0"):
        A.pretrain_dataset(_image_ds(x), "grayscale", batch_size=4, local_views=-1)


def test_pretrain_dataset_from_splits_uses_stats_and_shapes():
    from keras_ncssl import data
    splits = data.load_dataset("digits")
    ds = A.pretrain_dataset(splits, "grayscale", batch_size=32, image_size=12, channels=3,
                            jit_compile=False)
    v1, v2 = next(iter(ds))
    assert v1.shape == (32, 12, 12, 3) and v2.dtype == tf.float32
    assert ds.element_spec[0].shape == (32, 12, 12, 3)  # drop_remainder: static batch
    lo = (0.0 - splits.mean[0]) / splits.std[0]
    assert float(tf.reduce_min(v1)) >= lo - 1e-4


def test_input_context_sharding_and_per_replica_batch():
    n = 32
    levels = np.arange(n, dtype=np.uint8) * 8
    images = np.broadcast_to(levels[:, None, None, None], (n, 8, 8, 1)).copy()
    seen = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
        ds = A.pretrain_dataset(_image_ds(images), "none", batch_size=8, seed=0,
                                input_context=ctx, jit_compile=False)
        batches = [v1.numpy() for v1, _ in ds]
        assert all(b.shape == (4, 8, 8, 1) for b in batches)  # 8 global / 2 replicas
        seen.append({int(round(v * 255)) for b in batches for v in b[:, 0, 0, 0]})
    assert not seen[0] & seen[1]  # disjoint shards
    assert seen[0] | seen[1] == set(levels.astype(int))


def test_distribute_datasets_from_function_two_replicas():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the two logical CPUs configured in conftest")
    strategy = distribute.get_strategy("cpu:2")
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: A.pretrain_dataset(_image_ds(images), "grayscale", batch_size=16, seed=0,
                                       input_context=ctx))
    v1, v2 = next(iter(dist))
    parts = strategy.experimental_local_results(v1)
    assert len(parts) == 2 and all(p.shape == (8, 8, 8, 1) for p in parts)


@pytest.mark.parametrize("method", ["resize", "pad"])
def test_pretrain_and_eval_share_the_input_conversion(method, rng):
    """With no augmentation (preset "none": full crop, no flip) the pretraining views of a
    28x28x1 batch equal the evaluation input at 32x32x3, for both conversions."""
    x = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    v1, v2 = next(iter(A.pretrain_dataset(_image_ds(x), "none", batch_size=8, image_size=32,
                                          channels=3, shuffle_buffer=0, mean=(0.3,),
                                          std=(0.3,), resize_method=method, jit_compile=False)))
    ev = next(iter(A.eval_dataset(_image_ds(x), 8, 32, 3, (0.3,), (0.3,), method)))
    np.testing.assert_allclose(v1.numpy(), ev.numpy(), atol=1e-4)
    np.testing.assert_allclose(v2.numpy(), ev.numpy(), atol=1e-4)


def test_eval_dataset_matches_manual_normalisation(rng):
    x = rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    y = np.arange(10, dtype=np.int64)
    ds = A.eval_dataset(tf.data.Dataset.from_tensor_slices((x, y)), batch_size=4,
                        image_size=28, channels=3, mean=(0.3,), std=(0.4,))
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds])
    assert [len(b) for b in ys] == [4, 4, 2]  # the last, smaller batch is kept
    np.testing.assert_array_equal(np.concatenate(ys), y)
    got = np.concatenate(xs)
    assert got.shape == (10, 28, 28, 3)
    np.testing.assert_allclose(got[..., 1], (x[..., 0] / 255.0 - 0.3) / 0.4, atol=1e-5)
    up = next(iter(A.eval_dataset(tf.data.Dataset.from_tensor_slices(x), 5, 32, 1)))
    assert up.shape == (5, 32, 32, 1)  # image-only datasets give x only


def test_variable_size_images_are_staged(rng):
    sizes = [(40, 60), (50, 30), (33, 33)]
    ds = tf.data.Dataset.from_generator(
        lambda: (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes),
        output_signature=tf.TensorSpec((None, None, 3), tf.uint8))
    with pytest.raises(ValueError, match="image_size is required"):
        A.pretrain_dataset(ds, "byol", batch_size=2)
    v1, _ = next(iter(A.pretrain_dataset(ds, "byol", batch_size=2, image_size=16,
                                         shuffle_buffer=0, jit_compile=False)))
    assert v1.shape == (2, 16, 16, 3)
    x = next(iter(A.eval_dataset(ds, 3, image_size=16)))
    assert x.shape == (3, 16, 16, 3)

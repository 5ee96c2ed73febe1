"""Small in-memory datasets for tests and benchmarks: scikit-learn's digits and synthetic images."""
import numpy as np
import tensorflow as tf

from keras_ncssl.data.registry import register_dataset
from keras_ncssl.data.splits import DatasetSplits, validation_indices, splits_from_arrays


@register_dataset("digits")
def load_digits(data_dir=None, validation_fraction=0.1, seed=0,
                test_fraction=0.2) -> DatasetSplits:
    """scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images).

    Pixel values 0..16 are scaled to uint8 0..255. The test split (`test_fraction`, stratified)
    is fixed (seed 0) so that the test number does not move with `seed`.
    """
    from sklearn.datasets import load_digits as _sk_digits
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
    digits = _sk_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    test = validation_indices(y, len(y), float(test_fraction), seed=0)
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    return splits_from_arrays("digits", x[~is_test], y[~is_test], x[is_test], y[is_test],
                              validation_fraction, seed, num_classes=10,
                              class_names=tuple(str(i) for i in range(10)))


@register_dataset("synthetic")
def load_synthetic(data_dir=None, validation_fraction=0.1, seed=0, image_shape=(32, 32, 3),
                   num_examples=2048, num_test=512, num_classes=10) -> DatasetSplits:
    """Random smooth images (class-dependent colour blobs), for benchmarks and shape tests."""
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape={image_shape!r} must be (H, W, C) with positive sizes")
    if int(num_examples) < 1 or int(num_test) < 1 or int(num_classes) < 1:
        raise ValueError(f"num_examples={num_examples!r}, num_test={num_test!r} and "
                         f"num_classes={num_classes!r} must be positive")
    h, w, c = image_shape
    rng = np.random.default_rng(12345)  # fixed: the data set itself does not move with `seed`
    n = int(num_examples) + int(num_test)
    labels = rng.integers(0, num_classes, n)
    small = rng.uniform(0, 1, (n, 4, 4, c)).astype(np.float32)
    small += (labels[:, None, None, None] / max(num_classes - 1, 1)).astype(np.float32)
    images = tf.image.resize(small / 2.0, (h, w), method="bicubic").numpy()
    images = np.clip(images * 255.0, 0, 255).astype(np.uint8)
    k = int(num_examples)
    return splits_from_arrays("synthetic", images[:k], labels[:k], images[k:], labels[k:],
                              validation_fraction, seed, num_classes=num_classes)

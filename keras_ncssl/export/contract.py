"""The exported encoder's input contract: image size, channels, statistics and geometry.

One `InputContract` says how raw pixels become the encoder's input, exactly as
`keras_ncssl.augment.eval_dataset` prepares evaluation images:

    x = pixels / 255                                  (uint8, or float in [0, 255])
    x = channels(x)                                   (1 -> 3 repeats grey; 3 -> 1 BT.601 luma)
    x = geometry(x)                                   (to image_size x image_size, see GEOMETRIES)
    x = (x - mean) / std                              (per channel, statistics in [0, 1] units)

("center_crop" works on the native pixels, so it comes first, as in `eval_dataset`.) The contract is checked once here (every bad argument named with its value and the fix) and
written to the export's metadata, so a client in any language can reproduce it.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from keras_ncssl.augment.convert import normalization_stats
from keras_ncssl.augment.pipeline import eval_dataset

# "resize" and "pad" are `eval_dataset`'s resize methods for fixed-size datasets;
# "center_crop" is what it does to variable-size (ImageNet-style) datasets.
GEOMETRIES = {
    "resize": "resize to image_size x image_size (bilinear, half-pixel centres, antialiased when "
              "shrinking, aspect not kept), then clip to [0, 1]; images already that size are "
              "unchanged",
    "pad": "centre-crop or zero-pad to image_size x image_size (tf.image.resize_with_crop_or_pad)",
    "center_crop": "on the 0..255 pixels: resize the shorter side to round(image_size * 256 / 224) "
                   "(bilinear, antialiased, tf.image.resize), centre-crop that square, round to "
                   "integers, then centre-crop image_size x image_size (ImageNet evaluation)",
}


@dataclasses.dataclass(frozen=True)
class InputContract:
    """Raw images -> encoder input. `mean`/`std` are per encoder channel, in [0, 1] units."""
    image_size: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    geometry: str = "resize"

    @property
    def input_shape(self):
        """The encoder's (normalised) input shape, batch open."""
        return (None, self.image_size, self.image_size, self.channels)

    def steps(self):
        """The preprocessing as words, in order (the metadata's `preprocessing.steps`)."""
        to_channels = ("grey (1 channel) is repeated to 3; 3 channels are kept"
                       if self.channels == 3 else
                       "3 channels become 1 by BT.601 luma (0.299 R + 0.587 G + 0.114 B); "
                       "1 channel is kept")
        scale = "pixels / 255 (uint8 0..255, or float 0..255)"
        steps = [scale, to_channels, GEOMETRIES[self.geometry]]
        if self.geometry == "center_crop":  # eval_dataset crops the native pixels first
            steps = [GEOMETRIES[self.geometry], scale, to_channels]
        return steps + ["(x - mean) / std per channel"]

    def to_json(self):
        return {"image_size": self.image_size, "channels": self.channels,
                "mean": _float32_list(self.mean), "std": _float32_list(self.std),
                "geometry": self.geometry, "steps": self.steps()}


def _float32_list(values):
    """The shortest decimals that read back as the same float32 (0.3, not 0.30000001...)."""
    return [float(str(np.float32(v))) for v in values]


def _encoder_size(input_shape):
    h, w, _ = input_shape
    if h is not None and w is not None and h != w:
        raise ValueError(f"input_shape={tuple(input_shape)!r}: the export serves square images "
                         "(image_size x image_size); give a square input_shape")
    return h if h is not None else w


def make_contract(input_shape, image_size: Optional[int] = None,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  preprocessing: str = "resize") -> InputContract:
    """The contract of an encoder whose input is `input_shape` = (H, W, C).

    `image_size` defaults to H (= W); it is required when the encoder takes any size.
    `mean`/`std` are the dataset's statistics (1 or 3 values, [0, 1] units, as
    `DatasetSplits.mean/std`); None means the encoder was trained on unnormalised x / 255.
    """
    if preprocessing not in GEOMETRIES:
        raise ValueError(f"preprocessing={preprocessing!r}; choose one of {sorted(GEOMETRIES)} "
                         "(what keras_ncssl.augment.eval_dataset did to the evaluation images)")
    channels = input_shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"input_shape={tuple(input_shape)!r}: the raw-image signatures need an "
                         f"encoder with 1 or 3 input channels, not {channels}")
    size = _encoder_size(input_shape)
    if image_size is None:
        if size is None:
            raise ValueError(f"input_shape={tuple(input_shape)!r} leaves the image size open; "
                             "pass image_size=S (the size the encoder was trained on)")
        image_size = size
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer")
    if size is not None and image_size != size:
        raise ValueError(f"image_size={image_size!r} contradicts input_shape="
                         f"{tuple(input_shape)!r}; leave image_size out or make them agree")
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r}, std={std!r}: give both statistics or neither")
    mean = (0.0,) if mean is None else mean
    std = (1.0,) if std is None else std
    try:
        mean, std = normalization_stats(mean, std, channels)
    except ValueError as error:
        raise ValueError(f"mean/std: {error}") from None
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError(f"mean={mean.tolist()}, std={std.tolist()} must be finite")
    return InputContract(int(image_size), int(channels), tuple(float(v) for v in mean),
                         tuple(float(v) for v in std), preprocessing)


def evaluation_input(images, contract: InputContract) -> np.ndarray:
    """What `augment.eval_dataset` feeds the encoder for raw uint8 images [N, H, W, C]: the
    reference the exported `serve` is checked against (variable-size data for "center_crop")."""
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"images of shape {images.shape}: give a non-empty batch [N, H, W, C]")
    if contract.geometry == "center_crop":
        spec = tf.TensorSpec([None, None, images.shape[-1]], tf.as_dtype(images.dtype))
        ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=spec)
    else:
        ds = tf.data.Dataset.from_tensor_slices(images)
    method = "resize" if contract.geometry == "center_crop" else contract.geometry
    batches = eval_dataset(ds, batch_size=max(len(images), 1), image_size=contract.image_size,
                           channels=contract.channels, mean=contract.mean, std=contract.std,
                           resize_method=method)
    return np.concatenate([batch.numpy() for batch in batches])

"""`image_folder`: a user's own images (class sub-folders, or a flat folder = unlabelled)."""
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from keras_ncssl.data.registry import register_dataset
from keras_ncssl.data.splits import DatasetSplits, validation_indices

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _list_images(directory: str, extensions) -> list:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(extensions)
                  and os.path.isfile(os.path.join(directory, f)))


def _scan_labelled(root: str, extensions, class_names=None):
    """(paths, labels, class_names) from class sub-folders, sorted like Keras does."""
    if class_names is None:
        class_names = sorted(d for d in os.listdir(root)
                             if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        sub = os.path.join(root, cls)
        if not os.path.isdir(sub):
            continue  # a class missing from the test folder is allowed
        for p in _list_images(sub, extensions):
            paths.append(p)
            labels.append(label)
    return paths, labels, list(class_names)


def check_images(paths: Sequence[str], channels: int = 3):
    """Decodes every file once; returns (good_indices, bad [(path, reason)], stats).

    Done up front so a corrupt file is reported before training, not as a crash mid-epoch.
    `stats` holds the per-channel mean/std in [0, 1] units over the decoded (native-size)
    images and the set of native sizes seen.
    """
    good, bad, sizes = [], [], set()
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for i, path in enumerate(paths):
        try:
            raw = tf.io.read_file(path)
            img = tf.io.decode_image(raw, channels=channels, expand_animations=False)
            if img.shape[0] == 0 or img.shape[1] == 0:
                raise ValueError("empty image")
        except (tf.errors.OpError, ValueError) as e:
            reason = getattr(e, "message", None) or str(e)
            bad.append((path, reason.strip().splitlines()[0] if reason else type(e).__name__))
            continue
        sizes.add(tuple(int(d) for d in img.shape[:2]))
        x = tf.cast(img, tf.float64).numpy() / 255.0
        total += x.sum(axis=(0, 1))
        total_sq += (x * x).sum(axis=(0, 1))
        count += x.shape[0] * x.shape[1]
        good.append(i)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 1e-6))
    return good, bad, {"mean": tuple(mean), "std": tuple(std), "sizes": sizes}


@register_dataset("image_folder")
def load_image_folder(data_dir=None, validation_fraction=0.1, seed=0, image_size=(96, 96),
                      channels=3, on_corrupt="raise", test_fraction=0.2,
                      extensions=IMAGE_EXTENSIONS) -> DatasetSplits:
    """A user's own images, like `keras.utils.image_dataset_from_directory` (labels inferred
    from sorted sub-folder names), with an up-front decode check.

    Layouts of `data_dir`:
      - `class_a/*.jpg, class_b/*.jpg, ...`: labelled; a stratified `test_fraction` is held
        out (seed 0, fixed) as the test split.
      - `train/<class>/*, test/<class>/*` (optionally `unlabelled/*`): given splits; unlabelled
        images join pretraining only.
      - `*.jpg` (flat): unlabelled, pretraining only; the labelled splits are empty.

    Args:
        image_size: (H, W) every image is resized to (bilinear, antialiased), or None to keep
            the native size (then all images must share one size).
        channels: 1 (grayscale) or 3 (RGB); decoded to this many channels.
        on_corrupt: "raise" (ValueError listing the unreadable files) or "skip" (drop them and
            log how many).
        extensions: file name endings that count as images.
    """
    if data_dir is None or not os.path.isdir(data_dir):
        raise ValueError(f"image_folder needs data_dir = an existing directory, got {data_dir!r}")
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt={on_corrupt!r}; choose 'raise' or 'skip'")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r}; choose 1 or 3")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size={image_size!r} must be (height, width) or None")
    extensions = tuple(e.lower() for e in extensions)

    subdirs = {d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))}
    unlabelled_paths = []
    if {"train", "test"} <= subdirs:
        train_paths, train_labels, class_names = _scan_labelled(
            os.path.join(data_dir, "train"), extensions)
        test_paths, test_labels, _ = _scan_labelled(
            os.path.join(data_dir, "test"), extensions, class_names)
        for name in ("unlabelled", "unlabeled"):
            if name in subdirs:
                unlabelled_paths += _list_images(os.path.join(data_dir, name), extensions)
    elif subdirs:
        paths, labels, class_names = _scan_labelled(data_dir, extensions)
        test = set(validation_indices(np.asarray(labels), len(labels), float(test_fraction),
                                       seed=0).tolist()) if labels else set()
        train_paths = [p for i, p in enumerate(paths) if i not in test]
        train_labels = [y for i, y in enumerate(labels) if i not in test]
        test_paths = [p for i, p in enumerate(paths) if i in test]
        test_labels = [y for i, y in enumerate(labels) if i in test]
    else:
        train_paths, train_labels, test_paths, test_labels, class_names = [], [], [], [], []
        unlabelled_paths = _list_images(data_dir, extensions)

    all_paths = train_paths + test_paths + unlabelled_paths
    if not all_paths:
        raise ValueError(f"no images with extensions {list(extensions)} found under "
                         f"{data_dir!r}")
    _, bad, stats = check_images(all_paths, channels=channels)
    if bad:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        if on_corrupt == "raise":
            raise ValueError(f"{len(bad)} unreadable image file(s) under {data_dir!r} "
                             f"(on_corrupt='raise'; pass on_corrupt='skip' to drop them):\n"
                             f"{listing}{more}")
        log.warning("image_folder: skipping %d unreadable image file(s) under %s:\n%s%s",
                    len(bad), data_dir, listing, more)
    if image_size is None:
        if len(stats["sizes"]) > 1:
            raise ValueError(f"images under {data_dir!r} have {len(stats['sizes'])} different "
                             f"sizes (e.g. {sorted(stats['sizes'])[:3]}); pass image_size=(H, W)")
        image_size = next(iter(stats["sizes"])) if stats["sizes"] else (1, 1)
    bad_paths = {path for path, _ in bad}

    def keep(paths, labels=None):
        idx = [i for i, p in enumerate(paths) if p not in bad_paths]
        return [paths[i] for i in idx], ([labels[i] for i in idx] if labels is not None else None)

    train_paths, train_labels = keep(train_paths, train_labels)
    test_paths, test_labels = keep(test_paths, test_labels)
    unlabelled_paths, _ = keep(unlabelled_paths)

    target = tf.constant(image_size, tf.int32)

    def decode(path):
        img = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
        img = tf.image.resize(img, target, method="bilinear", antialias=True)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(img, (*image_size, channels))

    def labelled(paths, labels):
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
        return ds.map(lambda p, y: (decode(p), y), num_parallel_calls=AUTOTUNE)

    y_train = np.asarray(train_labels, np.int64)
    val = validation_indices(y_train, len(y_train), validation_fraction, seed)
    is_val = np.zeros(len(y_train), bool)
    is_val[val] = True
    probe = [p for p, v in zip(train_paths, is_val) if not v]
    probe_y = [y for y, v in zip(train_labels, is_val) if not v]
    val_paths = [p for p, v in zip(train_paths, is_val) if v]
    val_y = [y for y, v in zip(train_labels, is_val) if v]
    pretrain_paths = train_paths + unlabelled_paths
    pretrain = tf.data.Dataset.from_tensor_slices(tf.constant(pretrain_paths, tf.string)).map(
        decode, num_parallel_calls=AUTOTUNE)
    return DatasetSplits(
        name="image_folder", pretrain=pretrain, train=labelled(probe, probe_y),
        validation=labelled(val_paths, val_y), test=labelled(test_paths, test_labels),
        num_classes=len(class_names), image_shape=(*image_size, channels),
        mean=tuple(float(m) for m in stats["mean"]),
        std=tuple(float(max(s, 1e-3)) for s in stats["std"]),
        num_examples={"pretrain": len(pretrain_paths), "train": len(probe),
                      "validation": len(val_paths), "test": len(test_paths)},
        class_names=tuple(class_names))

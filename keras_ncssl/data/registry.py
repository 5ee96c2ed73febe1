"""The dataset registry: `register_dataset(name, loader)` and `load_dataset(name, ...)`."""
import inspect
from typing import Callable, Dict, Optional

from keras_ncssl.data.splits import DatasetSplits


DATASETS: Dict[str, Callable[..., DatasetSplits]] = {}


def register_dataset(name: str, loader: Optional[Callable[..., DatasetSplits]] = None):
    """Registers `loader(data_dir, validation_fraction, seed, **options) -> DatasetSplits`.

    Usable as a decorator (`@register_dataset("mine")`) or a call. Replaces an existing entry.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def _register(fn):
        DATASETS[name] = fn
        return fn

    return _register(loader) if loader is not None else _register


def load_dataset(name: str = "fashion_mnist", data_dir: Optional[str] = None,
                 validation_fraction: float = 0.1, seed: int = 0, **options) -> DatasetSplits:
    """Loads a registered dataset.

    Args:
        name: a key of `DATASETS`.
        data_dir: where the data lives (meaning depends on the dataset: the IDX directory for
            fashion_mnist, the tfds data_dir for tfds datasets, the image folder for image_folder).
        validation_fraction: fraction of the training split held out (with `seed`) for
            choosing probe hyper-parameters, in [0, 1).
        seed: seed of the validation split.
        **options: dataset-specific options (e.g. `download=True` for tfds datasets,
            `on_corrupt="skip"` for image_folder); unknown options raise ValueError.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} "
                         "(or add one with keras_ncssl.data.register_dataset)")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1)")
    loader = DATASETS[name]
    params = inspect.signature(loader).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        allowed = sorted(k for k in params if k not in ("data_dir", "validation_fraction", "seed"))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; "
                             f"allowed: {allowed}")
    return loader(data_dir=data_dir, validation_fraction=float(validation_fraction),
                  seed=int(seed), **options)

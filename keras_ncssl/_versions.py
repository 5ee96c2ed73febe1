"""The TensorFlow and Keras versions keras_ncssl supports, checked when the package is imported.

An unsupported TensorFlow or Keras raises one ImportError that names the installed and the
supported versions and the pip command that fixes it, instead of an AttributeError deep in
training (issue 22). The check reads package metadata only (`importlib.metadata`, about a
millisecond); it imports TensorFlow or Keras only when no distribution of them is installed
(a source build), to read ``__version__``.

Keep these ranges equal to `setup.cfg`'s and `requirements-floor.txt` (the floor CI tests);
`tests/test_versions.py` checks that they agree. BUILD_NOTES.md "Supported versions" says
what broke below each floor.
"""
import importlib
import importlib.metadata
import re
import warnings

__all__ = ["SUPPORTED", "TESTED", "check_versions", "installed_version", "parse_version",
           "requirement"]

# module -> (lowest supported, first unsupported or None): the floors are the oldest releases
# the fast tests pass on; Keras is capped above the newest tested release because
# `models._NonContrastive` overrides its private `_maybe_symbolic_build`.
SUPPORTED = {"tensorflow": ("2.16", None), "keras": ("3.10", "3.16")}
# module -> (oldest, newest) release the test suite ran on: the floor CI job and requirements.txt.
TESTED = {"tensorflow": ("2.16.2", "2.21.0"), "keras": ("3.10.0", "3.15.1")}

# Distributions that install each module, most common first (`tensorflow` and `tensorflow-cpu`
# are both the same module; the others are the GPU, nightly and vendor builds).
DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly",
                   "tf-nightly-cpu", "tensorflow-macos", "tensorflow-intel", "tensorflow-rocm",
                   "intel-tensorflow", "tensorflow-aarch64"),
    "keras": ("keras", "keras-nightly"),
}


def parse_version(text):
    """The leading release numbers of a version string: "2.19.0rc1" -> (2, 19, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not match:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def installed_version(module):
    """(version, distribution) of an installed module; (None, None) if it is not installed.

    The first installed distribution of `DISTRIBUTIONS` wins; with none (a source build),
    the module's ``__version__`` is read, with the distribution reported as None.
    """
    for name in DISTRIBUTIONS[module]:
        try:
            return importlib.metadata.version(name), name
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        return importlib.import_module(module).__version__, None
    except ImportError:
        return None, None


def requirement(module, distribution=None):
    """The pip requirement for a supported `module`, e.g. "keras>=3.10,<3.16"."""
    low, high = SUPPORTED[module]
    spec = f">={low}" + (f",<{high}" if high else "")
    return f"{distribution or DISTRIBUTIONS[module][0]}{spec}"


def _meets_floor_and_cap(version, module):
    low, high = SUPPORTED[module]
    padded = lambda v: v + (0,) * (3 - len(v))  # noqa: E731  ("3.10" == "3.10.0")
    parsed = padded(parse_version(version))
    return parsed >= padded(parse_version(low)), high is None or parsed < padded(parse_version(high))


def check_versions(lookup=installed_version):
    """Raise ImportError if TensorFlow or Keras is missing or older than supported.

    A Keras at or above the cap only warns: pip keeps it out unless asked, a user who asks is
    trying a newer release on purpose (README "Supported versions"), and the override of the
    private Keras method fails loudly by itself if the method is gone (`_compat`).

    Args:
        lookup: ``module -> (version, distribution)``; `installed_version` unless a test
            passes another.
    """
    problems, fixes = [], []
    for module in ("tensorflow", "keras"):
        version, distribution = lookup(module)
        fix = requirement(module, distribution)
        if version is None:
            problems.append(f"{module} is not installed")
            fixes.append(fix)
            continue
        new_enough, below_cap = _meets_floor_and_cap(version, module)
        shown = f"{distribution or module} {version}"
        if not new_enough:
            problems.append(f"{shown} is installed")
            fixes.append(fix)
        elif not below_cap:
            oldest, newest = TESTED[module]
            warnings.warn(f"keras_ncssl is tested with {module} {oldest} to {newest}; {shown} is "
                          f"untested (supported: {fix}). If a test fails, install "
                          f"'{fix}'.", UserWarning, stacklevel=2)
    if problems:
        wanted = ", ".join(requirement(m, None) for m in ("tensorflow", "keras"))
        command = "pip install " + " ".join(f"'{fix}'" for fix in fixes)
        raise ImportError(f"keras_ncssl needs {wanted}, but {' and '.join(problems)}. "
                          f"Fix: {command}")

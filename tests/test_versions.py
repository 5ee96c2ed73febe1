"""The supported-version check at import and the guard on the overridden private Keras method."""
import configparser
import importlib.metadata
import os
import re
import subprocess
import sys
import types
import warnings

import keras
import pytest

from keras_ncssl import _compat, _versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lookup_of(**versions):
    """A `check_versions` lookup: module -> (version, distribution) from keyword arguments."""
    return lambda module: versions[module]


SUPPORTED_NOW = dict(tensorflow=("2.21.0", "tensorflow-cpu"), keras=("3.15.1", "keras"))


def test_supported_versions_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _versions.check_versions(lookup_of(**SUPPORTED_NOW))
        _versions.check_versions(lookup_of(tensorflow=("2.16.0", "tensorflow"),
                                           keras=("3.10.0", "keras")))
        _versions.check_versions(lookup_of(tensorflow=("2.22.0rc1", "tf-nightly"),
                                           keras=("3.15.9", "keras")))


def test_the_installed_versions_are_supported():
    _versions.check_versions()  # the environment running the tests must pass its own check


def test_old_keras_names_installed_supported_and_the_pip_fix():
    with pytest.raises(ImportError) as info:
        _versions.check_versions(lookup_of(tensorflow=("2.18.1", "tensorflow-cpu"),
                                           keras=("3.8.0", "keras")))
    message = str(info.value)
    assert "\n" not in message
    assert "keras 3.8.0 is installed" in message
    assert "tensorflow>=2.16, keras>=3.10,<3.16" in message
    assert message.endswith("Fix: pip install 'keras>=3.10,<3.16'")
    assert "tensorflow-cpu" not in message  # TensorFlow 2.18.1 is fine: no fix for it


def test_old_tensorflow_fix_names_the_installed_wheel_and_both_problems_are_one_error():
    with pytest.raises(ImportError, match=r"tensorflow-cpu 2\.15\.1 is installed and keras 3\.0\.5 is "
                                          r"installed\. Fix: pip install 'tensorflow-cpu>=2\.16' "
                                          r"'keras>=3\.10,<3\.16'$"):
        _versions.check_versions(lookup_of(tensorflow=("2.15.1", "tensorflow-cpu"),
                                           keras=("3.0.5", "keras")))
    with pytest.raises(ImportError, match=r"tensorflow-macos 2\.15\.0 is installed\. "
                                          r"Fix: pip install 'tensorflow-macos>=2\.16'$"):
        _versions.check_versions(lookup_of(tensorflow=("2.15.0", "tensorflow-macos"),
                                           keras=SUPPORTED_NOW["keras"]))


def test_missing_module_and_source_build_without_a_distribution():
    with pytest.raises(ImportError, match=r"tensorflow is not installed\. "
                                          r"Fix: pip install 'tensorflow>=2\.16'$"):
        _versions.check_versions(lookup_of(tensorflow=(None, None), keras=SUPPORTED_NOW["keras"]))
    # A source build (no distribution) is shown by module name.
    with pytest.raises(ImportError, match=r"but tensorflow 2\.14\.0 is installed\. "
                                          r"Fix: pip install 'tensorflow>=2\.16'$"):
        _versions.check_versions(lookup_of(tensorflow=("2.14.0", None), keras=SUPPORTED_NOW["keras"]))


def test_keras_at_or_above_the_cap_warns_with_the_tested_range():
    with pytest.warns(UserWarning, match=r"tested with keras 3\.10\.0 to 3\.15\.1; keras 3\.16\.0 is "
                                         r"untested \(supported: keras>=3\.10,<3\.16\)"):
        _versions.check_versions(lookup_of(tensorflow=SUPPORTED_NOW["tensorflow"],
                                           keras=("3.16.0", "keras")))


@pytest.mark.parametrize("text,expected", [
    ("2.18.1", (2, 18, 1)), ("3.10", (3, 10)), ("2.19.0rc1", (2, 19, 0)),
    ("2.21.0.dev20260101", (2, 21, 0)), ("v3.9.2", (3, 9, 2)), ("3.15.1+cpu", (3, 15, 1))])
def test_parse_version(text, expected):
    assert _versions.parse_version(text) == expected


def test_parse_version_rejects_text_without_a_number():
    with pytest.raises(ValueError, match="cannot read a version number from 'unknown'"):
        _versions.parse_version("unknown")


def test_installed_version_takes_the_first_distribution_found(monkeypatch):
    installed = {"tensorflow-cpu": "2.18.1", "tf-nightly": "2.22.0.dev1", "keras-nightly": "3.16.0.dev1"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _versions.installed_version("tensorflow") == ("2.18.1", "tensorflow-cpu")
    assert _versions.installed_version("keras") == ("3.16.0.dev1", "keras-nightly")


def test_installed_version_falls_back_to_the_module_only_without_a_distribution(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    imported = []

    def import_module(name):
        imported.append(name)
        if name == "keras":
            raise ImportError("no keras")
        return types.SimpleNamespace(__version__="2.17.0")

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(_versions.importlib, "import_module", import_module)
    assert _versions.installed_version("tensorflow") == ("2.17.0", None)
    assert _versions.installed_version("keras") == (None, None)
    assert imported == ["tensorflow", "keras"]


def _requirement_lines(path):
    with open(os.path.join(ROOT, path)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def _pin(lines, name):
    pins = {re.split(r"[=;]", line)[0].strip() for line in lines if line.startswith(name + "==")}
    versions = {re.match(rf"{name}==([^;\s]+)", line).group(1) for line in lines
                if line.startswith(name + "==")}
    assert pins == {name} and len(versions) == 1, (name, lines)
    return versions.pop()


def test_ranges_agree_with_setup_cfg_and_the_tested_pins():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    requires = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    low_tf, _ = _versions.SUPPORTED["tensorflow"]
    low_keras, high_keras = _versions.SUPPORTED["keras"]
    for wheel in ("tensorflow-cpu", "tensorflow"):
        assert any(line.startswith(f"{wheel}>={low_tf};") for line in requires), requires
    assert f"keras>={low_keras},<{high_keras}" in requires
    # The oldest tested release is what the floor CI job installs; the newest is requirements.txt.
    floor, pinned = _requirement_lines("requirements-floor.txt"), _requirement_lines("requirements.txt")
    assert (_pin(floor, "tensorflow-cpu"), _pin(pinned, "tensorflow-cpu")) == _versions.TESTED["tensorflow"]
    assert (_pin(floor, "keras"), _pin(pinned, "keras")) == _versions.TESTED["keras"]
    for module, (oldest, newest) in _versions.TESTED.items():
        low, high = _versions.SUPPORTED[module]
        assert _versions.parse_version(oldest)[:2] == _versions.parse_version(low)  # floor = tested
        assert high is None or _versions.parse_version(newest) < _versions.parse_version(high)


def test_private_method_guard_passes_on_the_installed_keras_and_fails_loudly_without_it():
    _compat.require_private_method(keras.Model, "_maybe_symbolic_build", ("iterator", "data_batch"))

    class Renamed:
        def _symbolic_build_v2(self, iterator=None, data_batch=None):
            pass

    class Changed:
        def _maybe_symbolic_build(self, data_batch=None):
            pass

    installed, _ = _versions.installed_version("keras")
    with pytest.raises(ImportError, match=rf"private Keras method Renamed\._maybe_symbolic_build\(iterator, "
                                          rf"data_batch\) .*keras {re.escape(installed)} does not have it\. "
                                          r"Fix: pip install 'keras>=3\.10,<3\.16'$"):
        _compat.require_private_method(Renamed, "_maybe_symbolic_build", ("iterator", "data_batch"))
    with pytest.raises(ImportError, match=r"has it with parameters \('data_batch',\)\. Fix: pip install"):
        _compat.require_private_method(Changed, "_maybe_symbolic_build", ("iterator", "data_batch"))
    # Other backends have no such method and never call the override: nothing to check.
    _compat.require_private_method(Renamed, "_maybe_symbolic_build", ("iterator",), backend="jax")


def test_batchnorm_renorm_reads_the_option_where_keras_has_it():
    assert _compat.batchnorm_renorm(types.SimpleNamespace()) is False  # Keras < 3.14: no option
    assert _compat.batchnorm_renorm(types.SimpleNamespace(renorm=True)) is True
    assert _compat.batchnorm_renorm(keras.layers.BatchNormalization()) is False


def test_half_imported_tfds_names_protobuf_and_tensorflow_metadata(monkeypatch):
    from keras_ncssl.data import tfds_datasets
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.ModuleType("tensorflow_datasets"))
    with pytest.raises(ImportError, match=r"installed: protobuf [^,]+, tensorflow-metadata [^,]+, "
                                          r"tensorflow-datasets [^.]+\..*pip install "
                                          r"'tensorflow-metadata<1\.21'$"):
        tfds_datasets._import_tfds()


def _fake_distribution(root, name, version):
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.slow
def test_import_with_an_old_keras_fails_first_and_cheaply(tmp_path):
    # A fresh interpreter whose metadata says keras 3.8.0 (first on sys.path): importing the
    # package fails with the one-line error before TensorFlow is imported.
    _fake_distribution(tmp_path, "keras", "3.8.0")
    code = ("import sys\ntry:\n    import keras_ncssl\nexcept ImportError as e:\n    print(e)\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("keras_ncssl needs tensorflow>=2.16, keras>=3.10,<3.16, but keras 3.8.0 "
                               "is installed. Fix: pip install 'keras>=3.10,<3.16'"), result.stdout
    assert lines[1] == "tensorflow imported: False"

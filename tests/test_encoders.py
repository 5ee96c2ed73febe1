"""Encoders: torchvision parameter counts, output dims, layout, init, serialisation."""
import numpy as np
import pytest
import keras

from keras_ncssl import encoders


@pytest.fixture(scope="module")
def r18():
    """One CIFAR-stem ResNet-18 shared by the read-only tests (building one takes seconds)."""
    return encoders.resnet18((32, 32, 3), stem="cifar")


def _count(weights):
    return sum(int(np.prod(v.shape)) for v in weights)


# torchvision totals (resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032) minus
# the fc layer (512*1000+1000 = 513,000 or 2048*1000+1000 = 2,049,000). The CIFAR stem replaces
# the 7x7x3x64 conv1 (9,408) by a 3x3x3x64 one (1,728): 7,680 fewer (ResNet-34 with the ImageNet
# stem: 21,284,672; not built here to keep the file fast).
@pytest.mark.parametrize("name,stem,trainable,bn_channels", [
    ("resnet18", "imagenet", 11_176_512, 4_800),
    ("resnet34", "cifar", 21_276_992, 8_512),
    ("resnet50", "imagenet", 23_508_032, 26_560),
])
def test_resnet_parameter_counts_match_torchvision(name, stem, trainable, bn_channels):
    model = encoders.get_encoder(name, (32, 32, 3), stem=stem)
    assert _count(model.trainable_weights) == trainable
    # Only the BN moving mean/variance are non-trainable (2 per BN channel, like torch buffers).
    assert _count(model.non_trainable_weights) == 2 * bn_channels
    assert model.output_shape == (None, 2048 if name == "resnet50" else 512)


def test_resnet18_cifar_parameter_count(r18):
    assert _count(r18.trainable_weights) == 11_168_832
    assert _count(r18.non_trainable_weights) == 2 * 4_800
    assert r18.output_shape == (None, 512)


def test_resnet18_cifar_and_imagenet_stems_resolution(r18):
    cifar = r18
    # CIFAR stem: stride 1 and no max-pool, so layer1 works at the input resolution and
    # layer4 at 1/8 of it.
    assert cifar.get_layer("layer1_1_out").output.shape[1:3] == (32, 32)
    assert cifar.get_layer("layer4_1_out").output.shape[1:3] == (4, 4)
    assert not any(isinstance(l, keras.layers.MaxPooling2D) for l in cifar.layers)
    imagenet = encoders.resnet18((64, 64, 3), stem="imagenet")
    assert imagenet.get_layer("maxpool").output.shape[1:3] == (16, 16)
    assert imagenet.get_layer("layer4_1_out").output.shape[1:3] == (2, 2)
    out = imagenet(np.zeros((2, 64, 64, 3), "float32"), training=False)
    assert tuple(out.shape) == (2, 512)


def test_strided_convs_pad_symmetrically_like_torch(r18):
    model = r18
    conv = model.get_layer("layer2_0_conv1")
    assert conv.strides == (2, 2) and conv.padding == "valid" and not conv.use_bias
    pad = model.get_layer("layer2_0_conv1_pad")
    assert tuple(map(tuple, pad.padding)) == ((1, 1), (1, 1))


def test_conv_init_is_kaiming_normal_fan_out(r18):
    model = r18
    # 3x3x64x128: fan_out = 9*128 differs from fan_in = 9*64 (and from glorot) by sqrt(2)-ish.
    kernel = np.asarray(model.get_layer("layer2_0_conv1").kernel)
    expected = np.sqrt(2.0 / (3 * 3 * 128))
    assert abs(kernel.std() / expected - 1.0) < 0.02
    assert abs(kernel.mean()) < 1e-3
    bn = model.get_layer("layer4_1_bn2")
    np.testing.assert_array_equal(np.asarray(bn.gamma), 1.0)
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)


def test_zero_init_residual_sets_last_bn_gamma_to_zero():
    model = encoders.resnet18((32, 32, 3), zero_init_residual=True, width_multiplier=0.125)
    np.testing.assert_array_equal(np.asarray(model.get_layer("layer1_0_bn2").gamma), 0.0)
    np.testing.assert_array_equal(np.asarray(model.get_layer("layer1_0_bn1").gamma), 1.0)


def test_small_encoder_dims_and_forward(rng):
    model = encoders.get_encoder("small", (32, 32, 1))
    assert model.output_shape == (None, 256)
    x = rng.normal(size=(4, 32, 32, 1)).astype("float32")
    out = np.asarray(model(x, training=True))
    assert out.shape == (4, 256) and np.all(np.isfinite(out)) and np.all(out >= 0)
    # Default stem stride 2: 16, 8, 4, 2 px maps.
    assert model.get_layer("stage4_0_relu").output.shape[1:3] == (2, 2)
    half = encoders.get_encoder("small", (32, 32, 3), width_multiplier=0.5, stem_stride=1)
    assert half.output_shape == (None, 128)
    assert half.get_layer("stage4_0_relu").output.shape[1:3] == (4, 4)
    custom = encoders.get_encoder("small", (96, 96, 3), widths=(8, 16, 24), convs_per_stage=2)
    assert custom.output_shape == (None, 24)
    assert len([l for l in custom.layers if isinstance(l, keras.layers.Conv2D)]) == 6


def test_channels_last_regardless_of_global_data_format():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = encoders.get_encoder("small", (32, 32, 1))
        out = model(np.zeros((2, 32, 32, 1), "float32"))
    finally:
        keras.config.set_image_data_format(previous)
    assert tuple(out.shape) == (2, 256)


def test_synchronized_bn_option():
    model = encoders.get_encoder("small", (32, 32, 3), synchronized_bn=True)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.synchronized for l in bns)
    plain = encoders.get_encoder("small", (32, 32, 3))
    assert not any(l.synchronized for l in plain.layers
                   if isinstance(l, keras.layers.BatchNormalization))


def _perturb_bn_statistics(model, rng):
    # Non-trivial moving statistics, so a reload that lost them would change the outputs.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape) * 0.1)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))


def test_small_encoder_keras_file_round_trip(tmp_path, rng):
    model = encoders.get_encoder("small", (32, 32, 1), synchronized_bn=True)
    _perturb_bn_statistics(model, rng)
    x = rng.normal(size=(3, 32, 32, 1)).astype("float32")
    path = str(tmp_path / "small.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)),
                                  np.asarray(model(x, training=False)))
    assert loaded.get_layer("stage1_0_bn").synchronized


def test_resnet18_config_round_trip(r18, rng):
    model = r18
    _perturb_bn_statistics(model, rng)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone(x, training=False)),
                               np.asarray(model(x, training=False)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: encoders.get_encoder("resnet101", (32, 32, 3)), "resnet101"),
    (lambda: encoders.get_encoder("small", (32, 32, 3), depth=3), "depth"),
    (lambda: encoders.get_encoder("resnet18", (32, 32, 3), stem="tiny"), "tiny"),
    (lambda: encoders.get_encoder("small", (32, 32)), r"\(32, 32\)"),
    (lambda: encoders.get_encoder("small", (32, 32, 3), widths=()), "widths"),
    (lambda: encoders.get_encoder("small", (32, 32, 3), stem_stride=3), "stem_stride"),
    (lambda: encoders.resnet((32, 32, 3), depth=101), "101"),
    (lambda: encoders.resnet18((32, 32, 3), width_multiplier=0), "width_multiplier"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_names():
    assert {"resnet18", "resnet34", "resnet50", "small"} <= set(encoders.ENCODERS)

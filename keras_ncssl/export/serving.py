"""The exported signatures: raw images -> embeddings, in TensorFlow ops that TFLite converts.

    serve             images uint8   [N, H, W, 1 or 3], any H, W >= 1  -> embeddings [N, D]
    serve_float       images float32 [N, H, W, 1 or 3], values 0..255  -> embeddings [N, D]
    serve_normalized  images float32 [N, S, S, C], already preprocessed -> embeddings [N, D]

`serve` applies the `InputContract` (the evaluation's preprocessing) and calls the encoder in
inference mode; its embeddings equal the runner's evaluation features for the same images.

Input checks (issue 24): a signature's declared shape is not enforced by TensorFlow when it is
called (a rank-3 image reached the convolution and aborted the process in oneDNN; 32 x 32 images
went through a 28 x 28 encoder silently). Each function therefore checks its input itself with
ops that run on every call and raise InvalidArgumentError: `tf.ensure_shape` for the rank and,
for `serve_normalized`, the exact [?, S, S, C] (a rank test with `tf.rank` would be folded to a
constant from the declared shape and never fire); `tf.debugging.Assert` for 1 or 3 channels,
height and width >= 1 and, for floats, values in [0, 255] (normalised images sent to `serve_float`
have negative values and fail loudly instead of being embedded as wrong pixels). The dtype is
checked by the signature itself. An empty batch returns [0, D] (`embed`).

Resizing: `tf.image.resize(..., antialias=True)` (the evaluation's op, ScaleAndTranslate) has
no TFLite kernel, not even through Flex. The "resize" geometry therefore resamples with two
matrices, rows [S, H] and columns [S, W], from `augment.resample_matrix` (the same antialiased
triangle kernel with half-pixel centres; identity when H = S); it agrees with the evaluation's
resize to float rounding (BUILD_NOTES.md, "Exported encoders"). "center_crop" rounds to
integers after its resize, where a rounding difference could flip a pixel, so it keeps
`tf.image.resize` and exact agreement, at the cost of having no TFLite conversion.
"""
import tensorflow as tf

from keras_ncssl.augment.convert import LUMA, normalize, stage_variable_size
from keras_ncssl.augment.geometry import resample_matrix

SIGNATURE = "serve"
FLOAT_SIGNATURE = "serve_float"
NORMALIZED_SIGNATURE = "serve_normalized"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def _resize_matrix(in_size, out_size):
    """[out_size, in_size] antialiased bilinear resampling of a whole axis of any length."""
    return resample_matrix(tf.zeros([1]), tf.ones([1]), in_size, out_size)[0]


def resize_images(x, size):
    """x [N, H, W, C] float -> [N, size, size, C] as `tf.image.resize(antialias=True)` + clip.

    Two plain 2-D matmuls: a broadcast batched matmul ([1, 1, S, H] @ [N, C, H, W]) hits the
    oneDNN heap corruption of TF 2.21 (tensorflow/tensorflow#117700, #123109; wrong values
    and malloc aborts here with C = 1).
    """
    n, h, w, c = tf.unstack(tf.shape(x))
    rows, cols = _resize_matrix(h, size), _resize_matrix(w, size)  # [S, H], [S, W]
    y = tf.reshape(tf.transpose(x, [0, 1, 3, 2]), [-1, w])  # [N*H*C, W]
    y = tf.matmul(y, cols, transpose_b=True)  # [N*H*C, S]
    y = tf.reshape(tf.transpose(tf.reshape(y, [n, h, c * size]), [1, 0, 2]), [h, -1])
    y = tf.matmul(rows, y)  # [S, N*C*S]
    y = tf.transpose(tf.reshape(y, [size, n, c, size]), [1, 0, 3, 2])  # [N, S, S, C]
    return tf.clip_by_value(y, 0.0, 1.0)


def _to_channels(x, in_channels, channels):
    """As `convert_images`: grey repeated to 3 channels, or RGB to 1 by luma; else kept."""
    if channels == 3:
        return tf.broadcast_to(x, tf.concat([tf.shape(x)[:3], [3]], 0))
    weights = tf.where(tf.equal(in_channels, 3), tf.constant(LUMA, tf.float32),
                       tf.constant([1.0, 0.0, 0.0]))[:in_channels]
    return tf.reduce_sum(x * weights, axis=-1, keepdims=True)


def _check_raw(images, signature):
    """Runtime checks of a raw batch; returns it with its rank fixed to 4."""
    images = tf.ensure_shape(images, [None, None, None, None])
    shape = tf.shape(images)
    expected = (f"{signature}: images must be [batch, height, width, channels] with height, "
                "width >= 1 and 1 or 3 channels; got shape")
    checks = [tf.debugging.Assert(
        (shape[1] >= 1) & (shape[2] >= 1) & ((shape[3] == 1) | (shape[3] == 3)),
        [expected, shape], summarize=4)]
    if images.dtype != tf.uint8:
        low, high = tf.reduce_min(images), tf.reduce_max(images)  # +inf / -inf when empty
        checks.append(tf.debugging.Assert(
            (low >= 0.0) & (high <= 255.0),
            [f"{signature}: images must be raw pixel values in [0, 255]; got min", low, "max",
             high, f"(normalised images go to {NORMALIZED_SIGNATURE})"]))
    with tf.control_dependencies(checks):
        return tf.identity(images)


def raw_to_input(images, contract, signature=SIGNATURE):
    """Raw uint8 (or float 0..255) images [N, H, W, 1|3] -> the encoder's input [N, S, S, C]."""
    images = _check_raw(images, signature)
    size, channels = contract.image_size, contract.channels
    if contract.geometry == "center_crop":  # eval_dataset stages the native uint8 image first
        images = tf.image.resize_with_crop_or_pad(stage_variable_size(images, size), size, size)
    in_channels = tf.shape(images)[3]
    x = _to_channels(tf.cast(images, tf.float32) * (1.0 / 255.0), in_channels, channels)
    if contract.geometry == "resize":
        x = resize_images(x, size)
    elif contract.geometry == "pad":
        x = tf.image.resize_with_crop_or_pad(x, size, size)
    x = normalize(x, contract.mean, contract.std)
    return tf.ensure_shape(x, contract.input_shape)


def checked_normalized(images, contract):
    """`serve_normalized`'s input, checked to be exactly [N, S, S, C]."""
    return tf.ensure_shape(images, contract.input_shape)


def embed(encoder, x):
    """Inference-mode embeddings, float32 [N, D]; an empty batch gives [0, D].

    The oneDNN BatchNorm kernel rejects an empty batch, so one zero image is appended when
    (and only when) the batch is empty, and cut off again. A `tf.cond` would do the same, but
    tf2onnx cannot convert the encoder's variables inside a branch (BUILD_NOTES.md).
    """
    n = tf.shape(x)[0]
    padded = tf.pad(x, [[0, tf.cast(tf.equal(n, 0), tf.int32)], [0, 0], [0, 0], [0, 0]])
    # A reshape, not set_shape: TFLite's converter re-infers shapes and its Conv2D needs C.
    padded = tf.reshape(padded, [-1, *x.shape[1:]])
    # float32 out even under a mixed-precision policy: callers compare embeddings.
    return tf.cast(encoder(padded, training=False), tf.float32)[:n]


def add_signatures(archive, encoder, contract):
    """Adds the three endpoints to a `keras.export.ExportArchive` (`serve` first: default)."""
    def raw(signature):
        def fn(images):
            return {OUTPUT_NAME: embed(encoder, raw_to_input(images, contract, signature))}
        return fn

    def normalized(images):
        return {OUTPUT_NAME: embed(encoder, checked_normalized(images, contract))}

    spec = [None, None, None, None]
    archive.add_endpoint(SIGNATURE, raw(SIGNATURE),
                         input_signature=[tf.TensorSpec(spec, tf.uint8, name=INPUT_NAME)])
    archive.add_endpoint(FLOAT_SIGNATURE, raw(FLOAT_SIGNATURE),
                         input_signature=[tf.TensorSpec(spec, tf.float32, name=INPUT_NAME)])
    archive.add_endpoint(NORMALIZED_SIGNATURE, normalized, input_signature=[
        tf.TensorSpec(contract.input_shape, tf.float32, name=INPUT_NAME)])


def describe_signatures(contract, dim):
    """The signatures as the metadata records them (what `saved_model_cli show` lists)."""
    out = {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, dim]}
    raw = [None, None, None, None]
    return {
        SIGNATURE: {"input": {"name": INPUT_NAME, "dtype": "uint8", "shape": raw},
                    "output": out, "takes": "raw images, any height and width, 1 or 3 channels"},
        FLOAT_SIGNATURE: {"input": {"name": INPUT_NAME, "dtype": "float32", "shape": raw},
                          "output": out, "takes": "raw images as float32 pixel values in [0, 255]"},
        NORMALIZED_SIGNATURE: {"input": {"name": INPUT_NAME, "dtype": "float32",
                                         "shape": list(contract.input_shape)},
                               "output": out,
                               "takes": "images already preprocessed: preprocessing.steps applied"},
        "serving_default": {"same_as": SIGNATURE},
    }

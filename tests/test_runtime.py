"""keras_ncssl.runtime: bf16 detection from CPU flags, the auto precision, thread settings."""
import pytest

from keras_ncssl import runtime


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 fma\n")
    assert runtime.cpu_flags(str(info)) >= {"avx512_bf16", "avx2"}
    assert runtime.cpu_has_native_bfloat16({"avx512f", "avx512_bf16"})
    assert runtime.cpu_has_native_bfloat16({"amx_bf16"})
    assert runtime.cpu_has_native_bfloat16({"fp", "asimd", "bf16"})  # Arm "Features"
    assert not runtime.cpu_has_native_bfloat16({"avx512f", "avx2", "fma"})
    assert runtime.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("flags,accelerators,expected", [
    ({"avx512_bf16"}, [], "mixed_bfloat16"),
    ({"avx2", "fma"}, [], "none"),                     # emulated bf16 is slower than float32
    ({"avx512_bf16"}, ["/physical_device:GPU:0"], "none"),  # a GPU user's path is unchanged
])
def test_auto_precision(flags, accelerators, expected):
    assert runtime.resolve_precision("auto", flags, accelerators) == expected
    assert runtime.resolve_precision("mixed_float16", flags, accelerators) == "mixed_float16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="choose auto or one of none, mixed_float16, mixed_bfloat16"):
        runtime.resolve_precision("fp8")


def test_describe_is_json_able():
    import json
    described = runtime.describe("none")
    assert json.loads(json.dumps(described))["precision"] == "none"
    assert {"intra_op_threads", "inter_op_threads", "cpu_native_bfloat16"} <= set(described)


@pytest.mark.parametrize("flags,accelerators,expected", [
    (["--encoder=small"], [], (1, 0)),                           # the quick run on a CPU
    (["--encoder=resnet18"], [], (0, 0)),                        # large kernels: TensorFlow's pools
    (["--encoder=small"], ["/physical_device:GPU:0"], (0, 0)),   # a GPU user's path is unchanged
    (["--encoder=small", "--threads=default"], [], (0, 0)),
    (["--encoder=small", "--threads=2,3"], [], (2, 3)),
])
def test_runner_threads(flags, accelerators, expected, monkeypatch):
    from run_tiny import parse
    config = parse(*flags)
    import runner
    monkeypatch.setattr(runtime, "accelerators", lambda: accelerators)
    assert runner.threads_for(config) == expected

"""The device check: what a GPU machine says about keras_ncssl, in one JSON file, in <= 8 minutes.

    python experiments/benchmarks/device_check.py OUT_DIR [--budget_s=480] [--parts=env,eigh,...]

Writes OUT_DIR/device_check.json after every part (a killed run keeps what it finished):

- env: Python, TensorFlow (and its CUDA/cuDNN build), Keras, NumPy, torch, the GPUs, nvidia-smi.
- eigh: tf.linalg.eigh at d = 128/512/2048 on random PSD, rank-1 and zero matrices, float32,
  on the GPU and on the CPU: success or the error, median time, reconstruction error against
  float64 numpy; torch.linalg.eigh on the GPU beside it (the same cuSOLVER), when torch is
  there; and DirectPredictor.refresh on those matrices with rule_device None vs "auto".
- train_step: the ResNet-18 BYOL/DirectPred step (experiments/bench.py train_step, batch 128,
  32 px) in float32, mixed_float16 and mixed_bfloat16, alternating with the PyTorch peer
  (peer_torch_step.py here) in the same precision on the same device, peer first and last;
  plus ours with the rule on the GPU (rule_device=none) to price the host eigh.
- stl10_run: `experiments/run.py --flagfile=stl10.flags` for a few steps on STL-10-shaped
  files in the binary layout (tests/test_paper_flagfiles.py's check, at GPU speed).
- multi_gpu: 1 vs N GPUs on the same global batch (tests/dist_worker.py's model), N > 1 only.

On a machine without a GPU the GPU parts are skipped, with the reason, and the CPU half of
eigh still runs. Each part runs in its own process with a time limit, so one framework's GPU
memory never starves the other's and a hung part cannot eat the budget.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PARTS = ("env", "eigh", "train_step", "stl10_run", "multi_gpu")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_FORCE_GPU_ALLOW_GROWTH="true", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def run_json(command, timeout, cwd=ROOT):
    """Runs `command`; its last stdout line that parses as JSON, or {"error": ...}."""
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s", "seconds": round(time.perf_counter() - began, 1)}
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            out = json.loads(line)
            out.setdefault("seconds", round(time.perf_counter() - began, 1))
            return out
        except ValueError:
            continue
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {result.returncode}: {' | '.join(tail)}", "seconds": round(time.perf_counter() - began, 1)}


def part_command(name, *args):
    return [sys.executable, os.path.abspath(__file__), "--part", name, *args]


# -- parts that run in a child process (print one JSON line) ---------------------------------------

def child_env():
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import numpy
        info["numpy"] = numpy.__version__
        import tensorflow as tf
        import keras
        build = tf.sysconfig.get_build_info()
        info.update(tensorflow=tf.__version__, keras=keras.__version__,
                    tf_cuda=build.get("cuda_version"), tf_cudnn=build.get("cudnn_version"),
                    tf_gpus=[d.name for d in tf.config.list_logical_devices("GPU")],
                    gpu_details=[tf.config.experimental.get_device_details(g) for g in
                                 tf.config.list_physical_devices("GPU")])
    except Exception as error:  # report, never stop: the rest of the check says what it can
        info["tensorflow_error"] = f"{type(error).__name__}: {error}"
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    torch_gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    except Exception as error:
        info["torch_error"] = f"{type(error).__name__}: {error}"
    return info


def _matrices(d, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed + d)
    z = rng.normal(size=(4 * d, d)) * rng.uniform(0.1, 2.0, size=d)
    v = rng.normal(size=(d, 1))
    return {"random_psd": z.T @ z / len(z), "rank1": v @ v.T, "zero": np.zeros((d, d))}


def _time_it(fn, repeats):
    times, out = [], None
    for _ in range(repeats + 1):  # the first call compiles / warms up
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, sorted(times[1:])[len(times[1:]) // 2]


def _eigh_result(matrix, decompose, repeats):
    import numpy as np
    try:
        (s, u), seconds = _time_it(decompose, repeats)
        s, u = np.asarray(s, np.float64), np.asarray(u, np.float64)
        scale = max(np.linalg.norm(matrix), 1e-30)
        return {"ok": bool(np.all(np.isfinite(s)) and np.all(np.isfinite(u))), "ms": round(1e3 * seconds, 3),
                "reconstruction_rel_error": float(np.linalg.norm((u * s) @ u.T - matrix) / scale),
                "orthogonality_error": float(np.abs(u.T @ u - np.eye(len(s))).max())}
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}


def child_eigh(dims, repeats):
    """TensorFlow's eigh on its GPU and CPU, torch's on CUDA (the same cuSOLVER), each where present."""
    import numpy as np
    try:
        import tensorflow as tf
        from keras_ncssl.predictors import DirectPredictor
        devices = [d.name for d in tf.config.list_logical_devices("GPU")][:1] + ["/device:CPU:0"]
    except ImportError:
        tf, devices = None, []
    try:
        import torch
        has_torch_cuda = torch.cuda.is_available()
    except ImportError:
        has_torch_cuda = False
    results = {"devices": devices, "tf": {}, "torch_cuda": {}, "refresh": {}}
    for d in dims:
        for kind, matrix in _matrices(d).items():
            key = f"d{d}_{kind}"
            for device in devices:
                with tf.device(device):
                    tensor = tf.constant(matrix, tf.float32)
                    fn = tf.function(tf.linalg.eigh)
                    results["tf"].setdefault(key, {})[device] = _eigh_result(
                        matrix, lambda: [t.numpy() for t in fn(tensor)], repeats)
            if has_torch_cuda:
                cuda = torch.tensor(matrix, dtype=torch.float32, device="cuda")
                results["torch_cuda"][key] = _eigh_result(
                    matrix, lambda: [t.cpu().numpy() for t in torch.linalg.eigh(cuda)], repeats)
            if d == dims[0] and devices:  # the layer's guard and placement, on the GPU (else the CPU)
                for rule_device in (None, "auto"):
                    results["refresh"].setdefault(key, {})[str(rule_device)] = _refresh_outcome(
                        DirectPredictor, tf, devices[0], rule_device, matrix)
    return results


def _refresh_outcome(layer_class, tf, device, rule_device, matrix):
    """DirectPredictor.refresh (compiled) with F = matrix, variables on `device`."""
    import numpy as np
    with tf.device(device):
        layer = layer_class(rule_device=rule_device)
        layer.build((None, len(matrix)))
        layer.correlation.assign(matrix.astype(np.float32))
        layer.num_updates.assign(1)
        try:
            applied = bool(tf.function(layer.refresh)())
            return {"applied": applied, "num_skipped": int(layer.num_skipped.numpy()),
                    "placement": layer.rule_placement()}
        except Exception as error:
            return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}


def child_multi_gpu(device_type):
    """1 vs N devices of `device_type` ("GPU"; "CPU" splits the CPU in two, to test this code)."""
    import numpy as np
    import tensorflow as tf
    if device_type == "CPU":
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                                   [tf.config.LogicalDeviceConfiguration()] * 2)
    import importlib.util  # the tests' two-replica model and data, loaded by path (no sys.path edit)
    spec = importlib.util.spec_from_file_location("dist_worker", os.path.join(ROOT, "tests", "dist_worker.py"))
    dw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dw)
    from keras_ncssl import distribute

    gpus = [d.name for d in tf.config.list_logical_devices(device_type)]
    batch = 8 * len(gpus)
    with tf.device(gpus[0]):
        single = dw.build_model()
    init = single.get_weights()
    strategy = tf.distribute.MirroredStrategy(gpus)
    with strategy.scope():
        several = dw.build_model()
    several.set_weights(init)
    x1, x2 = dw.make_views(batch=batch)
    dw.train(single, dw.single_dataset(x1, x2, batch))
    dw.train(several, distribute.distribute_pretrain_dataset(strategy, dw.dataset_fn(x1, x2, batch), batch))
    diffs = dw.max_abs_diff(dw.snapshot(single), dw.snapshot(several))
    tolerance = 1e-4  # tests/test_distribute.py's ATOL (2 logical CPUs: <= 2e-5)
    return {"devices": gpus, "global_batch": batch, "max_abs_diff": diffs, "tolerance": tolerance,
            "equal": bool(all(v <= tolerance for k, v in diffs.items() if k != "counters")
                          and diffs["counters"] == 0),
            "weights_moved": float(max(np.abs(a - b).max() for a, b in zip(init, single.get_weights())
                                       if a.dtype.kind == "f"))}


def child_stl10_run(workdir, steps):
    import numpy as np
    from keras_ncssl import data

    rng = np.random.default_rng(0)
    n_train, batch = 60, 128  # 6 per class: a stratified validation image per class
    n_unlabelled = steps * batch - n_train
    data.write_stl10_binary(os.path.join(workdir, "stl10_binary"),
                            (rng.integers(0, 256, (n_train, 96, 96, 3), dtype=np.uint8), np.arange(n_train) % 10),
                            (rng.integers(0, 256, (40, 96, 96, 3), dtype=np.uint8), np.arange(40) % 10),
                            rng.integers(0, 256, (n_unlabelled, 96, 96, 3), dtype=np.uint8))
    command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--flagfile=stl10.flags",
               f"--data_dir={workdir}", f"--workdir={os.path.join(workdir, 'run')}", "--epochs=1",
               "--few_label_per_class=2", "--few_label_draws=1", "--checkpoint_every_steps=0", "--verbose=0"]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    out = {"command": " ".join(command[1:]), "returncode": result.returncode,
           "seconds": round(time.perf_counter() - began, 1),
           "data_line": next((line for line in result.stdout.splitlines() if line.startswith("Data:")), None)}
    if result.returncode != 0:
        out["error"] = " | ".join(result.stderr.strip().splitlines()[-5:])
        return out
    run = os.path.join(workdir, "run")
    with open(os.path.join(run, "pretrain.json")) as handle:
        pretrain = json.load(handle)
    with open(os.path.join(run, "eval.json")) as handle:
        trained = json.load(handle)["trained"]
    import tensorflow as tf
    # serve takes raw images of any size; serve_normalized declares the encoder's input shape.
    serve = tf.saved_model.load(os.path.join(run, "encoder")).signatures["serve_normalized"]
    out.update(steps_per_epoch=pretrain["steps_per_epoch"], images_per_sec=pretrain["images_per_sec"],
               eval_counts=[trained["n_train"], trained["n_val"], trained["n_test"]],
               linear_probe_top1=trained["linear_probe_top1"],
               export_input_shape=serve.structured_input_signature[1]["images"].shape.as_list())
    return out


# -- the parent: orchestration, budget, JSON -------------------------------------------------------

def train_step_runs(remaining, steps, env):
    """Peer and ours alternating, per precision; each run's JSON line, in order."""
    bench = [sys.executable, os.path.join(ROOT, "experiments", "bench.py"), "train_step", "--encoder=resnet18",
             "--image_size=32", "--batch_size=128", "--predictor=directpred", f"--steps={steps}", "--warmup=5"]
    peer = [sys.executable, os.path.join(HERE, "peer_torch_step.py"), "--device=cuda", "--batch=128", "--image=32",
            f"--steps={steps}", "--warmup=5"]
    plan = []
    for policy, amp in (("float32", "none"), ("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")):
        plan += [("peer", policy, peer + [f"--amp={amp}"]),
                 ("ours", policy, bench + ([] if policy == "float32" else [f"--mixed_precision={policy}"]))]
    plan += [("peer", "float32", peer + ["--amp=none"]),
             ("ours_rule_on_gpu", "float32", bench + ["--rule_device=none"])]
    runs = []
    for who, policy, command in plan:
        left = remaining()
        missing = env.get("torch_error") if who == "peer" else env.get("tensorflow_error")
        if missing:
            runs.append({"who": who, "policy": policy, "skipped": f"not importable: {missing}"})
            continue
        if left < 45:
            runs.append({"who": who, "policy": policy, "skipped": "budget"})
            continue
        runs.append({"who": who, "policy": policy, **run_json(command, timeout=min(left - 30, 150))})
    return runs


FLAGS = flags.FlagValues()  # its own: the check also runs as `bench.py device_check OUT_DIR`
flags.DEFINE_float("budget_s", 480, "Total wall time (the check's goal: 8 minutes).", flag_values=FLAGS)
flags.DEFINE_list("parts", list(PARTS), f"Parts to run, a subset of {','.join(PARTS)}.", flag_values=FLAGS)
flags.DEFINE_list("cpu_dims", ["128", "512", "2048"], "eigh sizes on a machine without a GPU.", flag_values=FLAGS)
flags.DEFINE_list("on_cpu", [], "Without a GPU, still run these parts on the CPU (stl10_run, multi_gpu over two "
                  "logical CPUs): tests the check itself.", flag_values=FLAGS)
flags.DEFINE_integer("stl10_steps", 10, "Training steps of the stl10_run part.", flag_values=FLAGS)
flags.DEFINE_string("part", None, "Internal: run one part in this process.", flag_values=FLAGS)
flags.DEFINE_multi_string("arg", [], "Internal: the part's arguments.", flag_values=FLAGS)


def _fail(message):
    sys.exit(f"device_check.py: error: {message}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(f"{__doc__}\nflags:\n{FLAGS.get_help()}")
        return 0
    try:
        positional = FLAGS(["device_check.py", *argv])[1:]
    except flags.Error as error:
        _fail(error)
    args = FLAGS
    if args.part:
        child = {"env": child_env, "eigh": lambda: child_eigh([int(d) for d in args.arg[0].split(",")],
                                                               int(args.arg[1])),
                 "multi_gpu": lambda: child_multi_gpu(args.arg[0]),
                 "stl10_run": lambda: child_stl10_run(args.arg[0], int(args.arg[1]))}
        print(json.dumps(child[args.part]()), flush=True)
        return 0
    if len(positional) != 1:
        _fail(f"give one OUT_DIR (got {positional or 'none'}): python experiments/benchmarks/device_check.py OUT_DIR")
    parts = list(args.parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        _fail(f"--parts={','.join(parts)}: unknown {unknown}; choose from {list(PARTS)}")
    out_dir = positional[0]
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "device_check.json")
    began = time.perf_counter()

    def remaining():
        return args.budget_s - (time.perf_counter() - began)

    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
              "nvidia_smi": _nvidia_smi(), "parts": {}}

    def save():
        report["seconds"] = round(time.perf_counter() - began, 1)
        with open(out_path + ".tmp", "w") as handle:
            json.dump(report, handle, indent=1, default=str)
        os.replace(out_path + ".tmp", out_path)

    env = run_json(part_command("env"), timeout=min(remaining(), 90))
    report["parts"]["env"] = env
    save()
    # Without TensorFlow (the lent GPU machines have only PyTorch) the torch halves still run.
    gpus = len(env.get("tf_gpus") or env.get("torch_gpus") or [])
    no_gpu = None if gpus else "no GPU visible to TensorFlow or PyTorch"
    on_cpu = set(args.on_cpu)
    for name in parts:
        if name == "env":
            continue
        forced = bool(no_gpu) and name in on_cpu and "tensorflow_error" not in env
        if name != "eigh" and no_gpu and not forced:
            report["parts"][name] = {"skipped": no_gpu}
        elif name in ("stl10_run", "multi_gpu") and "tensorflow_error" in env:
            report["parts"][name] = {"skipped": f"TensorFlow not importable: {env['tensorflow_error']}"}
        elif name == "multi_gpu" and gpus < 2 and not forced:
            report["parts"][name] = {"skipped": f"{gpus} GPU: the 1-vs-N check needs N > 1"}
        elif remaining() < 30:
            report["parts"][name] = {"skipped": "budget"}
        elif name == "eigh":
            dims, repeats = ("128,512,2048", 5) if gpus else (",".join(args.cpu_dims), 1)
            report["parts"][name] = run_json(part_command("eigh", "--arg", dims, "--arg", str(repeats)),
                                             timeout=min(remaining(), 150))
        elif name == "train_step":
            report["parts"][name] = {"runs": train_step_runs(remaining, steps=30, env=env)}
        elif name == "stl10_run":
            scratch = tempfile.mkdtemp(prefix="device_check_stl10_")
            try:
                report["parts"][name] = run_json(
                    part_command("stl10_run", "--arg", scratch, "--arg", str(args.stl10_steps)),
                    timeout=min(remaining(), 240 if gpus else 480))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            report["parts"][name] = run_json(part_command(name, "--arg", "CPU" if forced else "GPU"),
                                             timeout=min(remaining(), 150))
        if forced:
            report["parts"][name]["ran_on_cpu"] = True
        save()
    save()
    print(f"wrote {out_path} ({report['seconds']}s)")
    return 0


def _nvidia_smi():
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())

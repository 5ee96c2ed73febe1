"""Where a traced train step spends its time, read from the TensorFlow profiler's trace.

`tf.profiler.experimental.start/stop` writes an XSpace (`*.xplane.pb`) that TensorBoard's
Profile tab shows; this reads the same file without the profile plugin: on the host plane,
the TensorFlow op events (named "name:Type") are grouped by op type, and each type's total time
is the sum of its events' durations over all threads (so two busy threads count twice: the
shares are of CPU time in ops, not of wall time).

    python experiments/bench.py train_step --flagfile=experiments/quick.flags --profile_dir=/tmp/prof
"""
import collections
import glob
import os


def op_times(logdir):
    """({op type: (total seconds, count)}, executor busy seconds) from the newest trace under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # only here: the module moves between releases

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as handle:
        space.ParseFromString(handle.read())
    totals, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's op threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if "::" in name or ":" not in name:
                    continue  # executor bookkeeping, not an op kernel ("scope/name:OpType")
                totals[name.rsplit(":", 1)[1]] += event.duration_ps * 1e-12
                counts[name.rsplit(":", 1)[1]] += 1
            for event in line.events:
                if names.get(event.metadata_id, "") == "ExecutorState::Process":
                    totals[BUSY] += event.duration_ps * 1e-12
    busy = totals.pop(BUSY, 0.0)
    return {op: (totals[op], counts[op]) for op in totals}, busy


# Time the executor threads spent processing ops (kernels + scheduling), for the overhead line.
BUSY = "executor busy"


def summary(logdir, steps, top=15):
    """A text table: the ``top`` op types by time per step and their share of all op time."""
    times, busy = op_times(logdir)
    total = sum(seconds for seconds, _ in times.values()) or 1.0
    lines = [f"per step: {1e3 * total / steps:.2f} ms CPU time in op kernels, {1e3 * busy / steps:.2f} ms in the "
             f"executor's threads (kernels + scheduling), {len(times)} op types, "
             f"{sum(count for _, count in times.values()) / steps:.0f} kernel calls",
             f"{'op type':<36}{'ms/step':>9}{'share':>8}{'calls/step':>12}"]
    for op, (seconds, count) in sorted(times.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{op:<36}{1e3 * seconds / steps:>9.2f}{100 * seconds / total:>7.1f}%{count / steps:>12.1f}")
    return "\n".join(lines)

"""JSON and text files written atomically, and read back: the one copy used by the checkpoint
records, the runner's work-directory files and the sweep's results (numpy only, no TensorFlow).

An atomic write goes to a temporary file in the same directory, is flushed to disk, then
renamed over the target (``os.replace``), so a reader (or a run resumed after a kill) sees
either the old file or the new one, never a half-written one.
"""
import json
import os
import tempfile

__all__ = ["read_json", "write_json_atomic", "write_text_atomic"]

_MISSING = object()


def read_json(path, default=_MISSING):
    """The JSON value in ``path``; ``default`` when the file does not exist (if given)."""
    if default is not _MISSING and not os.path.exists(path):
        return default
    with open(path) as handle:
        return json.load(handle)


def write_text_atomic(path, text):
    """Write the string ``text`` to ``path`` atomically (creating its directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        # mkstemp makes the file 0600; give it the usual umask's mode, as TensorFlow's
        # checkpoints get, so that other workers and users of a shared workdir can read it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path, payload):
    """Write ``payload`` as JSON (indent 1; numpy scalars as floats) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1, default=float))


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""Shared by the three levels of `keras_ncssl.theory`: argument validation and the fixed-step
integrators (classical RK4, forward Euler).

The package's internal API (used by linear.py, modes.py and symmetric.py): ``check_number``,
``check_matrix``, ``check_symmetric``, ``check_covariance``, ``check_choice`` (each raises a
ValueError naming the argument) and ``integrate``."""
import math
import numbers

import numpy as np

from keras_ncssl import diagnostics


PREDICTORS = ("linear", "symmetric", "identity")
METHODS = ("rk4", "euler")

# Tolerances for "symmetric" and "PSD" checks, relative to the matrix scale: loose enough for
# matrices built in float32 (tf tensors), tight enough to reject genuinely indefinite input.
_SYMMETRY_RTOL = 1e-6
_PSD_RTOL = 1e-6


def check_number(name, value, *, minimum=0.0, strict=False, allow_none=False):
    """A finite real scalar >= minimum (> minimum if strict); ValueError otherwise."""
    if value is None and allow_none:
        return None
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    allowed = f"a finite number {bound}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, np.generic)) \
            or np.ndim(value) != 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_matrix(name, value, shape=None):
    """A finite real 2-D float64 array (of ``shape`` if given); ValueError naming ``name`` otherwise."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real matrix, got {type(value).__name__}") from error
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}; it must be {tuple(shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def check_symmetric(name, array):
    """ValueError unless ``array`` is symmetric to a relative tolerance of its scale."""
    scale = max(1.0, float(np.max(np.abs(array))))
    asymmetry = float(np.max(np.abs(array - array.T)))
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric; max |{name} - {name}^T| = {asymmetry:.3g}")


def check_covariance(name, value, n):
    """n x n symmetric PSD matrix; a number c means c * I (c >= 0)."""
    if np.ndim(value) == 0:
        return check_number(name, value) * np.eye(n)
    array = check_matrix(name, value, (n, n))
    check_symmetric(name, array)
    array = 0.5 * (array + array.T)
    eigenvalues = diagnostics.spectrum(array)
    if eigenvalues[-1] < -_PSD_RTOL * max(1.0, eigenvalues[0]):
        raise ValueError(
            f"{name} must be positive semi-definite (a covariance); its smallest eigenvalue is "
            f"{eigenvalues[-1]:.3g}")
    return array


def check_choice(name, value, allowed):
    """``value`` if it is one of ``allowed``; ValueError naming ``name`` otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _euler_step(rhs, state, h):
    return tuple(y + h * k for y, k in zip(state, rhs(*state)))


def _rk4_step(rhs, state, h):
    k1 = rhs(*state)
    k2 = rhs(*(y + 0.5 * h * k for y, k in zip(state, k1)))
    k3 = rhs(*(y + 0.5 * h * k for y, k in zip(state, k2)))
    k4 = rhs(*(y + h * k for y, k in zip(state, k3)))
    return tuple(y + (h / 6.0) * (a + 2.0 * b + 2.0 * c + d)
                 for y, a, b, c, d in zip(state, k1, k2, k3, k4))


def integrate(rhs, state, t_end, dt, method, record_every):
    """Integrate dy/dt = rhs(*y) from t = 0 to t_end; returns (times, stacked states)."""
    t_end = check_number("t_end", t_end)
    dt = check_number("dt", dt, strict=True)
    check_choice("method", method, METHODS)
    if isinstance(record_every, bool) or not isinstance(record_every, numbers.Integral) \
            or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    # The 1e-12 keeps t_end / dt = 1000.0000000000001 from costing an extra, tiny step.
    n_steps = int(math.ceil(t_end / dt * (1.0 - 1e-12))) if t_end > 0 else 0
    h = t_end / n_steps if n_steps else 0.0
    step = _rk4_step if method == "rk4" else _euler_step
    times, records = [0.0], [state]
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(1, n_steps + 1):
            state = step(rhs, state, h)
            if k % record_every == 0 or k == n_steps:
                if not all(np.all(np.isfinite(y)) for y in state):
                    raise FloatingPointError(
                        f"the state became non-finite by t = {k * h:.4g} ({method}, dt = {h:.3g});"
                        " the dynamics diverge or dt is too large for stability")
                times.append(k * h)
                records.append(state)
    return np.asarray(times), tuple(np.stack(column) for column in zip(*records))

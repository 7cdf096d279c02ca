"""Is a kernel's output right? Compared with the float64 reference before any time counts.

Two tests, both must pass:

- the whole array: ``‖out − ref‖ / ‖ref‖`` within ``TOLERANCE[dtype]`` (a reordered fp32
  reduction lands around 1e-6);
- every element: ``|out − ref| <= ELEMENT_TOLERANCE[dtype] * (|ref| + rms(ref))``, so a kernel that
  gets a few elements of a large output wrong cannot hide in the norm (one wrong element of a
  1024x1024 fp16 output moves the whole-array error by about 1e-3, inside its tolerance).

Any non-finite element (the NaN the output was poisoned with, an overflow) is wrong.
"""

from __future__ import annotations

import numpy as np

# fp16 inputs are rounded before the float64 reference sees them and kernels accumulate in fp32,
# so both dtypes differ from the reference only by the accumulation order. A PrimFunc from a model
# may also be float64 throughout, or integer (its reference then computes the same integers: exact).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "fp64": 1e-9, "int": 0.0}
ELEMENT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "fp64": 1e-7, "int": 0.0}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when any element is not finite (NaN poison survived)."""
    out = np.asarray(out, dtype=np.float64)
    if out.shape != ref.shape or not np.isfinite(out).all():
        return float("inf")
    denom = float(np.linalg.norm(ref))
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def check_output(out: np.ndarray, ref: np.ndarray, dtype: str) -> tuple[float, str | None]:
    """(relative error, None when ``out`` is right, else one line saying what is wrong)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return float("inf"), f"output shape {out.shape}, expected {ref.shape}"
    bad_values = ~np.isfinite(out)
    if bad_values.any():
        idx = tuple(int(i) for i in np.argwhere(bad_values)[0])
        return float("inf"), f"{int(bad_values.sum())} elements not finite (first at {idx}: {out[idx]})"
    err = relative_error(out, ref)
    if not err <= TOLERANCE[dtype]:
        return err, f"relative error {err:.3g} exceeds {TOLERANCE[dtype]:g} against the float64 reference"
    rms = float(np.sqrt(np.mean(ref * ref))) if ref.size else 0.0
    excess = np.abs(out - ref) - ELEMENT_TOLERANCE[dtype] * (np.abs(ref) + rms)
    if (excess > 0).any():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        return err, (f"{int((excess > 0).sum())} elements off by more than {ELEMENT_TOLERANCE[dtype]:g} of their "
                     f"scale against the float64 reference (worst at {idx}: {out[idx]:.6g}, expected {ref[idx]:.6g})")
    return err, None

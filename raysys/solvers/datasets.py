"""Instances from generation (Ray tasks, deterministic by seed) or from files.

Generation: instance ``k`` of a data set with seed ``s`` draws from
``numpy.random.default_rng([s, k])``, so it is the same whatever the chunking or
the number of workers, and data sets with different seeds are independent.

Files read (never unpickled):

- the FNO benchmark's Darcy files: ``.pt`` read with
  ``torch.load(weights_only=True)`` or ``.npz``, holding ``x`` (N, n, n): a
  boolean permeability mask, coefficient 12 where true and 3 where false (a
  float ``x`` is taken as the coefficient itself), and ``y``, a solution
  sub-sampled from a finer grid, which is ignored: it is not the n x n
  finite-difference solution, so references are recomputed;
- the user's own ``.npz``: ``a`` (N, n, n) or (n, n) positive Darcy
  coefficients, optionally ``f`` forcing fields of the same shape; or ``vx``,
  ``vy`` and ``epsilon`` (N,) for convection-diffusion.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from raysys.runtime import bounded_get
from raysys.runtime.errors import RaysysError
from raysys.solvers.errors import DataFormatError, InvalidInstance
from raysys.solvers.families import Instance, get_family

logger = logging.getLogger(__name__)

BENCHMARK_HIGH = 12.0
BENCHMARK_LOW = 3.0
# what numpy raises for a truncated, corrupt or non-archive .npz
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def sample_instances(
    family: str,
    resolution: int,
    seed: int,
    indices: Sequence[int],
    with_reference: bool,
) -> list[Instance]:
    """Draw instances ``indices`` of the data set ``seed`` (no Ray)."""
    fam = get_family(family)
    _check_sizes(resolution, len(indices))
    out = []
    for k in indices:
        rng = np.random.default_rng([seed, int(k)])
        inst = fam.sample(rng, resolution, f"{family}-n{resolution}-s{seed}-{k}")
        if with_reference:
            inst.reference = fam.reference_solution(inst)
        out.append(inst)
    return out


def _check_sizes(resolution: int, num_instances: int) -> None:
    if int(resolution) != resolution or resolution < 2:
        raise InvalidInstance(
            f"resolution {resolution!r} is too small; the grid is n x n interior "
            "nodes with n >= 2"
        )
    if num_instances < 0:
        raise InvalidInstance(
            f"number of instances {num_instances!r} is negative; give 0 or more"
        )


@ray.remote(num_cpus=1)
def _sample_chunk(
    family: str, resolution: int, seed: int, indices: list[int], with_reference: bool
) -> list[Instance]:
    return sample_instances(family, resolution, seed, indices, with_reference)


def generate_instances(
    family: str,
    resolution: int,
    num_instances: int,
    seed: int,
    *,
    with_reference: bool = True,
    chunk_size: int | None = None,
    timeout_s: float = 1800.0,
) -> list[Instance]:
    """Generate instances in parallel Ray tasks (sample, assemble, reference solve).

    Args:
        chunk_size: instances per task; None spreads them over two tasks per
            cluster CPU, at most 32 per task.

    Raises:
        InvalidInstance: an unknown family, a resolution below 2 or a negative
            count (before any task starts).
        RemoteTimeout: the tasks did not finish within ``timeout_s``.
    """
    get_family(family)  # fail before any task starts
    _check_sizes(resolution, num_instances)
    if chunk_size is None:
        num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunk_size = max(1, min(32, math.ceil(num_instances / (2 * num_cpus))))
    chunks = [
        list(range(i, min(i + chunk_size, num_instances)))
        for i in range(0, num_instances, chunk_size)
    ]
    refs = [
        _sample_chunk.remote(family, resolution, seed, c, with_reference)
        for c in chunks
    ]
    logger.info(
        "generating %d %s instances at %dx%d (seed %d) in %d tasks",
        num_instances,
        family,
        resolution,
        resolution,
        seed,
        len(refs),
    )
    parts = bounded_get(refs, timeout_s, f"generation of {num_instances} instances")
    return [inst for part in parts for inst in part]


@ray.remote(num_cpus=1)
def _reference_chunk(chunk: list[Instance]) -> list[Instance]:
    for inst in chunk:
        inst.reference = get_family(inst.family).reference_solution(inst)
    return chunk


def with_references(
    instances: Sequence[Instance], chunk_size: int = 64, timeout_s: float = 1800.0
) -> list[Instance]:
    """The instances with reference solutions, solved in parallel Ray tasks.

    Raises:
        InvalidInstance: an instance cannot be assembled (training needs all).
        RemoteTimeout: the solves did not finish within ``timeout_s``.
    """
    refs = [
        _reference_chunk.remote(list(instances[i : i + chunk_size]))
        for i in range(0, len(instances), chunk_size)
    ]
    try:
        parts = bounded_get(refs, timeout_s, f"reference solves of {len(instances)}")
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, RaysysError):
            raise cause from None  # its message, without the remote traceback
        raise e.as_instanceof_cause() from None
    return [inst for part in parts for inst in part]


def _as_stack(arr: np.ndarray, key: str, path: Path) -> np.ndarray:
    arr = np.ascontiguousarray(_numeric(arr, key, path))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataFormatError(
            f"{path}: array {key!r} has shape {arr.shape}; expected (N, n, n) or (n, n)"
        )
    return arr


def _numeric(arr: np.ndarray, key: str, path: Path) -> np.ndarray:
    """``arr`` if it holds real numbers (or booleans); the file is refused otherwise."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise DataFormatError(
            f"{path}: array {key!r} is complex ({arr.dtype}); the fields must be "
            "real numbers"
        )
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise DataFormatError(
            f"{path}: array {key!r} has dtype {arr.dtype}; it must hold numbers"
        )
    return arr


def _same_count(path: Path, first: str, n_first: int, key: str, n_key: int) -> None:
    if n_key != n_first:
        raise DataFormatError(
            f"{path}: {key!r} holds {n_key} instances but {first!r} holds {n_first}"
        )


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise DataFormatError(
            f"data file {str(path)!r} is a folder; give a .npz or a .pt file"
        )
    if not path.is_file():
        raise DataFormatError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".pt":
        import torch

        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises several types for unsafe/corrupt files
            raise DataFormatError(
                f"{path}: not a tensor file torch.load(weights_only=True) accepts "
                f"({e}); save plain tensors in a dict"
            ) from e
        if not isinstance(data, dict):
            raise DataFormatError(
                f"{path} holds a {type(data).__name__}; expected a dict of tensors"
            )
        try:
            return {
                k: v.contiguous().numpy()
                for k, v in data.items()
                if isinstance(v, torch.Tensor)
            }
        except (TypeError, RuntimeError) as e:  # e.g. bfloat16 has no numpy type
            raise DataFormatError(f"{path}: a tensor numpy cannot hold ({e})") from e
    if path.suffix == ".npz":
        try:
            with path.open("rb") as f:
                head = f.read(6)
        except OSError as e:
            raise DataFormatError(f"{path}: cannot be read ({e.strerror or e})") from e
        if not head.startswith(b"PK"):  # numpy would try it as a pickle
            kind = "a single .npy array" if head == b"\x93NUMPY" else "not a zip file"
            raise DataFormatError(
                f"{path}: not an .npz archive ({kind}); save the arrays with "
                "numpy.savez"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except _NPZ_ERRORS as e:
            raise DataFormatError(
                f"{path}: not a readable .npz ({type(e).__name__}: {e})"
            ) from e
    raise DataFormatError(
        f"{path}: unknown suffix {path.suffix!r}; give a .npz or a .pt file"
    )


def load_instances(path: str | Path) -> list[Instance]:
    """Read Darcy or convection-diffusion instances from a benchmark or user file.

    Only the file's structure is checked here (array kinds, dtypes, shapes,
    instance counts); each instance's values are checked when it is solved, so
    that one bad instance fails alone.

    Raises:
        DataFormatError: the file is unreadable, holds none of the expected
            arrays, arrays that disagree in their instance counts, non-numeric or
            complex arrays, or no instances; the message names the file, the
            array and what is expected.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    instances = _instances(path, arrays)
    if not instances:
        raise DataFormatError(f"{path}: holds 0 instances; give at least one")
    return instances


def _instances(path: Path, arrays: dict[str, np.ndarray]) -> list[Instance]:
    stem = path.stem
    if "x" in arrays:
        x = _as_stack(arrays["x"], "x", path)
        a = (
            np.where(x, BENCHMARK_HIGH, BENCHMARK_LOW)
            if x.dtype == bool
            else x.astype(np.float64)
        )
        return [Instance(f"{stem}-{k}", "darcy", {"a": a[k]}) for k in range(len(a))]
    if "a" in arrays:
        a = _as_stack(arrays["a"], "a", path)
        f = _as_stack(arrays["f"], "f", path) if "f" in arrays else None
        if f is not None:
            _same_count(path, "a", len(a), "f", len(f))
        return [
            Instance(
                f"{stem}-{k}",
                "darcy",
                {"a": a[k]} | ({"f": f[k]} if f is not None else {}),
            )
            for k in range(len(a))
        ]
    if {"vx", "vy", "epsilon"} <= arrays.keys():
        vx = _as_stack(arrays["vx"], "vx", path)
        vy = _as_stack(arrays["vy"], "vy", path)
        _same_count(path, "vx", len(vx), "vy", len(vy))
        eps = _numeric(arrays["epsilon"], "epsilon", path)
        if eps.ndim > 1:
            raise DataFormatError(
                f"{path}: array 'epsilon' has shape {eps.shape}; expected one value "
                "per instance (N,) or a single value"
            )
        if eps.ndim == 1 and len(eps) != 1:
            _same_count(path, "vx", len(vx), "epsilon", len(eps))
        eps = np.broadcast_to(eps.astype(np.float64), (len(vx),))
        return [
            Instance(
                f"{stem}-{k}",
                "convection-diffusion",
                {"vx": vx[k], "vy": vy[k]},
                {"epsilon": float(eps[k])},
            )
            for k in range(len(vx))
        ]
    raise DataFormatError(
        f"{path} holds arrays {sorted(arrays)}; expected 'x' (FNO benchmark mask), "
        "'a' (Darcy coefficients, optional 'f'), or 'vx', 'vy', 'epsilon' "
        "(convection-diffusion)"
    )

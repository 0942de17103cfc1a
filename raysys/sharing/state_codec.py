"""Turn a workload's ``state_dict()`` into JSON plus safetensors, and back.

A checkpoint never holds a pickle: tensors (torch or numpy) go into one
safetensors blob, everything else into a JSON tree in which each tensor is a
reference to its key in that blob. JSON cannot say everything Python state
holds, so a few values are wrapped in an object carrying the reserved key
``"__raysys__"``:

- ``{"__raysys__": "tensor", "key": "t3", "kind": "torch"|"numpy"}``;
- ``{"__raysys__": "tuple", "items": [...]}``;
- ``{"__raysys__": "dict", "items": [[key, value], ...]}`` for dicts whose keys
  are not all strings (a torch optimizer's ``state`` is keyed by ints), or that
  use the reserved key themselves;
- ``{"__raysys__": "float", "value": "nan"|"inf"|"-inf"}``;
- ``{"__raysys__": "bytes", "hex": "..."}``.

Decoding reverses exactly these forms, so ``decode(encode(s)) == s`` for every
state made of None, bools, ints, floats, strings, bytes, lists, tuples, dicts
and tensors. Anything else is refused with the path of the offending value.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from raysys.runtime.errors import RaysysError

TAG = "__raysys__"


class StateEncodingError(RaysysError, TypeError):
    """A state holds a value the checkpoint format cannot store."""


# numpy dtypes safetensors stores (`safetensors.numpy`); others are refused with
# the value's path instead of failing inside safetensors without one.
NUMPY_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
)


# torch dtypes safetensors stores (its format's dtype list; the float8 kinds
# only exist in recent torch builds, hence looked up by name).
TORCH_DTYPES = (
    *NUMPY_DTYPES,
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
)


def _check_torch_tensor(value: Any, path: str) -> None:
    torch = _torch_if_loaded()
    if value.layout != torch.strided:
        raise StateEncodingError(
            f"state{path} is a {value.layout} torch tensor; store it dense "
            "(tensor.to_dense())"
        )
    supported = {getattr(torch, name, None) for name in TORCH_DTYPES}
    if value.dtype not in supported:
        raise StateEncodingError(
            f"state{path} is a torch tensor of dtype {value.dtype}, which "
            "safetensors cannot store; convert it (for example to a real dtype)"
        )


def _is_torch_tensor(value: Any) -> bool:
    torch = _torch_if_loaded()
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_if_loaded():
    import sys

    return sys.modules.get("torch")


def encode_state(state: Any) -> tuple[Any, dict[str, Any]]:
    """Split ``state`` into a JSON-ready tree and a dict of named tensors.

    Returns:
        ``(tree, tensors)``: ``tree`` holds only JSON types; ``tensors`` maps
        keys (``t0``, ``t1``, ...) to CPU torch tensors or numpy arrays.

    Raises:
        StateEncodingError: a value has a type the format cannot store; the
            message gives its path inside the state.
    """
    tensors: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):  # numpy's float64 is a float too
            if math.isfinite(value):
                return float(value)
            # repr of a plain float ("nan", "inf", "-inf"): numpy's own repr
            # ("np.float64(nan)") would not parse back.
            return {TAG: "float", "value": repr(float(value))}
        if isinstance(value, np.generic):
            return walk(value.item(), path)
        if isinstance(value, bytes):
            return {TAG: "bytes", "hex": value.hex()}
        if _is_torch_tensor(value):
            _check_torch_tensor(value, path)
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {TAG: "tensor", "key": key, "kind": "torch"}
        if isinstance(value, np.ndarray):
            dtype = value.dtype
            if dtype.kind == "O":
                raise StateEncodingError(
                    f"state{path} is a numpy array of Python objects; store a "
                    "numeric array instead"
                )
            if dtype.name not in NUMPY_DTYPES:
                raise StateEncodingError(
                    f"state{path} is a numpy array of dtype {dtype}, which "
                    f"safetensors cannot store; use one of {', '.join(NUMPY_DTYPES)}"
                )
            key = f"t{len(tensors)}"
            # np.array, not np.ascontiguousarray: the latter turns a 0-d array
            # into shape (1,). Native byte order, as safetensors and torch expect.
            tensors[key] = np.array(value, dtype=dtype.newbyteorder("="), order="C")
            return {TAG: "tensor", "key": key, "kind": "numpy"}
        if isinstance(value, tuple):
            items = [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
            return {TAG: "tuple", "items": items}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            plain = all(isinstance(k, str) for k in value) and TAG not in value
            if plain:
                return {k: walk(v, f"{path}[{k!r}]") for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, bool | int | float | str)):
                    raise StateEncodingError(
                        f"state{path} has a key of type {type(k).__name__}; "
                        "dict keys must be str, int, float, bool or None"
                    )
                items.append([walk(k, path), walk(v, f"{path}[{k!r}]")])
            return {TAG: "dict", "items": items}
        raise StateEncodingError(
            f"state{path} is a {type(value).__module__}.{type(value).__name__}; "
            "checkpoint state may hold only tensors, numpy arrays, numbers, "
            "strings, bytes, None, lists, tuples and dicts"
        )

    return walk(state, ""), tensors


def decode_state(tree: Any, tensors: dict[str, Any]) -> Any:
    """Rebuild the state `encode_state` split, taking tensors from ``tensors``.

    Raises:
        StateEncodingError: the tree refers to a tensor that is missing, or
            holds an unknown tagged form.
    """

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        tag = value.get(TAG)
        if tag is None:
            return {k: walk(v) for k, v in value.items()}
        if tag == "tensor":
            key = value["key"]
            if key not in tensors:
                raise StateEncodingError(f"checkpoint refers to missing tensor {key}")
            tensor = tensors[key]
            if value.get("kind") == "numpy" and not isinstance(tensor, np.ndarray):
                return tensor.numpy()
            if value.get("kind") == "torch" and isinstance(tensor, np.ndarray):
                import torch

                return torch.from_numpy(tensor)
            return tensor
        if tag == "tuple":
            return tuple(walk(v) for v in value["items"])
        if tag == "dict":
            return {walk(k): walk(v) for k, v in value["items"]}
        if tag == "float":
            return _float(value["value"])
        if tag == "bytes":
            return bytes.fromhex(value["hex"])
        raise StateEncodingError(f"unknown tagged value {tag!r} in checkpoint")

    return walk(tree)


# Written by earlier versions for numpy floats: "np.float64(nan)".
_NUMPY_FLOAT_REPR = re.compile(r"np\.float\d*\((.*)\)")


def _float(text: str) -> float:
    match = _NUMPY_FLOAT_REPR.fullmatch(text)
    return float(match[1] if match else text)


def tensors_to_bytes(tensors: dict[str, Any]) -> tuple[bytes, str]:
    """Serialise tensors with safetensors; returns ``(blob, flavour)``.

    The flavour is ``"torch"`` when any tensor is a torch tensor (numpy arrays
    are then stored through torch too) and ``"numpy"`` otherwise, so a state
    without torch tensors never imports torch.
    """
    if any(_is_torch_tensor(t) for t in tensors.values()):
        import torch
        from safetensors.torch import save

        as_torch = {
            k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
            for k, v in tensors.items()
        }
        return save(as_torch), "torch"
    from safetensors.numpy import save

    return save(tensors), "numpy"


def tensors_from_bytes(blob: bytes, flavour: str) -> dict[str, Any]:
    """Read a safetensors blob written by `tensors_to_bytes`.

    Raises:
        ValueError: the blob is not safetensors (safetensors' own error, which
            is no ValueError, is turned into one naming the cause).
    """
    from safetensors import SafetensorError

    if flavour == "torch":
        from safetensors.torch import load
    else:
        from safetensors.numpy import load
    try:
        return load(blob)
    except SafetensorError as e:
        raise ValueError(f"not a safetensors file ({e})") from e

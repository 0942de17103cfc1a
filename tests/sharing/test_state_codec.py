"""States round-trip through JSON + safetensors exactly; odd values are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysys.sharing.state_codec import (
    TAG,
    StateEncodingError,
    decode_state,
    encode_state,
    tensors_from_bytes,
    tensors_to_bytes,
)


def roundtrip(state):
    tree, tensors = encode_state(state)
    blob, flavour = tensors_to_bytes(tensors)
    import json

    tree = json.loads(json.dumps(tree, allow_nan=False))
    return decode_state(tree, tensors_from_bytes(blob, flavour))


def test_torch_optimizer_state_roundtrips():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "k": 7}
    back = roundtrip(state)
    assert back["k"] == 7
    for key, value in state["model"].items():
        assert torch.equal(back["model"][key], value)
    # int-keyed per-parameter state and tuple betas survive
    assert set(back["opt"]["state"]) == {0, 1}
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    fresh = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    fresh.load_state_dict(back["opt"])


def test_plain_values_roundtrip_without_torch_tensors():
    state = {
        "f": 1.5,
        "nan": float("nan"),
        "inf": float("-inf"),
        "t": (1, "a", None),
        "b": b"\x00\xff",
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
        "nested": [{"x": True}],
        TAG: "user key that looks like ours",
        "np_scalar": np.float32(2.5),
    }
    tree, tensors = encode_state(state)
    _, flavour = tensors_to_bytes(tensors)
    assert flavour == "numpy"
    back = roundtrip(state)
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert back["t"] == (1, "a", None) and back["b"] == b"\x00\xff"
    assert back["arr"].dtype == np.int16 and np.array_equal(back["arr"], state["arr"])
    assert back[TAG] == state[TAG] and back["nested"] == [{"x": True}]
    assert back["np_scalar"] == 2.5


def test_mixed_numpy_and_torch_keep_their_kinds():
    back = roundtrip({"a": np.ones(3), "b": torch.zeros(2)})
    assert isinstance(back["a"], np.ndarray) and isinstance(back["b"], torch.Tensor)


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"fn": print}, "['fn']"),
        ({"x": [1, {2, 3}]}, "['x'][1]"),
        ({"obj": np.array([object()])}, "['obj']"),
        ({(1, 2): 3}, "tuple"),
    ],
)
def test_unstorable_values_are_refused_with_their_path(bad, where):
    with pytest.raises(StateEncodingError) as err:
        encode_state(bad)
    assert where in str(err.value)


@pytest.mark.parametrize("value", [np.float64("nan"), np.float64("inf"), -np.inf])
def test_non_finite_numpy_floats_roundtrip(value):
    back = roundtrip({"loss": value, "history": [value, 1.0]})
    assert math.isnan(back["loss"]) if math.isnan(value) else back["loss"] == value
    assert back["history"][1] == 1.0
    assert type(back["loss"]) is float


def test_numpy_float_written_by_earlier_versions_still_decodes():
    # An earlier encoder wrote numpy's repr; such committed states stay readable.
    tree = {"x": {TAG: "float", "value": "np.float64(-inf)"}}
    assert decode_state(tree, {}) == {"x": -math.inf}


@pytest.mark.parametrize("torch_too", [False, True])
def test_numpy_arrays_keep_shape_and_values_whatever_their_layout(torch_too):
    state = {
        "scalar": np.array(7.5),  # 0-d
        "big_endian": np.array([1.5, -2.25], dtype=">f4"),
        "strided": np.arange(12, dtype=np.int64).reshape(3, 4)[:, 1],
    }
    if torch_too:
        state["t"] = torch.arange(3)
    back = roundtrip(state)
    assert back["scalar"].shape == () and back["scalar"] == 7.5
    assert back["big_endian"].tolist() == [1.5, -2.25]
    assert back["strided"].tolist() == [1, 5, 9]


@pytest.mark.parametrize(
    "bad, what",
    [
        (np.zeros(2, dtype=np.complex128), "dtype complex128"),
        (np.array(["ab"]), "dtype <U2"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "dtype datetime64[D]"),
        (torch.zeros(2, dtype=torch.complex128), "dtype torch.complex128"),
        (torch.zeros(3).to_sparse(), "to_dense"),
    ],
)
def test_tensors_safetensors_cannot_store_are_refused_with_their_path(bad, what):
    with pytest.raises(StateEncodingError) as err:
        encode_state({"opt": [1, bad]})
    assert "state['opt'][1]" in str(err.value) and what in str(err.value)

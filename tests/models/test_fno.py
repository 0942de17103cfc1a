import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from raysys.models.fno import CONFIG_FILE, FNO, WEIGHTS_FILE, FNOConfig
from raysys.solvers.datasets import sample_instances
from raysys.solvers.training import (
    TrainSettings,
    build_model,
    evaluate,
    stack_pairs,
    train_operator,
)


def small_config(**kw):
    return FNOConfig(
        in_channels=1, modes=4, width=8, num_layers=2, projection_channels=16, **kw
    )


@pytest.fixture(scope="module")
def trained_16():
    """A small operator trained on 16x16 Darcy instances, with held-out data."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = stack_pairs(sample_instances("darcy", 16, 0, range(96), True))
    model = build_model(
        FNOConfig(in_channels=1, modes=6, width=12, num_layers=3), *train
    )
    settings = TrainSettings(epochs=25, batch_size=8, learning_rate=5e-3, loss="l2")
    train_operator(model, train, None, "darcy", settings)
    return model


def test_safetensors_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(1)
    model = FNO(small_config(metadata={"family": "darcy"})).eval()
    model.set_normalisation(torch.rand(4, 1, 8, 8) * 9 + 3, torch.rand(4, 1, 8, 8))
    x = torch.rand(3, 1, 20, 20) * 9 + 3
    model.save(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["metadata"] == {
        "family": "darcy"
    }
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
    assert {"in_mean", "in_std", "out_mean", "out_std"} <= names

    loaded = FNO.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert torch.equal(loaded.out_std, model.out_std)

    config_json, weights = model.to_bytes()
    again = FNO.from_bytes(config_json, weights)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_half_precision_storage_loads_as_float32(tmp_path):
    torch.manual_seed(2)
    model = FNO(small_config()).eval()
    model.save(tmp_path, dtype=torch.float16)
    loaded = FNO.load(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=2e-2, atol=2e-3)


def test_missing_or_mismatched_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        FNO.load(tmp_path)
    FNO(small_config()).save(tmp_path)
    bigger = small_config().model_dump() | {"width": 9}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(bigger))
    with pytest.raises(ValueError, match="do not match"):
        FNO.load(tmp_path)


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="channels"):
        FNO(small_config())(torch.rand(1, 2, 8, 8))


@pytest.mark.parametrize("n", [6, 16, 33])
def test_any_grid_size_gives_an_output_of_that_size(n):
    model = FNO(small_config()).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 1, n, n))
    assert y.shape == (2, 1, n, n)
    assert torch.isfinite(y).all()


def test_a_model_trained_at_16_predicts_at_32_and_24(trained_16):
    errors = {}
    for n in (16, 24, 32):
        test = stack_pairs(sample_instances("darcy", n, 1, range(16), True))
        errors[n] = evaluate(trained_16, *test, "darcy")["l2"]
    # the zero guess has relative error 1; the operator stays accurate off its grid
    assert errors[16] < 0.2
    assert errors[24] < 2 * errors[16] + 0.05
    assert errors[32] < 2 * errors[16] + 0.05


def test_normalisation_is_part_of_the_model():
    torch.manual_seed(3)
    x = torch.rand(8, 1, 10, 10) * 9 + 3
    y = torch.rand(8, 1, 10, 10) * 0.01
    model = build_model(small_config(), x, y)
    np.testing.assert_allclose(model.in_mean.numpy(), [float(x.mean())], rtol=1e-5)
    np.testing.assert_allclose(model.out_std.numpy(), [float(y.std())], rtol=1e-5)

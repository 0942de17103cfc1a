"""Files a user or tenant could have written are never unpickled.

A pickle runs code of its author's choosing when it is loaded. These tests
plant pickles where model weights belong, each carrying a payload that would
create a marker file if it ever ran, and check that the loaders refuse them and
the payload never runs. A scan of the source keeps unpickling calls out of the
project.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
from safetensors import SafetensorError

from raysys.models.hf import Checkpoint, UnsafeCheckpointError, load_model
from raysys.models.llama import LlamaConfig
from raysys.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

TINY_LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


class Payload:
    """Unpickling this creates ``marker``: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(folder: Path, name: str, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA.to_hf()))
    path = folder / name
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    return path


def test_the_payload_does_run_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # the danger these tests guard against
    assert marker.exists()


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "w.pkl"]
)
def test_pickle_weights_in_a_model_folder_are_refused(tmp_path, name):
    marker = tmp_path / "ran"
    plant(tmp_path / "model", name, marker)
    with pytest.raises(UnsafeCheckpointError, match="unpickling can run arbitrary"):
        load_model(tmp_path / "model")
    assert not marker.exists()


def test_pickle_weights_named_directly_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = plant(tmp_path / "model", "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError):
        Checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00001.bin"])
def test_a_pickle_disguised_as_safetensors_fails_without_running(tmp_path, name):
    marker = tmp_path / "ran"
    folder = tmp_path / "model"
    plant(folder, name, marker)
    if name.endswith(".bin"):  # a sharded index that points at a pickle shard
        index = {"weight_map": {"model.embed_tokens.weight": name}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ConfigError, SafetensorError)):
        load_model(folder)
    assert not marker.exists()


# ---- checkpoints and data files ------------------------------------------------


@pytest.mark.parametrize("planted", ["tensors.safetensors", "state.json"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_without_running(
    tmp_path, planted, caplog
):
    """A pickle in place of a checkpoint file, with a manifest and commit marker
    rewritten to match it (all a tenant with write access to its namespace could
    do), is refused as unreadable; the reader falls back to the older one."""
    import hashlib
    import logging

    import numpy as np

    from raysys.sharing.store import CheckpointError, CheckpointStore

    marker = tmp_path / "ran"
    alice = CheckpointStore(str(tmp_path / "ckpt")).tenant("alice")
    for step in (10, 20):
        alice.save("train", step, {"step": step, "w": np.full(3, step, np.float32)})
    cdir = tmp_path / "ckpt/alice/train/ckpt-000000000020-0000"
    blob = pickle.dumps({"w": Payload(marker)})
    (cdir / planted).write_bytes(blob)
    manifest = json.loads((cdir / "MANIFEST.json").read_text())
    manifest["files"][planted] = {
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size_bytes": len(blob),
    }
    manifest_bytes = json.dumps(manifest).encode()
    (cdir / "MANIFEST.json").write_bytes(manifest_bytes)
    (cdir / "COMMITTED").write_text(
        json.dumps({"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()})
    )
    with pytest.raises(CheckpointError, match="unreadable"):
        alice.load("train", "ckpt-000000000020-0000")
    with caplog.at_level(logging.WARNING, logger="raysys.sharing.store"):
        latest = alice.latest("train")
    assert latest.step == 10 and latest.state["step"] == 10
    assert "ckpt-000000000020-0000 is unreadable" in caplog.text
    assert not marker.exists()


def test_a_pickled_pde_data_file_is_refused_without_running(tmp_path):
    import numpy as np
    import torch

    from raysys.solvers.datasets import load_instances
    from raysys.solvers.errors import DataFormatError

    marker = tmp_path / "ran"
    path = tmp_path / "darcy.pt"
    torch.save({"x": torch.zeros(2, 4, 4), "hook": Payload(marker)}, path)
    with pytest.raises(DataFormatError, match="weights_only=True"):
        load_instances(path)
    assert not marker.exists()
    fake = tmp_path / "darcy.npz"
    fake.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(DataFormatError):
        load_instances(fake)
    np.savez(tmp_path / "objects.npz", x=np.array([Payload(marker)], dtype=object))
    with pytest.raises(DataFormatError):
        load_instances(tmp_path / "objects.npz")
    assert not marker.exists()


# ---- no unpickling calls in the project ------------------------------------------

# Calls that unpickle whatever the file holds.
UNPICKLING = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_calls(source: str) -> list[str]:
    """Unpickling calls in ``source``: pickle-family loads, ``torch.load`` without
    ``weights_only=True``, ``numpy.load`` with ``allow_pickle=True`` and
    ``yaml.load`` without a safe loader."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not isinstance(owner, ast.Name):
            continue
        call = (owner.id, node.func.attr)
        line = f"line {node.lineno}: {owner.id}.{node.func.attr}"
        if call in UNPICKLING:
            found.append(line)
        elif call == ("torch", "load") and _keyword(node, "weights_only") is not True:
            found.append(line + " without weights_only=True")
        elif call in (("np", "load"), ("numpy", "load")) and _keyword(
            node, "allow_pickle"
        ):
            found.append(line + " with allow_pickle=True")
        elif call == ("yaml", "load") and not any(
            kw.arg == "Loader"
            and isinstance(kw.value, ast.Attribute)
            and kw.value.attr in ("SafeLoader", "CSafeLoader")
            for kw in node.keywords
        ):
            found.append(line + " without a safe loader")
    return found


def test_the_scan_finds_each_kind_of_unpickling():
    source = "\n".join(
        [
            "pickle.loads(b)",
            "torch.load(f)",
            "torch.load(f, weights_only=False)",
            "np.load(f, allow_pickle=True)",
            "yaml.load(text)",
            "torch.load(f, weights_only=True)",  # allowed
            "np.load(f)",  # allowed
            "yaml.load(text, Loader=yaml.SafeLoader)",  # allowed
        ]
    )
    assert len(unsafe_calls(source)) == 5


def test_project_code_never_unpickles():
    offenders = []
    for folder in ("raysys", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            offenders += [
                f"{path.relative_to(ROOT)} {c}" for c in unsafe_calls(path.read_text())
            ]
    assert offenders == []

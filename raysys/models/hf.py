"""Hugging Face checkpoints: ``config.json`` + ``*.safetensors``, read and written.

A checkpoint folder holds ``config.json`` and either one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Parameter names are the HF names
(``model.layers.0.self_attn.q_proj.weight``; Mixtral experts as
``model.layers.0.block_sparse_moe.experts.3.w1.weight``). Pickle-based weights
(``.bin``, ``.pt``, ...) are refused and never opened: unpickling runs code the
file's author chose.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from raysys.models.llama import Llama, LlamaConfig, Transformer, _read_hf_config
from raysys.models.mixtral import ExpertStore, ExpertWeights, Mixtral, MixtralConfig
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeCheckpointError(ConfigError):
    """The checkpoint is stored in a pickle-based format, which is never loaded."""


def read_config(path: str | Path) -> LlamaConfig | MixtralConfig:
    """The config of a checkpoint folder (or ``config.json``), by its ``model_type``.

    Raises:
        ConfigError: missing file, unknown ``model_type`` or unsupported option.
    """
    data, where = _read_hf_config(path)
    model_type = data.get("model_type")
    if model_type in ("llama", "mistral"):
        return LlamaConfig.from_hf(data)
    if model_type == "mixtral":
        return MixtralConfig.from_hf(data)
    raise ConfigError(
        f"{where}: model_type {model_type!r} is not supported; "
        "supported are 'llama', 'mistral' and 'mixtral'"
    )


def build_model(
    config: LlamaConfig | MixtralConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    resident_experts: bool = True,
) -> Transformer:
    """An uninitialised model of ``config``'s architecture."""
    if isinstance(config, MixtralConfig):
        return Mixtral(
            config, device=device, dtype=dtype, resident_experts=resident_experts
        )
    return Llama(config, device=device, dtype=dtype)


# --------------------------------------------------------------------------- names


def to_hf_name(name: str, config: LlamaConfig) -> str:
    """HF parameter name of one of this package's parameter names."""
    if name.startswith("lm_head."):
        return name
    if isinstance(config, MixtralConfig):
        name = name.replace(".mlp.", ".block_sparse_moe.", 1)
    return "model." + name


def from_hf_name(name: str, config: LlamaConfig) -> str:
    """This package's parameter name of a HF parameter name."""
    if name.startswith("lm_head."):
        return name
    name = name.removeprefix("model.")
    if isinstance(config, MixtralConfig):
        name = name.replace(".block_sparse_moe.", ".mlp.", 1)
    return name


_EXPERT_NAME = re.compile(r"\.block_sparse_moe\.experts\.\d+\.")


# --------------------------------------------------------------------------- reading


def _refuse_pickle(paths: Iterable[Path]) -> None:
    unsafe = sorted(p.name for p in paths if p.name.endswith(PICKLE_SUFFIXES))
    if unsafe or any(p.name == "pytorch_model.bin.index.json" for p in paths):
        raise UnsafeCheckpointError(
            f"refusing to load pickle-based weights {unsafe or ['pytorch_model.bin.index.json']}: "
            "unpickling can run arbitrary code. Convert the checkpoint to safetensors "
            "in a trusted environment (e.g. transformers "
            "`model.save_pretrained(dir, safe_serialization=True)`) and load that"
        )


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or every shard).

    Raises:
        UnsafeCheckpointError: the path is, or the folder only holds, pickle weights.
        ConfigError: no safetensors weights are found or the index is broken.
    """
    path = Path(path)
    if path.is_file():
        _refuse_pickle([path])
        if path.suffix != ".safetensors":
            raise ConfigError(f"{path} is not a .safetensors file or checkpoint folder")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"checkpoint folder {str(path)!r} does not exist")
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(
                f"{path / INDEX_FILE} is not a safetensors index: {e}"
            ) from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{path / INDEX_FILE} lists missing shards {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    _refuse_pickle(list(path.iterdir()))
    raise ConfigError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; save the weights with "
        "`save_pretrained(dir, safe_serialization=True)` or `save_model`"
    )


class Checkpoint:
    """Lazy access to a checkpoint's tensors by HF name (only what is read is loaded).

    Expert hosts use `read_expert` to load just their own experts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        folder = self.path if self.path.is_dir() else self.path.parent
        self.files = checkpoint_files(self.path)
        self.config = read_config(folder)
        self._where: dict[str, Path] = {}
        for file in self.files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._where[name] = file

    def names(self) -> list[str]:
        """HF names of every stored tensor."""
        return sorted(self._where)

    def get(self, name: str) -> Tensor:
        """One tensor (on CPU, in its stored dtype)."""
        return self.read([name])[name]

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """Several tensors by HF name (on CPU, stored dtype), each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise KeyError(f"{self.path} holds no tensor {name!r}")
            by_file.setdefault(self._where[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors

    def read_expert(self, layer_idx: int, expert_id: int) -> ExpertWeights:
        """One Mixtral expert's weights (on CPU, stored dtype)."""
        prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts.{expert_id}."
        names = [f"{prefix}{w}.weight" for w in ("w1", "w2", "w3")]
        tensors = self.read(names)
        return ExpertWeights(*(tensors[name] for name in names))


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    resident_experts: bool = True,
) -> Llama | Mixtral:
    """Load a HF Llama/Mistral/Mixtral checkpoint folder.

    Args:
        path: folder with ``config.json`` and safetensors weights.
        device: where the weights go.
        dtype: weight dtype; default the config's ``torch_dtype``, else float32.
        resident_experts: Mixtral only; False skips the expert weights (they are
            served by an `raysys.models.mixtral.ExpertSource` set afterwards).

    Raises:
        UnsafeCheckpointError: the weights are pickle-based.
        ConfigError: missing files, unsupported config, or tensor names/shapes
            that do not match the architecture.
    """
    checkpoint = Checkpoint(path)
    config = checkpoint.config
    dtype = dtype or config.torch_dtype or torch.float32
    with torch.device("meta"):
        model = build_model(config, dtype=dtype, resident_experts=resident_experts)
    expected = {to_hf_name(name, config) for name in model.state_dict()}

    stored = set(checkpoint.names())
    if config.tie_word_embeddings:
        stored.discard("lm_head.weight")  # some tied checkpoints store it twice
    if not resident_experts:
        stored = {name for name in stored if not _EXPERT_NAME.search(name)}
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{path}: weights do not match the {config.model_type} config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    state = {
        from_hf_name(name, config): tensor.to(device=device, dtype=dtype)
        for name, tensor in checkpoint.read(expected).items()
    }
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: tensor shapes do not match the config: {e}") from e
    model.eval()
    logger.info(
        "loaded %s (%d layers, %.1f M parameters) from %s on %s as %s",
        config.model_type,
        config.num_hidden_layers,
        sum(t.numel() for t in state.values()) / 1e6,
        path,
        device,
        dtype,
    )
    return model


def load_expert_store(
    path: str | Path,
    experts: Iterable[tuple[int, int]] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> ExpertStore:
    """An `ExpertStore` of a Mixtral checkpoint's experts (a host's shard of them).

    Args:
        path: the checkpoint folder.
        experts: ``(layer_idx, expert_id)`` pairs to load; None loads all.
        device, dtype: where and as what to keep them (default: stored dtype).
    """
    checkpoint = Checkpoint(path)
    config = checkpoint.config
    if not isinstance(config, MixtralConfig):
        raise ConfigError(f"{path} is a {config.model_type} checkpoint, not mixtral")
    if experts is None:
        experts = [
            (layer, e)
            for layer in range(config.num_hidden_layers)
            for e in range(config.num_local_experts)
        ]
    return ExpertStore(
        {key: checkpoint.read_expert(*key).to(device, dtype) for key in experts}
    )


# --------------------------------------------------------------------------- writing


def save_model(
    model: Transformer, path: str | Path, *, max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json`` and safetensors weights with HF names.

    Args:
        model: a `Llama` or `Mixtral` (with resident experts).
        path: folder to write (created if needed).
        max_shard_bytes: split the weights into shards of at most this size
            (a single tensor larger than it gets a shard of its own), with
            ``model.safetensors.index.json``; None writes one ``model.safetensors``.

    Returns:
        The folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if isinstance(model, Mixtral) and not model.has_resident_experts:
        raise ValueError("cannot save a Mixtral without resident experts")
    hf_config = config.model_copy(update={"dtype": _dtype_name(model.dtype)}).to_hf()
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    tensors = {
        to_hf_name(name, config): t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
    }
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, path / SINGLE_FILE, metadata=metadata)
        return path
    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes = 0
    for name in sorted(tensors):
        size = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensors[name]
        shard_bytes += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "float32",
        torch.bfloat16: "bfloat16",
        torch.float16: "float16",
    }[dtype]


def save_random_model(
    config: LlamaConfig | MixtralConfig,
    path: str | Path,
    *,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    **save_kwargs: Any,
) -> Llama | Mixtral:
    """Build a randomly initialised model of ``config``, save it in HF format, return it."""
    model = build_model(config, dtype=dtype)
    model.init_weights(std=std, seed=seed)
    model.eval()
    save_model(model, path, **save_kwargs)
    return model

"""The checkpoint store the expert hosts load from: single experts, ranged reads.

Expert weights live in a Hugging Face Mixtral checkpoint (``config.json`` plus
``model.safetensors`` or index-listed shards) at a local folder or any
`pyarrow.fs` URI (``file:///...``, ``s3://bucket/...``, ``hdfs://...``). A
safetensors file is an 8-byte little-endian header length, a JSON header
mapping each tensor name to its dtype, shape and byte range, then the raw data;
so a host reads the header once and then exactly the bytes of the experts it
owns, never the whole file and never anything pickled.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from raysys.models.hf import INDEX_FILE, SINGLE_FILE
from raysys.models.mixtral import ExpertWeights, MixtralConfig
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Larger headers are refused: a corrupt length must not make us read gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def open_filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a `pyarrow.fs` URI.

    Raises:
        ConfigError: the URI's scheme is unknown to pyarrow.
    """
    text = str(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise ConfigError(
            f"cannot open expert store {text!r}: {e}; give a local folder or a "
            "pyarrow filesystem URI such as file:///abs/path or s3://bucket/path"
        ) from e


class ExpertCheckpointStore:
    """Read single Mixtral experts from a checkpoint at a path or `pyarrow.fs` URI.

    Raises:
        ConfigError: no checkpoint there, not a Mixtral, or a broken header.
    """

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.fs, self.root = open_filesystem(uri)
        self.config = self._read_config()
        self.locations: dict[str, TensorLocation] = {}
        for file in self._files():
            self.locations.update(self._read_header(file))
        self._check_experts()

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_file(path) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise ConfigError(
                f"expert store {self.uri!r}: cannot read {path}: {e}"
            ) from e

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _read_config(self) -> MixtralConfig:
        path = f"{self.root}/config.json"
        if not self._exists(path):
            raise ConfigError(
                f"expert store {self.uri!r} holds no config.json; point it at a "
                "Mixtral checkpoint folder"
            )
        try:
            data = json.loads(self._read(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"expert store {self.uri!r}: config.json is not valid JSON: {e}"
            ) from e
        if not isinstance(data, dict):
            raise ConfigError(
                f"expert store {self.uri!r}: config.json holds a "
                f"{type(data).__name__}, not a JSON object"
            )
        if data.get("model_type") != "mixtral":
            raise ConfigError(
                f"expert store {self.uri!r} holds a {data.get('model_type')!r} "
                "checkpoint; expert hosts need a Mixtral (mixture-of-experts) one"
            )
        return MixtralConfig.from_hf(data)

    def _files(self) -> list[str]:
        index = f"{self.root}/{INDEX_FILE}"
        if self._exists(index):
            try:
                weight_map = json.loads(self._read(index))["weight_map"]
                names = set(weight_map.values())
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"expert store {self.uri!r}: {INDEX_FILE} is not a safetensors "
                    f"index ({type(e).__name__}: {e})"
                ) from e
            return [f"{self.root}/{name}" for name in sorted(names)]
        single = f"{self.root}/{SINGLE_FILE}"
        if self._exists(single):
            return [single]
        raise ConfigError(
            f"expert store {self.uri!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}"
        )

    def _read_header(self, path: str) -> dict[str, TensorLocation]:
        try:
            with self.fs.open_input_file(path) as f:
                size = f.size()
                if size < 8:
                    raise ConfigError(
                        f"{path}: {size} bytes, too short for a safetensors file"
                    )
                (length,) = struct.unpack("<Q", f.read_at(8, 0))
                if length > MAX_HEADER_BYTES or 8 + length > size:
                    raise ConfigError(
                        f"{path}: safetensors header of {length} bytes in a file of "
                        f"{size}; file is corrupt"
                    )
                header = json.loads(f.read_at(length, 8))
        except (FileNotFoundError, OSError) as e:
            raise ConfigError(
                f"expert store {self.uri!r}: cannot read {path}: {e}"
            ) from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{path}: safetensors header is not valid JSON ({e}); file is corrupt"
            ) from e
        data_start = 8 + length
        found = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise ConfigError(
                    f"{path}: tensor {name} has unsupported dtype {meta['dtype']}"
                )
            begin, end = meta["data_offsets"]
            found[name] = TensorLocation(
                path,
                SAFETENSORS_DTYPES[meta["dtype"]],
                tuple(meta["shape"]),
                data_start + begin,
                end - begin,
            )
            if data_start + end > size:
                raise ConfigError(
                    f"{path}: tensor {name} ends at byte {data_start + end}, beyond "
                    f"the file's {size}; file is truncated"
                )
        return found

    def _check_experts(self) -> None:
        """Every expert of the config is stored, with the config's shapes.

        Checked once from the headers (no weights read), so a broken store fails
        when it is opened rather than at the first fetch of a broken expert; a
        transposed matrix has the right byte count and would otherwise be
        served as a wrong expert.
        """
        c = self.config
        f, d = c.intermediate_size, c.hidden_size
        shapes = {"w1": (f, d), "w2": (d, f), "w3": (f, d)}
        for layer, expert in self.all_experts:
            for name in self.expert_names(layer, expert):
                loc = self.locations.get(name)
                if loc is None:
                    raise ConfigError(
                        f"expert store {self.uri!r} holds no tensor {name} (its "
                        f"config has {c.num_hidden_layers} layers x "
                        f"{c.num_local_experts} experts)"
                    )
                want = shapes[name.rsplit(".", 2)[-2]]
                if loc.shape != want:
                    raise ConfigError(
                        f"expert store {self.uri!r}: {name} has shape "
                        f"{list(loc.shape)}, the config needs {list(want)}"
                    )
                itemsize = torch.empty((), dtype=loc.dtype).element_size()
                if loc.nbytes != want[0] * want[1] * itemsize:
                    raise ConfigError(
                        f"expert store {self.uri!r}: {name} spans {loc.nbytes} "
                        f"bytes, not the {want[0] * want[1] * itemsize} of its "
                        "shape and dtype; file is corrupt"
                    )

    def expert_names(self, layer_idx: int, expert_id: int) -> list[str]:
        """HF names of one expert's three matrices (w1, w2, w3)."""
        prefix = f"model.layers.{layer_idx}.block_sparse_moe.experts.{expert_id}."
        return [f"{prefix}{w}.weight" for w in ("w1", "w2", "w3")]

    def read_expert(self, layer_idx: int, expert_id: int) -> ExpertWeights:
        """One expert's weights on CPU in the stored dtype (three ranged reads).

        Raises:
            KeyError: the checkpoint has no such expert.
        """
        tensors = []
        for name in self.expert_names(layer_idx, expert_id):
            if name not in self.locations:
                raise KeyError(f"expert store {self.uri!r} holds no tensor {name}")
            loc = self.locations[name]
            with self.fs.open_input_file(loc.file) as f:
                raw = bytearray(f.read_at(loc.nbytes, loc.offset))
            tensors.append(torch.frombuffer(raw, dtype=loc.dtype).reshape(loc.shape))
        return ExpertWeights(*tensors)

    @property
    def expert_nbytes(self) -> int:
        """Stored bytes of one expert (the bytes a fetch moves)."""
        return sum(self.locations[n].nbytes for n in self.expert_names(0, 0))

    @property
    def all_experts(self) -> list[tuple[int, int]]:
        """Every (layer, expert) key of the checkpoint."""
        c = self.config
        return [
            (layer, e)
            for layer in range(c.num_hidden_layers)
            for e in range(c.num_local_experts)
        ]

"""Fourier neural operator (Li et al., "Fourier Neural Operator for Parametric
Partial Differential Equations", ICLR 2021) for fields on a 2-D grid.

The operator maps C input fields to output fields on the same n x n grid and runs
at any n: its weights act on a fixed number of Fourier modes and on channels,
never on grid points, and the grid coordinates it appends are those of the
grid it is given. Input and output normalisation (one mean and standard
deviation per channel) are buffers of the model, so they are saved with it.

Saved as a directory: ``config.json`` (`FNOConfig`) and ``model.safetensors``
(weights and normalisation); loading reads JSON and safetensors only, never a
pickle.

Shape letters: B batch, C input channels, W width (hidden channels), H x V grid
(rows x columns), M1 x M2 retained Fourier modes, O output channels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class FNOConfig(BaseModel):
    """Architecture of a `FNO`, stored as ``config.json`` beside the weights."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = Field(ge=1, description="input fields per grid point")
    out_channels: int = Field(1, ge=1, description="output fields per grid point")
    modes: int = Field(12, ge=1, description="Fourier modes kept per direction")
    width: int = Field(32, ge=1, description="hidden channels of the Fourier layers")
    num_layers: int = Field(4, ge=1, description="Fourier layers")
    projection_channels: int = Field(
        64, ge=1, description="hidden channels of the output projection"
    )
    padding_fraction: float = Field(
        0.125,
        ge=0.0,
        le=1.0,
        description="zero padding on the high side of each axis, as a fraction of "
        "the grid size (the Fourier layers assume periodicity)",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="free-form facts about the model: PDE family, training grid, "
        "loss, errors",
    )


class SpectralConv2d(nn.Module):
    """Multiply the lowest M1 x M2 Fourier modes by learned complex matrices.

    Weights are stored as real tensors with a trailing (real, imaginary) axis,
    one block for non-negative and one for negative row frequencies, laid out
    mode-major so both blocks go through one batched matrix product. On a grid
    too small for all modes only the modes it has are used.
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int):
        super().__init__()
        self.modes = modes
        self.out_channels = out_channels
        scale = 1.0 / (in_channels * out_channels)
        shape = (2, modes, modes, in_channels, out_channels, 2)
        self.weight = nn.Parameter(scale * torch.rand(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, V = x.shape
        m1 = min(self.modes, H // 2)
        m2 = min(self.modes, V // 2 + 1)
        out_channels = self.out_channels
        x_ft = torch.fft.rfft2(x)  # (B, C, H, V//2+1)
        corners = torch.stack(
            [x_ft[:, :, :m1, :m2], x_ft[:, :, H - m1 :, :m2]]
        )  # (2, B, C, M1, M2)
        corners = corners.permute(0, 3, 4, 1, 2).reshape(2 * m1 * m2, B, C)
        w = torch.view_as_complex(self.weight[:, :m1, :m2].contiguous())
        w = w.reshape(2 * m1 * m2, C, out_channels)  # (2*M1*M2, C, O)
        mixed = torch.bmm(corners, w)  # (2*M1*M2, B, O)
        mixed = mixed.reshape(2, m1, m2, B, out_channels).permute(
            0, 3, 4, 1, 2
        )  # (2,B,O,M1,M2)
        out_ft = torch.zeros(
            B, out_channels, H, V // 2 + 1, dtype=x_ft.dtype, device=x.device
        )
        out_ft[:, :, :m1, :m2] = mixed[0]
        out_ft[:, :, H - m1 :, :m2] = mixed[1]
        return torch.fft.irfft2(out_ft, s=(H, V))  # (B, O, H, V)


class FNO(nn.Module):
    """Fourier neural operator on an n x n grid of the unit square's interior.

    Forward pass:

    1. normalise each input channel with the stored mean and deviation;
    2. append the node coordinates ``(j + 1) / (n + 1)``, ``(i + 1) / (n + 1)``;
    3. lift pointwise to W channels and zero-pad the high side of each axis;
    4. ``num_layers`` Fourier layers: spectral convolution plus a pointwise
       linear map, GELU between layers;
    5. crop the padding, project pointwise to the output channels;
    6. undo the output normalisation.
    """

    def __init__(self, config: FNOConfig):
        super().__init__()
        self.config = config
        c = config
        self.lift = nn.Conv2d(c.in_channels + 2, c.width, 1)
        self.spectral = nn.ModuleList(
            SpectralConv2d(c.width, c.width, c.modes) for _ in range(c.num_layers)
        )
        self.pointwise = nn.ModuleList(
            nn.Conv2d(c.width, c.width, 1) for _ in range(c.num_layers)
        )
        self.project = nn.Sequential(
            nn.Conv2d(c.width, c.projection_channels, 1),
            nn.GELU(),
            nn.Conv2d(c.projection_channels, c.out_channels, 1),
        )
        self.register_buffer("in_mean", torch.zeros(c.in_channels))
        self.register_buffer("in_std", torch.ones(c.in_channels))
        self.register_buffer("out_mean", torch.zeros(c.out_channels))
        self.register_buffer("out_std", torch.ones(c.out_channels))

    def set_normalisation(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
    ) -> None:
        """Per-channel mean and deviation from training fields (B, C, H, V)."""
        eps = 1e-12
        self.in_mean.copy_(inputs.mean(dim=(0, 2, 3)))
        self.in_std.copy_(inputs.std(dim=(0, 2, 3)).clamp_min(eps))
        self.out_mean.copy_(outputs.mean(dim=(0, 2, 3)))
        self.out_std.copy_(outputs.std(dim=(0, 2, 3)).clamp_min(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, V = x.shape
        if self.config.in_channels != C:
            raise ValueError(
                f"input has {C} channels, the model takes {self.config.in_channels}"
            )
        x = (x - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        x = torch.cat([x, grid_coordinates(B, H, V, x)], dim=1)  # (B, C+2, H, V)
        x = self.lift(x)  # (B, W, H, V)

        pad_h = math.ceil(self.config.padding_fraction * H)
        pad_v = math.ceil(self.config.padding_fraction * V)
        x = F.pad(x, (0, pad_v, 0, pad_h))  # (B, W, H+ph, V+pv)
        for k, (spectral, pointwise) in enumerate(
            zip(self.spectral, self.pointwise, strict=True)
        ):
            x = spectral(x) + pointwise(x)
            if k < len(self.spectral) - 1:
                x = F.gelu(x)
        x = x[:, :, :H, :V]  # (B, W, H, V)

        y = self.project(x)  # (B, O, H, V)
        return y * self.out_std[:, None, None] + self.out_mean[:, None, None]

    # -- saving and loading ------------------------------------------------

    def save(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        Args:
            dtype: storage type of the weights (float16 halves the size;
                loading converts back to float32).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))
        save_file(self._tensors(dtype), str(directory / WEIGHTS_FILE))
        return directory

    def to_bytes(self) -> tuple[str, bytes]:
        """The config as JSON and the weights as safetensors bytes."""
        return self.config.model_dump_json(), save_safetensors_bytes(
            self._tensors(torch.float32)
        )

    def _tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", dtype).contiguous()
            for k, v in self.state_dict().items()
        }

    @classmethod
    def from_bytes(cls, config_json: str, weights: bytes) -> FNO:
        """Rebuild a model from `to_bytes` output (JSON and safetensors only)."""
        return cls._from_parts(json.loads(config_json), load_safetensors_bytes(weights))

    @classmethod
    def load(cls, directory: str | Path) -> FNO:
        """Load a model saved by `save` (JSON and safetensors only, no pickle).

        Raises:
            FileNotFoundError: a file is missing; the message names it.
            ValueError: the weights do not match the config.
        """
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} is missing; a saved operator directory "
                    f"holds {CONFIG_FILE} and {WEIGHTS_FILE}"
                )
        config = json.loads((directory / CONFIG_FILE).read_text())
        return cls._from_parts(config, load_file(str(directory / WEIGHTS_FILE)))

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        model = cls(FNOConfig.model_validate(config))
        tensors = {k: v.float() for k, v in tensors.items()}
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights do not match the config: {e}") from e
        return model.eval()


def grid_coordinates(B: int, H: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, V) interior node coordinates x = (j+1)/(V+1), y = (i+1)/(H+1)."""
    ys = torch.arange(1, H + 1, dtype=like.dtype, device=like.device) / (H + 1)
    xs = torch.arange(1, V + 1, dtype=like.dtype, device=like.device) / (V + 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, V) each
    return torch.stack([gx, gy]).expand(B, 2, H, V)

"""image-normalize, written in Python: a Plinth processor for componentize-py.

The same contract, configuration and errors as the Rust plugin in
plugins/image-normalize, and the same numbers bit for bit: each selected
`u8` tensor of shape [H, W, C] or [N, H, W, C] becomes an `f32` tensor of
shape [N, C, H, W], each value `pixel * gain + offset` in single precision,
with `gain = scale / std[c]` and `offset = -mean[c] / std[c]`.

Configuration (as the Rust plugin):

- `mean`, `std`: per-channel values, comma-separated; one value applies to
  every channel. Defaults 0 and 1; no `std` may be 0.
- `scale`: applied to the raw pixel first. Default 1/255.
- `inputs`: comma-separated names of the tensors to convert, each required.
  Unset means every `u8` tensor of rank 3 or 4.

A u8 pixel has 256 values, so each channel's 256 results are computed once
per instance, in init; a call is then a table lookup per pixel, which is
what keeps a CPython guest within a few milliseconds for small images.
"""
import struct
from array import array

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """`x` rounded to single precision, as the Rust plugin computes."""
    return _F32.unpack(_F32.pack(x))[0]


def refuse(message: str) -> Err:
    return Err(types.PluginError_Unavailable(message))


def invalid(message: str) -> Err:
    return Err(types.PluginError_InvalidInput(message))


def parse_list(key: str, default: list) -> list:
    raw = host.config(key)
    if raw is None:
        return default
    values = []
    for item in raw.split(","):
        item = item.strip()
        try:
            value = f32(float(item))
        except ValueError:
            raise refuse(f"config key `{key}`: expected comma-separated numbers, got {raw!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise refuse(f"config key `{key}`: values must be finite, got {item}")
        values.append(value)
    if not values:
        raise refuse(f"config key `{key}`: needs at least one value")
    return values


class Config:
    """Read once per instance by init()."""

    inputs = None
    mean = [0.0]
    std = [1.0]
    scale = f32(1.0 / 255.0)
    # (channel count) -> per-channel 256-entry tables
    tables: dict = {}


def configure() -> None:
    raw = host.config("scale")
    if raw is not None:
        try:
            Config.scale = f32(float(raw))
        except ValueError:
            raise refuse(f"config key `scale`: expected a number, got {raw!r}")
    Config.mean = parse_list("mean", [0.0])
    Config.std = parse_list("std", [1.0])
    if 0.0 in Config.std:
        raise refuse("config key `std`: values must not be 0")
    if len(Config.mean) > 1 and len(Config.std) > 1 and len(Config.mean) != len(Config.std):
        raise refuse(
            f"config keys `mean` and `std` give {len(Config.mean)} and {len(Config.std)} channels"
        )
    raw = host.config("inputs")
    if raw is not None:
        Config.inputs = [name.strip() for name in raw.split(",") if name.strip()]


def tables(channels: int) -> list:
    """Each channel's 256 outputs, as packed little-endian f32."""
    if channels not in Config.tables:
        def pick(values: list, ch: int) -> float:
            return values[0] if len(values) == 1 else values[ch]

        per_channel = []
        for ch in range(channels):
            gain = f32(Config.scale / pick(Config.std, ch))
            offset = f32(-pick(Config.mean, ch) / pick(Config.std, ch))
            per_channel.append([_F32.pack(f32(f32(p * gain) + offset)) for p in range(256)])
        Config.tables[channels] = per_channel
    return Config.tables[channels]


def selects(tensor: types.Tensor) -> bool:
    if Config.inputs is not None:
        return tensor.name in Config.inputs
    return tensor.dtype == types.Dtype.U8 and len(tensor.shape) in (3, 4)


def normalize(tensor: types.Tensor) -> types.Tensor:
    if tensor.dtype != types.Dtype.U8:
        raise invalid(f"tensor `{tensor.name}`: expected dtype u8, got {tensor.dtype.name.lower()}")
    if len(tensor.shape) == 3:
        n, (h, w, c) = 1, tensor.shape
    elif len(tensor.shape) == 4:
        n, h, w, c = tensor.shape
    else:
        raise invalid(
            f"tensor `{tensor.name}`: expected rank 3 (HWC) or 4 (NHWC), got shape {list(tensor.shape)}"
        )
    for key, values in (("mean", Config.mean), ("std", Config.std)):
        if len(values) > 1 and len(values) != c:
            raise invalid(
                f"tensor `{tensor.name}`: shape {list(tensor.shape)} has {c} channels, "
                f"config `{key}` has {len(values)} values"
            )
    pixels = tensor.data
    if len(pixels) != n * h * w * c:
        raise invalid(
            f"tensor `{tensor.name}`: shape {list(tensor.shape)} needs {n * h * w * c} bytes, got {len(pixels)}"
        )
    lut = tables(c)
    image = h * w * c
    planes = []
    for i in range(n):
        for ch in range(c):
            # One channel's plane: every c-th byte of the image, in HW order.
            plane = pixels[i * image + ch:(i + 1) * image:c]
            planes.append(b"".join(map(lut[ch].__getitem__, plane)))
    return types.Tensor(tensor.name, types.Dtype.F32, [n, c, h, w], b"".join(planes))


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.PluginInfo:
        return types.PluginInfo(
            name="image-normalize-py",
            version="0.1.0",
            description="u8 HWC/NHWC images to normalised f32 NCHW (Python)",
        )

    def init(self) -> None:
        configure()


class Processor(exports.Processor):
    def preprocess(self, req: types.RequestInfo, inputs: list) -> list:
        if Config.inputs is not None:
            present = [t.name for t in inputs]
            for name in Config.inputs:
                if name not in present:
                    raise invalid(f"expected an image tensor `{name}`, got tensors {present}")
        return [normalize(t) if selects(t) else t for t in inputs]

    def postprocess(self, req: types.RequestInfo, outputs: list) -> list:
        return outputs

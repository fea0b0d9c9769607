#!/usr/bin/env python3
"""A ComfyUI simulator: ComfyUI 0.3.64's HTTP + WebSocket protocol on one port, for the gateway's tests.

It reproduces what ``shared/comfyui-protocol.md`` describes and ``shared/comfyui-transcripts/`` shows: message
shapes and their order, who receives what (including the same-clientId trap and the broadcasts of prompts
without ``client_id``), the 400 bodies of prompt validation, the priority queue, the history and ``/view``.
It imports nothing from the gateway (``actors``, ``web``): it is an independent reference, so it catches
their parser bugs instead of sharing them.

Simulated rather than computed:

- Nodes do no real work. Images are small solid-colour (optionally noisy) PNGs, at most
  ``SAVED_IMAGE_MAX_SIDE_PX`` on a side, kept in an in-memory file store that ``/view`` serves and
  ``/upload/image`` fills. Latent previews are ``PREVIEW_SIDE_PX`` PNGs (ComfyUI would send JPEGs).
- Time: ``KSampler``/``KSamplerAdvanced`` send one ``progress`` per sampling step, ``step_ms`` apart;
  ``SaveImageWebsocket`` sends one frame per ``step_ms``; every other node is instant. All waiting is
  ``trio.sleep``, so tests can run under ``trio.testing.MockClock``.
- Scripted faults, as extra node inputs (ComfyUI ignores undeclared inputs, so they pass validation):
  ``"sim_error": "<text>"`` makes the node raise ``RuntimeError(<text>)`` when it executes;
  ``"sim_sleep_ms": N`` makes it take N ms without progress updates (an interrupt then lands at the next
  node, as with a slow real node). ``fail_rate`` fails random prompts at a random step.
- The "classic" output cache is off unless ``cache=True`` (then identical nodes are not executed again and
  ``execution_cached`` lists them); without it ``execution_cached`` always has ``"nodes": []``.

Test controls: ``pause()``/``resume()``, ``drop_sockets()``, ``refuse_websockets``, ``step_ms``.
Records: ``runs``, ``max_in_queue``, ``submitted``, ``interrupts``, ``gaps()``.

CLI: ``python scripts/fake_comfyui.py --port P [--host H] [--step-ms MS] [--fail-rate F] [--seed S]
[--no-previews] [--cache]``; prints ``fake ComfyUI listening on http://HOST:PORT`` once listening (``--port 0``
picks a free port and prints it) and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import ipaddress
import itertools
import json
import logging
import mimetypes
import os
import posixpath
import random
import re
import signal
import socket
import struct
import sys
import time
import traceback
import urllib.parse
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, Literal

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed as TransportClosed
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

__all__ = [
    "NODE_SPECS",
    "FakeComfyUI",
    "RunRecord",
    "encode_png",
    "main",
    "png_size",
    "serve_fake_comfyui",
    "validate_prompt",
]

log = logging.getLogger(__name__)

# --- protocol constants -------------------------------------------------------------------------------

COMFYUI_VERSION: Final = "0.3.64"
MAX_UPLOAD_SIZE_BYTES: Final = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size (100 MB)
SERVER_FEATURES: Final[Mapping[str, Any]] = {
    "supports_preview_metadata": True,
    "max_upload_size": MAX_UPLOAD_SIZE_BYTES,
}
MAX_HISTORY_ITEMS: Final = 10_000  # ComfyUI's MAXIMUM_HISTORY_SIZE: the oldest entry goes first
WEBSOCKET_PATHS: Final = frozenset({"/ws", "/api/ws"})
API_PREFIX: Final = "/api"
FILE_TYPES: Final = ("output", "input", "temp")
INTERNAL_ERROR_TEXT: Final = "500 Internal Server Error\n\nServer got itself in trouble"  # aiohttp's 500 body

# Binary WebSocket frames: big-endian u32 event type, then a u32 (image format or a length).
BINARY_PREVIEW_IMAGE: Final = 1
BINARY_TEXT: Final = 3
BINARY_PREVIEW_IMAGE_WITH_METADATA: Final = 4
IMAGE_FORMAT_PNG: Final = 2  # 1 = JPEG

# --- simulator constants ------------------------------------------------------------------------------

DEFAULT_STEP_MS: Final = 50.0
MS_PER_S: Final = 1000.0
KEEP_ALIVE_TIMEOUT_S: Final = 75.0  # aiohttp's keepalive_timeout (hypercorn's own default is 5 s)
# Per-socket outbox. ComfyUI's single send queue is unbounded; here a socket whose reader stalls loses
# frames beyond this many (logged) instead of growing without limit: about 5 MB of small frames.
OUTBOX_MAX_FRAMES: Final = 16_384
SAVED_IMAGE_MAX_SIDE_PX: Final = 64  # saved and streamed images are scaled down to fit this
PREVIEW_SIDE_PX: Final = 16  # sampler previews
TEMP_PREFIX_LETTERS: Final = "abcdefghijklmnopqrstupvxyz"  # sic, as ComfyUI's PreviewImage
TEMP_PREFIX_LENGTH: Final = 5
FAKE_MEMORY_BYTES: Final = 16 * 1024**3
FAKE_FREE_MEMORY_BYTES: Final = 12 * 1024**3
DEFAULT_CHECKPOINT: Final = "v1-5-pruned-emaonly.safetensors"
MODEL_FOLDERS: Final = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
    "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
)  # fmt: skip
SIM_ERROR_INPUT: Final = "sim_error"
SIM_SLEEP_INPUT: Final = "sim_sleep_ms"


# --- PNG ----------------------------------------------------------------------------------------------

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESS_LEVEL: Final = 4  # ComfyUI's SaveImage default
_PNG_RGB_8BIT: Final = (8, 2, 0, 0, 0)  # bit depth, colour type (truecolour), compression, filter, interlace


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(width: int, height: int, rgb: bytes, *, text: Mapping[str, str] | None = None) -> bytes:
    """Encode 8-bit RGB pixels (rows top to bottom) as a PNG, with optional ``tEXt`` chunks."""
    if width < 1 or height < 1:
        raise ValueError(f"PNG size must be positive, not {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{width}x{height} RGB needs {stride * height} bytes, got {len(rgb)}")
    scanlines = b"".join(b"\x00" + rgb[row * stride : (row + 1) * stride] for row in range(height))
    chunks = [_png_chunk(b"IHDR", struct.pack(">II5B", width, height, *_PNG_RGB_8BIT))]
    for key, value in (text or {}).items():
        chunks.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(scanlines, PNG_COMPRESS_LEVEL)))
    chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _clamp_byte(value: int) -> int:
    return 0 if value < 0 else 255 if value > 255 else value


def _split_rgb(color: int) -> tuple[int, int, int]:
    return (color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    longest = max(width, height, 1)
    if longest <= max_side:
        return max(1, width), max(1, height)
    return max(1, width * max_side // longest), max(1, height * max_side // longest)


def render_rgb(width: int, height: int, color: int, *, noise_seed: int | None = None, noise: float = 0.0) -> bytes:
    """Solid ``color`` (0xRRGGBB), plus seeded grey noise of amplitude ``noise`` (0..1) if a seed is given."""
    red, green, blue = _split_rgb(color)
    if noise_seed is None or noise <= 0:
        return bytes((red, green, blue)) * (width * height)
    rng = random.Random(noise_seed)
    amplitude = round(255 * min(noise, 1.0))
    pixels = bytearray()
    for _ in range(width * height):
        delta = rng.randint(-amplitude, amplitude)
        pixels += bytes((_clamp_byte(red + delta), _clamp_byte(green + delta), _clamp_byte(blue + delta)))
    return bytes(pixels)


# --- values flowing between simulated nodes -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimImage:
    """An IMAGE batch: ``batch`` images of ``width`` x ``height`` in one colour, maybe with noise."""

    width: int
    height: int
    batch: int
    color: int  # 0xRRGGBB
    noise_seed: int | None = None
    noise: float = 0.0

    def png(
        self, index: int, *, max_side: int = SAVED_IMAGE_MAX_SIDE_PX, text: Mapping[str, str] | None = None
    ) -> bytes:
        width, height = _fit(self.width, self.height, max_side)
        seed = None if self.noise_seed is None else self.noise_seed + index
        return encode_png(
            width, height, render_rgb(width, height, self.color, noise_seed=seed, noise=self.noise), text=text
        )

    def __str__(self) -> str:  # what PreviewAny shows (ComfyUI prints the tensor)
        return f"tensor(shape=[{self.batch}, {self.height}, {self.width}, 3], color=#{self.color:06x})"


@dataclass(frozen=True, slots=True)
class SimMask:
    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"tensor(shape=[{self.batch}, {self.height}, {self.width}])"


@dataclass(frozen=True, slots=True)
class SimLatent:
    width: int  # in pixels of the decoded image
    height: int
    batch: int
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None  # an output node's UI output (the `executed` event, history outputs)


def _seed_color(seed: int | None) -> int:
    return ((seed or 0) * 2654435761 + 0x404040) & 0xFFFFFF


# --- node implementations -----------------------------------------------------------------------------
# Each takes the node's context and its declared inputs (links already resolved) as keyword arguments.


async def _run_checkpoint_loader(ctx: _NodeContext, *, ckpt_name: str) -> NodeResult:
    return NodeResult((f"<MODEL {ckpt_name}>", f"<CLIP {ckpt_name}>", f"<VAE {ckpt_name}>"))


async def _run_clip_text_encode(ctx: _NodeContext, *, text: str, clip: str) -> NodeResult:
    return NodeResult((f"<CONDITIONING {text[:40]!r}>",))


async def _run_empty_latent(ctx: _NodeContext, *, width: int, height: int, batch_size: int) -> NodeResult:
    return NodeResult((SimLatent(width, height, batch_size),))


async def _run_ksampler(
    ctx: _NodeContext, *, model: str, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
    positive: str, negative: str, latent_image: SimLatent, denoise: float = 1.0,
) -> NodeResult:  # fmt: skip
    await ctx.sample(steps, seed)
    return NodeResult((replace(latent_image, seed=seed),))


async def _run_ksampler_advanced(
    ctx: _NodeContext, *, model: str, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
    scheduler: str, positive: str, negative: str, latent_image: SimLatent, start_at_step: int, end_at_step: int,
    return_with_leftover_noise: str,
) -> NodeResult:  # fmt: skip
    await ctx.sample(max(0, min(end_at_step, steps) - start_at_step), noise_seed)
    return NodeResult((replace(latent_image, seed=noise_seed),))


async def _run_vae_decode(ctx: _NodeContext, *, samples: SimLatent, vae: str) -> NodeResult:
    return NodeResult((SimImage(samples.width, samples.height, samples.batch, _seed_color(samples.seed)),))


async def _run_save_image(ctx: _NodeContext, *, images: SimImage, filename_prefix: str = "ComfyUI") -> NodeResult:
    return NodeResult((), {"images": ctx.save_images(images, filename_prefix, "output")})


async def _run_preview_image(ctx: _NodeContext, *, images: SimImage) -> NodeResult:
    return NodeResult((), {"images": ctx.save_images(images, ctx.temp_prefix, "temp")})


async def _run_save_image_websocket(ctx: _NodeContext, *, images: SimImage) -> NodeResult:
    # websocket_image_save.py: one PNG frame per image, progress value 0..n-1 (never reaches max), no UI.
    await ctx.run_steps(range(images.batch), images.batch, lambda index: images.png(index))
    return NodeResult()


async def _run_load_image(ctx: _NodeContext, *, image: str) -> NodeResult:
    data = ctx.read_input_file(image)
    if data is None:
        raise FileNotFoundError(f"Invalid image file: {image}")
    width, height = png_size(data) or (SAVED_IMAGE_MAX_SIDE_PX, SAVED_IMAGE_MAX_SIDE_PX)
    color = int.from_bytes(hashlib.sha256(data).digest()[:3], "big")
    return NodeResult((SimImage(width, height, 1, color), SimMask(width, height, 1)))


async def _run_empty_image(ctx: _NodeContext, *, width: int, height: int, batch_size: int, color: int) -> NodeResult:
    return NodeResult((SimImage(width, height, batch_size, color),))


async def _run_image_invert(ctx: _NodeContext, *, image: SimImage) -> NodeResult:
    return NodeResult((replace(image, color=image.color ^ 0xFFFFFF),))


async def _run_image_blur(ctx: _NodeContext, *, image: SimImage, blur_radius: int, sigma: float) -> NodeResult:
    return NodeResult((replace(image, noise=image.noise / 2),))


async def _run_image_scale(
    ctx: _NodeContext, *, image: SimImage, upscale_method: str, width: int, height: int, crop: str
) -> NodeResult:
    if width == 0 and height == 0:
        width, height = image.width, image.height
    elif width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return NodeResult((replace(image, width=width, height=height),))


async def _run_image_add_noise(ctx: _NodeContext, *, image: SimImage, seed: int, strength: float) -> NodeResult:
    return NodeResult((replace(image, noise_seed=seed, noise=strength),))


async def _run_get_image_size(ctx: _NodeContext, *, image: SimImage) -> NodeResult:
    ctx.send_text(f"width: {image.width}, height: {image.height}\n batch size: {image.batch}")
    return NodeResult((image.width, image.height, image.batch))


async def _run_preview_any(ctx: _NodeContext, *, source: Any = None) -> NodeResult:
    # comfy_extras/nodes_preview_any.py
    if isinstance(source, str):
        value = source
    elif isinstance(source, (int, float, bool)):
        value = str(source)
    elif source is None:
        value = "None"
    else:
        try:
            value = json.dumps(source)
        except TypeError:
            value = str(source)
    return NodeResult((), {"text": [value]})


async def _run_primitive_string(ctx: _NodeContext, *, value: str) -> NodeResult:
    return NodeResult((value,))


async def _run_string_concatenate(
    ctx: _NodeContext, *, string_a: str, string_b: str, delimiter: str = ""
) -> NodeResult:
    return NodeResult((f"{string_a}{delimiter}{string_b}",))


async def _run_regex_replace(
    ctx: _NodeContext, *, string: str, regex_pattern: str, replace: str, case_insensitive: bool = True,
    multiline: bool = False, dotall: bool = False, count: int = 0,
) -> NodeResult:  # fmt: skip
    flags = (
        (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0) | (re.DOTALL if dotall else 0)
    )
    return NodeResult((re.sub(regex_pattern, replace, string, count=count, flags=flags),))


# --- node classes: the one input table ----------------------------------------------------------------
# Inputs are written the way ComfyUI's INPUT_TYPES() writes them: (type_or_choices, options?). That is what
# validation errors quote as "input_config" and what /object_info returns.

InputConfig = tuple[Any, ...]
NodeFunction = Callable[..., Awaitable[NodeResult]]
Validator = Callable[..., "bool | str"]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    run: NodeFunction
    required: Mapping[str, InputConfig]
    optional: Mapping[str, InputConfig] = field(default_factory=dict)
    returns: tuple[str, ...] = ()
    return_names: tuple[str, ...] | None = None
    output_node: bool = False
    category: str = ""
    display_name: str | None = None
    # Like a node's VALIDATE_INPUTS: called with these literal inputs plus `file_exists`; True or a reason.
    validate: Validator | None = None
    validate_inputs: tuple[str, ...] = ()
    always_changed: bool = False  # IS_CHANGED differs on every run: never served from the cache
    python_module: str = "nodes"

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)

    def input_info(self, name: str) -> tuple[Any, str, dict[str, Any]] | None:
        """(input_type, "required" | "optional", options) as ComfyUI's get_input_info, or None."""
        for category, table in (("required", self.required), ("optional", self.optional)):
            if name in table:
                config = table[name]
                return config[0], category, (config[1] if len(config) > 1 else {})
        return None


def _validate_load_image(file_exists: Callable[[str], bool], *, image: str) -> bool | str:
    return True if file_exists(image) else f"Invalid image file: {image}"


MAX_RESOLUTION: Final = 16384
MAX_SEED: Final = 0xFFFFFFFFFFFFFFFF
SAMPLER_NAMES: Final = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim",
    "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULER_NAMES: Final = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]  # fmt: skip
UPSCALE_METHODS: Final = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]

_IMAGE_IN: Final = ("IMAGE",)
_SEED: Final = ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True})
_STEPS: Final = ("INT", {"default": 20, "min": 1, "max": 10000})
_CFG: Final = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
_LATENT_SIDE: Final = ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8})
_IMAGE_SIDE: Final = ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1})
_SCALE_SIDE: Final = ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1})
_BATCH: Final = ("INT", {"default": 1, "min": 1, "max": 4096})
_MULTILINE: Final = ("STRING", {"multiline": True})

NODE_SPECS: Final[Mapping[str, NodeSpec]] = {
    # The checkpoint name is a free string: the simulator has no model files to choose from.
    "CheckpointLoaderSimple": NodeSpec(
        _run_checkpoint_loader, {"ckpt_name": ("STRING", {"default": DEFAULT_CHECKPOINT})},
        returns=("MODEL", "CLIP", "VAE"), category="loaders", display_name="Load Checkpoint",
    ),
    "CLIPTextEncode": NodeSpec(
        _run_clip_text_encode, {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
        returns=("CONDITIONING",), category="conditioning", display_name="CLIP Text Encode (Prompt)",
    ),
    "EmptyLatentImage": NodeSpec(
        _run_empty_latent, {"width": _LATENT_SIDE, "height": _LATENT_SIDE, "batch_size": _BATCH},
        returns=("LATENT",), category="latent", display_name="Empty Latent Image",
    ),
    "KSampler": NodeSpec(
        _run_ksampler,
        {
            "model": ("MODEL",), "seed": _SEED, "steps": _STEPS, "cfg": _CFG, "sampler_name": (SAMPLER_NAMES,),
            "scheduler": (SCHEDULER_NAMES,), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",), "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        },
        returns=("LATENT",), category="sampling", display_name="KSampler",
    ),
    "KSamplerAdvanced": NodeSpec(
        _run_ksampler_advanced,
        {
            "model": ("MODEL",), "add_noise": (["enable", "disable"],), "noise_seed": _SEED, "steps": _STEPS,
            "cfg": _CFG, "sampler_name": (SAMPLER_NAMES,), "scheduler": (SCHEDULER_NAMES,),
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        },
        returns=("LATENT",), category="sampling", display_name="KSampler (Advanced)",
    ),
    "VAEDecode": NodeSpec(
        _run_vae_decode, {"samples": ("LATENT",), "vae": ("VAE",)},
        returns=("IMAGE",), category="latent", display_name="VAE Decode",
    ),
    "SaveImage": NodeSpec(
        _run_save_image,
        {
            "images": ("IMAGE", {"tooltip": "The images to save."}),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
        },
        output_node=True, category="image", display_name="Save Image",
    ),
    "PreviewImage": NodeSpec(
        _run_preview_image, {"images": _IMAGE_IN}, output_node=True, category="image", display_name="Preview Image",
    ),
    "SaveImageWebsocket": NodeSpec(
        _run_save_image_websocket, {"images": _IMAGE_IN}, output_node=True, category="api node/image",
        always_changed=True, python_module="custom_nodes.websocket_image_save",
    ),
    "LoadImage": NodeSpec(
        _run_load_image, {"image": ([], {"image_upload": True})}, returns=("IMAGE", "MASK"), category="image",
        display_name="Load Image", validate=_validate_load_image, validate_inputs=("image",),
    ),
    "EmptyImage": NodeSpec(
        _run_empty_image,
        {
            "width": _IMAGE_SIDE, "height": _IMAGE_SIDE, "batch_size": _BATCH,
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        },
        returns=("IMAGE",), category="image",
    ),
    "ImageInvert": NodeSpec(
        _run_image_invert, {"image": _IMAGE_IN}, returns=("IMAGE",), category="image", display_name="Invert Image",
    ),
    "ImageBlur": NodeSpec(
        _run_image_blur,
        {
            "image": _IMAGE_IN, "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        },
        returns=("IMAGE",), category="image/postprocessing", display_name="Image Blur",
        python_module="comfy_extras.nodes_post_processing",
    ),
    "ImageScale": NodeSpec(
        _run_image_scale,
        {
            "image": _IMAGE_IN, "upscale_method": (UPSCALE_METHODS,), "width": _SCALE_SIDE,
            "height": _SCALE_SIDE, "crop": (["disabled", "center"],),
        },
        returns=("IMAGE",), category="image/upscaling", display_name="Upscale Image",
    ),
    "ImageAddNoise": NodeSpec(
        _run_image_add_noise,
        {
            "image": _IMAGE_IN, "seed": _SEED,
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        },
        returns=("IMAGE",), category="image", python_module="comfy_extras.nodes_images",
    ),
    "GetImageSize": NodeSpec(
        _run_get_image_size, {"image": _IMAGE_IN}, returns=("INT", "INT", "INT"),
        return_names=("width", "height", "batch_size"), category="image", python_module="comfy_extras.nodes_images",
    ),
    "PreviewAny": NodeSpec(
        _run_preview_any, {"source": ("*", {})}, output_node=True, category="utils", display_name="Preview Any",
        python_module="comfy_extras.nodes_preview_any",
    ),
    "PrimitiveString": NodeSpec(
        _run_primitive_string, {"value": ("STRING", {})}, returns=("STRING",), category="utils/primitive",
        display_name="String", python_module="comfy_extras.nodes_primitive",
    ),
    "StringConcatenate": NodeSpec(
        _run_string_concatenate,
        {"string_a": _MULTILINE, "string_b": _MULTILINE, "delimiter": ("STRING", {"multiline": False, "default": ""})},
        returns=("STRING",), category="utils/string", display_name="Concatenate",
        python_module="comfy_extras.nodes_string",
    ),
    "RegexReplace": NodeSpec(
        _run_regex_replace,
        {"string": _MULTILINE, "regex_pattern": _MULTILINE, "replace": _MULTILINE},
        optional={
            "case_insensitive": ("BOOLEAN", {"default": True}), "multiline": ("BOOLEAN", {"default": False}),
            "dotall": ("BOOLEAN", {"default": False}), "count": ("INT", {"default": 0, "min": 0, "max": 100}),
        },
        returns=("STRING",), category="utils/string", display_name="Regex Replace",
        python_module="comfy_extras.nodes_string",
    ),
}  # fmt: skip

SAMPLER_CLASSES: Final = frozenset({"KSampler", "KSamplerAdvanced"})
PROGRESS_CLASSES: Final = SAMPLER_CLASSES | {"SaveImageWebsocket"}


def object_info(class_type: str, spec: NodeSpec) -> dict[str, Any]:
    """The /object_info entry of one node class."""
    inputs: dict[str, Any] = {"required": {name: list(config) for name, config in spec.required.items()}}
    order: dict[str, Any] = {"required": list(spec.required)}
    if spec.optional:
        inputs["optional"] = {name: list(config) for name, config in spec.optional.items()}
        order["optional"] = list(spec.optional)
    return {
        "input": inputs,
        "input_order": order,
        "output": list(spec.returns),
        "output_is_list": [False] * len(spec.returns),
        "output_name": list(spec.return_names or spec.returns),
        "name": class_type,
        "display_name": spec.display_name or class_type,
        "description": "",
        "python_module": spec.python_module,
        "category": spec.category,
        "output_node": spec.output_node,
    }


# --- prompt validation: a port of ComfyUI's execution.validate_prompt / validate_inputs ----------------


def _error(kind: str, message: str, details: str, extra_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": dict(extra_info or {})}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _full_type_name(kind: type) -> str:
    """ComfyUI's full_type_name: module-qualified except for builtins ("re.error", "RuntimeError")."""
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    """Can an output of ``received_type`` feed an input of ``input_type``? (ComfyUI's non-strict rule)."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {part.strip() for part in received_type.split(",")}
    accepted = {part.strip() for part in input_type.split(",")}
    return "*" in received or "*" in accepted or not received.isdisjoint(accepted)


_Verdict = tuple[bool, list[dict[str, Any]], str]  # (valid, errors, node_id) as ComfyUI's `validated` values


def _validate_inputs(
    prompt: Mapping[str, Any], node_id: str, validated: dict[str, _Verdict], file_exists: Callable[[str], bool]
) -> _Verdict:
    """Validate one node and, recursively, what it links to. Converts literal values in place, as ComfyUI does.

    Exceptions (a link to a missing node is a KeyError) propagate to the caller, which reports them the way
    ComfyUI does: ``exception_during_validation`` for an output, ``exception_during_inner_validation`` for a
    linked node.
    """
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    inputs = node["inputs"]
    spec = NODE_SPECS[node["class_type"]]
    errors: list[dict[str, Any]] = []
    valid = True

    for name in spec.input_names:
        info_found = spec.input_info(name)
        assert info_found is not None
        input_type, category, options = info_found
        if name not in inputs:
            if category == "required":
                errors.append(_error("required_input_missing", "Required input is missing", name, {"input_name": name}))
            continue
        value = inputs[name]
        input_config = [input_type, options]
        if isinstance(value, list):
            if len(value) != 2:
                errors.append(_error(
                    "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                    {"input_name": name, "input_config": input_config, "received_value": value},
                ))  # fmt: skip
                continue
            source_id, slot = value
            source_class = prompt[source_id]["class_type"]  # KeyError for a link to a missing node
            received_type = NODE_SPECS[source_class].returns[slot]
            if name not in spec.validate_inputs and not validate_node_input(received_type, input_type):
                errors.append(_error(
                    "return_type_mismatch", "Return type mismatch between linked nodes",
                    f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                    {
                        "input_name": name, "input_config": input_config, "received_type": received_type,
                        "linked_node": value,
                    },
                ))  # fmt: skip
                continue
            try:
                linked_valid, _, _ = _validate_inputs(prompt, source_id, validated, file_exists)
            except Exception as exc:  # ComfyUI reports any failure inside a linked node, whatever it is
                valid = False
                validated[source_id] = (False, [_error(
                    "exception_during_inner_validation", "Exception when validating inner node", str(exc),
                    {
                        "input_name": name, "input_config": input_config, "exception_message": str(exc),
                        "exception_type": _full_type_name(type(exc)),
                        "traceback": traceback.format_tb(exc.__traceback__), "linked_node": value,
                    },
                )], source_id)  # fmt: skip
                continue
            if not linked_valid:
                valid = False
            continue

        try:
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            converter = (
                {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type)
                if isinstance(input_type, str)
                else None
            )
            if converter is not None:
                value = inputs[name] = converter(value)
        except (TypeError, ValueError, OverflowError) as exc:
            errors.append(_error(
                "invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                f"{name}, {value}, {exc}",
                {
                    "input_name": name, "input_config": input_config, "received_value": value,
                    "exception_message": str(exc),
                },
            ))  # fmt: skip
            continue

        if name in spec.validate_inputs:
            continue  # the node's own validator decides (ComfyUI skips min/max/list checks then)
        if "min" in options and value < options["min"]:
            errors.append(_error(
                "value_smaller_than_min", f"Value {value} smaller than min of {options['min']}", name,
                {"input_name": name, "input_config": input_config, "received_value": value},
            ))  # fmt: skip
            continue
        if "max" in options and value > options["max"]:
            errors.append(_error(
                "value_bigger_than_max", f"Value {value} bigger than max of {options['max']}", name,
                {"input_name": name, "input_config": input_config, "received_value": value},
            ))  # fmt: skip
            continue
        choices = (
            input_type if isinstance(input_type, list) else options.get("options") if input_type == "COMBO" else None
        )
        if choices is not None and value not in choices:
            long_list = len(choices) > 20  # ComfyUI does not echo gigantic lists (model files)
            errors.append(_error(
                "value_not_in_list", "Value not in list",
                f"{name}: '{value}' not in {f'(list of length {len(choices)})' if long_list else str(list(choices))}",
                {"input_name": name, "input_config": None if long_list else input_config, "received_value": value},
            ))  # fmt: skip
            continue

    if spec.validate is not None:
        literal = {
            name: inputs[name] for name in spec.validate_inputs if name in inputs and not isinstance(inputs[name], list)
        }
        if len(literal) == len(spec.validate_inputs):
            verdict = spec.validate(file_exists, **literal)
            if verdict is not True:
                for name in literal:
                    details = name if verdict is False else f"{name} - {verdict}"
                    errors.append(_error(
                        "custom_validation_failed", "Custom validation failed for node", details, {"input_name": name}
                    ))  # fmt: skip

    verdict_out: _Verdict = (False, errors, node_id) if errors or not valid else (True, [], node_id)
    validated[node_id] = verdict_out
    return verdict_out


@dataclass(frozen=True, slots=True)
class ValidationResult:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]  # outputs_to_execute: the valid output nodes
    node_errors: dict[str, Any]


def validate_prompt(
    prompt: Any, partial_targets: Sequence[str] | None = None, file_exists: Callable[[str], bool] = lambda name: False
) -> ValidationResult:
    """Validate an API-format prompt like ComfyUI 0.3.64 does, with the same error shapes.

    A malformed prompt (not a dict, a node that is not a dict) raises like it does in ComfyUI, where it becomes
    the generic 500 answer.
    """
    outputs: list[str] = []
    for node_id in prompt:
        if "class_type" not in prompt[node_id]:
            error = _error(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )  # fmt: skip
            return ValidationResult(False, error, [], {})
        class_type = prompt[node_id]["class_type"]
        spec = NODE_SPECS.get(class_type)
        if spec is None:
            error = _error(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{node_id}'"
            )
            return ValidationResult(False, error, [], {})
        if spec.output_node and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        return ValidationResult(False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {})

    good_outputs: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, _Verdict] = {}
    for output_id in outputs:
        try:
            valid, reasons, _ = _validate_inputs(prompt, output_id, validated, file_exists)
        except Exception as exc:  # as ComfyUI: any exception while validating an output invalidates it
            valid = False
            reasons = [_error(
                "exception_during_validation", "Exception when validating node", str(exc),
                {"exception_type": _full_type_name(type(exc)), "traceback": traceback.format_tb(exc.__traceback__)},
            )]  # fmt: skip
            validated[output_id] = (False, reasons, output_id)
        if valid:
            good_outputs.append(output_id)
            continue
        failed.append((output_id, reasons))
        # Only nodes that own an error are listed; ComfyUI appends the output to every such node seen so far.
        for node_id, (node_valid, node_reasons, _) in validated.items():
            if not node_valid and node_reasons:
                entry = node_errors.setdefault(
                    node_id,
                    {"errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
                )
                entry["dependent_outputs"].append(output_id)

    if not good_outputs:
        details = "\n".join(f"{reason['message']}: {reason['details']}" for _, reasons in failed for reason in reasons)
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return ValidationResult(False, error, [], node_errors)
    return ValidationResult(True, None, good_outputs, node_errors)


# --- execution order: ComfyUI's ExecutionList staging ----------------------------------------------------


def execution_order(prompt: Mapping[str, Any], outputs: Iterable[str], cached: Iterable[str] = ()) -> list[str]:
    """The order ComfyUI runs a validated prompt in: each output's inputs depth-first (cached nodes are not
    followed), then repeatedly the "most UX-friendly" ready node: an output, else a node feeding an output,
    else one two links away, else the first ready one."""
    skip = set(cached)
    pending: dict[str, None] = {}  # insertion-ordered set
    block_count: dict[str, int] = {}
    blocking: dict[str, dict[str, None]] = {}

    def add_node(root: str) -> None:
        stack, links = [root], []
        while stack:
            node_id = stack.pop()
            if node_id in pending:
                continue
            pending[node_id] = None
            block_count[node_id] = 0
            blocking[node_id] = {}
            for value in prompt[node_id]["inputs"].values():
                # an extra input (not in the node's spec, so never validated) may "link" to no node: not a link
                if _is_link(value) and value[0] in prompt:
                    if value[0] not in skip:
                        stack.append(value[0])
                    links.append((value[0], node_id))
        for source, target in links:
            if source not in skip:
                add_node(source)
                if target not in blocking[source]:
                    blocking[source][target] = None
                    block_count[target] += 1

    def is_output(node_id: str) -> bool:
        return NODE_SPECS[prompt[node_id]["class_type"]].output_node

    def pick(ready: list[str]) -> str:
        for node_id in ready:
            if is_output(node_id):
                return node_id
        for node_id in ready:
            if any(is_output(target) for target in blocking[node_id]):
                return node_id
        for node_id in ready:
            if any(is_output(after) for target in blocking[node_id] for after in blocking[target]):
                return node_id
        return ready[0]

    for output_id in outputs:
        add_node(output_id)
    order: list[str] = []
    while pending:
        ready = [node_id for node_id in pending if block_count[node_id] == 0]
        if not ready:  # unreachable: validation recurses forever on a cycle and rejects the prompt
            log.warning("dependency cycle among %s; not running them", list(pending))
            break
        node_id = pick(ready)
        order.append(node_id)
        del pending[node_id]
        for target in blocking[node_id]:
            block_count[target] -= 1
    return order


# --- paths and the in-memory file store ---------------------------------------------------------------


def _safe_relative_path(path: str) -> str | None:
    """Normalize a path relative to a ComfyUI directory; None if it escapes it. The directory itself is ""."""
    if path.startswith("/"):
        return None
    normalized = posixpath.normpath(path) if path else "."
    if normalized == ".." or normalized.startswith("../"):
        return None
    return "" if normalized == "." else normalized


def _annotated_filepath(name: str) -> tuple[str, str | None]:
    """ComfyUI's annotated_filepath: "x.png [output]" → ("x.png", "output")."""
    for kind in FILE_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


FileKey = tuple[str, str, str]  # (type, subfolder, filename)


def _format_value(value: Any) -> Any:
    """How ComfyUI shows an input value in execution_error.current_inputs."""
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)


# --- records and queue items --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One prompt the worker ran to a terminal event (times are ``trio.current_time()``)."""

    prompt_id: str
    client_id: str | None
    started: float
    ended: float
    outcome: Literal["success", "error", "interrupted"]


@dataclass(slots=True)
class _QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    @property
    def client_id(self) -> Any:
        return self.extra_data.get("client_id")

    def as_list(self) -> list[Any]:
        """The 5-element form of /queue and history entries."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _NodeFailure(Exception):
    def __init__(self, node_id: str, class_type: str, cause: Exception, inputs: Mapping[str, Any]) -> None:
        super().__init__(f"{class_type} {node_id}: {cause!r}")
        self.node_id = node_id
        self.class_type = class_type
        self.cause = cause
        self.inputs = dict(inputs)


# --- WebSocket connections ----------------------------------------------------------------------------

AsgiReceive = Callable[[], Awaitable[dict[str, Any]]]
AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]


def _abrupt_closer(asgi_send: AsgiSend) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that cuts this WebSocket's TCP connection without a close frame, or None.

    ASGI cannot do that (``websocket.close`` always sends a close frame), but a dropped connection must look like
    a network failure (the client sees 1006). With hypercorn 0.18 (pinned in pyproject.toml) the ASGI ``send`` is
    ``WSStream.app_send``; that stream's ``send`` is ``H11Protocol.stream_send``, and that protocol's ``send`` is
    ``TCPServer.protocol_send``, which closes the socket when handed a ``Closed`` event. Returns None if the
    layout is not that one; the caller then falls back to a close frame.
    """
    ws_stream = getattr(asgi_send, "__self__", None)
    h11_protocol = getattr(getattr(ws_stream, "send", None), "__self__", None)
    tcp_send = getattr(h11_protocol, "send", None)
    if tcp_send is None or getattr(tcp_send, "__name__", "") != "protocol_send":
        return None
    return partial(tcp_send, TransportClosed())


class _Socket:
    """One accepted WebSocket: its clientId, outbox (drained by a writer task) and drop trigger."""

    _ids = itertools.count(1)

    def __init__(self, sid: str, abrupt_close: Callable[[], Awaitable[None]] | None) -> None:
        self.id = next(self._ids)
        self.sid = sid
        self.abrupt_close = abrupt_close
        self._outbox_send, self.outbox = trio.open_memory_channel[str | bytes](OUTBOX_MAX_FRAMES)
        self.writer_scope = trio.CancelScope()  # cancelled to drop the connection
        self.dropped = False
        self.frames_lost = 0

    def __repr__(self) -> str:
        return f"<socket {self.id} clientId={self.sid!r}>"

    def push(self, frame: str | bytes) -> None:
        try:
            self._outbox_send.send_nowait(frame)
        except trio.WouldBlock:
            self.frames_lost += 1
            if self.frames_lost == 1:
                log.warning(
                    "%r: outbox full (%d frames), the client does not read: dropping frames", self, OUTBOX_MAX_FRAMES
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("%r: closed, frame dropped", self)

    def request_drop(self) -> None:
        self.dropped = True
        self.writer_scope.cancel()

    def close(self) -> None:
        self._outbox_send.close()
        self.outbox.close()


def _text_frame(event: str, data: Any) -> str:
    return json.dumps({"type": event, "data": data})


def _preview_frame(png: bytes) -> bytes:
    return struct.pack(">II", BINARY_PREVIEW_IMAGE, IMAGE_FORMAT_PNG) + png


def _preview_with_metadata_frame(png: bytes, prompt_id: str, node_id: str) -> bytes:
    metadata = json.dumps({
        "node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
        "real_node_id": node_id, "image_type": "image/png",
    }).encode()  # fmt: skip
    return struct.pack(">II", BINARY_PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + png


def _text_binary_frame(node_id: str, text: str) -> bytes:
    node = node_id.encode()
    return struct.pack(">II", BINARY_TEXT, len(node)) + node + text.encode()


# --- HTTP helpers -------------------------------------------------------------------------------------


def _json_response(payload: Any, status: int = 200) -> Response:
    # Our own json.dumps: Quart's provider sorts keys, and history order is part of the protocol.
    return Response(json.dumps(payload), status=status, content_type="application/json; charset=utf-8")


def _empty_response(status: int = 200) -> Response:
    response = Response(b"", status=status)
    del response.headers["Content-Type"]  # aiohttp's bare web.Response(status=...) has none
    return response


def _is_loopback(host: str | None) -> bool:
    """ComfyUI's is_loopback, without DNS: loopback addresses and "localhost"."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _origin_forbidden(host: str | None, origin: str | None) -> bool:
    """ComfyUI's origin_only_middleware: for a loopback Host, Origin's host:port must equal Host's."""
    if not host or not origin:
        return False
    try:
        host_domain = host.lower()
        parsed_origin = urllib.parse.urlparse(origin)
        origin_domain = parsed_origin.netloc.lower()
        parsed_host = urllib.parse.urlsplit("//" + host_domain)
        if parsed_origin.port is None:  # browsers may omit default ports: compare host names only
            host_domain = parsed_host.hostname or ""
        if parsed_host.port is None:
            origin_domain = parsed_origin.hostname or ""
        loopback = _is_loopback(parsed_host.hostname)
    except ValueError:  # a port that is not a number: ComfyUI fails too (500); refusing is close enough
        return True
    return loopback and bool(host_domain) and bool(origin_domain) and host_domain != origin_domain


async def _reject_websocket(send: AsgiSend, status: int) -> None:
    await send({"type": "websocket.http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "websocket.http.response.body", "body": b""})


class _ListenerConfig(HypercornConfig):
    """Remembers the listening sockets hypercorn creates, so a killed server frees its port at once."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: list[socket.socket] = []

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()  # SO_REUSEADDR is set: rebinding right after a kill works
        self.listening.extend(sockets.insecure_sockets)
        return sockets

    def close_listening(self) -> None:
        for sock in self.listening:
            sock.close()
        self.listening.clear()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- execution of one prompt --------------------------------------------------------------------------


class _NodeContext:
    """What a node implementation may do: report progress, save files, send a TEXT frame."""

    def __init__(self, run: _PromptRun, node_id: str) -> None:
        self._run = run
        self.node_id = node_id

    @property
    def temp_prefix(self) -> str:
        return self._run.sim._temp_prefix

    async def run_steps(self, values: Sequence[int], total: int, preview: Callable[[int], bytes | None]) -> None:
        """One step per value: ``step_ms`` of work, then a progress update (with ``preview(value)``)."""
        fail_at = self._run.pick_fail_step(self.node_id, values)
        for value in values:
            await trio.sleep(max(0.0, self._run.sim.step_ms) / MS_PER_S)
            self._run.progress(self.node_id, value, total, preview(value), fail=value == fail_at)

    async def sample(self, steps: int, seed: int) -> None:
        previews = self._run.sim.previews

        def preview(step: int) -> bytes | None:
            if not previews:
                return None
            # from grey noise towards the final colour, like a latent preview
            color = _seed_color(seed)
            mixed = [(channel * step + 0x80 * (steps - step)) // steps for channel in _split_rgb(color)]
            rgb = render_rgb(PREVIEW_SIDE_PX, PREVIEW_SIDE_PX, (mixed[0] << 16) | (mixed[1] << 8) | mixed[2],
                             noise_seed=seed + step, noise=(steps - step) / (2 * steps))  # fmt: skip
            return encode_png(PREVIEW_SIDE_PX, PREVIEW_SIDE_PX, rgb)

        await self.run_steps(range(1, steps + 1), steps, preview)

    def send_text(self, text: str) -> None:
        """A binary TEXT frame, broadcast (core nodes send it without a target)."""
        self._run.sim._send_bytes(_text_binary_frame(self.node_id, text), None)

    def read_input_file(self, name: str) -> bytes | None:
        return self._run.sim._read_annotated(name, default_type="input")

    def save_images(self, images: SimImage, filename_prefix: str, kind: str) -> list[dict[str, str]]:
        """Write the batch as ``<subfolder>/<prefix>_<counter:05>_.png``, as ComfyUI's SaveImage/PreviewImage."""
        relative = _safe_relative_path(filename_prefix)
        if relative is None or relative == "":
            raise ValueError(
                f"Saving image outside the {kind} folder is not allowed. filename_prefix: {filename_prefix}"
            )
        subfolder, prefix = posixpath.split(relative)
        counter = self._run.sim._reserve_file_counters(kind, subfolder, prefix, images.batch)
        metadata = {"prompt": json.dumps(self._run.item.prompt)}
        saved = []
        for index in range(images.batch):
            filename = f"{prefix}_{counter + index:05}_.png"
            self._run.sim._files[(kind, subfolder, filename)] = images.png(index, text=metadata)
            saved.append({"filename": filename, "subfolder": subfolder, "type": kind})
        return saved


class _PromptRun:
    """The execution of one queue item: the events it sends and what goes into its history entry."""

    def __init__(self, sim: FakeComfyUI, item: _QueueItem) -> None:
        self.sim = sim
        self.item = item
        self.prompt_id = item.prompt_id
        self.client_id = item.client_id
        self.prompt = item.prompt
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.node_states: dict[str, dict[str, Any]] = {}
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.fail_node: str | None = None
        self.status_str = "success"

    # events ----------------------------------------------------------------------------------------

    def add_message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        """Recorded in history.status.messages; sent to the client, or broadcast if asked and there is none."""
        data = {**data, "timestamp": int(time.time() * MS_PER_S)}  # data, not timing: ComfyUI's wall clock
        self.messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.sim._send_json(event, data, self.client_id)

    def to_client(self, event: str, data: dict[str, Any]) -> None:
        """Per-prompt events that are not sent at all for a prompt without client_id."""
        if self.client_id is not None:
            self.sim._send_json(event, data, self.client_id)

    def set_state(self, node_id: str, value: float, maximum: float, state: str) -> None:
        self.node_states[node_id] = {
            "value": value, "max": maximum, "state": state, "node_id": node_id, "prompt_id": self.prompt_id,
            "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id,
        }  # fmt: skip
        # to the client, or broadcast when the prompt has none
        self.sim._send_json("progress_state", {"prompt_id": self.prompt_id, "nodes": self.node_states}, self.client_id)

    def progress(self, node_id: str, value: int, total: int, preview: bytes | None, *, fail: bool = False) -> None:
        """A progress-bar update: ComfyUI's hook checks the interrupt flag first, then sends
        progress_state, [preview with metadata], progress, [legacy preview]."""
        self.raise_if_interrupted(node_id)
        if fail:
            raise RuntimeError(f"Simulated failure (fail_rate={self.sim.fail_rate})")
        self.set_state(node_id, value, total, "running")
        with_metadata = self.sim._supports_preview_metadata(self.client_id)
        if preview is not None and with_metadata:
            self.sim._send_bytes(_preview_with_metadata_frame(preview, self.prompt_id, node_id), self.client_id)
        progress = {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}
        self.sim._send_json("progress", progress, self.client_id)
        if preview is not None and not with_metadata:
            self.sim._send_bytes(_preview_frame(preview), self.client_id)

    def raise_if_interrupted(self, node_id: str) -> None:
        if self.sim._interrupt_requested:
            self.sim._interrupt_requested = False  # ComfyUI clears the flag when it raises
            raise _Interrupted(node_id)

    # failures --------------------------------------------------------------------------------------

    def choose_fail_node(self, order: Sequence[str]) -> None:
        if order and self.sim.fail_rate > 0 and self.sim._rng.random() < self.sim.fail_rate:
            self.fail_node = self.sim._rng.choice(list(order))

    def pick_fail_step(self, node_id: str, values: Sequence[int]) -> int | None:
        if node_id != self.fail_node or not values:
            return None
        return self.sim._rng.choice(list(values))

    # execution -------------------------------------------------------------------------------------

    async def execute(self, signatures: Mapping[str, str]) -> Literal["success", "error", "interrupted"]:
        sim = self.sim
        cached = [node_id for node_id in self.prompt if signatures.get(node_id) in sim._cache]
        for node_id in cached:
            self.values[node_id] = sim._cache[signatures[node_id]].outputs
        self.add_message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, broadcast=False)
        order = execution_order(self.prompt, self.item.outputs_to_execute, cached)
        self.choose_fail_node([node_id for node_id in order if node_id not in cached])
        try:
            for node_id in order:
                if node_id in cached:
                    self.replay_cached(node_id, sim._cache[signatures[node_id]])
                else:
                    await self.execute_node(node_id, signatures.get(node_id))
        except _Interrupted as interrupted:
            self.status_str = "error"
            self.add_message("execution_interrupted", {
                "prompt_id": self.prompt_id, "node_id": interrupted.node_id,
                "node_type": self.prompt[interrupted.node_id]["class_type"], "executed": list(self.executed),
            }, broadcast=True)  # fmt: skip
            return "interrupted"
        except _NodeFailure as failure:
            self.status_str = "error"
            self.add_message("execution_error", {
                "prompt_id": self.prompt_id, "node_id": failure.node_id, "node_type": failure.class_type,
                "executed": list(self.executed),
                "exception_message": f"{failure.cause}\n",  # ComfyUI: "{ex}\n{tips}", tips only for OOM
                "exception_type": _full_type_name(type(failure.cause)),
                "traceback": traceback.format_tb(failure.cause.__traceback__),
                "current_inputs": {name: [_format_value(value)] for name, value in failure.inputs.items()},
                "current_outputs": list(self.prompt),
            }, broadcast=False)  # fmt: skip
            return "error"
        self.add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)
        return "success"

    def replay_cached(self, node_id: str, entry: _CacheEntry) -> None:
        """A cached output node: its UI is sent again (without `executing`), and it counts as finished."""
        if entry.ui is not None:
            self.ui[node_id] = entry.ui
        self.to_client(
            "executed", {"node": node_id, "display_node": node_id, "output": entry.ui, "prompt_id": self.prompt_id}
        )
        self.set_state(node_id, 1, 1, "finished")

    async def execute_node(self, node_id: str, signature: str | None) -> None:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        spec = NODE_SPECS[class_type]
        self.set_state(node_id, 0.0, 1.0, "running")
        self.sim._last_node_id = node_id
        self.to_client("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        self.raise_if_interrupted(node_id)  # checked as the node starts, after `executing` went out
        inputs: dict[str, Any] = {}
        try:
            inputs = {
                name: self.values[value[0]][value[1]] if _is_link(value) else value
                for name, value in node["inputs"].items()
                if name in spec.required or name in spec.optional
            }
            await self.scripted_behaviour(node_id, node["inputs"])
            result = await spec.run(_NodeContext(self, node_id), **inputs)
        except _Interrupted:
            raise
        except Exception as exc:  # whatever a node raises becomes execution_error, as in ComfyUI
            log.debug("prompt %s: node %s (%s) failed: %r", self.prompt_id, node_id, class_type, exc)
            raise _NodeFailure(node_id, class_type, exc, inputs) from exc
        self.values[node_id] = result.outputs
        if result.ui:
            self.ui[node_id] = result.ui
            self.to_client(
                "executed", {"node": node_id, "display_node": node_id, "output": result.ui, "prompt_id": self.prompt_id}
            )
        state = self.node_states[node_id]
        self.set_state(node_id, state["max"], state["max"], "finished")
        self.executed.append(node_id)
        if signature is not None and self.sim.cache:
            self.sim._cache[signature] = _CacheEntry(result.outputs, result.ui)

    async def scripted_behaviour(self, node_id: str, raw_inputs: Mapping[str, Any]) -> None:
        """The simulator's extra inputs and the fail_rate failure of nodes without progress steps."""
        sleep_ms = raw_inputs.get(SIM_SLEEP_INPUT)
        if isinstance(sleep_ms, (int, float)) and sleep_ms > 0:
            await trio.sleep(sleep_ms / MS_PER_S)
        else:
            await trio.lowlevel.checkpoint()
        message = raw_inputs.get(SIM_ERROR_INPUT)
        if message is not None:
            raise RuntimeError(str(message))
        if node_id == self.fail_node and self.prompt[node_id]["class_type"] not in PROGRESS_CLASSES:
            raise RuntimeError(f"Simulated failure (fail_rate={self.sim.fail_rate})")

    def history_entry(self) -> dict[str, Any]:
        nodes = sorted(self.ui)  # ComfyUI lists outputs and meta by node id as strings
        return {
            "prompt": self.item.as_list(),
            "outputs": {node_id: self.ui[node_id] for node_id in nodes},
            "status": {
                "status_str": self.status_str,
                "completed": self.status_str == "success",
                "messages": [[event, data] for event, data in self.messages],
            },
            "meta": {
                node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                for node_id in nodes
            },
        }


# --- the simulator ------------------------------------------------------------------------------------


class FakeComfyUI:
    """One simulated ComfyUI process. All state lives here; ``serve()`` runs it until cancelled.

    Cancelling the scope that runs ``serve()`` kills it: every socket drops, pending and running prompts are
    forgotten. Serving the same object again keeps history, files, counters and records (a restart that kept its
    disk); a new object is a fresh ComfyUI.
    """

    def __init__(
        self, *, step_ms: float = DEFAULT_STEP_MS, fail_rate: float = 0.0, seed: int | None = None,
        previews: bool = True, cache: bool = False,
    ) -> None:  # fmt: skip
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within 0..1, not {fail_rate!r}")
        self.step_ms = step_ms
        self.fail_rate = fail_rate
        self.previews = previews
        self.cache = cache
        self.refuse_websockets = False
        self.host = "127.0.0.1"
        self.port = 0
        self.url = ""
        # records for tests
        self.runs: list[RunRecord] = []
        self.max_in_queue = 0
        self.submitted: list[str] = []
        self.interrupts: list[str | None] = []
        # ComfyUI's state
        self._rng = random.Random(seed)
        self._temp_prefix = "ComfyUI_temp_" + "".join(
            self._rng.choice(TEMP_PREFIX_LETTERS) for _ in range(TEMP_PREFIX_LENGTH)
        )
        self._number = 0  # the priority counter of POST /prompt
        self._pending: list[tuple[float, int, _QueueItem]] = []  # a heap, like ComfyUI's
        self._sequence = itertools.count()  # tie-breaker for equal numbers
        self._running: _QueueItem | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._files: dict[FileKey, bytes] = {}
        self._file_counters: dict[FileKey, int] = {}  # (type, subfolder, prefix) -> the last counter used
        self._cache: dict[str, _CacheEntry] = {}
        self._sockets: dict[str, _Socket] = {}  # clientId -> the socket registered under it
        self._feature_flags: dict[str, dict[str, Any]] = {}  # clientId -> flags of its socket's first message
        self._connections: set[_Socket] = set()  # every open socket, registered or not
        self._current_client_id: Any = None  # client_id of the prompt running (or last run)
        self._last_node_id: str | None = None
        self._interrupt_requested = False
        self._paused = False
        self._serving = False
        self._wakeup = trio.Event()

    def __repr__(self) -> str:
        running = self._running.prompt_id if self._running else None
        return (
            f"<FakeComfyUI {self.url or 'not serving'} pending={len(self._pending)} running={running} "
            f"history={len(self._history)} sockets={len(self._connections)}>"
        )

    # --- test controls -------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop picking up prompts (the running one, if any, goes on)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    def drop_sockets(self) -> None:
        """Cut every WebSocket's connection, without a close frame. The server and the queue go on."""
        for conn in list(self._connections):
            conn.request_drop()

    def gaps(self) -> list[float]:
        """Idle time between consecutive runs: next.started - previous.ended."""
        return [after.started - before.ended for before, after in itertools.pairwise(self.runs)]

    # --- serving -------------------------------------------------------------------------------------

    async def serve(
        self, *, host: str = "127.0.0.1", port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve HTTP + WebSocket on ``host:port`` and run the worker until cancelled.

        ``task_status.started(port)`` reports the bound port once the socket listens.
        """
        if self._serving:
            raise RuntimeError(f"{self!r} is already serving")
        config = _ListenerConfig()
        config.bind = [f"{_host_for_url(host)}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
        config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
        self._serving = True
        self._wipe_temp_files()
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(hypercorn.trio.serve, self._asgi_app(), config, mode="asgi"))
                self.host = host
                self.port = int(binds[0].rsplit(":", 1)[1])
                self.url = f"http://{_host_for_url(host)}:{self.port}"
                nursery.start_soon(self._worker)
                log.info("fake ComfyUI listening on %s", self.url)
                task_status.started(self.port)
        finally:
            config.close_listening()
            self._forget_process_state()
            self._serving = False

    def _forget_process_state(self) -> None:
        """What a killed ComfyUI process loses: the queue, the running prompt, the sockets."""
        if self._pending or self._running:
            log.info(
                "killed with %d pending prompt(s) and running %s",
                len(self._pending),
                self._running and self._running.prompt_id,
            )
        self._pending.clear()
        self._running = None
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._sockets.clear()
        self._feature_flags.clear()
        self._current_client_id = None
        self._last_node_id = None
        self._interrupt_requested = False

    def _asgi_app(self) -> Callable[[dict[str, Any], AsgiReceive, AsgiSend], Awaitable[None]]:
        quart_app = self._build_http_app()

        async def app(scope: dict[str, Any], receive: AsgiReceive, send: AsgiSend) -> None:
            # WebSockets are handled at the ASGI level: only there can a connection be cut abruptly.
            if scope["type"] == "websocket" and scope["path"] in WEBSOCKET_PATHS:
                await self._websocket(scope, receive, send)
            else:
                await quart_app(scope, receive, send)

        return app

    # --- sending -------------------------------------------------------------------------------------

    def _targets(self, sid: Any) -> list[_Socket]:
        """ComfyUI's routing: sid None → every registered socket; else only the one registered under sid."""
        if sid is None:
            return list(self._sockets.values())
        conn = self._sockets.get(sid) if isinstance(sid, str) else None
        return [conn] if conn is not None else []

    def _send_json(self, event: str, data: Any, sid: Any) -> None:
        frame = _text_frame(event, data)
        for conn in self._targets(sid):
            conn.push(frame)

    def _send_bytes(self, frame: bytes, sid: Any) -> None:
        for conn in self._targets(sid):
            conn.push(frame)

    def _queue_remaining(self) -> int:
        return len(self._pending) + (1 if self._running is not None else 0)

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self._queue_remaining()}}

    def _broadcast_status(self) -> None:
        self._send_json("status", {"status": self._queue_info()}, None)

    def _supports_preview_metadata(self, sid: Any) -> bool:
        flags = self._feature_flags.get(sid) if isinstance(sid, str) else None
        return bool(flags) and flags.get("supports_preview_metadata") is True

    # --- queue and worker ----------------------------------------------------------------------------

    def _enqueue(self, item: _QueueItem) -> None:
        heapq.heappush(self._pending, (item.number, next(self._sequence), item))
        self.submitted.append(item.prompt_id)
        self.max_in_queue = max(self.max_in_queue, self._queue_remaining())
        self._broadcast_status()
        self._wakeup.set()

    def _delete_pending(self, prompt_id: Any) -> bool:
        """Remove the first pending item with this id (ComfyUI's delete_queue_item); never the running one."""
        for index, (_, _, item) in enumerate(self._pending):
            if item.prompt_id == prompt_id:
                del self._pending[index]
                heapq.heapify(self._pending)
                return True
        return False

    async def _worker(self) -> None:
        while True:
            while self._paused or not self._pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            item = heapq.heappop(self._pending)[2]
            self._running = item
            self._broadcast_status()  # picked up: the count does not change, the status repeats
            await self._run(item)

    async def _run(self, item: _QueueItem) -> None:
        run = _PromptRun(self, item)
        self._interrupt_requested = False  # ComfyUI clears the flag as a prompt starts
        self._current_client_id = item.client_id
        self._last_node_id = None
        signatures = self._signatures(item.prompt) if self.cache else {}
        started = trio.current_time()
        outcome = await run.execute(signatures)
        # The terminal event is queued; now the history entry, then status, then the idle `executing`.
        self._history[item.prompt_id] = run.history_entry()
        while len(self._history) > MAX_HISTORY_ITEMS:
            del self._history[next(iter(self._history))]
        self.runs.append(RunRecord(item.prompt_id, item.client_id, started, trio.current_time(), outcome))
        self._running = None
        self._last_node_id = None
        self._broadcast_status()
        run.to_client("executing", {"node": None, "prompt_id": item.prompt_id})
        log.debug("prompt %s: %s", item.prompt_id, outcome)

    def _signatures(self, prompt: Mapping[str, Any]) -> dict[str, str]:
        """Cache keys ("classic" cache: class, IS_CHANGED and inputs, recursively); the cache keeps only the
        entries this prompt can use, as ComfyUI's does at each prompt start."""
        memo: dict[str, str] = {}

        def signature(node_id: str) -> str:
            if node_id not in memo:
                node = prompt[node_id]
                spec = NODE_SPECS[node["class_type"]]
                changed: Any = None
                if spec.always_changed:
                    changed = uuid.uuid4().hex
                elif node["class_type"] == "LoadImage":
                    data = self._read_annotated(str(node["inputs"].get("image")), default_type="input") or b""
                    changed = hashlib.sha256(data).hexdigest()
                parts = [node["class_type"], changed]
                for name in sorted(node["inputs"]):
                    value = node["inputs"][name]
                    parts.append([name, ["link", signature(value[0]), value[1]] if _is_link(value) else value])
                memo[node_id] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
            return memo[node_id]

        signatures = {node_id: signature(node_id) for node_id in prompt}
        wanted = set(signatures.values())
        self._cache = {key: entry for key, entry in self._cache.items() if key in wanted}
        return signatures

    # --- files ---------------------------------------------------------------------------------------

    def _read_annotated(self, name: str, *, default_type: str) -> bytes | None:
        name, kind = _annotated_filepath(name)
        relative = _safe_relative_path(name)
        if not relative:
            return None
        subfolder, filename = posixpath.split(relative)
        return self._files.get((kind or default_type, subfolder, filename))

    def _wipe_temp_files(self) -> None:
        """ComfyUI empties its temp directory at start."""
        self._files = {key: data for key, data in self._files.items() if key[0] != "temp"}
        self._file_counters = {key: counter for key, counter in self._file_counters.items() if key[0] != "temp"}

    def _input_file_exists(self, name: str) -> bool:
        return self._read_annotated(name, default_type="input") is not None

    def _reserve_file_counters(self, kind: str, subfolder: str, prefix: str, count: int) -> int:
        """The first of ``count`` file counters for ``prefix_NNNNN_.png``: one past the highest there, as ComfyUI's
        get_save_image_path. The directory is scanned once per prefix, then the counter is remembered."""
        key = (kind, subfolder, prefix)
        if key not in self._file_counters:
            pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_")
            self._file_counters[key] = max(
                (
                    int(match.group(1))
                    for file_kind, file_subfolder, filename in self._files
                    if file_kind == kind and file_subfolder == subfolder and (match := pattern.match(filename))
                ),
                default=0,
            )
        first = self._file_counters[key] + 1
        self._file_counters[key] += count
        return first

    # --- WebSocket -----------------------------------------------------------------------------------

    async def _websocket(self, scope: dict[str, Any], receive: AsgiReceive, send: AsgiSend) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if _origin_forbidden(headers.get("host"), headers.get("origin")):  # ComfyUI's middleware comes first
            log.warning("WebSocket with Origin %r on Host %r: 403", headers.get("origin"), headers.get("host"))
            await _reject_websocket(send, 403)
            return
        if self.refuse_websockets:
            await _reject_websocket(send, 503)
            return
        query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"))
        sid = query.get("clientId", [""])[0] or uuid.uuid4().hex
        await send({"type": "websocket.accept"})
        conn = _Socket(sid, _abrupt_closer(send))
        # ComfyUI keeps one socket per clientId: a newer one replaces the older, which is neither closed nor
        # sent anything any more.
        self._sockets[sid] = conn
        self._feature_flags[sid] = {}
        self._connections.add(conn)
        log.debug("%r connected", conn)
        try:
            conn.push(_text_frame("status", {"status": self._queue_info(), "sid": sid}))
            if self._current_client_id == sid and self._last_node_id is not None:
                conn.push(_text_frame("executing", {"node": self._last_node_id}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._websocket_writer, conn, send)
                await self._websocket_reader(conn, receive)
                nursery.cancel_scope.cancel()
        finally:
            # The trap, faithfully: this removes whatever socket is registered under sid now, which may be a
            # newer one with the same clientId; that one then silently receives nothing.
            self._sockets.pop(sid, None)
            self._feature_flags.pop(sid, None)
            self._connections.discard(conn)
            conn.close()
            log.debug("%r closed", conn)

    async def _websocket_reader(self, conn: _Socket, receive: AsgiReceive) -> None:
        """Until the client goes. Only a first JSON message of type feature_flags is understood."""
        first_message = True
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if message["type"] != "websocket.receive" or text is None:
                continue
            try:
                data = json.loads(text)
            except ValueError:
                log.warning("invalid JSON received from client %s: %r", conn.sid, text[:200])
                continue
            if not isinstance(data, dict):
                log.warning("unexpected WebSocket message from client %s: %r", conn.sid, text[:200])
                continue  # ComfyUI fails on data.get(); its first-message flag stays set
            if first_message and data.get("type") == "feature_flags":
                flags = data.get("data", {})
                # Keyed by clientId, as in ComfyUI: the flags (and the reply) go to the registered socket.
                if conn.sid in self._feature_flags and isinstance(flags, dict):
                    self._feature_flags[conn.sid] = flags
                self._send_json("feature_flags", dict(SERVER_FEATURES), conn.sid)
            first_message = False

    async def _websocket_writer(self, conn: _Socket, send: AsgiSend) -> None:
        """Send the outbox in order. A drop is done from this task too, so it never cuts a frame in half."""
        with conn.writer_scope:
            async for frame in conn.outbox:
                if isinstance(frame, str):
                    await send({"type": "websocket.send", "text": frame})
                else:
                    await send({"type": "websocket.send", "bytes": frame})
        if not conn.dropped:
            return
        log.info("%r: dropping the connection", conn)
        if conn.abrupt_close is not None:
            await conn.abrupt_close()
        else:
            log.warning("%r: cannot cut the TCP connection with this hypercorn; closing with 1011", conn)
            await send({"type": "websocket.close", "code": 1011})
        await trio.sleep_forever()  # until the reader sees the disconnect and ends the connection

    # --- HTTP ----------------------------------------------------------------------------------------

    def _build_http_app(self) -> QuartTrio:
        app = QuartTrio("fake_comfyui")
        app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_SIZE_BYTES
        routes: list[tuple[str, str, Callable[..., Awaitable[Response]]]] = [
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/<prompt_id>", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/view", self._get_view),
            ("POST", "/upload/image", self._post_upload_image),
            ("GET", "/system_stats", self._get_system_stats),
            ("GET", "/features", self._get_features),
            ("GET", "/object_info", self._get_object_info),
            ("GET", "/object_info/<node_class>", self._get_object_info_class),
            ("GET", "/embeddings", self._get_empty_list),
            ("GET", "/extensions", self._get_empty_list),
            ("GET", "/models", self._get_models),
            ("GET", "/models/<folder>", self._get_model_files),
            ("POST", "/free", self._post_ok),
            ("PATCH", "/internal/logs/subscribe", self._post_ok),
        ]
        for method, path, view in routes:
            for prefix in ("", API_PREFIX):
                app.add_url_rule(prefix + path, endpoint=f"{method} {prefix}{path}", view_func=view, methods=[method])
        app.before_request(self._check_origin)
        app.register_error_handler(Exception, self._internal_error)
        return app

    async def _check_origin(self) -> Response | None:
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if _origin_forbidden(host, origin):
            log.warning("request with non matching host and origin %s != %s, returning 403", host, origin)
            return _empty_response(403)
        return None

    async def _internal_error(self, error: Exception) -> Response | HTTPException:
        if isinstance(error, HTTPException):
            return error  # 404, 405...: Quart's own answer
        log.error("%s %s failed: answering 500", request.method, request.path, exc_info=error)
        return Response(INTERNAL_ERROR_TEXT, status=500, content_type="text/plain; charset=utf-8")

    @staticmethod
    async def _json_body(*, empty_is: Any = ...) -> Any:
        """The request's JSON body; invalid JSON raises (→ 500), unless ``empty_is`` is given for that case."""
        raw = await request.get_data()
        if empty_is is not ...:
            try:
                return json.loads(raw)
            except ValueError:
                return empty_is
        return json.loads(raw)

    async def _post_prompt(self) -> Response:
        body = await self._json_body()
        if "number" in body:
            number: float = float(body["number"])
        else:
            number = -self._number if body.get("front") else self._number
            self._number += 1  # also for prompts rejected below, as ComfyUI
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return _json_response({"error": error, "node_errors": {}}, 400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        result = validate_prompt(prompt, body.get("partial_execution_targets"), self._input_file_exists)
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            log.info("invalid prompt: %s", result.error)
            return _json_response({"error": result.error, "node_errors": result.node_errors}, 400)
        self._enqueue(_QueueItem(number, prompt_id, prompt, extra_data, result.outputs))
        return _json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})

    async def _get_prompt(self) -> Response:
        return _json_response(self._queue_info())

    async def _get_queue(self) -> Response:
        running = [self._running.as_list()] if self._running is not None else []
        pending = [entry[2].as_list() for entry in self._pending]  # heap order, not run order, as ComfyUI
        return _json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self) -> Response:
        body = await self._json_body()
        if body.get("clear"):
            self._pending.clear()
            self._broadcast_status()
        for prompt_id in body.get("delete", ()):
            if self._delete_pending(prompt_id):  # never the running prompt
                self._broadcast_status()
        return _empty_response()

    async def _get_history(self) -> Response:
        max_items_arg, offset_arg = request.args.get("max_items"), request.args.get("offset")
        max_items = int(max_items_arg) if max_items_arg is not None else None
        offset = int(offset_arg) if offset_arg is not None else -1
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        selected: dict[str, Any] = {}
        for index, prompt_id in enumerate(self._history):
            if index >= offset:
                selected[prompt_id] = self._history[prompt_id]
                if max_items is not None and len(selected) >= max_items:
                    break
        return _json_response(selected)

    async def _get_history_item(self, prompt_id: str) -> Response:
        entry = self._history.get(prompt_id)
        return _json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self) -> Response:
        body = await self._json_body()
        if body.get("clear"):
            self._history.clear()
        for prompt_id in body.get("delete", ()):
            self._history.pop(prompt_id, None)
        return _empty_response()

    async def _post_interrupt(self) -> Response:
        body = await self._json_body(empty_is={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.interrupts.append(prompt_id or None)
        if not prompt_id:
            log.info("global interrupt")
            self._interrupt_requested = True
        elif self._running is not None and self._running.prompt_id == prompt_id:
            log.info("interrupting prompt %s", prompt_id)
            self._interrupt_requested = True
        else:
            log.info("prompt %s is not running, not interrupting", prompt_id)
        return _empty_response()

    async def _get_view(self) -> Response:
        query = request.args
        if "filename" not in query:
            return _empty_response(404)
        filename, kind = _annotated_filepath(query["filename"])
        if not filename:
            return _empty_response(400)
        if filename[0] == "/" or ".." in filename:
            return _empty_response(400)
        kind = kind or query.get("type", "output")
        if kind not in FILE_TYPES:
            return _empty_response(400)
        subfolder = ""
        if "subfolder" in query:
            normalized = _safe_relative_path(query["subfolder"])
            if normalized is None:
                return _empty_response(403)
            subfolder = normalized
        filename = posixpath.basename(filename)
        data = self._files.get((kind, subfolder, filename))
        if data is None:
            return _empty_response(404)
        # `preview=` (webp/jpeg re-encoding) and `channel=` are ignored: the file is always sent as stored.
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(data, content_type=content_type, headers={"Content-Disposition": f'filename="{filename}"'})

    async def _post_upload_image(self) -> Response:
        files, form = await request.files, await request.form
        image = files.get("image")
        if image is None or not image.filename:
            return _empty_response(400)
        kind = form.get("type") or "input"
        subfolder = form.get("subfolder", "")
        relative = _safe_relative_path(posixpath.join(subfolder, image.filename)) if kind in FILE_TYPES else None
        if not relative:
            return _empty_response(400)
        folder, filename = posixpath.split(relative)
        data = image.read()
        if form.get("overwrite") not in ("true", "1"):
            stem, extension = posixpath.splitext(filename)
            for counter in itertools.count(1):
                existing = self._files.get((kind, folder, filename))
                if existing is None or existing == data:  # same bytes under the same name: reused
                    break
                filename = f"{stem} ({counter}){extension}"
        self._files[(kind, folder, filename)] = data
        self._file_counters = {key: value for key, value in self._file_counters.items() if key[:2] != (kind, folder)}
        return _json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def _get_system_stats(self) -> Response:
        return _json_response({
            "system": {
                "os": os.name, "ram_total": FAKE_MEMORY_BYTES, "ram_free": FAKE_FREE_MEMORY_BYTES,
                "comfyui_version": COMFYUI_VERSION, "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                "python_version": sys.version, "pytorch_version": "simulated", "embedded_python": False,
                "argv": ["fake_comfyui.py", "--port", str(self.port)],
            },
            "devices": [{
                "name": "cpu", "type": "cpu", "index": None, "vram_total": FAKE_MEMORY_BYTES,
                "vram_free": FAKE_FREE_MEMORY_BYTES, "torch_vram_total": FAKE_MEMORY_BYTES,
                "torch_vram_free": FAKE_FREE_MEMORY_BYTES,
            }],
        })  # fmt: skip

    async def _get_features(self) -> Response:
        return _json_response(dict(SERVER_FEATURES))

    async def _get_object_info(self) -> Response:
        return _json_response({class_type: object_info(class_type, spec) for class_type, spec in NODE_SPECS.items()})

    async def _get_object_info_class(self, node_class: str) -> Response:
        spec = NODE_SPECS.get(node_class)
        return _json_response({node_class: object_info(node_class, spec)} if spec is not None else {})

    async def _get_empty_list(self) -> Response:
        return _json_response([])

    async def _get_models(self) -> Response:
        return _json_response(list(MODEL_FOLDERS))

    async def _get_model_files(self, folder: str) -> Response:
        # No model files: CheckpointLoaderSimple takes any name (its input is a free string here).
        return _json_response([]) if folder in MODEL_FOLDERS else _empty_response(404)

    async def _post_ok(self) -> Response:
        return _empty_response()


async def serve_fake_comfyui(
    sim: FakeComfyUI,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Same as ``sim.serve(...)``: for ``nursery.start(serve_fake_comfyui, sim)``."""
    await sim.serve(host=host, port=port, task_status=task_status)


# --- CLI ----------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A ComfyUI simulator (HTTP + WebSocket on one port).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed)")
    parser.add_argument("--step-ms", type=float, default=DEFAULT_STEP_MS, help="time per sampling step")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of prompts that fail (0..1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the failure randomness")
    parser.add_argument("--no-previews", action="store_true", help="no sampler preview images")
    parser.add_argument("--cache", action="store_true", help="cache node outputs like ComfyUI's classic cache")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def _run_until_signalled(sim: FakeComfyUI, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(sim.serve, host=host, port=port))
            print(f"fake ComfyUI listening on http://{_host_for_url(host)}:{bound}", flush=True)
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    sim = FakeComfyUI(
        step_ms=args.step_ms, fail_rate=args.fail_rate, seed=args.seed, previews=not args.no_previews, cache=args.cache
    )
    trio.run(_run_until_signalled, sim, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

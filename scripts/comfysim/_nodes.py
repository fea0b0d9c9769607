"""The node classes the simulator knows: their implementations, the one input table, /object_info."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from ._constants import DEFAULT_CHECKPOINT, SAVED_IMAGE_MAX_SIDE_PX
from ._png import SimImage, SimLatent, SimMask, png_size


class NodeContext(Protocol):
    """What a node implementation may do (``_execution._NodeContext`` is the one implementation)."""

    node_id: str

    @property
    def temp_prefix(self) -> str: ...

    async def run_steps(self, values: Sequence[int], total: int, preview: Callable[[int], bytes | None]) -> None: ...

    async def sample(self, steps: int, seed: int) -> None: ...

    def send_text(self, text: str) -> None: ...

    def read_input_file(self, name: str) -> bytes | None: ...

    def save_images(self, images: SimImage, filename_prefix: str, kind: str) -> list[dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None  # an output node's UI output (the `executed` event, history outputs)


def _seed_color(seed: int | None) -> int:
    return ((seed or 0) * 2654435761 + 0x404040) & 0xFFFFFF


# --- node implementations -----------------------------------------------------------------------------
# Each takes the node's context and its declared inputs (links already resolved) as keyword arguments.


async def _run_checkpoint_loader(ctx: NodeContext, *, ckpt_name: str) -> NodeResult:
    return NodeResult((f"<MODEL {ckpt_name}>", f"<CLIP {ckpt_name}>", f"<VAE {ckpt_name}>"))


async def _run_clip_text_encode(ctx: NodeContext, *, text: str, clip: str) -> NodeResult:
    return NodeResult((f"<CONDITIONING {text[:40]!r}>",))


async def _run_empty_latent(ctx: NodeContext, *, width: int, height: int, batch_size: int) -> NodeResult:
    return NodeResult((SimLatent(width, height, batch_size),))


async def _run_ksampler(
    ctx: NodeContext, *, model: str, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
    positive: str, negative: str, latent_image: SimLatent, denoise: float = 1.0,
) -> NodeResult:  # fmt: skip
    await ctx.sample(steps, seed)
    return NodeResult((replace(latent_image, seed=seed),))


async def _run_ksampler_advanced(
    ctx: NodeContext, *, model: str, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
    scheduler: str, positive: str, negative: str, latent_image: SimLatent, start_at_step: int, end_at_step: int,
    return_with_leftover_noise: str,
) -> NodeResult:  # fmt: skip
    await ctx.sample(max(0, min(end_at_step, steps) - start_at_step), noise_seed)
    return NodeResult((replace(latent_image, seed=noise_seed),))


async def _run_vae_decode(ctx: NodeContext, *, samples: SimLatent, vae: str) -> NodeResult:
    return NodeResult((SimImage(samples.width, samples.height, samples.batch, _seed_color(samples.seed)),))


async def _run_save_image(ctx: NodeContext, *, images: SimImage, filename_prefix: str = "ComfyUI") -> NodeResult:
    return NodeResult((), {"images": ctx.save_images(images, filename_prefix, "output")})


async def _run_preview_image(ctx: NodeContext, *, images: SimImage) -> NodeResult:
    return NodeResult((), {"images": ctx.save_images(images, ctx.temp_prefix, "temp")})


async def _run_save_image_websocket(ctx: NodeContext, *, images: SimImage) -> NodeResult:
    # websocket_image_save.py: one PNG frame per image, progress value 0..n-1 (never reaches max), no UI.
    await ctx.run_steps(range(images.batch), images.batch, lambda index: images.png(index))
    return NodeResult()


async def _run_load_image(ctx: NodeContext, *, image: str) -> NodeResult:
    data = ctx.read_input_file(image)
    if data is None:
        raise FileNotFoundError(f"Invalid image file: {image}")
    width, height = png_size(data) or (SAVED_IMAGE_MAX_SIDE_PX, SAVED_IMAGE_MAX_SIDE_PX)
    color = int.from_bytes(hashlib.sha256(data).digest()[:3], "big")
    return NodeResult((SimImage(width, height, 1, color), SimMask(width, height, 1)))


async def _run_empty_image(ctx: NodeContext, *, width: int, height: int, batch_size: int, color: int) -> NodeResult:
    return NodeResult((SimImage(width, height, batch_size, color),))


async def _run_image_invert(ctx: NodeContext, *, image: SimImage) -> NodeResult:
    return NodeResult((replace(image, color=image.color ^ 0xFFFFFF),))


async def _run_image_blur(ctx: NodeContext, *, image: SimImage, blur_radius: int, sigma: float) -> NodeResult:
    return NodeResult((replace(image, noise=image.noise / 2),))


async def _run_image_scale(
    ctx: NodeContext, *, image: SimImage, upscale_method: str, width: int, height: int, crop: str
) -> NodeResult:
    if width == 0 and height == 0:
        width, height = image.width, image.height
    elif width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return NodeResult((replace(image, width=width, height=height),))


async def _run_image_add_noise(ctx: NodeContext, *, image: SimImage, seed: int, strength: float) -> NodeResult:
    return NodeResult((replace(image, noise_seed=seed, noise=strength),))


async def _run_get_image_size(ctx: NodeContext, *, image: SimImage) -> NodeResult:
    ctx.send_text(f"width: {image.width}, height: {image.height}\n batch size: {image.batch}")
    return NodeResult((image.width, image.height, image.batch))


async def _run_preview_any(ctx: NodeContext, *, source: Any = None) -> NodeResult:
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


async def _run_primitive_string(ctx: NodeContext, *, value: str) -> NodeResult:
    return NodeResult((value,))


async def _run_string_concatenate(ctx: NodeContext, *, string_a: str, string_b: str, delimiter: str = "") -> NodeResult:
    return NodeResult((f"{string_a}{delimiter}{string_b}",))


async def _run_regex_replace(
    ctx: NodeContext, *, string: str, regex_pattern: str, replace: str, case_insensitive: bool = True,
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

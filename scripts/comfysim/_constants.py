"""ComfyUI 0.3.64's protocol constants and the simulator's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

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
# frames beyond this many items (logged) instead of growing without limit: about 5 MB of small frames. An item
# is one frame, or (step_ms 0) the frames of up to BURST_STEPS sampler steps.
OUTBOX_MAX_FRAMES: Final = 16_384
BURST_STEPS: Final = 64  # with step_ms 0: sampler steps run between two turns of the event loop
WRITE_BATCH_FRAMES: Final = 256  # frames ready in the outbox go out in one write, at most this many
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

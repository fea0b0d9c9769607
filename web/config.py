"""The web layer's settings (the actors' live in ``actors.gateway.GatewayConfig``). Every limit has a default."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.image_urls import DEFAULT_TTL as DEFAULT_IMAGE_URL_TTL
from actors.validate import WorkflowLimits

from .sockjs._protocol import SockJSConfig
from .stomp import MAX_FRAME_SIZE

DEFAULT_BIND = "127.0.0.1:8080"
RAW_WORKFLOW_POLICIES = ("all", "admin", "none")  # --raw-workflows: who may submit a graph that is not a template


@dataclass(frozen=True, slots=True)
class WebConfig:
    bind: str = DEFAULT_BIND
    auth: str = "token"  # "token" | "open"
    allowed_origins: tuple[str, ...] = ("*",)
    simulate: bool = False  # serve /api/demo-token for the demo page
    max_frame_size: int = MAX_FRAME_SIZE  # bytes of one inbound STOMP frame (the codec's own default)
    max_body_size: int = 1 << 20  # bytes of one HTTP request body
    max_connections_per_user: int = 16
    max_subscriptions: int = 8  # per connection
    heartbeat_ms: tuple[int, int] = (10_000, 10_000)  # (server sends every, server wants every)
    connect_timeout: float = 10.0  # seconds a new WebSocket has to send its STOMP CONNECT
    outbox_bytes: int = 1 << 20  # per-connection outbound budget
    outbox_delay: float = 10.0  # seconds a queued frame may wait before the client is "slow"
    lazy_heartbeats: bool = True  # an idle /ws connection's heart-beats are read by its timer (HeartbeatTap)
    max_task_size: int = 64  # largest "size" of one task
    permessage_deflate: bool = False
    shutdown_grace: float = 3.0  # seconds Hypercorn waits for connections after SIGTERM
    limits: WorkflowLimits = field(default_factory=WorkflowLimits)  # JSON bodies and workflows, at the door
    max_replays_per_minute: int = 30  # SUBSCRIBEs with last-seq per connection per minute ("too many replays")
    sockjs: SockJSConfig = field(default_factory=SockJSConfig)
    image_url_ttl: float = DEFAULT_IMAGE_URL_TTL  # seconds a signed image URL stays valid
    wall_clock: Callable[[], float] = time.time  # for image URL expiry (tests inject their own)
    templates_dir: str = ""  # directory of workflow templates ("" = the bundled ones)
    raw_workflows: str = "all"  # one of RAW_WORKFLOW_POLICIES
    allowed_nodes: frozenset[str] | None = None  # node classes a raw workflow may use (None: any)

    def __post_init__(self) -> None:
        if self.raw_workflows not in RAW_WORKFLOW_POLICIES:
            raise ValueError(
                f"raw_workflows must be one of {', '.join(RAW_WORKFLOW_POLICIES)}, not {self.raw_workflows!r}"
            )

    def origin_allowed(self, origin: str | None) -> bool:
        if origin is None or "*" in self.allowed_origins:
            return True
        return origin.rstrip("/") in self.allowed_origins

"""The Quart-Trio app: HTTP API, the STOMP endpoint at /ws, the web page, /metrics.

Routes only translate between HTTP and actor messages; all state lives in the actors (``Handles``).
Errors are ``{"error": code, "detail": text}`` with the right status, CORS headers included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors import ActorGone, NoAnswer, ask_within, ledger, registry, scheduler, sessions
from actors.gateway import Handles
from actors.store import MAX_AMOUNT, Account
from actors.validate import decode_json

from ._conn import ConnectionCounter
from ._metrics import Metrics
from ._submit import ASK_TIMEOUT, submit
from ._templates import TemplateLibrary, raw_workflows_allowed
from ._ws import StompEndpoint
from .auth import Authenticator, AuthError, Principal, bearer, valid_id
from .config import WebConfig
from .errors import http_status
from .sockjs import install as install_sockjs

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_IMAGE_BYTES = 64 << 20


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def create_app(
    handles: Handles,
    cfg: WebConfig,
    auth: Authenticator,
    shutdown: trio.Event,
    templates: TemplateLibrary | None = None,
) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_size
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep key order: a template's parameters are its form's
    metrics = Metrics(handles)
    counter = ConnectionCounter(cfg.max_connections_per_user)
    library = templates if templates is not None else TemplateLibrary(cfg.templates_dir)
    endpoint = StompEndpoint(handles, cfg, auth, shutdown, counter, metrics, library, lambda: app.nursery)
    sockjs = install_sockjs(app, endpoint, cfg.sockjs, cfg.origin_allowed)
    metrics.sockjs_sessions.set_function(lambda: len(sockjs.sessions))
    app.extensions["gateway"] = {
        "handles": handles,
        "metrics": metrics,
        "endpoint": endpoint,
        "sockjs": sockjs,
        "templates": library,
    }

    def error(status: int, code: str, detail: str) -> Response:
        return Response(json.dumps({"error": code, "detail": detail}), status=status, content_type="application/json")

    def principal(body_client_id: str | None = None) -> Principal:
        client_id = request.headers.get("X-Client-Id") or body_client_id
        try:
            return auth.authenticate(bearer(request.headers.get("Authorization")), client_id)
        except AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc)) from None

    async def call(build: Any, name: str, target: trio.MemorySendChannel[Any] | None = None) -> Any:
        try:
            return await ask_within(target if target is not None else handles.registry, build, ASK_TIMEOUT, name=name)
        except NoAnswer as exc:
            if exc.gone:
                raise ApiError(503, "unavailable", f"the {name} could not answer this request") from None
            raise ApiError(503, "busy", f"the {name} did not answer within {ASK_TIMEOUT:.0f}s") from None

    async def ledger_call(call: Any) -> Any:
        """Ask the ledger; its refusals and failures become this request's 4xx/5xx."""
        try:
            with trio.fail_after(ASK_TIMEOUT):
                return await call()
        except (trio.TooSlowError, ActorGone):
            raise ApiError(503, "unavailable", "the ledger did not answer") from None
        except ledger.LedgerFault as exc:
            raise ApiError(500, "internal", str(exc)) from None
        except (ledger.InvalidAmount, ledger.NegativeBalance) as exc:
            raise ApiError(400, "bad_amount", str(exc)) from None
        except ledger.LedgerError as exc:
            raise ApiError(409, "ledger_conflict", str(exc)) from None

    async def json_body() -> dict[str, Any]:
        # our own strict decoder, not request.get_json: invalid UTF-8, NaN, lone surrogates and deep nesting are
        # a 400 naming the problem (Quart's raised 500 on some of them)
        data = await request.get_data(cache=False)
        body, problem = decode_json(data, cfg.limits)
        if problem is not None:
            raise ApiError(400, problem.code, problem.detail)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        return body

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return error(exc.status, exc.error, exc.detail)

    @app.errorhandler(Exception)
    async def _internal_error(
        exc: Exception,
    ) -> Response:  # a bug or a store error: this request fails, not the process
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return error(500, "internal", f"the gateway failed on this request ({type(exc).__name__})")

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code or 500, "http_error")
        detail = f"the body is larger than {cfg.max_body_size} bytes" if exc.code == 413 else exc.description or ""
        resp = error(exc.code or 500, code, detail)
        if exc.code == 413:  # the rest of the body was not read: this connection cannot carry another request
            resp.headers["Connection"] = "close"
        return resp

    @app.after_request
    async def _cors(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if request.path == "/ws" or request.path.startswith("/ws/"):
            # SockJS sends credentials: the origin echoed, never "*" (its routes set this themselves; this covers
            # answers made outside them, e.g. a 413 for an oversized xhr_send)
            if origin and cfg.origin_allowed(origin) and "Access-Control-Allow-Origin" not in resp.headers:
                resp.headers["Access-Control-Allow-Origin"] = origin
                resp.headers["Access-Control-Allow-Credentials"] = "true"
                resp.headers["Vary"] = "Origin"
            return resp
        if origin and cfg.origin_allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in cfg.allowed_origins else origin
            resp.headers["Vary"] = "Origin"
            resp.headers["Access-Control-Expose-Headers"] = "content-type, content-length"
        return resp

    @app.before_request
    async def _preflight() -> Response | None:
        # a CORS preflight never carries the token: answer it before any route (and any auth check) runs
        if request.method != "OPTIONS" or not request.path.startswith("/api/"):
            return None
        resp = Response("", status=204)
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        resp.headers["Access-Control-Allow-Headers"] = "authorization, content-type, x-client-id"
        resp.headers["Access-Control-Max-Age"] = "600"
        return resp

    # ---- tasks

    @app.post("/api/tasks")
    async def submit_task() -> tuple[dict[str, Any], int]:
        body = await json_body()
        client_id = body.get("clientId")
        who = principal(client_id if isinstance(client_id, str) else None)
        if client_id is None:  # its messages would go to no STOMP session: refuse rather than lose them
            raise ApiError(
                400,
                "bad_request",
                "clientId is required: the task's messages go to the STOMP session with this clientId",
            )
        if not valid_id(client_id):
            raise ApiError(400, "bad_request", "clientId must be a non-empty string without ':'")
        if who.client_id is not None and client_id != who.client_id:
            raise ApiError(403, "forbidden", "clientId does not match the token")
        result = await submit(handles, cfg, library, who, client_id, body)
        if isinstance(result, registry.Refused):
            raise ApiError(http_status(result.code), result.code, result.detail)
        return {"taskId": result.task_id, "state": "queued", "position": result.position, "cost": result.cost}, 202

    @app.get("/api/tasks/<task_id>")
    async def get_task(task_id: str) -> dict[str, Any]:
        who = principal()
        view: dict[str, Any] | None = await call(lambda r: registry.GetTask(who.user_id, task_id, r), "registry")
        if view is None:
            raise ApiError(404, "not_found", f"no task {task_id}")
        return view

    @app.delete("/api/tasks/<task_id>")
    async def cancel_task(task_id: str) -> tuple[dict[str, Any], int]:
        who = principal()
        outcome = await call(lambda r: registry.Cancel(who.user_id, task_id, r), "registry")
        if outcome == "not_found":
            raise ApiError(404, "not_found", f"no task {task_id}")
        if outcome == "finished":
            raise ApiError(409, "finished", f"task {task_id} has already finished")
        return {"taskId": task_id, "state": outcome}, 200 if outcome == "cancelled" else 202

    def page_args() -> tuple[int, int | None]:
        try:
            limit = min(max(int(request.args.get("limit", 20)), 1), 100)
            before = int(request.args["before"]) if "before" in request.args else None
        except ValueError:
            raise ApiError(400, "bad_request", "limit and before must be integers") from None
        return limit, before

    @app.get("/api/results")
    async def results() -> dict[str, Any]:
        who = principal()
        limit, before = page_args()
        items, nxt = await call(lambda r: registry.ListResults(who.user_id, limit, before, r), "registry")
        return {"results": items} | ({"next": nxt} if nxt is not None else {})

    @app.get("/api/tasks")
    async def list_tasks() -> dict[str, Any]:
        who = principal()
        which = request.args.get("state", "all")
        if which not in ("active", "finished", "all"):
            raise ApiError(400, "bad_request", f"state must be active, finished or all, not {which!r}")
        limit, before = page_args()
        items, nxt = await call(lambda r: registry.ListTasks(who.user_id, which, limit, before, r), "registry")
        return {"tasks": items} | ({"next": nxt} if nxt is not None else {})

    @app.get("/api/images/<task_id>/<int:n>")
    async def image(task_id: str, n: int) -> Response:
        exp, sig = request.args.get("exp"), request.args.get("sig")
        owner: str | None = None
        if exp is not None or sig is not None:  # a signed URL (an <img src>): the signature is the permission
            signer = handles.config.image_urls
            verdict = signer.check(task_id, n, exp, sig) if signer is not None else "bad"
            if verdict == "expired":
                raise ApiError(403, "expired", "this image URL has expired; fetch the task again for a fresh one")
            if verdict != "ok":
                raise ApiError(403, "bad_signature", "this image URL's signature is not valid")
        if sig is None or request.headers.get("Authorization"):
            owner = principal().user_id  # a request that names a user gets only that user's images
        where = await call(lambda r: registry.ImageLocation(owner, task_id, n, r), "registry")
        if where is None:
            raise ApiError(404, "not_found", f"no image {n} for task {task_id}")
        return await stream_image(handles.http, where, f"{task_id}/{n}")

    # ---- templates

    @app.get("/api/templates")
    async def list_templates() -> dict[str, Any]:
        who = principal()
        return {
            "templates": library.current.schema(),
            "rawWorkflows": raw_workflows_allowed(cfg.raw_workflows, who.admin),
        }

    @app.post("/api/admin/templates/reload")
    async def reload_templates() -> dict[str, Any]:
        who = principal()
        if not who.admin:
            raise ApiError(403, "forbidden", "an admin token is required")
        try:
            catalog = await library.reload()
        except OSError as exc:
            log.error("templates: reload by %s failed: %s", who.user_id, exc)
            raise ApiError(
                500,
                "reload_failed",
                f"cannot read the templates directory {library.directory}: "
                f"{exc.strerror or exc}; the templates loaded before stay",
            ) from None
        log.info("templates: reloaded by %s", who.user_id)
        return {"templates": list(catalog.templates), "errors": [e.as_json() for e in catalog.errors]}

    # ---- accounts

    @app.get("/api/balance")
    async def balance() -> dict[str, Any]:
        who = principal()
        acc: Account = await ledger_call(lambda: ledger.get_account(handles.ledger, who.user_id))
        return acc.as_json()

    @app.post("/api/admin/credits")
    async def admin_credits() -> dict[str, Any]:
        who = principal()
        if not who.admin:
            raise ApiError(403, "forbidden", "an admin token is required")
        body = await json_body()
        user_id, amount, allow_negative = body.get("userId"), body.get("amount"), body.get("allowNegative", False)
        if (
            not valid_id(user_id)
            or not isinstance(amount, int)
            or isinstance(amount, bool)
            or not isinstance(allow_negative, bool)
        ):
            raise ApiError(400, "bad_request", 'body must be {"userId": str, "amount": int, "allowNegative"?: bool}')
        if abs(amount) > MAX_AMOUNT:
            raise ApiError(400, "bad_amount", f"amount must be within +-2^53 ({MAX_AMOUNT}), not {amount}")
        acc: Account = await ledger_call(
            lambda: ledger.grant(handles.ledger, user_id, amount, f"admin {who.user_id}", allow_negative=allow_negative)
        )
        return acc.as_json()

    @app.get("/api/demo-token")
    async def demo_token() -> dict[str, Any]:
        if not cfg.simulate:
            raise ApiError(404, "not_found", "demo tokens exist only in --simulate mode")
        user = "demo"
        client = request.args.get("clientId") or "demo-page"
        if not valid_id(client):
            raise ApiError(400, "bad_request", "bad clientId")
        return {"token": auth.issue(user, ttl=24 * 3600), "userId": user, "clientId": client}

    # ---- health, metrics, page

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **handles.lease.as_json()}

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        parts: dict[str, Any] = {}
        try:
            with trio.fail_after(2):
                parts["store"] = "up" if await handles.store.ping() else "down"
        except Exception as exc:  # sqlite errors, timeouts: report, don't crash the probe
            parts["store"] = f"down: {exc!r}"
        parts.update(handles.lease.as_json())
        if handles.lease.role == "core":
            try:
                stats = await call(lambda r: scheduler.GetStats(r), "scheduler", handles.scheduler)
                parts["backends"] = {"up": len(stats.backends_up), "total": stats.backends_total}
            except ApiError as exc:
                parts["backends"] = {"up": 0, "total": len(handles.backend_urls), "error": exc.detail}
            ready = parts["store"] == "up" and parts["backends"]["up"] > 0
        else:  # an edge: ready while the store is up and some process holds the core lease
            ready = parts["store"] == "up" and handles.lease.holder is not None
        if auth.open:
            parts["warning"] = "auth mode 'open': anyone can act as any user"
        return {"status": "ready" if ready else "not ready", **parts}, 200 if ready else 503

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, ctype = await metrics.render()
        return Response(body, content_type=ctype)

    @app.get("/")
    async def index() -> Response:
        return Response((STATIC / "index.html").read_bytes(), content_type="text/html; charset=utf-8")

    @app.websocket("/ws")
    async def ws() -> Any:
        return await endpoint.serve(websocket)

    return app


class _ImageTooLarge(Exception):
    """ComfyUI sent more than MAX_IMAGE_BYTES after the response began: the connection is dropped, not ended."""


async def stream_image(http: Any, where: tuple[str, Any], what: str) -> Response:
    """Relay an image from ComfyUI's /view as it arrives, its size checked as it goes (never held whole)."""
    base, ref = where
    params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
    try:  # no browser header (Origin, cookies, auth) is forwarded to ComfyUI
        upstream = await http.send(http.build_request("GET", f"{base}/view", params=params), stream=True)
    except Exception as exc:  # httpx transport errors
        log.warning("image %s: ComfyUI unreachable: %r", what, exc)
        raise ApiError(502, "backend_unavailable", "the ComfyUI backend holding this image is unreachable") from None
    declared = upstream.headers.get("content-length")
    if upstream.status_code != 200 or (declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES):
        await upstream.aclose()
        if upstream.status_code == 200:
            raise ApiError(502, "too_large", f"the image is larger than {MAX_IMAGE_BYTES} bytes")
        raise ApiError(
            404 if upstream.status_code == 404 else 502,
            "not_found" if upstream.status_code == 404 else "backend_error",
            f"ComfyUI answered {upstream.status_code} for this image",
        )

    async def body() -> AsyncIterator[bytes]:
        try:
            total = 0
            async for chunk in upstream.aiter_bytes():
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise _ImageTooLarge(f"image {what}: ComfyUI sent more than {MAX_IMAGE_BYTES} bytes")
                yield chunk
        finally:
            with trio.CancelScope(shield=True):
                await upstream.aclose()

    resp = Response(body(), content_type=upstream.headers.get("content-type", "application/octet-stream"))
    if declared and declared.isdigit():
        resp.headers["Content-Length"] = declared
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


__all__ = ["create_app", "sessions", "submit"]

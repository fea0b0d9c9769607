"""The web page at ``GET /`` in headless Chromium against the whole gateway and the ComfyUI simulator: what a
person using it sees. Each test runs one scenario of ``page_tasks.mjs`` / ``page_layout.mjs`` (see there) and
checks its result here, beside the gateway's own view over HTTP. Screenshots: ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from _harness import page_errors, run_scenario
from conftest import GatewayUnderTest, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI

DEMO = "demo"  # the user /api/demo-token issues tokens for


async def page_gateway(nursery: trio.Nursery, start_gateway: Any, step_ms: int, **overrides: Any) -> GatewayUnderTest:
    sim = FakeComfyUI(step_ms=step_ms, seed=1)
    await nursery.start(sim.serve)
    g: GatewayUnderTest = await start_gateway([sim.url], web={"simulate": True}, **overrides)
    await wait_backends_up(g)
    return g


async def task_state(g: GatewayUnderTest, task_id: str) -> str:
    r = await g.http.get(f"{g.url}/api/tasks/{task_id}", headers=g.auth(DEMO))
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


async def test_page_shows_progress_previews_and_the_image_then_the_finished_task_after_a_reload(
        nursery: trio.Nursery, start_gateway: Any) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=60)
    out = await run_scenario("page_tasks.mjs", "flow", g.url)
    views: list[dict[str, Any]] = out["views"]
    running = [v for v in views if v["state"] == "running"]
    assert any(0 < v["progress"] < 100 for v in running), f"no progress between 0 and 100 seen: {views}"
    progress = [v["progress"] for v in running]
    assert progress == sorted(progress), f"the progress bar went backwards: {progress}"
    assert any(v["status"].startswith("Running · step") for v in running), running
    assert any(v["previews"] > 0 for v in running), "no live preview was shown while the task ran"
    final = views[-1]
    assert final["badge"] == "Done" and final["status"] == "Finished · 1 image" and not final["cancelVisible"]
    assert final["images"] and all(i["width"] > 0 for i in final["images"]), final
    assert out["lightbox"]["width"] > 0 and out["lightbox"]["download"].endswith(".png"), out["lightbox"]
    assert out["creditsAfter"] == out["credits"] - g.price  # settled
    # after a reload, the finished task is shown finished, with its image, and no cancel button
    again = out["reloaded"]
    assert again["state"] == "succeeded" and again["badge"] == "Done" and not again["cancelVisible"], again
    assert again["images"] and again["images"][0]["width"] > 0, again
    assert await task_state(g, out["taskId"]) == "succeeded"
    assert page_errors(out) == []


async def test_page_shows_a_failure_with_its_error_and_the_refund(
        nursery: trio.Nursery, start_gateway: Any, tmp_path: Path) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=5)
    wf = workflow("txt2img")
    sampler = next(n for n in wf.values() if n["class_type"] == "KSampler")
    sampler["inputs"]["sim_error"] = "the GPU caught fire"
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(wf))
    out = await run_scenario("page_tasks.mjs", "failure", g.url, workflow=path)
    failed = out["failed"]
    assert failed["state"] == "failed" and failed["badge"] == "Failed" and not failed["cancelVisible"], failed
    assert "the GPU caught fire" in failed["error"], failed
    assert failed["refund"] == f"{g.price} credits returned", failed
    assert out["creditsAfter"] == out["credits"]  # the page shows the credits back
    reloaded = out["reloaded"]
    assert reloaded["state"] == "failed" and "the GPU caught fire" in reloaded["error"] and reloaded["refund"], reloaded
    assert (await g.balance(DEMO))["available"] == g.initial_credits
    assert page_errors(out) == []


async def test_page_reloaded_mid_task_resumes_on_the_same_card(nursery: trio.Nursery, start_gateway: Any) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=100)
    out = await run_scenario("page_tasks.mjs", "reload", g.url)
    before, after = out["before"], out["after"]
    assert before[-1]["state"] == "running" and 20 <= before[-1]["progress"] < 100, before[-1]
    # after the reload the same card keeps moving: progress beyond where it was, then the image
    resumed = [v["progress"] for v in after if v["state"] == "running"]
    assert any(p > before[-1]["progress"] for p in resumed), f"no progress after the reload: {resumed}"
    assert after[-1]["state"] == "succeeded" and after[-1]["images"][0]["width"] > 0, after[-1]
    assert out["cards"] == 1
    assert await task_state(g, out["taskId"]) == "succeeded"
    assert page_errors(out) == []


async def test_page_says_where_each_task_waits_and_cancels_waiting_and_running_ones(
        nursery: trio.Nursery, start_gateway: Any) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=150, max_inflight=2)
    out = await run_scenario("page_tasks.mjs", "queue", g.url)
    waiting = out["waiting"]
    by_where = {v["where"]: v for v in waiting}
    assert "step" in by_where["running"]["status"] or "starting" in by_where["running"]["status"]
    assert "ComfyUI" in by_where["comfyui"]["status"], by_where["comfyui"]
    gateway = sorted(v["status"] for v in waiting if v["where"] == "gateway")
    assert gateway == ["In the gateway queue · #1", "In the gateway queue · #2"], gateway  # no two alike
    for v in out["cancelled"].values():
        assert v["state"] == "cancelled" and v["badge"] == "Cancelled" and v["refund"], v
        assert not v["cancelVisible"]
    states = [await task_state(g, t) for t in out["ids"]]
    assert sorted(states) == ["cancelled", "cancelled", "succeeded", "succeeded"], states
    assert (await g.balance(DEMO))["available"] == g.initial_credits - 2 * g.price
    assert page_errors(out) == []

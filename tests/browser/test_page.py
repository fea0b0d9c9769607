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


async def task_view(g: GatewayUnderTest, task_id: str) -> dict[str, Any]:
    r = await g.http.get(f"{g.url}/api/tasks/{task_id}", headers=g.auth(DEMO))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def task_state(g: GatewayUnderTest, task_id: str) -> str:
    return str((await task_view(g, task_id))["state"])


async def test_page_shows_progress_previews_and_the_image_then_the_finished_task_after_a_reload(
    nursery: trio.Nursery, start_gateway: Any
) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=60)
    out = await run_scenario("page_tasks.mjs", "flow", g.url)
    templates = await g.http.get(f"{g.url}/api/templates", headers=g.auth(DEMO))
    # the form is the templates' when the gateway has some, else the raw editor with the standard workflow
    assert out["mode"] == ("template" if templates.status_code == 200 and templates.json()["templates"] else "raw")
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
    # the signed URL as given works in a plain <img src>: no fetch with a header, no blob: copy
    assert all("sig=" in i["src"] and i["src"].startswith(g.url) for i in final["images"]), final["images"]
    assert out["lightbox"]["width"] > 0 and out["lightbox"]["download"].endswith(".png"), out["lightbox"]
    task = await task_view(g, out["taskId"])
    assert out["creditsAfter"] == out["credits"] - task["cost"]  # settled
    assert final["refund"] == "" and f"{task['cost']} credit" in final["details"]
    # after a reload, the finished task is shown finished, with its image, and no cancel button
    again = out["reloaded"]
    assert again["state"] == "succeeded" and again["badge"] == "Done" and not again["cancelVisible"], again
    assert again["images"] and again["images"][0]["width"] > 0, again
    assert task["state"] == "succeeded"
    assert page_errors(out) == []


async def test_page_shows_a_failure_with_its_error_and_the_refund(
    nursery: trio.Nursery, start_gateway: Any, tmp_path: Path
) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=5)
    out = await run_scenario("page_tasks.mjs", "failure", g.url, workflow=failing_workflow(tmp_path))
    failed = out["failed"]
    assert failed["state"] == "failed" and failed["badge"] == "Failed" and not failed["cancelVisible"], failed
    assert "the GPU caught fire" in failed["error"], failed
    cost = (await task_view(g, out["taskId"]))["cost"]
    assert failed["refund"] == f"{cost} credit{'' if cost == 1 else 's'} returned", failed
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
    nursery: trio.Nursery, start_gateway: Any
) -> None:
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
    tasks = [await task_view(g, t) for t in out["ids"]]
    assert sorted(t["state"] for t in tasks) == ["cancelled", "cancelled", "succeeded", "succeeded"], tasks
    spent = sum(t["cost"] for t in tasks if t["state"] == "succeeded")
    assert (await g.balance(DEMO))["available"] == g.initial_credits - spent  # the cancelled ones refunded
    assert page_errors(out) == []


def failing_workflow(tmp_path: Path, text: str = "the GPU caught fire") -> Path:
    wf = workflow("txt2img")
    next(n for n in wf.values() if n["class_type"] == "KSampler")["inputs"]["sim_error"] = text
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(wf))
    return path


async def test_a_second_tab_shows_the_first_tabs_task(nursery: trio.Nursery, start_gateway: Any) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=60)
    out = await run_scenario("page_layout.mjs", "tabs", g.url)
    seen = out["seen"]
    assert seen[-1]["state"] == "succeeded" and seen[-1]["images"][0]["width"] > 0, seen[-1]
    # GET /api/tasks lists it in the second tab while it runs, not only once it is finished
    assert any(v["state"] in ("queued", "submitted", "running") for v in seen), [v["state"] for v in seen]
    assert seen[-1]["otherTab"] and not out["firstTab"]["otherTab"]  # marked as another tab's, there only
    assert page_errors(out) == []


async def test_at_390_px_nothing_overlaps(nursery: trio.Nursery, start_gateway: Any, tmp_path: Path) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=40)
    out = await run_scenario("page_layout.mjs", "mobile", g.url, workflow=failing_workflow(tmp_path))
    for moment in ("midRun", "done"):
        layout = out[moment]
        names = [b["name"] for b in layout["boxes"]]
        assert {".topbar[0]", ".compose[0]", ".tasks > h2[0]", ".card[0]"} <= set(names), names
        assert layout["hits"] == [], f"{moment}: overlapping boxes {layout['hits']}"
        assert layout["scrollWidth"] <= layout["viewport"] == 390, f"{moment}: the page is wider than the screen"
    assert len([b for b in out["done"]["boxes"] if b["name"].startswith(".card")]) == 2
    assert out["outsideTheirCard"] == [], "parts of a card stick out of it"
    ok, bad = out["views"]
    assert ok["state"] == "succeeded" and bad["state"] == "failed" and bad["refund"]
    assert page_errors(out) == []


async def test_the_page_says_when_no_comfyui_backend_is_up(start_gateway: Any) -> None:
    with trio.socket.socket() as s:  # a port nothing listens on
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    g: GatewayUnderTest = await start_gateway([dead], web={"simulate": True})
    out = await run_scenario("page_layout.mjs", "nobackend", g.url)
    assert "No ComfyUI backend is up" in out["banner"], out
    assert "0/1" in out["chip"], out["chip"]
    assert out["card"]["status"] == "In the gateway queue · #1" and out["card"]["cancelVisible"], out["card"]
    assert out["layout"]["hits"] == [], out["layout"]["hits"]
    assert page_errors(out) == []


TEMPLATES = {
    "rawWorkflows": True,
    "templates": [
        {
            "name": "txt2img",
            "title": "Text to image",
            "description": "Describe a picture",
            "cost": "ceil(steps / 20)",
            "params": {
                "prompt": {"type": "string", "maxLength": 2000, "required": True, "default": ""},
                "negative": {"type": "string", "maxLength": 2000, "default": "blurry"},
                "seed": {"type": "integer", "min": 0, "max": 2**48},
                "steps": {"type": "integer", "min": 1, "max": 100, "default": 20},
                "cfg": {"type": "number", "min": 1, "max": 30, "default": 7.5},
                "width": {"type": "integer", "min": 64, "max": 2048, "default": 512},
                "sampler": {"type": "enum", "values": ["euler", "dpmpp_2m"], "default": "euler"},
                "hires": {"type": "boolean", "default": False},
            },
        }
    ],
}


async def test_the_form_is_built_from_the_templates_and_sends_a_template_task(
    nursery: trio.Nursery, start_gateway: Any, tmp_path: Path
) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=5)
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(TEMPLATES))
    out = await run_scenario("page_layout.mjs", "templates", g.url, templates=path)
    fields = {f["name"]: f for f in out["fields"]}
    assert list(fields) == ["prompt", "negative", "seed", "steps", "cfg", "width", "sampler", "hires"]
    assert fields["prompt"]["tag"] == "textarea" and fields["negative"]["tag"] == "textarea"
    assert fields["steps"] == {**fields["steps"], "type": "number", "min": "1", "max": "100", "value": "20"}
    assert fields["seed"]["value"] == "" and fields["seed"]["placeholder"] == "random"
    assert fields["sampler"]["tag"] == "select" and fields["sampler"]["options"] == ["euler", "dpmpp_2m"]
    assert fields["hires"]["type"] == "checkbox" and fields["hires"]["value"] is False
    assert out["costs"] == ["Cost: 1 credit", "Cost: 3 credits"]  # the rule over the form's values, live
    assert out["toggle"] == {"visible": True, "rawHidden": True}  # raw JSON only behind "Advanced"
    body = out["body"]
    assert body is not None, "no SEND /app/tasks frame"
    assert body["template"] == "txt2img" and body["clientId"].startswith("web-")
    # the seed left empty is not sent (the gateway draws it); every other field is, typed
    assert body["params"] == {
        "prompt": "a red fox in the snow",
        "negative": "blurry",
        "steps": 7,
        "cfg": 7.5,
        "width": 512,
        "sampler": "dpmpp_2m",
        "hires": True,
    }
    assert out["answer"] == "Queued." or out["answer"].startswith("Not accepted: "), out["answer"]
    assert out["noRaw"] == {"visible": False, "rawHidden": True}
    assert page_errors(out) == []


async def test_show_older_pages_through_the_task_list(nursery: trio.Nursery, start_gateway: Any) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=5)
    out = await run_scenario("page_layout.mjs", "older", g.url)
    assert out["before"] == ["t-old-1", "t-old-2"]  # newest first
    assert out["after"] == ["t-old-1", "t-old-2", "t-old-3"] and out["buttonHidden"], out
    assert {"state": "all", "limit": "50", "before": "cursor-1"} in out["asked"], out["asked"]
    failed = out["failed"]
    assert failed["state"] == "failed" and failed["error"] == "out of memory" and failed["otherTab"], failed
    assert failed["refund"] == "1 credit returned" and failed["title"] == "old picture 3", failed


async def test_the_page_says_how_to_get_its_stomp_library_when_it_is_missing(
    nursery: trio.Nursery, start_gateway: Any
) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=5)
    out = await run_scenario("page_layout.mjs", "nolibrary", g.url)
    assert "npm" in out["banner"] and "scripts/run" in out["banner"] and out["conn"] == "no-library", out


async def test_page_cut_off_mid_task_reconnects_and_resumes_with_last_seq(
    nursery: trio.Nursery, start_gateway: Any
) -> None:
    g = await page_gateway(nursery, start_gateway, step_ms=100)
    out = await run_scenario("page_tasks.mjs", "drop", g.url)
    before, after = out["before"], out["after"]
    assert before[-1]["state"] == "running", before[-1]
    assert out["conn"] == "reconnecting", out["conn"]  # the page said it lost the link
    assert out["sockets"] == 2, "the page did not open a new WebSocket by itself"
    first, second = out["subscribes"]
    assert "last-seq:" not in first
    last_seq = int(second.split("last-seq:")[1].split("\n")[0])
    assert last_seq > 0, second
    progress = [v["progress"] for v in before + after if v["state"] == "running"]
    assert progress == sorted(progress), f"progress went backwards across the drop: {progress}"
    assert after[-1]["state"] == "succeeded" and after[-1]["images"][0]["width"] > 0, after[-1]
    assert page_errors(out) == []

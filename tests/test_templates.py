"""Workflow templates without a gateway: loading and its refusals, each parameter type, defaults, the drawn seed,
the cost language, and the store keeping a task's template and parameters (schema migration)."""

from __future__ import annotations

import copy
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fake_comfyui import NODE_SPECS

from actors.store import _MIGRATIONS, TaskRecord, open_store
from actors.templates import (
    BUNDLED_DIR,
    MAX_COST,
    CostError,
    CostRule,
    ParamError,
    Template,
    TemplateError,
    load_directory,
    load_file,
)

GRAPH = {
    "1": {"class_type": "PrimitiveString", "inputs": {"value": ""}},
    "2": {
        "class_type": "KSampler",
        "inputs": {"seed": 0, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "model": ["1", 0]},
    },
    "3": {"class_type": "RegexReplace", "inputs": {"string": ["1", 0], "case_insensitive": True, "count": 0}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
}


def every_type() -> dict[str, Any]:
    """A template with one parameter of each type, one bound to two inputs."""
    return {
        "name": "all-types",
        "title": "All types",
        "description": "one of each",
        "workflow": copy.deepcopy(GRAPH),
        "params": {
            "text": {"type": "string", "maxLength": 20, "bind": ["1.inputs.value"]},
            "seed": {"type": "integer", "min": 10, "max": 20, "bind": ["2.inputs.seed"]},
            "steps": {"type": "integer", "default": 20, "min": 1, "max": 100, "bind": ["2.inputs.steps"]},
            "cfg": {"type": "number", "default": 7.5, "min": 1, "max": 20, "bind": ["2.inputs.cfg"]},
            "sampler": {
                "type": "enum",
                "values": ["euler", "ddim"],
                "default": "euler",
                "bind": ["2.inputs.sampler_name"],
            },
            "fold": {"type": "boolean", "default": False, "bind": ["3.inputs.case_insensitive"]},
            "size": {
                "type": "integer",
                "default": 512,
                "min": 64,
                "max": 1024,
                "bind": ["4.inputs.width", "4.inputs.height"],
            },
            "count": {"type": "enum", "values": [1, 2, 4], "default": 1, "bind": ["4.inputs.batch_size"]},
        },
        "cost": "count * ceil(steps / 20) + max(0, floor(cfg - 10))",
    }


def write(directory: Path, name: str, body: Any) -> Path:
    path = directory / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def template(tmp_path: Path, body: dict[str, Any] | None = None) -> Template:
    return load_file(write(tmp_path, "t.json", body if body is not None else every_type()))


def refusal(tmp_path: Path, body: Any) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        load_file(write(tmp_path, "broken.json", body))
    assert caught.value.file == "broken.json" and str(caught.value).startswith("broken.json: ")
    return caught.value


# ---- resolving parameters ---------------------------------------------------------------------------------


def test_each_type_binds_into_its_inputs(tmp_path: Path) -> None:
    t = template(tmp_path)
    given = {"text": "hello", "seed": 12, "steps": 45, "cfg": 12.5, "sampler": "ddim", "fold": True, "size": 768}
    r = t.resolve(given | {"count": 4}, random.Random(0))
    wf = r.workflow
    assert wf["1"]["inputs"]["value"] == "hello"
    assert wf["2"]["inputs"] == {"seed": 12, "steps": 45, "cfg": 12.5, "sampler_name": "ddim", "model": ["1", 0]}
    assert wf["3"]["inputs"] == {"string": ["1", 0], "case_insensitive": True, "count": 0}
    assert wf["4"]["inputs"] == {"width": 768, "height": 768, "batch_size": 4}  # one parameter, two inputs
    assert r.params == given | {"count": 4}
    assert r.cost == 4 * 3 + 2 and r.template == "all-types"
    assert t.workflow["4"]["inputs"]["width"] == 512  # the template itself is untouched


def test_missing_optionals_take_their_defaults_and_a_missing_seed_is_drawn(tmp_path: Path) -> None:
    t = template(tmp_path)
    draws = [t.resolve({"text": "x"}, random.Random(n)) for n in range(40)]
    first = draws[0]
    assert {k: v for k, v in first.params.items() if k != "seed"} == {
        "text": "x",
        "steps": 20,
        "cfg": 7.5,
        "sampler": "euler",
        "fold": False,
        "size": 512,
        "count": 1,
    }
    assert first.cost == 1
    seeds = {d.params["seed"] for d in draws}
    assert seeds <= set(range(10, 21)) and len(seeds) > 3  # within the parameter's bounds, and varying
    assert all(d.workflow["2"]["inputs"]["seed"] == d.params["seed"] for d in draws)  # reported = used
    # null means "not given" (what an empty form field sends)
    assert t.resolve({"text": "x", "seed": None, "steps": None}, random.Random(1)).params["steps"] == 20
    assert t.resolve({"text": "x", "seed": 15}, random.Random(1)).params["seed"] == 15
    # a form sends an enum's choice as text: "4" is the choice 4, bound as the number
    r = t.resolve({"text": "x", "count": "4"}, random.Random(1))
    assert r.params["count"] == 4 and r.workflow["4"]["inputs"]["batch_size"] == 4 and r.cost == 4


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"text": "x", "steps": 0}, {"steps": "0 is below the minimum 1"}),
        ({"text": "x", "steps": 101}, {"steps": "101 is above the maximum 100"}),
        ({"text": "x", "steps": "20"}, {"steps": 'must be an integer, not string "20"'}),
        ({"text": "x", "steps": 20.5}, {"steps": "must be an integer, not number 20.5"}),
        ({"text": "x", "steps": True}, {"steps": "must be an integer, not boolean true"}),
        ({"text": "x", "cfg": 0.5}, {"cfg": "0.5 is below the minimum 1"}),
        ({"text": "x", "cfg": "7"}, {"cfg": 'must be a finite number, not string "7"'}),
        ({"text": "x", "cfg": float("inf")}, {"cfg": "must be a finite number, not number Infinity"}),
        ({"text": "x", "fold": 1}, {"fold": "must be true or false, not integer 1"}),
        ({"text": "x", "sampler": "heun"}, {"sampler": 'must be one of "euler", "ddim", not "heun"'}),
        ({"text": "x", "count": 3}, {"count": "must be one of 1, 2, 4, not 3"}),
        ({"text": "x", "count": True}, {"count": "must be one of 1, 2, 4, not true"}),
        ({"text": "x" * 21}, {"text": "is 21 characters long; at most 20 are allowed"}),
        ({"text": 5}, {"text": "must be a string, not integer 5"}),
        ({"text": "a\ud800b"}, {"text": "contains a lone surrogate (not valid Unicode text)"}),
        ({"text": "x", "seed": 21}, {"seed": "21 is above the maximum 20"}),
        ({}, {"text": "is required"}),
        ({"text": "x", "bogus": 1, "steps": -1}, {"bogus": "unknown parameter", "steps": "-1 is below the minimum 1"}),
    ],
)
def test_bad_parameters_are_refused_by_name(tmp_path: Path, params: dict[str, Any], expected: dict[str, str]) -> None:
    with pytest.raises(ParamError) as caught:
        template(tmp_path).resolve(params, random.Random(0))
    got = dict(caught.value.problems)
    assert sorted(got) == sorted(expected)
    for name, reason in expected.items():
        assert got[name].startswith(reason), (name, got[name])
        assert f"{name}: {got[name]}" in str(caught.value)


def test_huge_and_many_values_get_an_answer_of_bounded_size(tmp_path: Path) -> None:
    t = template(tmp_path)
    with pytest.raises(ParamError) as caught:
        t.resolve({"text": "x", "cfg": 10**400, "steps": -(10**400)}, random.Random(0))
    assert [name for name, _ in caught.value.problems] == ["steps", "cfg"]
    assert "is above the maximum 20" in str(caught.value) and len(str(caught.value)) < 300
    bad_number = every_type()
    bad_number["params"]["cfg"]["max"] = 10**400
    assert "params.cfg.max: must be a number within" in str(refusal(tmp_path, bad_number))
    with pytest.raises(ParamError) as caught:
        t.resolve({"text": "x"} | {f"p{n}": n for n in range(1000)}, random.Random(0))
    assert len(caught.value.problems) == 1000 and str(caught.value).endswith("; and 990 more")
    assert len(str(caught.value)) < 2000


def test_params_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="params: must be a JSON object"):
        template(tmp_path).resolve(["text"], random.Random(0))


# ---- the cost language --------------------------------------------------------------------------------------


WHOLE = {"steps": True, "n": True, "cfg": False}


@pytest.mark.parametrize(
    ("rule", "params", "cost"),
    [
        ("3", {}, 3),
        ("n * ceil(steps / 20)", {"n": 2, "steps": 41}, 6),
        ("floor(steps / 20)", {"steps": 39}, 1),
        ("ceil(0.1 * steps)", {"steps": 30}, 3),  # exact: binary floats would give 4
        ("min(n, 3) + max(1, 2, steps) - -1", {"n": 5, "steps": 0}, 6),
        ("(n + 1) * (steps - 1)", {"n": 1, "steps": 4}, 6),
        ("ceil(cfg)", {"cfg": 2.25}, 3),
        ("2.0 * n", {"n": 4}, 8),
        ("0", {}, 0),
    ],
)
def test_cost_rules_compute_exactly(rule: str, params: dict[str, Any], cost: int) -> None:
    assert CostRule.parse(rule, WHOLE).evaluate(params) == cost


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ("__import__('os').system('true')", "only ceil, floor, min and max may be called"),
        ("n.real", "is not allowed"),
        ("n ** 2", "is not allowed"),
        ("n if steps else 1", "is not allowed"),
        ("n > 1", "is not allowed"),
        ("'a' * n", "is not a number"),
        ("True", "is not a number"),
        ("prompt", "'prompt' is not a numeric parameter"),
        ("ceil(n, 2)", "ceil() takes 1 argument"),
        ("max(n)", "max() takes at least 2 arguments"),
        ("round(n)", "only ceil, floor, min and max"),
        ("ceil(x=n)", "only ceil, floor, min and max"),
        ("steps / 20", "may give a fraction"),
        ("n * cfg", "may give a fraction"),
        ("0.5", "may give a fraction"),
        ("n +", "is not an expression"),
        ("lambda: 1", "is not allowed"),
        ("", "is empty"),
        ("1" + "+1" * 600, "longer than"),
        ("ceil(" * 40 + "1" + ")" * 40, "nested deeper"),
    ],
)
def test_cost_rules_outside_the_language_are_refused(rule: str, complaint: str) -> None:
    with pytest.raises(CostError) as caught:
        CostRule.parse(rule, WHOLE)
    assert complaint in str(caught.value)


def test_cost_must_land_in_the_ledger_range() -> None:
    rule = CostRule.parse("steps - n", WHOLE)
    with pytest.raises(CostError, match="gives -1 for these parameters"):
        rule.evaluate({"steps": 1, "n": 2})
    with pytest.raises(CostError, match="more than 2"):
        CostRule.parse("n * n", WHOLE).evaluate({"n": 2**53})
    assert CostRule.parse("n", WHOLE).evaluate({"n": MAX_COST}) == MAX_COST
    with pytest.raises(CostError, match="divides by zero"):
        CostRule.parse("ceil(n / steps)", WHOLE).evaluate({"n": 1, "steps": 0})


# ---- loading ------------------------------------------------------------------------------------------------


def _broken(change: Any) -> dict[str, Any]:
    body = every_type()
    change(body)
    return body


@pytest.mark.parametrize(
    ("change", "field", "complaint"),
    [
        (lambda b: b.pop("cost"), "cost", "is missing"),
        (lambda b: b.update(cost="steps / 3"), "cost", "may give a fraction"),
        (lambda b: b.update(cost="text * 2"), "cost", "'text' is not a numeric parameter"),
        (lambda b: b.update(cost="eval('1')"), "cost", "only ceil, floor, min and max"),
        (lambda b: b.update(cost="ceil(1 / (steps - 20))"), "cost", "divides by zero"),
        (lambda b: b.update(cost="1 - steps"), "cost", "gives -19"),
        (lambda b: b.update(extra=1), "extra", "unknown field"),
        (lambda b: b.update(name="no spaces"), "name", "must be 1 to 64"),
        (lambda b: b.update(workflow={}), "workflow", "non-empty object"),
        (lambda b: b["workflow"]["2"].pop("class_type"), "workflow.2.class_type", "is missing"),
        (
            lambda b: b["workflow"]["3"]["inputs"].update(string=["9", 0]),
            "workflow.3.inputs.string",
            "links to node '9'",
        ),
        (lambda b: b["workflow"]["1"]["inputs"].update(value="\ud800"), "workflow", "lone surrogate"),
        (lambda b: b["params"]["steps"].update(bind=["2.inputs.stepz"]), "params.steps.bind", "has no input 'stepz'"),
        (lambda b: b["params"]["steps"].update(bind=["8.inputs.steps"]), "params.steps.bind", "has no node '8'"),
        (lambda b: b["params"]["steps"].update(bind=["2.steps"]), "params.steps.bind", "NODE_ID.inputs.INPUT_NAME"),
        (lambda b: b["params"]["steps"].update(bind=[]), "params.steps.bind", "one or more"),
        (lambda b: b["params"]["steps"].update(bind=["3.inputs.string"]), "params.steps.bind", "is a link"),
        (lambda b: b["params"]["cfg"].update(bind=["2.inputs.steps"]), "params.cfg.bind", "already bound by 'steps'"),
        (lambda b: b["params"]["steps"].update(default=500), "params.steps.default", "500 is above the maximum 100"),
        (lambda b: b["params"]["steps"].update(default="20"), "params.steps.default", "must be an integer"),
        (lambda b: b["params"]["steps"].update(min=50, max=10), "params.steps.min", "above max"),
        (lambda b: b["params"]["steps"].update(max=2**60), "params.steps.max", "within"),
        (lambda b: b["params"]["steps"].update(type="float"), "params.steps.type", "must be one of"),
        (lambda b: b["params"]["steps"].update(type="image"), "params.steps.type", "not supported"),
        (lambda b: b["params"]["steps"].update(maxLength=3), "params.steps.maxLength", "only to string"),
        (lambda b: b["params"]["steps"].update(maxlength=3), "params.steps.maxlength", "unknown field"),
        (lambda b: b["params"]["sampler"].pop("values"), "params.sampler.values", "needs a list"),
        (lambda b: b["params"]["sampler"].update(values=["a", "a"]), "params.sampler.values", "listed twice"),
        (lambda b: b["params"]["seed"].update(default=3), "params.seed.default", "no default"),
        (lambda b: b["params"]["seed"].update(type="string"), "params.seed.type", "must be an integer"),
        (
            lambda b: b["params"].update(ceil={"type": "integer", "bind": ["4.inputs.batch_size"]}),
            "params.ceil",
            "not ceil, floor",
        ),
        (lambda b: b.update(params=[]), "params", "must be an object"),
    ],
)
def test_a_broken_template_is_refused_with_its_file_and_field(
    tmp_path: Path, change: Any, field: str, complaint: str
) -> None:
    exc = refusal(tmp_path, _broken(change))
    assert exc.field == field and complaint in exc.reason, str(exc)
    assert str(exc).startswith(f"broken.json: {field}: ")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ("[]", "must hold a JSON object"),
        (b"\xff".decode("latin-1"), "is not valid JSON"),
    ],
)
def test_a_file_that_is_not_a_template_is_refused(tmp_path: Path, text: str, complaint: str) -> None:
    assert complaint in str(refusal(tmp_path, text))


def test_a_directory_loads_every_good_file_and_lists_the_bad_ones(tmp_path: Path) -> None:
    write(tmp_path, "a.json", every_type() | {"name": "a"})
    write(tmp_path, "b.json", _broken(lambda b: b["params"]["steps"].update(default=0)) | {"name": "b"})
    write(tmp_path, "c.json", every_type() | {"name": "c"})
    write(tmp_path, "d.json", every_type() | {"name": "a"})  # a name already taken
    write(tmp_path, "notes.txt", "not a template")
    catalog = load_directory(tmp_path)
    assert list(catalog.templates) == ["a", "c"]
    assert [(e.file, e.field) for e in catalog.errors] == [("b.json", "params.steps.default"), ("d.json", "name")]
    assert catalog.errors[0].error == "b.json: params.steps.default: 0 is below the minimum 1"
    with pytest.raises(FileNotFoundError):
        load_directory(tmp_path / "missing")


def test_the_schema_shows_what_a_form_needs_and_hides_the_bindings(tmp_path: Path) -> None:
    schema = template(tmp_path).schema()
    assert list(schema) == ["name", "title", "description", "params", "cost"]
    assert list(schema["params"]) == list(every_type()["params"])  # the file's order is the form's order
    assert schema["cost"] == every_type()["cost"]
    assert schema["params"]["text"] == {
        "type": "string",
        "title": "text",
        "description": "",
        "required": True,
        "random": False,
        "default": None,
        "min": None,
        "max": None,
        "maxLength": 20,
        "values": None,
    }
    assert schema["params"]["seed"] | {} == {
        "type": "integer",
        "title": "seed",
        "description": "",
        "required": False,
        "random": True,
        "default": None,
        "min": 10,
        "max": 20,
        "maxLength": None,
        "values": None,
    }
    assert schema["params"]["count"]["values"] == [1, 2, 4] and schema["params"]["cfg"]["default"] == 7.5
    assert "bind" not in json.dumps(schema) and "4.inputs" not in json.dumps(schema)


def test_bundled_templates_load_and_the_simulator_knows_their_nodes() -> None:
    catalog = load_directory(BUNDLED_DIR)
    assert catalog.errors == ()
    txt2img = catalog.get("txt2img")
    assert txt2img is not None
    assert {"prompt", "negative", "seed", "steps", "width", "height", "batch_size"} <= set(txt2img.params)
    assert txt2img.cost.text == "batch_size * ceil(steps / 20)"
    r = txt2img.resolve({"prompt": "a lighthouse", "steps": 30, "batch_size": 3}, random.Random(7))
    assert r.cost == 6
    for t in catalog.templates.values():
        assert t.node_classes() <= set(NODE_SPECS), (t.name, t.node_classes() - set(NODE_SPECS))


# ---- the store keeps them -----------------------------------------------------------------------------------


async def test_the_store_keeps_template_and_params_and_migrates_old_files(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN;{_MIGRATIONS[1]}{_MIGRATIONS[2]}PRAGMA user_version = 2;COMMIT;")
    db.execute(
        "INSERT INTO tasks(task_id, seq, user_id, client_id, prompt_id, state, size, cost, workflow, "
        "created_at, updated_at) VALUES ('old', 1, 'u', 'c', 'p-old', 'succeeded', 1, 1, '{}', 0, 0)"
    )
    db.close()
    rec = TaskRecord(
        task_id="new",
        seq=2,
        user_id="u",
        client_id="c",
        prompt_id="p-new",
        state="queued",
        size=1,
        cost=6,
        workflow={"1": {"class_type": "X", "inputs": {}}},
        created_at=1,
        updated_at=1,
        template="txt2img",
        params={"prompt": "a cat", "seed": 2**53 - 1, "cfg": 7.5},
    )
    async with open_store(str(path)) as store:
        old = await store.get_task("old")
        assert old is not None and old.template is None and old.params is None
        await store.save_task(rec)
        assert await store.get_task("new") == rec

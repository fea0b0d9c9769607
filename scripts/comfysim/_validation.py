"""Prompt validation (a port of ComfyUI's validate_prompt / validate_inputs) and execution order."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._nodes import NODE_SPECS

log = logging.getLogger("fake_comfyui")

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

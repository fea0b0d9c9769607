// The "new image" form: built from GET /api/templates (a field per parameter), with the raw ComfyUI
// workflow editor behind the "Advanced" toggle when the gateway allows raw workflows. A gateway without a
// templates endpoint gets the raw editor with the standard txt2img workflow.

import { api, ApiError } from "./api.js";
import { costOf } from "./cost.js";
import { $, el, store } from "./dom.js";

const LONG_TEXT = new Set(["prompt", "negative", "negative_prompt", "text"]);
const form = { templates: [], raw: true, rawOnly: false, defaultWorkflow: "" };

const label = (name, spec) => spec.title || name.replace(/_/g, " ").replace(/^\w/, (c) => c.toUpperCase());

function field(name, spec) {
  const id = "p-" + name;
  const attrs = { id, name, "data-param": name, title: spec.description || null };
  let input;
  if (spec.type === "boolean") {
    input = el("input", { ...attrs, type: "checkbox", checked: spec.default === true });
    return el("label", { class: "field check" }, input, el("span", { text: label(name, spec) }));
  }
  if (spec.type === "enum") {
    input = el("select", attrs, ...(spec.values || []).map((v) => el("option", { value: v, text: v, selected: v === spec.default })));
  } else if (spec.type === "string") {
    const long = LONG_TEXT.has(name) || (spec.maxLength || 0) > 120;
    input = el(long ? "textarea" : "input", { ...attrs, maxlength: spec.maxLength, rows: name === "prompt" ? 3 : 2,
                                               required: spec.required, placeholder: spec.description || null });
    input.value = spec.default ?? "";
  } else {
    input = el("input", { ...attrs, type: "number", inputmode: "numeric", min: spec.min, max: spec.max,
                          step: spec.type === "integer" ? 1 : "any", required: spec.required,
                          placeholder: name === "seed" ? "random" : null });
    if (spec.default != null && name !== "seed") input.value = spec.default;
  }
  const wide = input.tagName === "TEXTAREA";
  return el("label", { class: "field" + (wide ? " wide" : ""), for: id }, el("span", { text: label(name, spec) }), input);
}

function buildFields(template) {
  const specs = Object.entries(template.params || {});
  const text = specs.filter(([n, s]) => s.type === "string" && (LONG_TEXT.has(n) || (s.maxLength || 0) > 120));
  const rest = specs.filter((entry) => !text.includes(entry));
  $("templateFields").replaceChildren(...text.map(([n, s]) => field(n, s)),
                                      el("div", { class: "field-grid" }, ...rest.map(([n, s]) => field(n, s))));
  $("templateHint").textContent = template.description || "";
  showCost();
}

const currentTemplate = () => form.templates.find((t) => t.name === $("templatePick").value) || form.templates[0];

// "Cost: 2 credits", from the template's rule over the values filled in (defaults for the empty ones).
function showCost() {
  const template = currentTemplate();
  if (form.raw || !template || !template.cost) { $("templateCost").textContent = ""; return; }
  const values = {};
  for (const [name, spec] of Object.entries(template.params || {})) if (spec.default !== undefined) values[name] = spec.default;
  Object.assign(values, templateParams(template, false));
  const n = costOf(template.cost, values);
  $("templateCost").textContent = n == null ? `Cost: ${template.cost}` : `Cost: ${n} credit${n === 1 ? "" : "s"}`;
}

// The parameters the user filled in; an empty number (the seed) is left out so the gateway draws it.
function templateParams(template, strict = true) {
  const params = {};
  for (const [name, spec] of Object.entries(template.params || {})) {
    const input = document.querySelector(`[data-param="${CSS.escape(name)}"]`);
    if (!input) continue;
    if (spec.type === "boolean") params[name] = input.checked;
    else if (spec.type === "integer" || spec.type === "number") {
      if (input.value.trim() === "") continue;
      params[name] = Number(input.value);
    } else if (input.value.trim() !== "") params[name] = input.value;
    else if (spec.required && strict) {
      input.focus();
      throw new Error(`${label(name, spec)} is required.`);
    }
  }
  return params;
}

function setRaw(on) {
  form.raw = on || form.rawOnly;
  $("templateSection").hidden = form.raw;
  $("rawSection").hidden = !form.raw;
  $("advancedToggle").setAttribute("aria-pressed", String(form.raw));
  $("advancedToggle").textContent = form.raw ? "Use the form" : "Advanced: raw workflow";
  showCost();
}

async function loadDefaultWorkflow() {
  try {
    const res = await fetch("/static/txt2img.json");
    if (res.ok) form.defaultWorkflow = await res.text(); // verbatim: keeps the file's node order
  } catch (_) { /* the editor stays empty */ }
  $("workflow").value = store.get(localStorage, "cg.workflow") || form.defaultWorkflow;
}

export async function loadForm() {
  await loadDefaultWorkflow();
  let data = null;
  try {
    data = await api("GET", "/api/templates");
  } catch (err) {
    if (!(err instanceof ApiError) || ![404, 405].includes(err.status)) console.warn("templates:", err.message);
    if (err instanceof ApiError && err.status === 401) return; // the token panel asks for another token
  }
  form.templates = (data && Array.isArray(data.templates)) ? data.templates : [];
  const rawAllowed = !data || data.rawWorkflows !== false;
  form.rawOnly = form.templates.length === 0;
  $("templatePick").replaceChildren(...form.templates.map((t) => el("option", { value: t.name, text: t.title || t.name })));
  $("templatePickField").hidden = form.templates.length < 2;
  if (form.templates.length) buildFields(form.templates[0]);
  $("advancedToggle").hidden = !rawAllowed || form.rawOnly;
  $("rawOnlyHint").hidden = !form.rawOnly;
  setRaw(form.rawOnly);
  $("submitBtn").disabled = !rawAllowed && form.rawOnly;
  $("taskForm").dataset.mode = form.rawOnly ? "raw" : "template";
  if (!rawAllowed && form.rawOnly) formMessage("This gateway offers no templates and allows no raw workflows.", "error");
}

function parseWorkflow(text) {
  let wf;
  try { wf = JSON.parse(text); } catch (err) { throw new Error("The workflow is not valid JSON: " + err.message); }
  if (!wf || typeof wf !== "object" || Array.isArray(wf)) throw new Error("The workflow must be a JSON object of nodes.");
  if (Array.isArray(wf.nodes) && Array.isArray(wf.links)) throw new Error("This is a UI-format workflow: in ComfyUI use “Export (API)”.");
  return wf;
}

// A random seed for every sampler, so identical submissions are not answered from ComfyUI's cache.
function randomizeSeeds(workflow) {
  for (const node of Object.values(workflow)) {
    const inputs = node && node.inputs;
    for (const key of ["seed", "noise_seed"]) if (inputs && typeof inputs[key] === "number") inputs[key] = Math.floor(Math.random() * 2 ** 48);
  }
}

// What a raw workflow is about, for its card: the sampler's positive prompt text and its seed.
function describeWorkflow(workflow) {
  const sampler = Object.values(workflow).find((n) => n && /KSampler/.test(n.class_type || ""));
  const ref = sampler && sampler.inputs && sampler.inputs.positive;
  const text = Array.isArray(ref) && workflow[ref[0]] && workflow[ref[0]].inputs ? workflow[ref[0]].inputs.text : null;
  const out = {};
  if (typeof text === "string") out.prompt = text;
  if (sampler && sampler.inputs) for (const k of ["seed", "steps"]) if (typeof sampler.inputs[k] === "number") out[k] = sampler.inputs[k];
  return out;
}

// {body, summary}: the task body for SEND /app/tasks (or POST /api/tasks) and what the card shows until the
// gateway reports the parameters; throws an Error with a readable message.
export function taskBody(clientId) {
  if (form.raw) {
    const workflow = parseWorkflow($("workflow").value);
    const size = Number($("size").value);
    if (!Number.isInteger(size) || size < 1) throw new Error("Size must be a whole number of 1 or more.");
    if ($("newSeed").checked) randomizeSeeds(workflow);
    return { body: { clientId, workflow, size }, summary: describeWorkflow(workflow) };
  }
  const template = currentTemplate();
  const params = templateParams(template);
  return { body: { clientId, template: template.name, params }, summary: params };
}

export function formMessage(text, kind = "") {
  $("formMsg").textContent = text;
  $("formMsg").className = "form-msg " + kind;
}

export function bindForm(submit) {
  $("taskForm").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  $("advancedToggle").addEventListener("click", () => setRaw(!form.raw));
  $("templatePick").addEventListener("change", () => buildFields(currentTemplate()));
  $("templateFields").addEventListener("input", showCost);
  $("workflow").addEventListener("input", () => store.set(localStorage, "cg.workflow", $("workflow").value));
  $("resetWorkflow").addEventListener("click", () => {
    $("workflow").value = form.defaultWorkflow;
    store.remove(localStorage, "cg.workflow");
  });
}

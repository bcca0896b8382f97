// Runs web/picker.js's mapping functions in Node (no browser, no ComfyUI) for tests/test_picker_mapping.py.
//
//   node tests/js/picker_harness.mjs [path/to/picker.js] < request.json
//
// The frontend modules picker.js imports (../../scripts/app.js, api.js) are replaced by stubs through a
// module-resolution hook, so the file under test is loaded unchanged.  The request is a JSON list of calls:
//   {"fn": "stepOf", "node": NODE}                                -> the step
//   {"fn": "transformOf", "steps": [...], "w": W, "h": H, "roi": false, "points": [[x, y], ...],
//    "nodePoints": [[x, y], ...]}                                 -> {t, node: toNode of each point,
//                                                                     pixel: pixelAt of each, back: toPic of
//                                                                     node, pic: toPic of each node point}
//   {"fn": "chain", "graph": {id: NODE}, "node": id, "input": name, "w": W, "h": H, "points": [...],
//    "nodePoints": [...]}                                         -> findPicture from that node, then as above
//   {"fn": "constants"}                                           -> {KEEPS_SIZE, GEOMETRY}
// where NODE = {type, title?, mode?, widgets: {name: value}, inputs: [{name, type, from?: id, widget?: bool}],
// picture?: true (a Load Image node with a file)}.  Prints one JSON list of answers.
import { register } from "node:module";
import { pathToFileURL } from "node:url";
import { readFileSync } from "node:fs";

const stub = (code) => "data:text/javascript," + encodeURIComponent(code);
const STUBS = {
  "/scripts/app.js": "export const app = { registerExtension() {} };",
  "/scripts/api.js": "export const api = { apiURL: (p) => p };",
};
register(stub(`
  const STUBS = ${JSON.stringify(Object.fromEntries(Object.entries(STUBS).map(([k, v]) => [k, stub(v)])))};
  export async function resolve(specifier, context, next) {
    for (const [end, url] of Object.entries(STUBS)) {
      if (specifier.endsWith(end)) return { url, shortCircuit: true };
    }
    return next(specifier, context);
  }
`), import.meta.url);

const file = process.argv[2] || new URL("../../web/picker.js", import.meta.url).pathname;
const picker = await import(pathToFileURL(file).href);

/** LiteGraph-like nodes from the JSON description: widgets, inputs with links, findInputSlot, getInputNode. */
function graphOf(spec) {
  const nodes = {};
  for (const [id, n] of Object.entries(spec)) {
    const widgets = Object.entries(n.widgets || {}).map(([name, value]) => ({ name, value }));
    if (n.picture) widgets.push({ name: "image", value: `${n.title || "picture"}.png` });
    const inputs = (n.inputs || []).map((i) => ({
      name: i.name, type: i.type, link: i.from != null ? `${i.from}->${id}` : null,
      ...(i.widget ? { widget: { name: i.name } } : {}),
    }));
    nodes[id] = {
      id, type: n.type, title: n.title, mode: n.mode ?? 0, widgets, inputs,
      findInputSlot(name) { return this.inputs.findIndex((i) => i.name === name); },
      getInputNode(slot) { const from = (n.inputs || [])[slot]?.from; return from != null ? nodes[from] : null; },
    };
  }
  return nodes;
}

function mapped(t, points, nodePoints) {
  const json = (v) => JSON.parse(JSON.stringify(v));
  return {
    t: json(t),
    node: (points || []).map((p) => picker.toNode(t, p)),
    pixel: (points || []).map((p) => picker.pixelAt(t, p)),
    back: (points || []).map((p) => picker.toPic(t, picker.toNode(t, p))),
    pic: (nodePoints || []).map((q) => picker.toPic(t, q)),
  };
}

const request = JSON.parse(readFileSync(0, "utf8"));
const answers = request.map((call) => {
  try {
    if (call.fn === "constants") return { KEEPS_SIZE: [...picker.KEEPS_SIZE], GEOMETRY: picker.GEOMETRY };
    if (call.fn === "stepOf") return picker.stepOf(graphOf({ n: call.node }).n);
    if (call.fn === "transformOf") {
      return mapped(picker.transformOf(call.steps, call.w, call.h, !!call.roi), call.points, call.nodePoints);
    }
    if (call.fn === "chain") {
      const nodes = graphOf(call.graph);
      const pic = picker.findPicture(nodes[call.node], call.input);
      if (!pic) return { picture: null };
      const t = picker.transformOf(pic.steps, call.w, call.h, !!call.roi);
      return { picture: pic.label, steps: pic.steps, ...mapped(t, call.points, call.nodePoints) };
    }
    return { error: `unknown fn ${call.fn}` };
  } catch (e) {
    return { error: String(e && e.stack || e) };
  }
});
process.stdout.write(JSON.stringify(answers));

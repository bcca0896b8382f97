// comfyui-single-image-edit: click-on-the-image widgets (plain ES module, no build step, no network).
//
// * Segment (SAM points / box), SIE_SAMSegment: left click adds a positive point, shift-click or
//   right-click a negative one, a click on a point removes it, a drag draws the box.  Everything
//   is written into the node's `prompt` STRING widget as
//     {"points": [[x, y, 1], [x, y, 0]], "box": [x0, y0, x1, y1] | null}
//   in pixels of the image SAM receives (origin top left; see below), and always redrawn from that
//   text, so a saved workflow reloads with its points and the API prompt carries the same text:
//   headless runs need no browser.  The "clear points / box" button resets the prompt.
// * SinDDM Guide: Region, SIE_SinDDMGuideROI: a click (or a drag) sets its x, y widgets, where
//   the target's top-left corner lands; the target's rectangle is drawn there when its size is
//   known (from the nodes walked, below, or an upstream node's width / height).
//
// What the widget draws on: the frontend never sees the IMAGE flowing into a node, so the
// widget follows the node's image input (`image` for SAM, `target` for the region) upstream to
// the first node that has a picture: a Load Image node (its `image` widget, fetched from
// /view?type=input) or any node showing a preview (`node.imgs`), and shows that picture.
//
// Coordinates: the nodes walked on the way can change the geometry, so the widget composes, from
// their widget values, the transform from the picture's pixels to the pixels of the image that
// reaches the node (node = m * picture + o, as ComfyUI computes it; see transformOf):
//   ImageScale (width, height, crop): resized to width x height (a 0 keeps the aspect); crop "center"
//     first cuts, as comfy.utils.common_upscale does, round((W0 - W0 * new/old aspect) / 2) columns
//     from each side (or the same in rows) when the aspect changes;
//   ImageScaleBy (scale_by), ImageScaleToTotalPixels (megapixels[, resolution_steps]),
//     ImageScaleToMaxDimension (largest_size): resized to the size ComfyUI computes;
//   ImageCrop (width, height, x, y): the rectangle at (x, y), clipped to the image;
//   ImagePadForOutpaint (left, top, right, bottom), ResizeAndPadImage (target_width, target_height):
//     the image (resized to fit) placed inside a larger one;
//   ImageFlip, ImageRotate: mirrored, turned by quarter turns (clockwise, as torch.rot90 there).
// Nodes known to keep the image as it is (KEEPS_SIZE: Reroute, filters, blends onto it, batch picks)
// and bypassed nodes are passed over.  Any other node (an upscale model, a stitch, a subgraph, a
// custom node), or a listed one whose values come through links, cannot be followed: the line on
// the canvas says so in amber and picture pixels are used for that step.
// A click goes into the prompt as the pixel of the node's image it falls in (floor, clamped to
// 0 ... size - 1: a click on a part cut away lands on the nearest edge pixel), which is how SAM reads
// a point (it adds 0.5: the pixel's centre); a dragged box is the pixels its two corners fall in.
// The prompt's points and box are drawn back through the inverse on those pixels' centres, the parts
// of the picture the crops cut away are dimmed, and a line on the canvas says which pixels the numbers
// are in.  For the region, x, y are a corner, not a pixel: rounded to the nearest pixel corner, on the
// output canvas: an ImageCrop cuts the target out of the (scaled) picture, so from there on crops
// change the target's size but not the canvas; the scales still apply.
//
// Both widgets are DOM widgets (a <canvas>) with serialize: false, kept out of the workflow's
// widgets_values and out of the API prompt: only the node's own inputs carry data.  The canvas has
// no minimum height, so loading a workflow never resizes its nodes: it fills the height the node
// has left (on SAM the prompt box is capped at 80 px for that), and new nodes are made 240 px taller.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAM = "SIE_SAMSegment";
const ROI = "SIE_SinDDMGuideROI";
const KINDS = { [SAM]: "image", [ROI]: "target" }; // node type -> input followed to the picture
const COLOR = { pos: "#22c55e", neg: "#ef4444", box: "#3b82f6", roi: "#f59e0b", bg: "#1b1b1b",
                cut: "rgba(0, 0, 0, 0.65)" };
const PAD = 4;       // layout px around the picture (it is fitted, centred, inside the canvas)
const DRAG_PX = 5;   // a press that moves further than this (screen px) is a drag
const HIT_PX = 8;    // a click this close (layout px) to a point removes it

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);

// ---------------------------------------------------------------------------------------
// The prompt text <-> {points: [[x, y, label]], box: [x0, y0, x1, y1] | null}
// ---------------------------------------------------------------------------------------

/** The prompt's points and box, or null when the text is not a prompt (then nothing is overwritten). */
export function parsePrompt(text) {
  if (!text || !String(text).trim()) return { points: [], box: null };
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    return null;
  }
  if (!data || typeof data !== "object" || Array.isArray(data)) return null;
  const num = (v) => typeof v === "number" && Number.isFinite(v);
  const points = [];
  for (const p of Array.isArray(data.points) ? data.points : []) {
    if (!Array.isArray(p) || !num(p[0]) || !num(p[1])) return null;
    points.push([p[0], p[1], p.length > 2 && p[2] === 0 ? 0 : 1]); // [x, y] means positive
  }
  const b = data.box;
  const box = Array.isArray(b) && b.length === 4 && b.every(num) ? b.slice() : null;
  return { points, box };
}

/** The prompt text, spaced like the node's default ('{"points": [], "box": null}'). */
export function formatPrompt({ points, box }) {
  const list = (a) => `[${a.join(", ")}]`;
  return `{"points": [${points.map(list).join(", ")}], "box": ${box ? list(box) : "null"}}`;
}

// ---------------------------------------------------------------------------------------
// Finding the picture upstream
// ---------------------------------------------------------------------------------------

/** {url, label, size?} of the picture a node shows itself, or null. */
function pictureOf(node) {
  const w = node.widgets?.find((w) => w.name === "image" && typeof w.value === "string" && w.value);
  if (w) {
    // "sub/dir/name.png" or "name.png [output]" (the annotated form of pasted / output files)
    const m = /^(.*?)(?: \[(input|output|temp)\])?$/.exec(w.value);
    const path = m[1];
    const cut = path.lastIndexOf("/");
    const query = new URLSearchParams({
      filename: path.slice(cut + 1),
      type: m[2] || "input",
      subfolder: cut >= 0 ? path.slice(0, cut) : "",
    });
    return { url: api.apiURL(`/view?${query}`), label: w.value };
  }
  const img = node.imgs?.[node.imageIndex ?? 0];
  if (img?.src) return { url: img.src, label: node.title || node.type };
  return null;
}

/** The picture found by following `inputName` upstream (through at most 8 nodes, each by its first linked
 *  IMAGE input), or null; its `steps` are the nodes walked between the picture and `node`, as geometry steps
 *  (stepOf), in the image's order (picture first). */
export function findPicture(node, inputName) {
  let slot = node.findInputSlot(inputName);
  let at = node;
  const walked = [];
  for (let depth = 0; depth < 8 && slot >= 0; depth++) {
    const up = at.getInputNode(slot);
    if (!up) return null;
    const pic = pictureOf(up);
    if (pic) return { ...pic, steps: walked.reverse().map(stepOf) };
    walked.push(up);
    at = up;
    slot = (up.inputs || []).findIndex((i) => i.link != null && (i.type === "IMAGE" || i.type === "*"));
  }
  return null;
}

// ---------------------------------------------------------------------------------------
// From picture pixels to the pixels of the image that reaches the node
// ---------------------------------------------------------------------------------------

/** Python's round() (halves to even): ComfyUI computes sizes and crops with it. */
export function pyRound(v) {
  const f = Math.floor(v), d = v - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

/** Node types known to give out an image of the size of the one they take in (their first IMAGE input, the
 *  one followed upstream), pixel for pixel: filters, blends and composites onto it, batch picks.  Checked
 *  against ComfyUI 0.3.64 and 0.8.0 (tests/integration/test_picker_geometry_comfy.py).  Any node neither here
 *  nor in GEOMETRY is not followed: its effect on the geometry is unknown in the browser. */
export const KEEPS_SIZE = new Set([
  "Reroute", "ImageInvert", "ImageBlur", "ImageSharpen", "ImageQuantize", "ImageBlend", "ImageCompositeMasked",
  "ImageBatch", "ImageFromBatch", "RepeatImageBatch", "ImageAddNoise", "Morphology", "Canny",
  "SplitImageWithAlpha", "JoinImageWithAlpha",
]);

/** Node types whose geometry is computed here from their widgets: [kind, widgets read] (a trailing "?" marks a
 *  widget only some ComfyUI versions have). */
export const GEOMETRY = {
  ImageScale: ["scale", ["width", "height", "crop"]],
  ImageScaleBy: ["scaleBy", ["scale_by"]],
  ImageScaleToTotalPixels: ["totalPixels", ["megapixels", "resolution_steps?"]],
  ImageScaleToMaxDimension: ["maxDimension", ["largest_size"]],
  ImageCrop: ["crop", ["width", "height", "x", "y"]],
  ImagePadForOutpaint: ["pad", ["left", "top", "right", "bottom"]],
  ResizeAndPadImage: ["resizePad", ["target_width", "target_height"]],
  ImageFlip: ["flip", ["flip_method"]],
  ImageRotate: ["rotate", ["rotation"]],
};
const CHOICES = { crop: ["disabled", "center"] }; // combo widgets whose every value is known here
const BYPASS = 4; // LiteGraph mode of a bypassed node: ComfyUI hands its input on unchanged

/** One walked node as a geometry step: {kind, title, ...widget values}, where kind is "same" (keeps the image
 *  as it is), "unknown" (cannot be followed), or one of GEOMETRY's kinds. */
export function stepOf(node) {
  const title = node.title || node.type;
  if (node.mode === BYPASS) return { kind: "same", title };
  if (KEEPS_SIZE.has(node.type)) return { kind: "same", title };
  const known = GEOMETRY[node.type];
  if (!known) return { kind: "unknown", title };
  const [kind, names] = known;
  const step = { kind, title };
  for (const spec of names) {
    const optional = spec.endsWith("?"), name = optional ? spec.slice(0, -1) : spec;
    if (node.inputs?.some((i) => i.widget?.name === name && i.link != null)) return { kind: "unknown", title }; // fed by a link
    const w = widgetOf(node, name);
    if (!w) {
      if (optional) continue;
      return { kind: "unknown", title };
    }
    const v = w.value;
    const ok = typeof v === "number" ? Number.isFinite(v) && v >= 0
      : typeof v === "string" && (!CHOICES[name] || CHOICES[name].includes(v));
    if (!ok) return { kind: "unknown", title };
    step[name] = v;
  }
  return step;
}

// the 2 x 2 part of x -> g x + go, per step, in the current image's size [w0, h0]
const FLIPS = { x: [[1, 0, 0, -1], (w0, h0) => [0, h0]], y: [[-1, 0, 0, 1], (w0) => [w0, 0]] };
// torch.rot90(image, k, dims=[2, 1]) on [B, H, W, C]: k quarter turns clockwise
const TURNS = [null, [[0, -1, 1, 0], (w0, h0) => [h0, 0]], [[-1, 0, 0, -1], (w0, h0) => [w0, h0]],
               [[0, 1, -1, 0], (w0) => [0, w0]]];

/** The picture-to-node transform for a picture of w x h pixels and the steps walked (picture first).
 *
 *  Positions are continuous (pixel (i, j) is the square [i, i + 1) x [j, j + 1)); node = m picture + o with
 *  m = [[m[0], m[1]], [m[2], m[3]]] (a scale per axis, or a quarter turn / flip of it).  `size` is the image
 *  that reaches the node, `visible` the part of the picture it still shows ([x0, y0, x1, y1] in picture
 *  pixels; the rest is cut away by crops).  For the region node (`roi`) an ImageCrop cuts its target out of
 *  the canvas x, y refer to: from there on crops only change the target's size, scales still scale the canvas,
 *  and pads, flips and turns of the target alone are not followed.  `exact` is false when a step could not be
 *  followed (`unknown` lists them): those steps are taken as keeping the geometry. */
export function transformOf(steps, w, h, roi = false) {
  const t = { m: [1, 0, 0, 1], o: [0, 0], size: [w, h], visible: [0, 0, w, h], exact: true, via: [], unknown: [] };
  let targetCut = false; // roi: an ImageCrop was passed
  const apply = ([a, b, c, d], [e, f]) => { // node <- g node + go
    const [m0, m1, m2, m3] = t.m, [o0, o1] = t.o;
    t.m = [a * m0 + b * m2, a * m1 + b * m3, c * m0 + d * m2, c * m1 + d * m3];
    t.o = [a * o0 + b * o1 + e, c * o0 + d * o1 + f];
  };
  const cut = (x, y, cw, ch) => { // keep [x, x + cw) x [y, y + ch) of the current image
    if (!(roi && targetCut)) {
      const [a, b] = toPic(t, [x, y]), [c, d] = toPic(t, [x + cw, y + ch]);
      const v = t.visible;
      t.visible = [Math.max(v[0], Math.min(a, c)), Math.max(v[1], Math.min(b, d)),
                   Math.min(v[2], Math.max(a, c)), Math.min(v[3], Math.max(b, d))];
      apply([1, 0, 0, 1], [-x, -y]);
    }
    t.size = [cw, ch];
  };
  const resize = (W, H) => { // the whole current image to W x H (common_upscale, crop "disabled")
    apply([W / t.size[0], 0, 0, H / t.size[1]], [0, 0]);
    t.size = [W, H];
  };
  const skip = (s) => {
    t.exact = false;
    t.unknown.push(s.title);
  };
  for (const s of steps || []) {
    const [w0, h0] = t.size;
    if (s.kind === "same") continue;
    if (s.kind === "unknown" || !(w0 > 0 && h0 > 0)) {
      skip(s);
      continue;
    }
    if (roi && targetCut && ["pad", "resizePad", "flip", "rotate"].includes(s.kind)) { // changes the target only
      skip(s);
      continue;
    }
    if (s.kind === "scale") { // nodes.ImageScale -> comfy.utils.common_upscale
      let { width: W, height: H } = s;
      if (W === 0 && H === 0) continue;
      if (W === 0) W = Math.max(1, pyRound((w0 * H) / h0));
      else if (H === 0) H = Math.max(1, pyRound((h0 * W) / w0));
      let x = 0, y = 0;
      if (s.crop === "center") {
        const oldAspect = w0 / h0, newAspect = W / H;
        if (oldAspect > newAspect) x = pyRound((w0 - w0 * (newAspect / oldAspect)) / 2);
        else if (oldAspect < newAspect) y = pyRound((h0 - h0 * (oldAspect / newAspect)) / 2);
      }
      if (x || y) cut(x, y, w0 - 2 * x, h0 - 2 * y);
      resize(W, H);
    } else if (["scaleBy", "totalPixels", "maxDimension"].includes(s.kind)) {
      let W, H;
      if (s.kind === "scaleBy") { // nodes.ImageScaleBy
        [W, H] = [pyRound(w0 * s.scale_by), pyRound(h0 * s.scale_by)];
      } else if (s.kind === "totalPixels") { // comfy_extras.nodes_post_processing.ImageScaleToTotalPixels
        if (s.resolution_steps === undefined) { // ComfyUI before resolution_steps: an int total, no steps
          const k = Math.sqrt(Math.trunc(s.megapixels * 1024 * 1024) / (w0 * h0));
          [W, H] = [pyRound(w0 * k), pyRound(h0 * k)];
        } else {
          const k = Math.sqrt((s.megapixels * 1024 * 1024) / (w0 * h0)), n = s.resolution_steps;
          [W, H] = [pyRound((w0 * k) / n) * n, pyRound((h0 * k) / n) * n];
        }
      } else { // comfy_extras.nodes_images.ImageScaleToMaxDimension
        const L = s.largest_size;
        [W, H] = h0 > w0 ? [pyRound((w0 / h0) * L), L] : w0 > h0 ? [L, pyRound((h0 / w0) * L)] : [L, L];
      }
      if (!(W >= 1 && H >= 1)) { // ComfyUI fails on an empty image
        skip(s);
        continue;
      }
      resize(W, H);
    } else if (s.kind === "crop") { // comfy_extras.nodes_images.ImageCrop
      const x = Math.min(s.x, w0 - 1), y = Math.min(s.y, h0 - 1);
      if (roi) targetCut = true; // the region's target is this piece; x, y stay on the canvas it is cut from
      cut(x, y, Math.min(s.width, w0 - x), Math.min(s.height, h0 - y));
    } else if (s.kind === "pad") { // nodes.ImagePadForOutpaint: the image at (left, top) of a larger one
      apply([1, 0, 0, 1], [s.left, s.top]);
      t.size = [w0 + s.left + s.right, h0 + s.top + s.bottom];
    } else if (s.kind === "resizePad") { // comfy_extras.nodes_images.ResizeAndPadImage: fit, then centre
      const k = Math.min(s.target_width / w0, s.target_height / h0);
      const W = Math.trunc(w0 * k), H = Math.trunc(h0 * k);
      if (!(W >= 1 && H >= 1)) {
        skip(s);
        continue;
      }
      resize(W, H);
      apply([1, 0, 0, 1], [Math.floor((s.target_width - W) / 2), Math.floor((s.target_height - H) / 2)]);
      t.size = [s.target_width, s.target_height];
    } else if (s.kind === "flip") { // comfy_extras.nodes_images.ImageFlip: "x..." flips the rows, "y..." the columns
      const f = FLIPS[s.flip_method[0]];
      if (!f) {
        skip(s);
        continue;
      }
      apply(f[0], f[1](w0, h0));
    } else if (s.kind === "rotate") { // comfy_extras.nodes_images.ImageRotate
      const k = ["90", "180", "270"].findIndex((p) => s.rotation.startsWith(p)) + 1; // as ComfyUI reads it
      if (k) {
        apply(TURNS[k][0], TURNS[k][1](w0, h0));
        if (k !== 2) t.size = [h0, w0];
      }
    }
    t.via.push(s.title);
  }
  return t;
}

/** Picture position -> position in the node's image (continuous), and back. */
export const toNode = (t, [x, y]) => [t.m[0] * x + t.m[1] * y + t.o[0], t.m[2] * x + t.m[3] * y + t.o[1]];
export function toPic(t, [x, y]) {
  const [a, b, c, d] = t.m, det = a * d - b * c;
  const [u, v] = [x - t.o[0], y - t.o[1]];
  return [(d * u - b * v) / det, (a * v - c * u) / det];
}

/** The pixel [column, row] of the node's image that a picture position falls in: SAM reads a point as the pixel
 *  it names (its prompt encoder adds 0.5, the pixel's centre), so a click goes there as floor(position), clamped
 *  to the image (0 ... size - 1; a click on a part cut away lands on the nearest edge pixel). */
export function pixelAt(t, p) {
  const q = toNode(t, p);
  return [0, 1].map((i) => Math.min(Math.max(Math.floor(q[i]), 0), Math.max(0, t.size[i] - 1)));
}

/** The transform for the widget's current picture and chain. */
function transform(st) {
  const [w, h] = ready(st) ? [st.img.naturalWidth, st.img.naturalHeight] : [0, 0];
  return transformOf(st.pic?.steps, w, h, st.node.type === ROI);
}

/** [w, h] of the region node's target, when it can be known in the browser. */
function targetSize(st) {
  if (ready(st)) {
    const t = transform(st);
    if (t.exact) return t.size;
  }
  const up = st.node.getInputNode(st.node.findInputSlot("target")); // else: an upstream width / height, as set
  const num = (name) => up?.widgets?.find((w) => w.name === name)?.value;
  if (Number.isFinite(num("width")) && Number.isFinite(num("height"))) return [num("width"), num("height")];
  return null;
}

// ---------------------------------------------------------------------------------------
// The widget
// ---------------------------------------------------------------------------------------

/** Where the picture sits in the canvas (layout px): scale s and offset (ox, oy). */
function view(st) {
  const W = st.canvas.clientWidth, H = st.canvas.clientHeight;
  const iw = st.img.naturalWidth, ih = st.img.naturalHeight;
  const s = Math.max(1e-6, Math.min((W - 2 * PAD) / iw, (H - 2 * PAD) / ih));
  return { s, ox: (W - iw * s) / 2, oy: (H - ih * s) / 2, iw, ih };
}

/** A pointer event's position in picture pixels (not clamped). */
function toPicture(st, e) {
  const r = st.canvas.getBoundingClientRect(); // on screen, i.e. after the canvas zoom
  const v = view(st);
  const u = ((e.clientX - r.left) * st.canvas.clientWidth) / r.width;
  const w = ((e.clientY - r.top) * st.canvas.clientHeight) / r.height;
  return [(u - v.ox) / v.s, (w - v.oy) / v.s];
}

const ready = (st) => st.img?.complete && st.img.naturalWidth > 0;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/** Re-reads the inputs; loads a new picture and redraws when anything changed (or when forced). */
function sync(st, force = false) {
  const pic = findPicture(st.node, KINDS[st.node.type]);
  const url = pic?.url ?? null;
  st.pic = pic; // its steps (the resize nodes walked) may change while the picture stays
  if (url !== st.url) {
    st.url = url;
    st.img = null;
    if (url) {
      const img = new Image();
      img.onload = img.onerror = () => img === st.img && sync(st, true);
      img.src = url;
      st.img = img;
    }
  }
  const key = st.node.type === SAM
    ? widgetOf(st.node, "prompt")?.value
    : [widgetOf(st.node, "x")?.value, widgetOf(st.node, "y")?.value, targetSize(st)].join();
  const sig = `${url}|${ready(st)}|${key}|${JSON.stringify(pic?.steps ?? [])}`;
  if (force || sig !== st.sig) {
    st.sig = sig;
    draw(st);
  }
}

function draw(st) {
  const { canvas } = st;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  if (!W || !H) return; // not mounted yet: the ResizeObserver draws once it is
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(H * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = COLOR.bg;
  ctx.fillRect(0, 0, W, H);
  st.draws += 1;
  canvas.dataset.draws = String(st.draws); // for tests: how often it was drawn, and on what
  canvas.dataset.state = !st.url ? "no-image" : ready(st) ? "ready" : st.img?.complete ? "broken" : "loading";
  const say = (text, y = H / 2) => {
    ctx.fillStyle = "#aaa";
    ctx.font = "12px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(text, W / 2, y, W - 8);
  };
  if (H < 30) return say(H >= 12 ? "enlarge the node to pick on the image" : "", H - 3);
  if (canvas.dataset.state !== "ready") {
    const input = KINDS[st.node.type];
    return say({ "no-image": `connect a Load Image node (upstream) to '${input}'`,
                 loading: "loading the image ...", broken: `cannot load ${st.pic?.label}` }[canvas.dataset.state]);
  }
  const v = view(st);
  const t = transform(st);
  const at = (x, y) => { // node pixels -> canvas layout px
    const [px, py] = toPic(t, [x, y]);
    return [v.ox + px * v.s, v.oy + py * v.s];
  };
  ctx.drawImage(st.img, v.ox, v.oy, v.iw * v.s, v.ih * v.s);
  canvas.dataset.view = JSON.stringify({ s: v.s, ox: v.ox, oy: v.oy, w: v.iw, h: v.ih });
  canvas.dataset.transform = JSON.stringify({ m: t.m, o: t.o, size: t.size, visible: t.visible, exact: t.exact });
  const [x0, y0, x1, y1] = t.visible;
  if (x0 > 0 || y0 > 0 || x1 < v.iw || y1 < v.ih) { // what the crops cut away: dimmed, the kept part outlined
    const [a, b, c, d] = [v.ox + x0 * v.s, v.oy + y0 * v.s, v.ox + x1 * v.s, v.oy + y1 * v.s];
    ctx.save();
    ctx.beginPath();
    ctx.rect(v.ox, v.oy, v.iw * v.s, v.ih * v.s);
    ctx.rect(a, b, Math.max(0, c - a), Math.max(0, d - b));
    ctx.fillStyle = COLOR.cut;
    ctx.fill("evenodd");
    ctx.setLineDash([3, 3]);
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(255, 255, 255, 0.7)";
    ctx.strokeRect(a + 0.5, b + 0.5, Math.max(0, c - a - 1), Math.max(0, d - b - 1));
    ctx.restore();
  }
  const note = transformNote(st, t, v);
  canvas.dataset.note = note;
  if (note) {
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    const tw = Math.min(ctx.measureText(note).width, W - 12);
    ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
    ctx.fillRect(2, 2, tw + 8, 16);
    ctx.fillStyle = t.exact ? "#ddd" : "#fbbf24";
    ctx.fillText(note, 6, 4, W - 12);
    ctx.restore();
  }

  if (st.node.type === SAM) {
    const prompt = parsePrompt(widgetOf(st.node, "prompt")?.value);
    canvas.dataset.drawn = prompt ? formatPrompt(prompt) : "";
    if (!prompt) say("the prompt is not valid JSON: fix it or press clear");
    // where SAM reads them: a point, and each box corner, on the centre of the pixel it names
    const centre = (v) => v + 0.5;
    if (prompt?.box) drawBox(ctx, at, prompt.box.map(centre), COLOR.box, false);
    for (const [x, y, label] of prompt?.points ?? []) {
      const [px, py] = at(centre(x), centre(y));
      ctx.beginPath();
      ctx.arc(px, py, 5, 0, 2 * Math.PI);
      ctx.fillStyle = label ? COLOR.pos : COLOR.neg;
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    }
  } else {
    const x = widgetOf(st.node, "x")?.value ?? 0, y = widgetOf(st.node, "y")?.value ?? 0;
    const size = targetSize(st);
    canvas.dataset.drawn = JSON.stringify({ x, y, size });
    if (size) drawBox(ctx, at, [x, y, x + size[0], y + size[1]], COLOR.roi, false);
    const [px, py] = at(x, y); // crosshair on the target's top-left corner
    ctx.strokeStyle = COLOR.roi;
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(px - 8, py); ctx.lineTo(px + 8, py);
    ctx.moveTo(px, py - 8); ctx.lineTo(px, py + 8);
    ctx.stroke();
  }
  if (st.drag?.moved && st.node.type === SAM) drawBox(ctx, at, dragBox(st, st.drag).map((v) => v + 0.5), "#fff", true);
}

/** A line saying in which pixels the numbers are, when they are not the picture's; "" when they are. */
function transformNote(st, t, v) {
  if (!t.exact) return `not followed: ${t.unknown.join(", ")} (geometry unknown); picture pixels used`;
  const same = t.m.join() === "1,0,0,1" && t.o.join() === "0,0";
  if (same && t.visible.join() === [0, 0, v.iw, v.ih].join()) return "";
  const via = t.via.join(" \u2192 ");
  if (st.node.type === SAM) return `points in the ${t.size[0]}\u00d7${t.size[1]} px image after ${via}`;
  const [x0, y0, x1, y1] = t.visible;
  const [a, b] = toNode(t, [x0, y0]), [c, d] = toNode(t, [x1, y1]);
  const cw = Math.round(Math.abs(c - a)), ch = Math.round(Math.abs(d - b));
  return `x, y in pixels of the picture after ${via} (${cw}\u00d7${ch})`;
}

/** A box outline (dashed: the one being dragged; else lightly filled too). */
function drawBox(ctx, at, [x0, y0, x1, y1], color, dashed) {
  const [a, b] = at(x0, y0), [c, d] = at(x1, y1);
  ctx.save();
  ctx.setLineDash(dashed ? [4, 3] : []);
  ctx.lineWidth = 2;
  ctx.strokeStyle = color;
  ctx.strokeRect(a, b, c - a, d - b);
  if (!dashed) {
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = color;
    ctx.fillRect(a, b, c - a, d - b);
  }
  ctx.restore();
}

/** The box being dragged: the pixels of the node's image its corners fall in, x0 <= x1, y0 <= y1. */
function dragBox(st, drag) {
  const t = transform(st);
  const [ax, ay] = pixelAt(t, drag.from), [bx, by] = pixelAt(t, drag.to);
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

function setWidget(node, name, value) {
  const w = widgetOf(node, name);
  if (!w) return;
  w.value = value;
  w.callback?.(w.value);
}

function setPrompt(st, prompt) {
  setWidget(st.node, "prompt", formatPrompt(prompt));
  st.node.setDirtyCanvas?.(true, true);
  sync(st, true);
}

// SAM: click = point (removes a point it lands on), drag = box.
function finishSam(st, drag, e) {
  const prompt = parsePrompt(widgetOf(st.node, "prompt")?.value);
  if (!prompt) return sync(st, true); // not JSON: leave the user's text alone
  if (drag.moved) {
    const box = dragBox(st, drag);
    if (box[0] < box[2] && box[1] < box[3]) prompt.box = box;
    return setPrompt(st, prompt);
  }
  const [x, y] = drag.to;
  const v = view(st), t = transform(st);
  if (x < 0 || y < 0 || x > v.iw || y > v.ih) return sync(st, true); // outside the picture
  const hit = prompt.points.findIndex((p) => {
    const [px, py] = toPic(t, [p[0] + 0.5, p[1] + 0.5]); // drawn on the pixel's centre
    return Math.hypot(px - x, py - y) * v.s <= HIT_PX;
  });
  if (hit >= 0) prompt.points.splice(hit, 1);
  else prompt.points.push([...pixelAt(t, drag.to), e.button === 2 || e.shiftKey ? 0 : 1]);
  setPrompt(st, prompt);
}

// Region: the press (and a drag) puts the target's top-left corner under the pointer.
function moveRoi(st, drag) {
  const [x, y] = toNode(transform(st), drag.to);
  for (const [name, value] of [["x", x], ["y", y]]) {
    const o = widgetOf(st.node, name)?.options ?? {};
    setWidget(st.node, name, clamp(Math.round(value), o.min ?? -8192, o.max ?? 8192));
  }
  st.node.setDirtyCanvas?.(true, true);
  sync(st, true);
}

function listen(st) {
  const { canvas } = st;
  canvas.addEventListener("contextmenu", (e) => { // right-click = negative point, not the node's menu
    e.preventDefault();
    e.stopPropagation();
  });
  // Nodes 2.0 never calls onDrawForeground: catch a new upstream picture when the pointer comes by
  canvas.addEventListener("pointerenter", () => sync(st));
  canvas.addEventListener("pointerdown", (e) => {
    if (!ready(st) || (e.button !== 0 && e.button !== 2)) return;
    sync(st); // the resize nodes' values may have changed since the last draw
    e.preventDefault();
    e.stopPropagation(); // the graph canvas must not start a drag of its own
    canvas.setPointerCapture?.(e.pointerId);
    const p = toPicture(st, e);
    st.drag = { from: p, to: p, x: e.clientX, y: e.clientY, moved: false };
    if (st.node.type === ROI) moveRoi(st, st.drag);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!st.drag) return;
    st.drag.to = toPicture(st, e);
    st.drag.moved ||= Math.hypot(e.clientX - st.drag.x, e.clientY - st.drag.y) > DRAG_PX;
    if (st.node.type === ROI) moveRoi(st, st.drag);
    else if (st.drag.moved) draw(st);
  });
  const end = (e) => {
    const drag = st.drag;
    if (!drag) return;
    st.drag = null; // before the redraw: no rubber band any more
    drag.to = toPicture(st, e);
    if (st.node.type === SAM) finishSam(st, drag, e);
    else moveRoi(st, drag);
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", () => { st.drag = null; sync(st, true); });
}

/** Adds the picking canvas (and, for SAM, the clear button) to a freshly created node. */
function addPicker(node) {
  const sam = node.type === SAM;
  if (sam) {
    // the prompt is a line or three of JSON: let the picture, not the text box, take the node's free height
    const text = widgetOf(node, "prompt");
    if (text?.options && !text.options.getMaxHeight) text.options.getMaxHeight = () => 80;
    const clear = node.addWidget("button", "clear points / box", null,
                                 () => setPrompt(node.siePicker, { points: [], box: null }), { serialize: false });
    clear.serialize = false;
  }
  const canvas = document.createElement("canvas");
  canvas.dataset.testid = sam ? "sie-sam-picker" : "sie-roi-picker";
  canvas.style.cssText = "display:block;width:100%;height:100%;cursor:crosshair;touch-action:none";
  canvas.title = sam ? "click: positive point · shift- or right-click: negative point · click a point: remove it · "
                       + "drag: box"
                     : "click or drag: where the target's top-left corner lands (x, y)";
  // serialize: false in the options keeps it out of the API prompt, on the widget out of widgets_values.
  // No minimum height: the canvas takes the room the node has left, so a workflow saved without this
  // widget (or by a build script) keeps its node sizes and layout; a new node gets room below.
  const widget = node.addDOMWidget("sie_picker", "sie_picker", canvas, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 0,
  });
  widget.serialize = false;
  const st = { node, canvas, widget, url: null, pic: null, img: null, sig: "", drag: null, draws: 0 };
  node.siePicker = st;
  listen(st);
  st.resize = new ResizeObserver(() => draw(st));
  st.resize.observe(canvas);
  // typing in the prompt box (or x, y) redraws at once: the classic text box's input events, and the
  // widget's callback, which Nodes 2.0 calls on typing (it draws no foreground that would catch it)
  widgetOf(node, "prompt")?.element?.addEventListener?.("input", () => sync(st));
  for (const name of sam ? ["prompt"] : ["x", "y"]) {
    const w = widgetOf(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const r = callback?.apply(this, args);
      sync(st);
      return r;
    };
  }
  // room for the picture on a new node; a loaded node gets its saved size afterwards
  const [w, h] = node.computeSize();
  node.setSize([Math.max(w, 320), h + 240]);
}

app.registerExtension({
  name: "single-image-edit.picker",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData?.name in KINDS)) return;
    const chain = (hook, fn) => {
      const before = nodeType.prototype[hook];
      nodeType.prototype[hook] = function (...args) {
        const r = before?.apply(this, args);
        fn.call(this, ...args);
        return r;
      };
    };
    chain("onNodeCreated", function () { addPicker(this); });
    // and again once the whole graph is configured: nodes further up (an ImageScale added after this node)
    // get their links later, and Nodes 2.0 draws no foreground that would catch up
    chain("onConfigure", function () {
      if (!this.siePicker) return;
      sync(this.siePicker);
      setTimeout(() => sync(this.siePicker));
    });
    chain("onConnectionsChange", function () { if (this.siePicker) sync(this.siePicker); });
    // every frame the node is drawn: cheap unless the picture, the prompt or x / y changed
    chain("onDrawForeground", function () { if (this.siePicker) sync(this.siePicker); });
    chain("onRemoved", function () { this.siePicker?.resize.disconnect(); });
  },
});

// detfit serve's page: send each image to POST /v1/predict once, with every detection kept
// (score_threshold=0), then draw and list what passes the slider, in the browser, so moving the
// slider never asks the server again. The drawing follows detfit's overlays: translucent masks
// with a darker edge, boxes, "class score" labels on a filled background, one colour per object
// (its place in the score order the server returned), so overlapping objects stay apart.
"use strict";

const MASK_ALPHA = 0.45;
const state = { card: null, key: localStorage.getItem("detfit-api-key") || "", items: [] };
const $ = (id) => document.getElementById(id);

function headers() {
  return state.key ? { "X-API-Key": state.key } : {};
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model").textContent = "this server asks for an API key";
    return;
  }
  const card = await response.json();
  if (!response.ok) throw new Error(card.error || response.statusText);
  state.card = card;
  const size = card.input_size.min_size ? `, resized to ${card.input_size.min_size}px` : "";
  $("model").textContent =
    `${card.name} (${card.kind}, ${card.backend} on ${card.device}${size}): ` +
    card.classes.join(", ");
  $("score").value = card.score_threshold;
  showScore();
}

function colour(det) {
  const colours = state.card ? state.card.colours : ["#e69f00"];
  return colours[det.rank % colours.length];
}

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// COCO's compressed RLE string (pycocotools' rleFrString) -> run lengths.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p += 1;
      k += 1;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A detection's mask as one byte per pixel, row-major (COCO's RLE runs down the columns).
function decodeMask(rle) {
  const [height, width] = rle.size;
  const column = new Uint8Array(height * width);
  let at = 0;
  let value = 0;
  for (const run of rleCounts(rle.counts)) {
    if (value) column.fill(1, at, at + run);
    at += run;
    value = 1 - value;
  }
  const mask = new Uint8Array(height * width);
  for (let x = 0; x < width; x += 1) {
    for (let y = 0; y < height; y += 1) mask[y * width + x] = column[x * height + y];
  }
  return mask;
}

function threshold() {
  return parseFloat($("score").value);
}

function showScore() {
  $("score-value").textContent = threshold().toFixed(2);
}

function kept(item) {
  return item.result.detections.filter((d) => d.score >= threshold());
}

function drawMasks(ctx, width, height, detections) {
  const pixels = ctx.getImageData(0, 0, width, height);
  const data = pixels.data;
  // lowest score first: where masks overlap, the best detection's colour is on top
  for (const det of [...detections].sort((a, b) => a.score - b.score)) {
    if (!det.mask_rle) continue;
    det.mask = det.mask || decodeMask(det.mask_rle);
    const [r, g, b] = rgb(colour(det));
    const mask = det.mask;
    for (let y = 0; y < height; y += 1) {
      for (let x = 0; x < width; x += 1) {
        const i = y * width + x;
        if (!mask[i]) continue;
        const edge =
          x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
          !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width];
        const o = 4 * i;
        if (edge) {
          data[o] = 0.6 * r;
          data[o + 1] = 0.6 * g;
          data[o + 2] = 0.6 * b;
        } else {
          data[o] = (1 - MASK_ALPHA) * data[o] + MASK_ALPHA * r;
          data[o + 1] = (1 - MASK_ALPHA) * data[o + 1] + MASK_ALPHA * g;
          data[o + 2] = (1 - MASK_ALPHA) * data[o + 2] + MASK_ALPHA * b;
        }
      }
    }
  }
  ctx.putImageData(pixels, 0, 0);
}

function textColour(hex) {
  const [r, g, b] = rgb(hex);
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff";
}

function drawBoxes(ctx, width, height, detections) {
  const size = Math.max(11, Math.round(Math.min(height, width) / 32));
  const line = Math.max(1, Math.round(size / 8));
  ctx.font = `${size}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const det of detections) {
    const [x0, y0, x1, y1] = det.box_xyxy;
    const hex = colour(det);
    ctx.strokeStyle = hex;
    ctx.lineWidth = line;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = `${det.class} ${det.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 2 * line;
    const th = size + 2 * line;
    const tx = Math.min(Math.max(0, x0), Math.max(0, width - tw));
    const ty = y0 - th >= 0 ? y0 - th : y0;
    ctx.fillStyle = hex;
    ctx.fillRect(tx, ty, tw, th);
    ctx.fillStyle = textColour(hex);
    ctx.fillText(text, tx + line, ty + line);
  }
}

function draw(item) {
  const { canvas, image, result } = item;
  const { width, height } = result;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  if (image) {
    ctx.drawImage(image, 0, 0, width, height);
  } else {
    ctx.fillStyle = "#c8ccd4"; // a format this browser cannot show (TIFF): detections only
    ctx.fillRect(0, 0, width, height);
  }
  const detections = kept(item);
  drawMasks(ctx, width, height, detections);
  drawBoxes(ctx, width, height, detections);
  canvas.dataset.drawn = String(detections.length);
}

function fillTable(item) {
  const detections = kept(item);
  const body = item.element.querySelector("tbody");
  body.replaceChildren(
    ...detections.map((det, k) => {
      const row = document.createElement("tr");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour(det);
      const cells = [String(k + 1), det.class, det.score.toFixed(3), det.box_xyxy.map((v) => v.toFixed(1)).join(", ")];
      cells.forEach((text, i) => {
        const cell = document.createElement("td");
        if (i === 1) cell.append(swatch);
        cell.append(text);
        if (i !== 1) cell.className = "num";
        row.append(cell);
      });
      return row;
    }),
  );
  const summary = item.element.querySelector(".summary");
  const total = item.result.detections.length;
  summary.replaceChildren();
  const count = document.createElement("span");
  count.className = "count";
  count.textContent = String(detections.length);
  summary.append(
    count,
    ` of ${total} detection${total === 1 ? "" : "s"} with score ≥ ${threshold().toFixed(2)}` +
      ` · ${item.width}×${item.height} px · ${item.ms} ms`,
  );
}

function render(item) {
  draw(item);
  fillTable(item);
}

function loadImage(file) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);
    image.src = URL.createObjectURL(file);
  });
}

async function predict(file) {
  const element = $("card").content.firstElementChild.cloneNode(true);
  element.querySelector(".name").textContent = file.name;
  element.querySelector(".summary").textContent = "predicting…";
  $("results").prepend(element);
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  const response = await fetch("/v1/predict?score_threshold=0", {
    method: "POST",
    body: form,
    headers: headers(),
  });
  const result = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    element.classList.add("failed");
    element.querySelector(".summary").textContent = result.error || `HTTP ${response.status}`;
    if (response.status === 401) $("key-row").hidden = false;
    throw new Error(`${file.name}: ${result.error || response.status}`);
  }
  // each object's colour: its place in the server's score order, the same whatever the slider
  result.detections.forEach((det, k) => {
    det.rank = k;
  });
  const item = {
    element,
    result,
    canvas: element.querySelector("canvas"),
    image: await loadImage(file),
    ms: Math.round(performance.now() - started),
    width: result.width,
    height: result.height,
  };
  state.items.push(item);
  render(item);
  return item;
}

async function predictAll(files) {
  const images = [...files];
  if (!images.length) return;
  setStatus(`predicting ${images.length} image${images.length === 1 ? "" : "s"}…`);
  const failures = [];
  // in parallel: the server batches requests that arrive together
  await Promise.all(images.map((f) => predict(f).catch((e) => failures.push(e.message))));
  setStatus(failures.length ? failures.join("; ") : `done: ${images.length} image(s)`, failures.length > 0);
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => predictAll(e.target.files));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.remove("over");
    });
  }
  drop.addEventListener("drop", (e) => predictAll(e.dataTransfer.files));
  $("score").addEventListener("input", () => {
    showScore();
    state.items.forEach(render);
  });
  $("key").value = state.key;
  $("key").addEventListener("change", (e) => {
    state.key = e.target.value;
    localStorage.setItem("detfit-api-key", state.key);
    loadModel().catch((err) => setStatus(err.message, true));
  });
  loadModel().catch((err) => setStatus(`model: ${err.message}`, true));
}

setUp();

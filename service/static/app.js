// The web page: pick or drop an image (or a sample), caption it, ask a multiple-choice question.
// Plain JS, no build step; talks to the same /v1 API as any client.
"use strict";

const $ = (id) => document.getElementById(id);
let currentImage = null; // Blob of the chosen image
let hasVqa = false;
let attention = null; // {imageSize, resize} when the model has an attention decoder: captions come with word maps

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

// FastAPI-style errors: {"detail": "..."} or {"detail": [{"loc": [...], "msg": "..."}]}
function describeError(status, body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".") || "request"}: ${d.msg}`).join("; ");
  }
  const id = body && body.error_id ? ` (error id ${body.error_id})` : "";
  return `${status}: ${(body && body.detail) || "request failed"}${id}`;
}

async function postForm(url, form) {
  const res = await fetch(url, { method: "POST", body: form });
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error(describeError(res.status, body));
  return body;
}

function fmtTimings(t, batch) {
  return `total ${t.total_ms.toFixed(1)} ms (decode ${t.decode_ms.toFixed(1)}, queue ${t.queue_ms.toFixed(1)}, ` +
    `model ${t.inference_ms.toFixed(1)} ms in a batch of ${batch})`;
}

function setImage(blob, sample = null) {
  currentImage = blob;
  // only the sample being shown is marked: an uploaded file (even one that fails) unmarks the previous sample
  document.querySelectorAll(".sample").forEach((b) => b.classList.toggle("selected", b === sample));
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  $("drop-hint").hidden = true;
  $("caption-button").disabled = false;
  $("vqa-button").disabled = !hasVqa;
  $("captions").innerHTML = "";
  $("heatmap").hidden = true;
  $("answers").innerHTML = "";
  $("caption-timings").textContent = "";
  $("vqa-timings").textContent = "";
  showError("");
  caption(); // a new image is captioned at once
}

async function caption() {
  if (!currentImage) return;
  const form = new FormData();
  form.append("image", currentImage, currentImage.name || "image.jpg");
  const sample = $("sample").checked;
  form.append("beam_size", sample ? "1" : $("beam-size").value);
  form.append("num_captions", $("num-captions").value);
  if (sample) {
    form.append("sample", "true");
    form.append("temperature", $("temperature").value);
  }
  if (attention) form.append("attention", "true");
  $("caption-button").disabled = true;
  $("captions").innerHTML = '<li class="muted">captioning…</li>';
  try {
    const r = await postForm("/v1/captions", form);
    const list = $("captions");
    list.innerHTML = "";
    for (const c of r.captions) {
      const li = document.createElement("li");
      li.className = "caption";
      const text = document.createElement("span");
      text.className = "caption-text";
      if (c.words && c.attention && c.words.length) {
        c.words.forEach((w, i) => text.append(wordChip(w, c.attention[i]), " "));
      } else {
        text.textContent = c.caption || "(empty caption)";
      }
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = c.log_prob === null ? "" : `log p = ${c.log_prob.toFixed(2)}`;
      li.append(text, score);
      list.append(li);
    }
    $("caption-timings").textContent = fmtTimings(r.timings, r.batch_size);
    showError("");
  } catch (e) {
    $("captions").innerHTML = "";
    showError(e.message);
  } finally {
    $("caption-button").disabled = false;
  }
}

// A word of an attention model's caption: hovering, focusing or tapping it lays its map over the photo.
function wordChip(word, grid) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "word";
  b.textContent = word;
  b.title = "where the model looked for this word";
  const show = () => {
    document.querySelectorAll(".word.active").forEach((x) => x.classList.remove("active"));
    b.classList.add("active");
    drawHeatmap(grid);
  };
  const hide = () => { b.classList.remove("active"); $("heatmap").hidden = true; };
  b.addEventListener("mouseenter", show);
  b.addEventListener("focus", show);
  b.addEventListener("click", show);
  b.addEventListener("mouseleave", hide);
  b.addEventListener("blur", hide);
  return b;
}

// The map covers the centre crop the model saw (image_size/resize of the shorter side), upsampled smoothly.
function drawHeatmap(grid) {
  const img = $("preview");
  const canvas = $("heatmap");
  const S = grid.length;
  const side = Math.min(img.width, img.height) * attention.imageSize / attention.resize;
  canvas.width = canvas.height = Math.round(side);
  canvas.style.width = canvas.style.height = `${side}px`;
  canvas.style.left = `${img.offsetLeft + (img.width - side) / 2}px`;
  canvas.style.top = `${img.offsetTop + (img.height - side) / 2}px`;
  const max = Math.max(...grid.flat()) || 1;
  const cells = document.createElement("canvas");
  cells.width = cells.height = S;
  const px = cells.getContext("2d").createImageData(S, S);
  grid.flat().forEach((v, i) => {
    const a = v / max;
    px.data.set([255, Math.round(230 * (1 - a)), 0, Math.round(40 + 160 * a)], 4 * i);
  });
  cells.getContext("2d").putImageData(px, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
  canvas.hidden = false;
}

async function ask() {
  if (!currentImage) return;
  const choices = $("choices").value.split("\n").map((s) => s.trim()).filter((s) => s);
  const form = new FormData();
  form.append("image", currentImage, currentImage.name || "image.jpg");
  form.append("question", $("question").value);
  for (const c of choices) form.append("choices", c);
  $("vqa-button").disabled = true;
  $("answers").innerHTML = '<p class="muted">thinking…</p>';
  try {
    const r = await postForm("/v1/vqa", form);
    const box = $("answers");
    box.innerHTML = "";
    r.choices.forEach((c, i) => {
      const row = document.createElement("div");
      row.className = "answer" + (i === r.index ? " chosen" : "");
      const label = document.createElement("span");
      label.className = "answer-text";
      label.textContent = c;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${(100 * r.probs[i]).toFixed(1)}%`;
      bar.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = `${(100 * r.probs[i]).toFixed(1)} %`;
      row.append(label, bar, pct);
      box.append(row);
    });
    $("vqa-timings").textContent = fmtTimings(r.timings, r.batch_size);
    showError("");
  } catch (e) {
    $("answers").innerHTML = "";
    showError(e.message);
  } finally {
    $("vqa-button").disabled = false;
  }
}

async function loadModelInfo() {
  try {
    const res = await fetch("/v1/models");
    const body = await res.json();
    if (!res.ok) throw new Error(describeError(res.status, body));
    const m = body.models[0];
    hasVqa = m.tasks.includes("vqa");
    const a = m.architecture;
    attention = a.decoder.inject === "attention" ? { imageSize: a.image_size, resize: a.resize } : null;
    $("model-info").textContent = `${m.name} v${m.version}: ${a.encoder.arch} encoder + ${a.decoder.cell} decoder` +
      (attention ? " with attention" : "") + `, ${m.vocab_size} words, on ${m.device}` +
      (hasVqa ? ", with multiple-choice VQA" : " (no VQA head)") +
      (attention ? ". Hover over a word to see where the model looked." : "");
    const domain = m.metrics && m.metrics.domain;  // what the model knows, in one line, with its card
    $("model-domain").textContent = domain ? `What it knows: ${domain} ` : "";
    $("model-domain").hidden = !domain;
    if (domain) {
      const card = document.createElement("a");
      card.href = "/v1/models/card";
      card.textContent = "Model card";
      $("model-domain").append(card);
    }
    if (!hasVqa) {
      $("vqa-panel").classList.add("disabled");
      $("vqa-button").title = "this model has no VQA head";
    }
  } catch (e) {
    $("model-info").textContent = `model information unavailable (${e.message})`;
  }
}

function init() {
  const drop = $("drop-zone");
  $("file-input").addEventListener("change", (e) => {
    if (e.target.files.length) setImage(e.target.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file-input").click();
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
  }));
  drop.addEventListener("drop", (e) => {
    const f = e.dataTransfer.files[0];
    if (f && f.type.startsWith("image/")) setImage(f);
    else showError("that is not an image file");
  });
  document.querySelectorAll(".sample").forEach((b) => b.addEventListener("click", async () => {
    const res = await fetch(b.dataset.src);
    const blob = await res.blob();
    blob.name = b.dataset.src.split("/").pop();
    setImage(blob, b);
  }));
  $("caption-form").addEventListener("submit", (e) => { e.preventDefault(); caption(); });
  $("vqa-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  loadModelInfo();
}

init();

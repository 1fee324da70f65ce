// sdgate playground: a page on sdgate's public API only (the same keys, limits and jobs as any client).
// No framework and no build step. Flow: load models and LoRAs → submit an async job → follow its
// server-sent events (progress, previews) → show the images → keep the gallery of recent jobs.
"use strict";

const KEY_STORAGE = "sdgate.apiKey";
const GALLERY_PAGE = 12;
const MAX_INPUT_SIDE = 2048; // the API's largest side; bigger uploads are scaled down in the browser

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  models: [],
  jobId: null,
  busy: false, // a generation is being sent or followed
  stream: null, // AbortController of the events stream being read
  lastSeed: null,
  input: null, // {blob, width, height, url}: the image to start from
  maskPainted: false,
  galleryBefore: null,
  keyWaiters: [],
};

// -- the API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, field, retryAfter) {
    super(message);
    this.status = status;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

/** fetch() with the key; a non-2xx answer becomes an ApiError with the server's own message. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", "Bearer " + state.key);
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "The server cannot be reached. Is sdgate still running?");
  }
  if (res.ok) return res;
  let message = res.status + " " + res.statusText;
  let field = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      field = body.error.field || null;
    }
  } catch (_) {
    // not JSON (a proxy's page, say): the status line says enough
  }
  throw new ApiError(res.status, message, field, res.headers.get("Retry-After"));
}

/** The words a person reads for an API error. */
function explain(err) {
  if (!(err instanceof ApiError)) return "Something went wrong in the page: " + err.message;
  switch (err.status) {
    case 401:
      return "This server needs a valid API key: " + err.message + ".";
    case 403:
      return "This API key may not do that: " + err.message + ".";
    case 429: {
      const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
      return "Slow down: " + err.message + wait;
    }
    default:
      return err.message;
  }
}

/** Runs ``call``; on a 401 or 403 asks for a key and runs it again with each key given, until the
 * server takes one or the person closes the dialog (then the error is thrown, for the page to show). */
async function withKey(call) {
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof ApiError) || (err.status !== 401 && err.status !== 403)) throw err;
      if (!(await askForKey(explain(err)))) throw err;
    }
  }
}

// -- messages and status -------------------------------------------------------------------------

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

function setStatus(text, step = null, total = null) {
  $("status").textContent = text;
  const bar = $("progress");
  if (total) {
    bar.max = total;
    bar.value = step;
  } else if (step === null) {
    bar.removeAttribute("value"); // indeterminate while queued or loading
  }
}

function markInvalid(field) {
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  const el = field && $(field === "image" ? "image-file" : field);
  if (el) {
    el.setAttribute("aria-invalid", "true");
    if (el.type !== "file") el.focus();
  }
}

// -- the key ---------------------------------------------------------------------------------------

function askForKey(why) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !state.key;
  $("key-error").textContent = state.key ? why : "";
  $("api-key").value = state.key;
  $("key-button").hidden = false;
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

/** Resolves everyone waiting for a key: true when one was given, false when the dialog was dismissed. */
function keyGiven(given) {
  state.keyWaiters.splice(0).forEach((resolve) => resolve(given));
}

function saveKey(key) {
  state.key = key.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  keyGiven(Boolean(state.key));
}

// -- models and LoRAs ------------------------------------------------------------------------------

async function loadModels() {
  const res = await withKey(() => api("/v1/models"));
  state.models = (await res.json()).data;
  const select = $("model");
  select.replaceChildren(
    ...state.models.map((m) => new Option(m.id + (m.loaded ? "" : " (loads on first use)"), m.id, m.default, m.default)),
  );
  applyModelDefaults();
}

/** A model that just ran is in memory now: its option loses "(loads on first use)". */
function markLoaded(id) {
  const model = state.models.find((m) => m.id === id);
  const option = [...$("model").options].find((o) => o.value === id);
  if (model && option && !model.loaded) {
    model.loaded = true;
    option.textContent = id;
  }
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value) || state.models[0];
}

function applyModelDefaults() {
  const m = currentModel();
  if (!m) return;
  if (!state.input) {
    $("width").value = m.default_width;
    $("height").value = m.default_height;
  }
  $("num_inference_steps").value = m.default_steps;
  $("guidance_scale").value = m.default_guidance_scale;
  const scheduler = $("scheduler");
  const chosen = scheduler.value;
  scheduler.replaceChildren(new Option("model's default", ""), ...m.schedulers.map((s) => new Option(s, s)));
  scheduler.value = m.schedulers.includes(chosen) ? chosen : "";
  renderLoras();
}

let loras = [];

async function loadLoras() {
  const res = await withKey(() => api("/v1/loras"));
  loras = (await res.json()).data;
  renderLoras();
}

function renderLoras() {
  const model = $("model").value;
  const usable = loras.filter((l) => !l.error && (l.models.includes(model) || l.unchecked.includes(model)));
  const list = $("lora-list");
  const kept = Object.fromEntries(chosenLoras().map((l) => [l.name, l.weight]));
  list.replaceChildren(
    ...usable.map((l, i) => {
      const li = document.createElement("li");
      const id = "lora-" + i;
      li.innerHTML =
        `<label class="check"><input type="checkbox" id="${id}"> <span></span></label>` +
        `<input type="number" min="-4" max="4" step="0.1" value="1" aria-label="">`;
      const [check, weight] = li.querySelectorAll("input");
      li.querySelector("span").textContent = l.name;
      weight.setAttribute("aria-label", `Weight of ${l.name}`);
      check.dataset.lora = l.name;
      if (l.name in kept) {
        check.checked = true;
        weight.value = kept[l.name];
      }
      return li;
    }),
  );
  $("loras-empty").hidden = usable.length > 0;
}

function chosenLoras() {
  return [...$("lora-list").querySelectorAll("li")]
    .map((li) => li.querySelectorAll("input"))
    .filter(([check]) => check.checked)
    .map(([check, weight]) => ({ name: check.dataset.lora, weight: Number(weight.value || 1) }));
}

// -- the input image and its mask --------------------------------------------------------------------

const mask = document.createElement("canvas"); // white repaints, black keeps: what is sent

async function setInput(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch (_) {
    showMessage("That file is not an image this browser can read: use a PNG, JPEG or WebP.");
    return;
  }
  // Scaled down in the browser when larger than the API takes; sent as PNG so nothing is lost twice.
  const scale = Math.min(1, MAX_INPUT_SIDE / Math.max(bitmap.width, bitmap.height));
  const width = Math.max(1, Math.round(bitmap.width * scale));
  const height = Math.max(1, Math.round(bitmap.height * scale));
  let data = blob;
  if (scale < 1) {
    const c = Object.assign(document.createElement("canvas"), { width, height });
    c.getContext("2d").drawImage(bitmap, 0, 0, width, height);
    data = await new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }
  bitmap.close();
  if (state.input) URL.revokeObjectURL(state.input.url);
  state.input = { blob: data, width, height, url: URL.createObjectURL(data) };
  $("input-preview").src = state.input.url;
  $("input-preview").width = width;
  $("input-preview").height = height;
  for (const c of [mask, $("mask-canvas")]) {
    c.width = width;
    c.height = height;
  }
  clearMask();
  $("editor").hidden = false;
  // The result's size follows the image (rounded down to a multiple of 8), as the API's default does.
  $("width").value = Math.max(64, width - (width % 8));
  $("height").value = Math.max(64, height - (height % 8));
  showMessage("");
}

function removeInput() {
  if (state.input) URL.revokeObjectURL(state.input.url);
  state.input = null;
  $("editor").hidden = true;
  $("image-file").value = "";
  $("mask-on").checked = false;
  updateMaskTools();
  applyModelDefaults();
}

function clearMask() {
  const m = mask.getContext("2d");
  m.fillStyle = "#000";
  m.fillRect(0, 0, mask.width, mask.height);
  const view = $("mask-canvas");
  view.getContext("2d").clearRect(0, 0, view.width, view.height);
  state.maskPainted = false;
}

function updateMaskTools() {
  const on = $("mask-on").checked;
  $("mask-canvas").classList.toggle("off", !on);
  for (const el of document.querySelectorAll(".mask-tools input:not(#mask-on), #mask-clear")) el.disabled = !on;
}

function paintAt(from, to) {
  const erase = document.querySelector('input[name="tool"]:checked').value === "erase";
  const size = Number($("brush").value);
  const view = $("mask-canvas").getContext("2d");
  const data = mask.getContext("2d");
  for (const [ctx, color] of [
    [view, "#ff2d55"],
    [data, erase ? "#000" : "#fff"],
  ]) {
    ctx.save();
    ctx.globalCompositeOperation = ctx === view && erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = size;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    ctx.restore();
  }
  if (!erase) state.maskPainted = true;
}

function setUpMaskPainting() {
  const canvas = $("mask-canvas");
  let last = null;
  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * canvas.width) / r.width, y: ((e.clientY - r.top) * canvas.height) / r.height };
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!$("mask-on").checked) return;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    paintAt(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    paintAt(last, p);
    last = p;
  });
  const stop = () => (last = null);
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

function setUpDrop() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setInput(file);
  });
  $("image-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setInput(file);
  });
}

// -- a generation ----------------------------------------------------------------------------------

async function requestBody() {
  const form = new FormData();
  const text = (id) => $(id).value.trim();
  form.set("prompt", $("prompt").value);
  for (const id of [
    "negative_prompt",
    "model",
    "scheduler",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "num_images",
    "output_format",
  ]) {
    if (text(id)) form.set(id, text(id));
  }
  const chosen = chosenLoras();
  if (chosen.length) form.set("loras", JSON.stringify(chosen));
  if (state.input) {
    form.set("image", state.input.blob, "input.png");
    form.set("strength", $("strength").value);
    if ($("mask-on").checked) {
      if (!state.maskPainted) throw new Error("Paint the part of the image to change, or turn the mask off.");
      form.set("mask", await new Promise((resolve) => mask.toBlob(resolve, "image/png")), "mask.png");
    }
  }
  return form;
}

async function generate(event) {
  event.preventDefault();
  // Busy from the first moment, not from the POST's answer: a second Ctrl+Enter (or a held key) in
  // between would otherwise send a second job and spend the key's quota twice.
  if (state.busy) return;
  state.busy = true;
  try {
    await submitJob();
  } finally {
    state.busy = false;
  }
}

async function submitJob() {
  showMessage("");
  markInvalid(null);
  if (!$("prompt").value.trim()) {
    showMessage("Write a prompt first: what should the image show?");
    markInvalid("prompt");
    return;
  }
  let body;
  try {
    body = await requestBody();
  } catch (err) {
    showMessage(err.message);
    return;
  }
  running(true);
  setStatus("Sending…");
  try {
    const res = await withKey(() =>
      api("/v1/generations", { method: "POST", body, headers: { Prefer: "respond-async" } }),
    );
    const job = await res.json();
    state.jobId = job.id;
    await follow(job);
  } catch (err) {
    if (err.name !== "AbortError") {
      showMessage(explain(err));
      markInvalid(err.field);
      setStatus("Not started.", 0, 1);
    }
  } finally {
    state.jobId = null;
    running(false);
  }
}

function running(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("preview").hidden = true;
  if (on) $("results").replaceChildren();
}

/** Reads the job's server-sent events until its terminal one; polls the job if the stream breaks. */
async function follow(job) {
  showJob(job, "queued");
  state.stream = new AbortController();
  let last = job;
  try {
    const res = await api(`/v1/jobs/${job.id}/events?previews=1`, { signal: state.stream.signal });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (!event) continue;
        last = event.data;
        showJob(event.data, event.name);
        if (["succeeded", "failed", "canceled"].includes(event.name)) return;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
  } finally {
    state.stream = null;
  }
  // The stream ended early (a proxy's timeout, say): the job goes on; poll it.
  while (!["succeeded", "failed", "canceled"].includes(last.status)) {
    await new Promise((r) => setTimeout(r, 1000));
    last = await (await api(`/v1/jobs/${job.id}`)).json();
    showJob(last, last.status);
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return null; // a keep-alive comment
  return { name, data: JSON.parse(data.join("\n")) };
}

function showJob(job, name) {
  const p = job.progress || {};
  switch (name) {
    case "queued":
      setStatus(job.queue_position ? `Queued: ${job.queue_position} ahead.` : "Queued.", null);
      break;
    case "loading":
      setStatus(`Loading the model ${job.model}…`, null);
      break;
    case "started":
    case "running":
    case "progress": {
      const eta = p.eta_ms != null ? ` · about ${Math.max(1, Math.round(p.eta_ms / 1000))} s left` : "";
      setStatus(`Step ${p.step} of ${p.total_steps}${eta}`, p.step, p.total_steps || 1);
      if (job.preview) {
        $("preview").src = job.preview;
        $("preview").hidden = false;
      }
      break;
    }
    case "succeeded":
      setStatus(`Done in ${(job.timings.total / 1000).toFixed(1)} s.`, 1, 1);
      markLoaded(job.model);
      $("preview").hidden = true;
      showResults(job);
      if (job.params) {
        state.lastSeed = job.params.seed;
        $("seed-reuse").disabled = false;
      }
      loadGallery(true).catch(() => {});
      break;
    case "failed":
      setStatus("Failed.", 0, 1);
      showMessage(job.error ? job.error.message : "The job failed.");
      break;
    case "canceled":
      setStatus("Canceled.", 0, 1);
      $("preview").hidden = true;
      loadGallery(true).catch(() => {});
      break;
  }
}

async function cancel() {
  if (!state.jobId) return;
  $("cancel").disabled = true;
  setStatus("Canceling…");
  try {
    await api(`/v1/jobs/${state.jobId}/cancel`, { method: "POST" });
  } catch (err) {
    // 409: it ended meanwhile; its terminal event says how
    if (!(err instanceof ApiError && err.status === 409)) showMessage(explain(err));
  }
}

// -- results ---------------------------------------------------------------------------------------

function describeParams(job) {
  const p = job.params;
  if (!p) return job.model;
  const bits = [job.model, `${p.width}×${p.height}`, `${p.num_inference_steps} steps`, `guidance ${p.guidance_scale}`];
  if (p.scheduler) bits.push(p.scheduler);
  if (p.mode !== "txt2img") bits.push(`${p.mode}, strength ${p.strength}`);
  for (const l of job.loras || []) bits.push(`LoRA ${l.name} ${l.weight}`);
  return bits.join(" · ");
}

function showResults(job) {
  const results = $("results");
  const about = document.createElement("p");
  about.className = "params";
  about.textContent = describeParams(job);
  results.replaceChildren(about);
  job.images.forEach((image, i) => {
    const fig = document.createElement("figure");
    fig.innerHTML =
      `<img width="${image.width}" height="${image.height}">` +
      `<figcaption><span class="seed"></span>` +
      `<div class="share"><input type="url" readonly aria-label="Share URL of image ${i + 1}">` +
      `<button type="button" class="copy">Copy link</button></div>` +
      `<div class="buttons"><button type="button" class="use">Use as input</button>` +
      `<a class="download">Download</a></div></figcaption>`;
    const img = fig.querySelector("img");
    img.src = image.url;
    img.alt = `${job.params ? job.params.prompt : "Generated image"} (seed ${image.seed})`;
    fig.querySelector(".seed").textContent =
      `Seed ${image.seed} · ${image.width}×${image.height} · ${Math.round(image.bytes / 1024)} KB`;
    const share = fig.querySelector(".share input");
    share.value = image.url;
    fig.querySelector(".copy").addEventListener("click", (e) => copyLink(share, e.target));
    fig.querySelector(".use").addEventListener("click", () => useAsInput(image.url));
    const download = fig.querySelector(".download");
    download.href = image.url;
    download.download = `sdgate-${image.seed}.${image.content_type.split("/")[1]}`;
    results.append(fig);
  });
}

async function copyLink(input, button) {
  try {
    await navigator.clipboard.writeText(input.value);
    button.textContent = "Copied";
  } catch (_) {
    input.select(); // no clipboard access (an insecure origin, say): selected, ready for Ctrl+C
    button.textContent = "Press Ctrl+C";
  }
  setTimeout(() => (button.textContent = "Copy link"), 2000);
}

async function useAsInput(url) {
  try {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`the image answered ${res.status}`);
    await setInput(await res.blob());
    $("drop-zone").scrollIntoView({ behavior: "smooth", block: "center" });
  } catch (err) {
    showMessage("That image could not be read back as an input: " + err.message);
  }
}

// -- the gallery -----------------------------------------------------------------------------------

async function loadGallery(fresh) {
  if (fresh) state.galleryBefore = null;
  const query = new URLSearchParams({ limit: String(GALLERY_PAGE) });
  if (state.galleryBefore != null) query.set("before", String(state.galleryBefore));
  const page = await (await withKey(() => api("/v1/jobs?" + query))).json();
  const list = $("gallery");
  if (fresh) list.replaceChildren();
  for (const job of page.data) list.append(galleryItem(job));
  state.galleryBefore = page.next_before;
  $("gallery-more").hidden = page.next_before == null;
  $("gallery-empty").hidden = list.children.length > 0;
}

function galleryItem(job) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  const prompt = job.params ? job.params.prompt : "(no prompt recorded)";
  const image = job.images[0];
  if (image) {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = "";
    img.loading = "lazy";
    button.append(img);
  } else {
    const empty = document.createElement("div");
    empty.className = "thumb-empty";
    empty.textContent = job.status;
    button.append(empty);
  }
  const text = document.createElement("span");
  text.textContent = prompt;
  const meta = document.createElement("small");
  meta.textContent = `${job.status} · ${new Date(job.created * 1000).toLocaleString()}`;
  button.append(text, meta);
  button.setAttribute("aria-label", `${prompt} (${job.status}): load its parameters`);
  button.dataset.job = job.id;
  button.addEventListener("click", () => reload(job));
  li.append(button);
  return li;
}

/** A gallery job's parameters back into the form, its images into the result. */
function reload(job) {
  const p = job.params;
  if (p) {
    if (state.models.some((m) => m.id === job.model)) {
      $("model").value = job.model;
      applyModelDefaults();
    }
    $("prompt").value = p.prompt;
    $("negative_prompt").value = p.negative_prompt || "";
    $("width").value = p.width;
    $("height").value = p.height;
    $("num_inference_steps").value = p.num_inference_steps;
    $("guidance_scale").value = p.guidance_scale;
    $("scheduler").value = p.scheduler || "";
    $("seed").value = p.seed;
    $("num_images").value = p.num_images;
    $("output_format").value = p.output_format;
    if (p.strength != null) setStrength(p.strength);
    const weights = Object.fromEntries((job.loras || []).map((l) => [l.name, l.weight]));
    for (const li of $("lora-list").querySelectorAll("li")) {
      const [check, weight] = li.querySelectorAll("input");
      check.checked = check.dataset.lora in weights;
      if (check.checked) weight.value = weights[check.dataset.lora];
    }
  }
  if (job.status === "succeeded") {
    showResults(job);
    setStatus(`Job ${job.id}: its parameters are in the form.`, 1, 1);
  } else {
    $("results").replaceChildren();
    setStatus(`Job ${job.id} ${job.status}: its parameters are in the form.`, 0, 1);
  }
  $("prompt").focus();
}

function setStrength(value) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
}

// -- start -----------------------------------------------------------------------------------------

function setUp() {
  $("generate-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
  });
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", applyModelDefaults);
  $("seed-random").addEventListener("click", () => ($("seed").value = ""));
  $("seed-reuse").addEventListener("click", () => ($("seed").value = state.lastSeed ?? ""));
  $("strength").addEventListener("input", (e) => setStrength(e.target.value));
  $("brush").addEventListener("input", (e) => ($("brush-value").textContent = e.target.value));
  $("mask-on").addEventListener("change", updateMaskTools);
  $("mask-clear").addEventListener("click", clearMask);
  $("input-remove").addEventListener("click", removeInput);
  $("gallery-refresh").addEventListener("click", () => loadGallery(true).catch((e) => showMessage(explain(e))));
  $("gallery-more").addEventListener("click", () => loadGallery(false).catch((e) => showMessage(explain(e))));
  $("key-button").addEventListener("click", () => askForKey("").then((given) => given && start()));
  $("key-form").addEventListener("submit", () => saveKey($("api-key").value));
  $("key-dialog").addEventListener("close", () => keyGiven(false)); // Escape, or after a save (a no-op)
  $("key-forget").addEventListener("click", () => {
    $("api-key").value = "";
    saveKey("");
    $("key-dialog").close();
  });
  setUpDrop();
  setUpMaskPainting();
  updateMaskTools();
  if (state.key) $("key-button").hidden = false;
}

async function start() {
  try {
    await loadModels();
    await Promise.all([loadLoras(), loadGallery(true)]);
    showMessage("");
    document.body.dataset.ready = "true";
  } catch (err) {
    showMessage(explain(err));
  }
}

setUp();
start();

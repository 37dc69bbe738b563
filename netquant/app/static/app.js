// Deep Network Quantizer: the page side of netquant's local app. No libraries: plain DOM and SVG.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let session = null;      // {id, network, ...}
let rows = [];           // calibration table rows
let sortKey = null, sortDir = 1;

function setStatus(text, error) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (error ? " error" : "");
}

async function api(method, path, body, raw) {
  const opts = { method, headers: { "X-Token": TOKEN } };
  if (raw) { opts.body = raw; opts.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opts);
  const ctype = r.headers.get("Content-Type") || "";
  if (!r.ok) {
    const msg = ctype.includes("json") ? (await r.json()).error : r.statusText;
    throw new Error(msg);
  }
  return ctype.includes("json") ? r.json() : r.blob();
}

function option(select, values) {
  select.innerHTML = "";
  for (const v of values) { const o = document.createElement("option"); o.value = o.textContent = v; select.appendChild(o); }
}

async function init() {
  try {
    const n = await api("GET", "/api/networks");
    option($("network"), n.networks);
    option($("target"), n.targets);
    option($("range"), n.range_methods);
    setStatus("data: " + n.data);
  } catch (e) { setStatus(e.message, true); }
}

function specText(spec) {
  if (!spec) return "input: RGB in [0, 1] as is";
  const parts = [`input: ${spec.channel_order}`, `pixels ${spec.value_range[0]} .. ${spec.value_range[1]}`];
  if (spec.mean) parts.push(`mean ${spec.mean.join(", ")}`);
  if (spec.std) parts.push(`std ${spec.std.join(", ")}`);
  return parts.join(", ");
}

function showSession(s, calibrated) {
  session = s;
  datasets = [];
  $("results").innerHTML = ""; $("per-class").innerHTML = ""; $("sqnr").innerHTML = "";
  $("session-info").textContent = `Session ${s.id}: ${s.network}, input ${s.input_shape.join("x")}, ` +
    `${s.outputs} outputs; ${specText(s.input_spec)}; scheme ${JSON.stringify(s.config)}`;
  $("step-calibrate").hidden = false;
  showDatasets(s.datasets, null);
  if (calibrated) afterCalibration();
}

// --- data sets ---------------------------------------------------------------------------------
let datasets = [];       // [{id, name, train, test, same, shape, class_names, source}]

function classesText(names) {
  if (!names || !names.length) return "classes by label number";
  const shown = names.slice(0, 12).join(", ");
  return `${names.length} classes: ${shown}${names.length > 12 ? ", ..." : ""}`;
}

function fitCount(input, n) {
  // a count larger than the chosen set would be refused: offer the whole set instead
  const v = input.value.trim();
  if (v !== "all" && Number(v) > n) input.value = String(n);
}

function showDatasets(list, select) {
  datasets = list;
  const ul = $("datasets");
  ul.innerHTML = "";
  if (!list.length) {
    const li = document.createElement("li");
    li.className = "warn";
    li.textContent = `No data set yet: this network takes ${session.input_shape.join("x")} images; add one above.`;
    ul.appendChild(li);
  }
  for (const d of list) {
    const li = document.createElement("li");
    li.dataset.id = d.id;
    const split = d.same ? `${d.test} images` : `${d.train} training / ${d.test} validation images`;
    li.textContent = `${d.name} (${d.id}): ${split} of ${d.shape.join("x")}, ${classesText(d.class_names)}`;
    ul.appendChild(li);
  }
  for (const id of ["cal-data", "val-data"]) {
    const sel = $(id), keep = select || sel.value;
    sel.innerHTML = "";
    for (const d of list) {
      const o = document.createElement("option");
      o.value = d.id; o.textContent = d.name; sel.appendChild(o);
    }
    if (list.some((d) => d.id === keep)) sel.value = keep;
  }
  onDataChoice();
}

function chosen(id) { return datasets.find((d) => d.id === $(id).value); }

function onDataChoice() {
  const c = chosen("cal-data"), v = chosen("val-data");
  if (c) fitCount($("cal-count"), c.train);
  if (v) fitCount($("val-count"), v.test);
}

async function waitJob(label) {
  for (;;) {
    const j = await api("GET", `/api/sessions/${session.id}/job`);
    const pct = j.total ? (100 * j.done / j.total) : 0;
    $("bar").style.width = pct.toFixed(1) + "%";
    $("job-msg").textContent = `${label}: ${j.message} ${j.done}/${j.total}`;
    if (j.state === "done") { $("job-msg").textContent = `${label}: done in ${j.seconds} s`; return j; }
    if (j.state === "error") throw new Error(j.error);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function runJob(label, start) {
  try {
    setStatus(label + "...");
    await start();
    await waitJob(label);
    setStatus(label + " done");
    return true;
  } catch (e) { setStatus(label + ": " + e.message, true); return false; }
}

// --- calibration table -------------------------------------------------------------------------
const COLUMNS = ["Optimized Layer Name", "Network Layer Name", "Learnables / Activations", "MinValue", "MaxValue",
                 "Type", "Saturation %", "Underflow %", "BitsUsed", "Quantize"];

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(5);
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v);
}

function histogramSvg(h) {
  // log2-magnitude bins; the representable range in blue, underflow/overflow bins greyed
  const W = 160, H = 34, n = h.counts.length, bw = W / Math.max(n, 1);
  const max = Math.max(1, ...h.counts);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "hist"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  let under = 0, over = 0;
  h.counts.forEach((c, i) => {
    const e = h.exponents[i];
    const out = (h.underflow_below !== null && e + 1 <= h.underflow_below) ||
                (h.overflow_above !== null && e >= h.overflow_above);
    if (h.underflow_below !== null && e + 1 <= h.underflow_below) under += c;
    if (h.overflow_above !== null && e >= h.overflow_above) over += c;
    const bg = document.createElementNS(ns, "rect");
    bg.setAttribute("x", i * bw); bg.setAttribute("y", 0); bg.setAttribute("width", bw); bg.setAttribute("height", H);
    bg.setAttribute("class", out ? "grey" : "none"); if (!out) bg.setAttribute("fill", "none");
    svg.appendChild(bg);
    const r = document.createElementNS(ns, "rect");
    const bh = c ? Math.max(1, (H - 2) * Math.log1p(c) / Math.log1p(max)) : 0;
    r.setAttribute("x", i * bw + 0.5); r.setAttribute("y", H - bh); r.setAttribute("width", Math.max(bw - 1, 1));
    r.setAttribute("height", bh); r.setAttribute("class", out ? "out" : "in");
    const t = document.createElementNS(ns, "title");
    t.textContent = `2^${e} <= |x| < 2^${e + 1}: ${c} values`;
    r.appendChild(t); svg.appendChild(r);
  });
  const t = document.createElementNS(ns, "title");
  const pct = (v) => (100 * v / Math.max(h.total, 1)).toFixed(2);
  t.textContent = `underflow ${pct(under)}%, overflow ${pct(over)}%, zeros ${pct(h.zeros)}%`;
  svg.appendChild(t);
  svg.dataset.underflow = pct(under); svg.dataset.overflow = pct(over);
  return svg;
}

function renderTable() {
  const thead = $("caltable").querySelector("thead"), tbody = $("caltable").querySelector("tbody");
  thead.innerHTML = "";
  const tr = document.createElement("tr");
  for (const c of COLUMNS.concat(["Histogram (log2 |x|)"])) {
    const th = document.createElement("th");
    th.textContent = c + (sortKey === c ? (sortDir > 0 ? " ▲" : " ▼") : "");
    th.addEventListener("click", () => { sortDir = sortKey === c ? -sortDir : 1; sortKey = c; renderTable(); });
    tr.appendChild(th);
  }
  thead.appendChild(tr);
  const f = $("filter").value.toLowerCase();
  let shown = rows.filter((r) => !f || COLUMNS.slice(0, 3).some((c) => String(r[c]).toLowerCase().includes(f)));
  if (sortKey) shown = shown.slice().sort((a, b) => (a[sortKey] > b[sortKey] ? 1 : a[sortKey] < b[sortKey] ? -1 : 0) * sortDir);
  tbody.innerHTML = "";
  for (const r of shown) {
    const row = document.createElement("tr");
    row.className = r.Quantize ? "" : "float";
    row.title = r.Reason || "";
    for (const c of COLUMNS) {
      const td = document.createElement("td");
      td.textContent = fmt(r[c]);
      if (typeof r[c] === "number") td.className = "num";
      row.appendChild(td);
    }
    const td = document.createElement("td");
    td.appendChild(histogramSvg(r.histogram));
    row.appendChild(td);
    tbody.appendChild(row);
  }
}

function renderLayers(layers) {
  const box = $("layers");
  box.innerHTML = "";
  for (const l of layers) {
    const lab = document.createElement("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = l.quantized; cb.disabled = !l.can_quantize; cb.dataset.layer = l.name;
    if (!l.can_quantize) { lab.className = "disabled"; lab.title = l.reason; }
    cb.addEventListener("change", async () => {
      try {
        await api("POST", `/api/sessions/${session.id}/layers`, { layer: l.name, quantize: cb.checked });
        setStatus(`${l.name}: ${cb.checked ? "quantize" : "keep in float"}`);
      } catch (e) { cb.checked = !cb.checked; setStatus(e.message, true); }
    });
    lab.appendChild(cb);
    lab.appendChild(document.createTextNode(" " + l.name + (l.can_quantize ? "" : ` (float: ${l.reason})`)));
    box.appendChild(lab);
  }
}

async function afterCalibration() {
  const c = await api("GET", `/api/sessions/${session.id}/calibration`);
  rows = c.rows;
  $("table-info").textContent = `${rows.length} tensors calibrated on ${c.images} images (${c.source}). ` +
    "Grey histogram bins: values the integer type cannot represent (underflow to zero, or saturation).";
  renderTable();
  renderLayers(c.layers);
  $("step-table").hidden = false;
  $("step-validate").hidden = false;
  $("step-export").hidden = false;
}

// --- validation --------------------------------------------------------------------------------
function table(headers, data) {
  const t = document.createElement("table");
  const h = t.createTHead().insertRow();
  for (const x of headers) { const th = document.createElement("th"); th.textContent = x; h.appendChild(th); }
  const b = t.createTBody();
  for (const r of data) {
    const tr = b.insertRow();
    for (const x of headers) { const td = tr.insertCell(); td.textContent = fmt(r[x]); }
  }
  return t;
}

function sqnrChart(errors) {
  const ns = "http://www.w3.org/2000/svg", bw = 16, H = 170, W = errors.length * bw + 50;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H + 110);
  const max = Math.max(10, ...errors.map((e) => e.SQNR_dB || 0));
  const title = document.createElementNS(ns, "text");
  title.setAttribute("x", 4); title.setAttribute("y", 12); title.textContent = "per-layer SQNR (dB) of int8 against float";
  svg.appendChild(title);
  for (let db = 0; db <= max; db += 10) {  // y axis: a grid line and label every 10 dB
    const y = H - (H - 20) * db / max;
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", 26); line.setAttribute("x2", W); line.setAttribute("y1", y); line.setAttribute("y2", y);
    line.setAttribute("stroke", "#d8dde3");
    svg.appendChild(line);
    const lab = document.createElementNS(ns, "text");
    lab.setAttribute("x", 2); lab.setAttribute("y", y + 3); lab.textContent = db + " dB";
    svg.appendChild(lab);
  }
  errors.forEach((e, i) => {
    const v = e.SQNR_dB === null ? max : e.SQNR_dB, h = (H - 20) * v / max;
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", 40 + i * bw); r.setAttribute("y", H - h); r.setAttribute("width", bw - 3); r.setAttribute("height", h);
    r.setAttribute("class", v < 25 ? "bad" : "");
    const t = document.createElementNS(ns, "title");
    t.textContent = `${e.Layer}: ${v.toFixed(1)} dB, max error ${e.MaxErrorLSB.toFixed(2)} LSB`;
    r.appendChild(t); svg.appendChild(r);
    const lab = document.createElementNS(ns, "text");
    lab.setAttribute("transform", `translate(${46 + i * bw},${H + 4}) rotate(60)`); lab.textContent = e.Layer;
    svg.appendChild(lab);
  });
  return svg;
}

async function showValidation() {
  const v = await api("GET", `/api/sessions/${session.id}/validation`);
  const box = $("results");
  box.innerHTML = "";
  box.className = "results";
  const p = document.createElement("p");
  p.className = "info";
  const [d, lo, hi] = v.top1_difference;
  p.textContent = `${v.num_samples} images (${v.source}). Float/int8 top-1 agreement ${v.agreement.toFixed(2)}%; ` +
    `top-1 difference ${d.toFixed(2)} points (95% CI ${lo.toFixed(2)} .. ${hi.toFixed(2)}); ` +
    `learnable memory ${v.memory.float} -> ${v.memory.quantized} bytes (${v.memory.reduction.toFixed(1)}% smaller)`;
  box.appendChild(p);
  for (const [name, data] of Object.entries(v.metrics)) {
    const h = document.createElement("h3"); h.textContent = name; box.appendChild(h);
    const t = table(["NetworkImplementation", "MetricOutput", "LearnableParameterMemory(bytes)"], data);
    t.dataset.metric = name;
    box.appendChild(t);
  }
  const pc = $("per-class"); pc.innerHTML = "";
  if (v.per_class && v.per_class.length) {
    const h = document.createElement("h3");
    h.textContent = `Per class (${v.data ? v.data.name : "validation data"})`;
    pc.appendChild(h);
    const t = table(["Class", "Name", "Images", "Float top-1 %", "Int8 top-1 %", "Changed"], v.per_class);
    t.id = "per-class-table";
    pc.appendChild(t);
  }
  const s = $("sqnr"); s.innerHTML = ""; s.appendChild(sqnrChart(v.layer_errors));
}

// --- downloads ---------------------------------------------------------------------------------
async function download(path, name) {
  try {
    const blob = await api("GET", path);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    $("export-info").textContent = `downloaded ${name} (${blob.size} bytes)`;
  } catch (e) { setStatus(e.message, true); }
}

function readFile(input) {
  return new Promise((resolve, reject) => {
    const f = input.files[0];
    if (!f) { reject(new Error("choose a file first")); return; }
    const r = new FileReader();
    r.onload = () => resolve(r.result); r.onerror = () => reject(r.error);
    r.readAsArrayBuffer(f);
  });
}

// --- wiring ------------------------------------------------------------------------------------
function inputSpec() {
  // only what differs from the default ([0, 1] RGB taken as is) makes a spec
  const spec = { channel_order: $("spec-order").value, value_range: $("spec-range").value.split(",").map(Number),
                 mean: $("spec-mean").value.trim(), std: $("spec-std").value.trim() };
  const plain = spec.channel_order === "RGB" && spec.value_range[1] === 1 && !spec.mean && !spec.std;
  return plain ? null : spec;
}

$("btn-new").addEventListener("click", async () => {
  try {
    setStatus("loading the network...");
    const opts = { network: $("network").value, target: $("target").value, activation_range: $("range").value };
    const spec = inputSpec(), shape = $("input-shape").value.trim();
    let s;
    if ($("model-file").files.length) {   // an .onnx or .safetensors model uploaded from this browser
      const f = $("model-file").files[0];
      const q = new URLSearchParams({ target: opts.target, activation_range: opts.activation_range, filename: f.name });
      if (spec) q.set("input_spec", JSON.stringify(spec));
      if (shape) q.set("input_shape", shape);
      s = await api("POST", "/api/sessions?" + q, undefined, await readFile($("model-file")));
    } else {
      if ($("model-path").value.trim()) opts.model_path = $("model-path").value.trim();
      if (spec) opts.input_spec = spec;
      if (shape) opts.input_shape = shape;
      s = await api("POST", "/api/sessions", opts);
    }
    showSession(s, false);
    setStatus("session " + s.id);
  } catch (e) { setStatus(e.message, true); }
});
$("btn-data").addEventListener("click", async () => {
  try {
    setStatus("reading the data set...");
    const classes = $("data-classes").value.trim();
    let d;
    if ($("data-file").files.length) {
      const f = $("data-file").files[0];
      const q = new URLSearchParams({ filename: f.name });
      if (classes) q.set("class_names", classes);
      d = await api("POST", `/api/sessions/${session.id}/data?` + q, undefined, await readFile($("data-file")));
    } else if ($("data-path").value.trim()) {
      const body = { path: $("data-path").value.trim() };
      if (classes) body.class_names = classes;
      d = await api("POST", `/api/sessions/${session.id}/data`, body);
    } else throw new Error("choose a .zip or .npz file, or type a path");
    showDatasets(d.datasets, d.id);
    setStatus(`data set ${d.name}: ${d.test} images`);
  } catch (e) { setStatus(e.message, true); }
});
$("cal-data").addEventListener("change", onDataChoice);
$("val-data").addEventListener("change", onDataChoice);
$("btn-import").addEventListener("click", async () => {
  try {
    const s = await api("POST", "/api/import", undefined, await readFile($("import-file")));
    showSession(s, s.calibrated);
    setStatus("imported " + s.network);
  } catch (e) { setStatus(e.message, true); }
});
$("btn-calibrate").addEventListener("click", async () => {
  const count = $("cal-count").value.trim() === "all" ? "all" : Number($("cal-count").value);
  if (await runJob("Calibrate", () => api("POST", `/api/sessions/${session.id}/calibrate`,
      { data: $("cal-data").value, count, seed: Number($("cal-seed").value) }))) await afterCalibration();
});
$("btn-cal-upload").addEventListener("click", async () => {
  let data;
  try { data = await readFile($("cal-file")); } catch (e) { setStatus(e.message, true); return; }
  if (await runJob("Calibrate", () => api("POST", `/api/sessions/${session.id}/calibrate`, undefined, data))) await afterCalibration();
});
$("filter").addEventListener("input", renderTable);
$("btn-validate").addEventListener("click", async () => {
  const metrics = [];
  if ($("m-top1").checked) metrics.push("top1");
  if ($("m-top5").checked) metrics.push("top5");
  for (const m of $("m-custom").value.split(",").map((x) => x.trim()).filter(Boolean)) metrics.push(m);
  const count = $("val-count").value.trim() === "all" ? "all" : Number($("val-count").value);
  if (await runJob("Validate", () => api("POST", `/api/sessions/${session.id}/validate`,
      { data: $("val-data").value, count, seed: Number($("val-seed").value), metrics }))) await showValidation();
});
$("btn-export-q").addEventListener("click", () => download(`/api/sessions/${session.id}/export/quantizer`, "quantizer.nq"));
$("btn-export-onnx").addEventListener("click", () => download(`/api/sessions/${session.id}/export/onnx`, "network_int8.onnx"));
$("btn-codegen").addEventListener("click", async () => {
  if (await runJob("Generate code", () => api("POST", `/api/sessions/${session.id}/codegen`))) {
    $("btn-export-code").disabled = false;
    const a = $("report-link");
    a.hidden = false;
    a.href = `/api/sessions/${session.id}/export/report?token=${encodeURIComponent(TOKEN)}`;
    $("export-info").textContent = "C sources generated and compiled";
  }
});
$("btn-export-code").addEventListener("click", () => download(`/api/sessions/${session.id}/export/code`, "netquant-c.zip"));

// assets carry the token too: the server requires it on every request
init();

// Deep Network Quantizer: the page side of netquant's local app. No libraries: plain DOM and SVG.
"use strict";

const PARAMS = new URLSearchParams(location.search);
const TOKEN = PARAMS.get("token") || "";
const $ = (id) => document.getElementById(id);
const NS = "http://www.w3.org/2000/svg";
let session = null;      // {id, network, target, config, ...}
let rows = [];           // calibration table rows
let layerInfo = [];      // calibration layers: [{name, quantized, can_quantize, reason}]
let sortKey = null, sortDir = 1;
let options = {};        // /api/networks: targets, range methods, granularities, scales

function setStatus(text, error, busy) {
  const s = $("status");
  s.textContent = text;
  s.className = "status" + (error ? " error" : "") + (busy ? " busy" : "");
}

async function api(method, path, body, raw) {
  const opts = { method, headers: { "X-Token": TOKEN } };
  if (raw) { opts.body = raw; opts.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  else if (method === "POST") opts.body = "";  // a Content-Length of 0: the server wants one
  let r;
  try { r = await fetch(path, opts); }
  catch (e) { throw new Error(`the server did not answer (${e.message}); is netquant app still running?`); }
  const ctype = r.headers.get("Content-Type") || "";
  if (!r.ok) {
    const msg = ctype.includes("json") ? (await r.json()).error : `${r.status} ${r.statusText}`;
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return ctype.includes("json") ? r.json() : r.blob();
}

function option(select, values, labels) {
  select.innerHTML = "";
  for (const v of values) {
    const o = document.createElement("option");
    o.value = v; o.textContent = (labels && labels[v]) || v; select.appendChild(o);
  }
}

const LABELS = { per_channel: "per output channel", per_tensor: "one per tensor", float: "any float",
                 pow2: "powers of two", minmax: "min / max", percentile: "percentile", entropy: "entropy (KL)",
                 mse: "least squared error" };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function kb(bytes) {
  // memory as people read it: 1089896 bytes -> "1.04 MB"
  if (bytes >= 1024 * 1024) return (bytes / 1024 / 1024).toFixed(2) + " MB";
  if (bytes >= 1024) return (bytes / 1024).toFixed(1) + " KB";
  return bytes + " bytes";
}

async function init() {
  setStatus("loading the networks and CIFAR-10...", false, true);
  try {
    options = await api("GET", "/api/networks");
    option($("network"), options.networks);
    option($("target"), options.targets);
    option($("range"), options.range_methods, LABELS);
    option($("wrange"), options.range_methods, LABELS);
    option($("granularity"), options.granularities, LABELS);
    option($("scale"), options.scales, LABELS);
    setStatus("ready: data " + options.data);
  } catch (e) { setStatus(e.message, true); return; }
  const sid = PARAMS.get("session");
  if (sid) await restore(sid);
}

async function restore(sid) {
  // a reload keeps the session: its id is in the address
  try {
    setStatus("restoring session " + sid + "...", false, true);
    const s = await api("GET", `/api/sessions/${sid}`);
    await showSession(s);
    setStatus("session " + s.id + " restored");
  } catch (e) {
    rememberSession(null);
    setStatus(`session ${sid}: ${e.message}`, true);
  }
}

function rememberSession(id) {
  const q = new URLSearchParams(location.search);
  if (id) q.set("session", id); else q.delete("session");
  history.replaceState(null, "", location.pathname + "?" + q.toString());
}

function specText(spec) {
  if (!spec) return "RGB in [0, 1] as is";
  const parts = [spec.channel_order, `pixels ${spec.value_range[0]} .. ${spec.value_range[1]}`];
  if (spec.mean) parts.push(`mean ${spec.mean.join(", ")}`);
  if (spec.std) parts.push(`std ${spec.std.join(", ")}`);
  return parts.join(", ");
}

function schemeText(c) {
  const parts = [`weights ${LABELS[c.weight_granularity] || c.weight_granularity}`,
                 `scales ${LABELS[c.scale] || c.scale}`,
                 `activation range ${LABELS[c.activation_range] || c.activation_range}` +
                   (c.activation_range === "percentile" ? ` ${c.percentile}` : ""),
                 `weight range ${LABELS[c.weight_range] || c.weight_range}`];
  const o = Object.entries(c.overrides || {});
  if (o.length) parts.push(`per layer: ${o.map(([k, v]) => k + " " + Object.entries(v).map(([a, b]) => `${a} ${b}`).join(", ")).join("; ")}`);
  return parts.join(" · ");
}

function showSessionInfo(s) {
  const box = $("session-info");
  box.innerHTML = "";
  const dl = el("dl", undefined, "facts");
  const add = (k, v, id) => { dl.appendChild(el("dt", k)); const d = el("dd", v); if (id) d.id = id; dl.appendChild(d); };
  add("Session", s.id, "session-id");
  add("Network", `${s.network}, input ${s.input_shape.join("x")}, ${s.outputs} outputs`);
  add("Environment", s.target);
  add("Input", specText(s.input_spec));
  add("Scheme", schemeText(s.config), "scheme-text");
  box.appendChild(dl);
  // the line the tests and users read first
  box.dataset.summary = `Session ${s.id}: ${s.network}, input ${s.input_shape.join("x")}, ${s.outputs} outputs; ` +
    `input: ${specText(s.input_spec)}`;
}

function clearResults(note) {
  $("results").innerHTML = ""; $("per-class").innerHTML = ""; $("sqnr").innerHTML = "";
  $("val-msg").textContent = note || ""; $("val-bar").style.width = "0";
  $("btn-export-code").disabled = true; $("report-link").hidden = true;
  $("code-msg").textContent = ""; $("code-bar").style.width = "0";
}

async function showSession(s) {
  session = s;
  datasets = [];
  rememberSession(s.id);
  clearResults("");
  $("step-table").hidden = $("step-validate").hidden = $("step-export").hidden = true;
  $("step-sensitivity").hidden = true;
  clearSensitivity(); $("ap-chart").innerHTML = ""; $("ap-front").innerHTML = ""; $("ap-msg").textContent = "";
  $("hist-detail").hidden = true;
  showSessionInfo(s);
  option($("code-target"), s.target === "gpu" ? ["c", "cuda"] : ["c"], { c: "C (CPU)", cuda: "CUDA (GPU)" });
  $("step-calibrate").hidden = false;
  showDatasets(s.datasets, null);
  if (s.calibrated) await afterCalibration();
  if (s.validated) await showValidation();
  if (s.sensitivity) await showSensitivity();
  if (s.searched) await showSearch();
  if (s.codegen) codeReady(s.codegen);
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
  for (const id of ["cal-data", "val-data", "sens-data"]) {
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

async function waitJob(label, prefix) {
  for (;;) {
    const j = await api("GET", `/api/sessions/${session.id}/job`);
    const pct = j.total ? (100 * j.done / j.total) : 0;
    $(prefix + "-bar").style.width = pct.toFixed(1) + "%";
    $(prefix + "-msg").textContent = `${label}: ${j.message} ${j.total ? j.done + "/" + j.total : ""}`;
    if (j.state === "done") {
      $(prefix + "-bar").style.width = "100%";
      $(prefix + "-msg").textContent = `${label}: done in ${j.seconds} s`;
      return j;
    }
    if (j.state === "error") throw new Error(j.error);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function runJob(label, prefix, start) {
  // a job's progress shows in its own step: calibration under 2, validation under 4, code under 5
  try {
    setStatus(label + "...", false, true);
    $(prefix + "-bar").style.width = "0";
    await start();
    await waitJob(label, prefix);
    setStatus(label + " done");
    return true;
  } catch (e) {
    $(prefix + "-msg").textContent = `${label}: ${e.message}`;
    setStatus(label + ": " + e.message, true);
    return false;
  }
}

function countValue(input) {
  // sent as typed when it is not a number, so the server's message quotes it ("abc", not null)
  const v = input.value.trim();
  return v === "all" ? "all" : (/^\d+$/.test(v) ? Number(v) : v);
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

function pct(v) { return v === null || v === undefined ? "" : v.toFixed(2); }

function binOut(h, e) {
  // a bin is greyed when all of it lies outside the representable range (as Underflow % counts)
  return (h.underflow_below !== null && e + 1 <= h.underflow_below) ||
         (h.overflow_above !== null && e >= h.overflow_above);
}

function histogramSvg(h) {
  // the small one in the table: log2-magnitude bins, representable in blue, out of range greyed
  const W = 160, H = 34, n = h.counts.length, bw = W / Math.max(n, 1);
  const max = Math.max(1, ...h.counts);
  const svg = svgEl("svg", { class: "hist", width: W, height: H });
  h.counts.forEach((c, i) => {
    const e = h.exponents[i], out = binOut(h, e);
    if (out) svg.appendChild(svgEl("rect", { x: i * bw, y: 0, width: bw, height: H, class: "grey" }));
    const bh = c ? Math.max(1, (H - 2) * Math.log1p(c) / Math.log1p(max)) : 0;
    const r = svgEl("rect", { x: i * bw + 0.5, y: H - bh, width: Math.max(bw - 1, 1), height: bh, class: out ? "out" : "in" });
    r.appendChild(svgEl("title", {}, `2^${e} <= |x| < 2^${e + 1}: ${c} values`));
    svg.appendChild(r);
  });
  svg.appendChild(svgEl("title", {}, `underflow ${pct(h.underflow_pct)}%, overflow ${pct(h.overflow_pct)}% (click for detail)`));
  svg.dataset.underflow = pct(h.underflow_pct); svg.dataset.overflow = pct(h.overflow_pct);
  return svg;
}

function histogramDetail(r) {
  // the large one: axes, the representable range, the underflow and saturation regions marked
  const h = r.histogram, box = $("hist-detail");
  box.innerHTML = "";
  box.hidden = false;
  const head = el("div", undefined, "detail-head");
  head.appendChild(el("strong", `${r["Optimized Layer Name"]} (${r["Learnables / Activations"]})`));
  const close = el("button", "Close", "small"); close.addEventListener("click", () => { box.hidden = true; });
  head.appendChild(close);
  box.appendChild(head);
  const W = 720, H = 240, L = 60, B = 40, T = 16, n = h.counts.length, pw = W - L - 10, ph = H - B - T;
  const bw = pw / Math.max(n, 1), max = Math.max(1, ...h.counts);
  const e0 = h.exponents[0], xOf = (e) => L + (e - e0) * bw;            // x: log2 |x|
  const yOf = (c) => T + ph - ph * Math.log10(1 + c) / Math.log10(1 + max);  // y: count, log scale
  const svg = svgEl("svg", { class: "hist-big", width: W, height: H, id: "hist-detail-svg" });
  const clampX = (x) => Math.min(L + pw, Math.max(L, x));
  if (h.underflow_below !== null) {   // values below half a step round to zero
    const x = clampX(xOf(h.underflow_below));
    svg.appendChild(svgEl("rect", { x: L, y: T, width: x - L, height: ph, class: "region-under" }));
    svg.appendChild(svgEl("line", { x1: x, x2: x, y1: T, y2: T + ph, class: "edge" }));
  }
  if (h.overflow_above !== null) {    // values beyond qmax * scale saturate
    const x = clampX(xOf(h.overflow_above));
    svg.appendChild(svgEl("rect", { x, y: T, width: L + pw - x, height: ph, class: "region-over" }));
    svg.appendChild(svgEl("line", { x1: x, x2: x, y1: T, y2: T + ph, class: "edge" }));
  }
  h.counts.forEach((c, i) => {
    const e = h.exponents[i], y = yOf(c);
    const rect = svgEl("rect", { x: xOf(e) + 1, y, width: Math.max(bw - 2, 1), height: T + ph - y,
                                 class: binOut(h, e) ? "out" : "in" });
    rect.appendChild(svgEl("title", {}, `2^${e} <= |x| < 2^${e + 1}: ${c} values`));
    svg.appendChild(rect);
  });
  // axes with ticks: x every few exponents, y at powers of ten
  svg.appendChild(svgEl("line", { x1: L, x2: L + pw, y1: T + ph, y2: T + ph, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: T + ph, class: "axis" }));
  const step = Math.max(1, Math.ceil(n / 12));
  for (let i = 0; i <= n; i += step) {
    const e = e0 + i, x = xOf(e);
    svg.appendChild(svgEl("line", { x1: x, x2: x, y1: T + ph, y2: T + ph + 4, class: "axis" }));
    svg.appendChild(svgEl("text", { x, y: T + ph + 15, "text-anchor": "middle", class: "tick" }, `2^${e}`));
  }
  for (let p = 1; p <= max * 1.0001; p *= 10) {
    const y = yOf(p);
    svg.appendChild(svgEl("text", { x: L - 4, y: y + 3, "text-anchor": "end", class: "tick" }, String(p)));
    svg.appendChild(svgEl("line", { x1: L - 3, x2: L, y1: y, y2: y, class: "axis" }));
  }
  svg.appendChild(svgEl("text", { x: L + pw / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, "|x| (log2 bins)"));
  svg.appendChild(svgEl("text", { x: 12, y: T + ph / 2, transform: `rotate(-90 12 ${T + ph / 2})`, "text-anchor": "middle",
                                  class: "axis-label" }, "values (log scale)"));
  box.appendChild(svg);
  const legend = el("div", undefined, "legend");
  const item = (cls, text) => { const s = el("span", undefined, "swatch " + cls); const d = el("span"); d.appendChild(s); d.appendChild(document.createTextNode(" " + text)); legend.appendChild(d); };
  const scale = r.Scale;
  item("in", "representable by " + (r.Type || "the integer type"));
  if (h.underflow_below !== null) item("under", `underflow: |x| < scale/2 = ${(2 ** h.underflow_below).toPrecision(3)} rounds to 0 (Underflow % ${pct(r["Underflow %"])})`);
  if (h.overflow_above !== null) item("over", `saturation: |x| > ${(2 ** h.overflow_above).toPrecision(3)} clips (Saturation % ${pct(r["Saturation %"])})`);
  box.appendChild(legend);
  box.appendChild(el("p", `${h.total} values, ${h.zeros} exactly zero; scale ${scale === null ? "none (float)" : scale.toPrecision(4)}. ` +
    "Greyed bins lie wholly outside the representable range; their share is the table's Underflow %.", "info"));
  box.dataset.underflow = pct(h.underflow_pct);
  box.scrollIntoView({ block: "nearest" });
}

function renderTable() {
  const thead = $("caltable").querySelector("thead"), tbody = $("caltable").querySelector("tbody");
  thead.innerHTML = "";
  const tr = document.createElement("tr");
  for (const c of COLUMNS.concat(["Histogram (log2 |x|)"])) {
    const th = el("th", c + (sortKey === c ? (sortDir > 0 ? " ▲" : " ▼") : ""));
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
      const td = el("td", fmt(r[c]));
      if (typeof r[c] === "number") td.className = "num";
      row.appendChild(td);
    }
    const td = document.createElement("td");
    const svg = histogramSvg(r.histogram);
    svg.addEventListener("click", () => histogramDetail(r));
    td.appendChild(svg);
    row.appendChild(td);
    tbody.appendChild(row);
  }
}

function renderLayers(layers) {
  const box = $("layers");
  box.innerHTML = "";
  const overrides = session.config.overrides || {};
  for (const l of layers) {
    const lab = el("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = l.quantized; cb.disabled = !l.can_quantize; cb.dataset.layer = l.name;
    if (!l.can_quantize) { lab.className = "disabled"; lab.title = l.reason; }
    cb.addEventListener("change", () => changeLayer(l.name, cb));
    lab.appendChild(cb);
    lab.appendChild(document.createTextNode(" " + l.name + (l.can_quantize || !l.reason ? "" : ` (float: ${l.reason})`)));
    if (l.can_quantize && ["conv", "linear", "add", "pool", "gap"].some((k) => l.op.includes(k))) {
      const sel = document.createElement("select");
      sel.className = "override"; sel.dataset.layer = l.name; sel.title = "activation range of this layer";
      option(sel, [""].concat(options.range_methods || []), Object.assign({ "": "range: scheme" }, LABELS));
      sel.value = (overrides[l.name] || {}).activation_range || "";
      sel.addEventListener("change", () => changeOverride(l.name, sel.value));
      lab.appendChild(sel);
    }
    if (l.precision && l.can_quantize) {   // the bit width of a conv or fully connected layer
      const p = document.createElement("select");
      p.className = "precision"; p.dataset.layer = l.name; p.title = "precision of this layer's weights";
      option(p, ["float", "int8", "w4a8"], PRECISION);
      p.value = l.precision;
      p.addEventListener("change", () => changePrecision(l.name, p.value));
      lab.appendChild(p);
    }
    box.appendChild(lab);
  }
}

async function changeLayer(name, cb) {
  try {
    const r = await api("POST", `/api/sessions/${session.id}/layers`, { layer: name, quantize: cb.checked });
    if (r.results_cleared) clearResults("Layer choices changed: the results shown were for the old network, validate again.");
    await afterCalibration();   // the table's Type and Quantize columns follow the choice
    setStatus(`${name}: ${cb.checked ? "quantize" : "keep in float"}`);
  } catch (e) { cb.checked = !cb.checked; setStatus(e.message, true); }
}

const PRECISION = { float: "float", int8: "int8", w4a8: "W4A8 (4-bit weights)" };

async function changePrecision(name, precision) {
  try {
    const r = await api("POST", `/api/sessions/${session.id}/layers`, { layer: name, precision });
    session.config = r.config;
    $("scheme-text").textContent = schemeText(r.config);
    if (r.results_cleared) clearResults("Layer precision changed: the results shown were for the old network, validate again.");
    await afterCalibration();
    setStatus(`${name}: ${PRECISION[precision]}`);
  } catch (e) { setStatus(e.message, true); await afterCalibration(); }
}

// --- sensitivity and the precision search -------------------------------------------------------
function clearSensitivity() {
  $("sens-chart").innerHTML = ""; $("sens-table").innerHTML = ""; $("sens-wrap").hidden = true;
  $("sens-msg").textContent = ""; $("sens-bar").style.width = "0";
}

function sensitivityChart(t) {
  // one bar per layer, most harmful first: the metric lost with only it quantized (left of the
  // axis would be a gain), and a dot: what keeping only it in float wins back
  const rows = t.rows, bw = 16, H = 160, L = 50;
  const W = rows.length * bw + L + 10;
  const vals = rows.flatMap((r) => [r.DropQuantizedOnly || 0, r.GainFloatOnly || 0]);
  const max = Math.max(0.1, ...vals.map(Math.abs));
  const y0 = H / 2 + 10, yOf = (v) => y0 - (H / 2 - 10) * v / max;
  const svg = svgEl("svg", { class: "chart sens-chart", width: Math.max(W, 420), height: H + 140 });
  svg.appendChild(svgEl("text", { x: 4, y: 12, class: "chart-title" },
    `${t.metric} lost with only this layer quantized (bars) and won back with only it float (dots), ${t.images} images`));
  for (const v of [max, max / 2, 0, -max / 2, -max]) {
    svg.appendChild(svgEl("line", { x1: L - 4, x2: W, y1: yOf(v), y2: yOf(v), stroke: v === 0 ? "#3d4652" : "#d8dde3" }));
    svg.appendChild(svgEl("text", { x: L - 6, y: yOf(v) + 3, "text-anchor": "end" }, v.toPrecision(2)));
  }
  rows.forEach((r, i) => {
    const d = r.DropQuantizedOnly || 0, g = r.GainFloatOnly || 0;
    const bar = svgEl("rect", { x: L + i * bw, y: Math.min(yOf(d), y0), width: bw - 3, height: Math.abs(yOf(d) - y0),
                                class: d > 0 ? "bad" : "" });
    bar.appendChild(svgEl("title", {}, `${r.Layer}: quantized alone ${r.QuantizedOnly} (drop ${d.toFixed(2)}), ` +
      `float alone ${r.FloatOnly} (gain ${g.toFixed(2)}), SQNR ${r.SQNR_dB === null ? "inf" : r.SQNR_dB.toFixed(1)} dB`));
    svg.appendChild(bar);
    svg.appendChild(svgEl("circle", { cx: L + i * bw + (bw - 3) / 2, cy: yOf(g), r: 3, class: "gain" }));
    svg.appendChild(svgEl("text", { transform: `translate(${L + 6 + i * bw},${H + 14}) rotate(60)` }, r.Layer));
  });
  return svg;
}

async function showSensitivity() {
  const t = await api("GET", `/api/sessions/${session.id}/sensitivity`);
  clearSensitivity();
  $("sens-msg").textContent = `${t.images} images (${t.source}): float ${t.metric} ${t.float}, all int8 ${t.int8}; ` +
    "most harmful layer first.";
  $("sens-chart").appendChild(sensitivityChart(t));
  const cols = ["Layer", "Op", "QuantizedOnly", "FloatOnly", "DropQuantizedOnly", "GainFloatOnly", "SQNR_dB"];
  const tab = table(cols, t.rows, { SQNR_dB: (v) => v === null ? "inf" : v.toFixed(1) });
  tab.id = "sens-table";
  $("sens-wrap").replaceChildren(tab);
  $("sens-wrap").hidden = false;
}

function paretoChart(s) {
  // memory (x) against the metric (y) of every configuration the search measured: grey points,
  // the Pareto front as a line, the chosen one in red; dashed: the budget (float - max drop)
  const W = 560, H = 280, L = 56, B = 40, T = 20, R = 16;
  const pts = s.explored;
  const xs = pts.map((p) => p.MemoryBytes).concat([s.int8_bytes]);
  const ys = pts.map((p) => p.Metric).concat([s.float, s.float - s.max_drop]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const xOf = (v) => L + (W - L - R) * (v - x0) / Math.max(x1 - x0, 1);
  const yOf = (v) => T + (H - T - B) * (1 - (v - y0) / Math.max(y1 - y0, 1e-9));
  const svg = svgEl("svg", { class: "chart pareto", width: W, height: H });
  svg.appendChild(svgEl("text", { x: 4, y: 12, class: "chart-title" },
    `${s.metric} against learnable memory, ${pts.length} configurations measured`));
  svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  for (const v of [x0, (x0 + x1) / 2, x1])
    svg.appendChild(svgEl("text", { x: xOf(v), y: H - B + 14, "text-anchor": "middle" }, kb(Math.round(v))));
  for (const v of [y0, (y0 + y1) / 2, y1])
    svg.appendChild(svgEl("text", { x: L - 4, y: yOf(v) + 3, "text-anchor": "end" }, v.toFixed(2)));
  svg.appendChild(svgEl("text", { x: (L + W) / 2, y: H - 6, "text-anchor": "middle" }, "learnable memory"));
  const budget = s.float - s.max_drop;
  svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: yOf(budget), y2: yOf(budget), class: "threshold" }));
  svg.appendChild(svgEl("text", { x: W - R, y: yOf(budget) - 3, "text-anchor": "end" }, `budget ${budget.toFixed(2)}`));
  for (const p of pts) {
    const c = svgEl("circle", { cx: xOf(p.MemoryBytes), cy: yOf(p.Metric), r: 3, class: "explored" });
    c.appendChild(svgEl("title", {}, `${p.Step}: ${p.Metric} at ${kb(p.MemoryBytes)} (${p.W4A8} W4A8, ${p.Int8} int8, ${p.Float} float)`));
    svg.appendChild(c);
  }
  const front = s.front.map((p) => `${xOf(p.MemoryBytes).toFixed(1)},${yOf(p.Metric).toFixed(1)}`).join(" ");
  svg.appendChild(svgEl("polyline", { points: front, class: "front" }));
  const c = s.chosen;
  svg.appendChild(svgEl("circle", { cx: xOf(c.MemoryBytes), cy: yOf(c.Metric), r: 6, class: "chosen" }));
  return svg;
}

async function showSearch() {
  const s = await api("GET", `/api/sessions/${session.id}/auto_precision`);
  const c = s.chosen;
  $("ap-msg").textContent = `chosen: ${s.metric} ${c.Metric} (float ${s.float}, drop ${c.Drop.toFixed(2)}, budget ` +
    `${s.max_drop}) at ${kb(c.MemoryBytes)} (int8 ${kb(s.int8_bytes)}): ${c.W4A8} W4A8, ${c.Int8} int8, ${c.Float} ` +
    `float layers; measured on ${s.source}. The layer list above shows the choice.`;
  $("ap-chart").replaceChildren(paretoChart(s));
  const tab = table(["MemoryBytes", "Metric", "Drop", "W4A8", "Int8", "Float", "Step", "Chosen"], s.front,
                    { MemoryBytes: kb, Drop: (v) => v.toFixed(2) });
  tab.id = "ap-front-table";
  $("ap-front").replaceChildren(el("h3", "Pareto front"), tab);
}

async function changeOverride(name, method) {
  const overrides = Object.assign({}, session.config.overrides || {});
  if (method) overrides[name] = Object.assign({}, overrides[name] || {}, { activation_range: method });
  else if (overrides[name]) { const o = Object.assign({}, overrides[name]); delete o.activation_range; if (Object.keys(o).length) overrides[name] = o; else delete overrides[name]; }
  await applyScheme({ overrides }, `${name}: activation range ${method || "as the scheme"}`);
}

async function applyScheme(change, what) {
  try {
    const r = await api("POST", `/api/sessions/${session.id}/config`, change);
    session.config = r.config;
    $("scheme-text").textContent = schemeText(r.config);
    if (r.results_cleared) clearResults("The scheme changed: the results shown were for the old scheme, validate again.");
    if (session.calibrated) await afterCalibration();
    setStatus(what);
  } catch (e) { setStatus(e.message, true); }
}

async function afterCalibration() {
  const c = await api("GET", `/api/sessions/${session.id}/calibration`);
  session.calibrated = true;
  rows = c.rows;
  layerInfo = c.layers;
  $("table-info").textContent = `${rows.length} tensors calibrated on ${c.images} images (${c.source}). ` +
    "Grey histogram bins: values the integer type cannot represent (underflow to zero, or saturation); " +
    "click a histogram for its detail.";
  renderTable();
  renderLayers(c.layers);
  $("step-table").hidden = false;
  $("step-sensitivity").hidden = false;
  $("step-validate").hidden = false;
  $("step-export").hidden = false;
}

// --- validation --------------------------------------------------------------------------------
function table(headers, data, format) {
  const t = document.createElement("table");
  const h = t.createTHead().insertRow();
  for (const x of headers) h.appendChild(el("th", x));
  const b = t.createTBody();
  for (const r of data) {
    const tr = b.insertRow();
    for (const x of headers) { const td = tr.insertCell(); td.textContent = (format && format[x]) ? format[x](r[x]) : fmt(r[x]); }
  }
  return t;
}

function metricValue(v, unit) {
  // one way to read every metric: percent with two decimals when it is a share, else as returned
  if (v === null || v === undefined) return "";
  if (unit === "%") return v.toFixed(2) + " %";
  if (unit === "fraction") return (100 * v).toFixed(2) + " %";
  return v.toPrecision(4) + (unit ? " " + unit : "");
}

function metricTitle(name, unit) {
  if (unit === "%" || unit === "fraction") return `${name} (percent)`;
  return unit ? `${name} (${unit})` : `${name} (as the function returns it; give it a unit attribute, e.g. "fraction", to show percent)`;
}

function sqnrChart(errors) {
  const bw = 16, H = 170, L = 44, W = errors.length * bw + L + 10, THRESH = 25;
  const svg = svgEl("svg", { class: "chart", width: Math.max(W, 420), height: H + 130 });
  const max = Math.max(10, ...errors.map((e) => e.SQNR_dB || 0));
  const yOf = (db) => H - (H - 24) * db / max;
  svg.appendChild(svgEl("text", { x: 4, y: 12, class: "chart-title" }, "Per-layer SQNR of int8 against float (higher is better)"));
  for (let db = 0; db <= max; db += 10) {  // y axis: a grid line and label every 10 dB
    const y = yOf(db);
    svg.appendChild(svgEl("line", { x1: L - 4, x2: W, y1: y, y2: y, stroke: "#d8dde3" }));
    svg.appendChild(svgEl("text", { x: L - 6, y: y + 3, "text-anchor": "end" }, db + " dB"));
  }
  const ty = yOf(THRESH);
  svg.appendChild(svgEl("line", { x1: L - 4, x2: W, y1: ty, y2: ty, class: "threshold" }));
  errors.forEach((e, i) => {
    const v = e.SQNR_dB === null ? max : e.SQNR_dB, h = (H - 24) * v / max;
    const r = svgEl("rect", { x: L + i * bw, y: H - h, width: bw - 3, height: h, class: v < THRESH ? "bad" : "" });
    r.appendChild(svgEl("title", {}, `${e.Layer}: ${v.toFixed(1)} dB, max error ${e.MaxErrorLSB.toFixed(2)} LSB`));
    svg.appendChild(r);
    svg.appendChild(svgEl("text", { transform: `translate(${L + 6 + i * bw},${H + 4}) rotate(60)` }, e.Layer));
  });
  svg.appendChild(svgEl("line", { x1: L - 4, x2: W, y1: H, y2: H, class: "axis" }));
  // legend: what the colours and the dashed line mean
  const ly = H + 118;
  svg.appendChild(svgEl("rect", { x: 4, y: ly - 9, width: 10, height: 10 }));
  svg.appendChild(svgEl("text", { x: 18, y: ly }, `${THRESH} dB or more`));
  svg.appendChild(svgEl("rect", { x: 110, y: ly - 9, width: 10, height: 10, class: "bad" }));
  svg.appendChild(svgEl("text", { x: 124, y: ly }, `under ${THRESH} dB (dashed line): error above 1/18 of the signal, worth a look`));
  return svg;
}

function ciText(v) {
  const [d, lo, hi] = v.top1_difference;
  if (lo === 0 && hi === 0 && v.agreement === 100)
    return `no top-1 difference on these ${v.num_samples} images; a disagreement rate under ` +
           `${v.unseen_below.toFixed(1)}% could go unseen with this many (validate on more for a tighter bound)`;
  return `top-1 difference int8 - float ${d.toFixed(2)} points (95% CI ${lo.toFixed(2)} .. ${hi.toFixed(2)})`;
}

async function showValidation() {
  const v = await api("GET", `/api/sessions/${session.id}/validation`);
  const box = $("results");
  box.innerHTML = "";
  box.className = "results";
  const m = v.memory;
  const summary = el("dl", undefined, "facts");
  const add = (k, text, id) => { summary.appendChild(el("dt", k)); const d = el("dd", text); if (id) d.id = id; summary.appendChild(d); };
  add("Images", `${v.num_samples} (${v.source})`);
  add("Agreement", `float and int8 predict the same class on ${v.agreement.toFixed(2)}% of images; ${ciText(v)}`, "agreement");
  add("Learnable memory", `${kb(m.float)} float → ${kb(m.quantized)} quantized (${m.reduction.toFixed(1)}% smaller)`, "memory");
  box.appendChild(summary);
  for (const [name, data] of Object.entries(v.metrics)) {
    const unit = (v.metric_units || {})[name] || "";
    box.appendChild(el("h3", metricTitle(name, unit)));
    const t = table(["NetworkImplementation", "MetricOutput", "LearnableParameterMemory(bytes)"], data,
                    { MetricOutput: (x) => metricValue(x, unit), "LearnableParameterMemory(bytes)": kb });
    t.tHead.rows[0].cells[0].textContent = "Network";
    t.tHead.rows[0].cells[1].textContent = name;
    t.tHead.rows[0].cells[2].textContent = "Learnable memory";
    t.dataset.metric = name;
    box.appendChild(t);
  }
  const pc = $("per-class"); pc.innerHTML = "";
  if (v.per_class && v.per_class.length) {
    pc.appendChild(el("h3", `Per class (${v.data ? v.data.name : "validation data"})`));
    const f2 = (x) => x.toFixed(2) + " %";
    const t = table(["Class", "Name", "Images", "Float top-1 %", "Int8 top-1 %", "Changed"], v.per_class,
                    { "Float top-1 %": f2, "Int8 top-1 %": f2 });
    t.id = "per-class-table";
    pc.appendChild(t);
  }
  const s = $("sqnr"); s.innerHTML = ""; s.appendChild(sqnrChart(v.layer_errors));
}

// --- downloads ---------------------------------------------------------------------------------
async function download(path, name) {
  try {
    setStatus(`preparing ${name}...`, false, true);
    const blob = await api("GET", path);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    $("export-info").textContent = `downloaded ${name} (${kb(blob.size)})`;
    setStatus(`downloaded ${name}`);
  } catch (e) { setStatus(e.message, true); }
}

function codeReady(target) {
  $("btn-export-code").disabled = false;
  const a = $("report-link");
  a.hidden = false;
  a.href = `/api/sessions/${session.id}/export/report?token=${encodeURIComponent(TOKEN)}`;
  $("code-target").value = target;
  $("export-info").textContent = target === "cuda" ? "CUDA sources generated" : "C sources generated and compiled";
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

function schemeForm() {
  return { weight_granularity: $("granularity").value, scale: $("scale").value,
           activation_range: $("range").value, weight_range: $("wrange").value };
}

$("btn-new").addEventListener("click", async () => {
  try {
    setStatus("loading the network...", false, true);
    const opts = Object.assign({ network: $("network").value, target: $("target").value }, schemeForm());
    const spec = inputSpec(), shape = $("input-shape").value.trim();
    let s;
    if ($("model-file").files.length) {   // an .onnx or .safetensors model uploaded from this browser
      const f = $("model-file").files[0];
      const q = new URLSearchParams(Object.assign({}, opts, { filename: f.name }));
      q.delete("network");
      if (spec) q.set("input_spec", JSON.stringify(spec));
      if (shape) q.set("input_shape", shape);
      s = await api("POST", "/api/sessions?" + q, undefined, await readFile($("model-file")));
    } else {
      if ($("model-path").value.trim()) opts.model_path = $("model-path").value.trim();
      if (spec) opts.input_spec = spec;
      if (shape) opts.input_shape = shape;
      s = await api("POST", "/api/sessions", opts);
    }
    await showSession(s);
    setStatus("session " + s.id);
  } catch (e) { setStatus(e.message, true); }
});
$("btn-data").addEventListener("click", async () => {
  try {
    setStatus("reading the data set...", false, true);
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
    setStatus("importing...", false, true);
    const s = await api("POST", "/api/import", undefined, await readFile($("import-file")));
    await showSession(s);
    setStatus("imported " + s.network + (s.validated ? " with its results" : ""));
  } catch (e) { setStatus(e.message, true); }
});
$("btn-calibrate").addEventListener("click", async () => {
  if (await runJob("Calibrate", "cal", () => api("POST", `/api/sessions/${session.id}/calibrate`,
      { data: $("cal-data").value, count: countValue($("cal-count")), seed: countValue($("cal-seed")) }))) {
    clearResults("");
    await afterCalibration();
  }
});
$("btn-cal-upload").addEventListener("click", async () => {
  let data;
  try { data = await readFile($("cal-file")); } catch (e) { setStatus(e.message, true); return; }
  if (await runJob("Calibrate", "cal", () => api("POST", `/api/sessions/${session.id}/calibrate`, undefined, data))) {
    clearResults("");
    await afterCalibration();
  }
});
$("filter").addEventListener("input", renderTable);
for (const [id, key] of [["granularity", "weight_granularity"], ["scale", "scale"], ["range", "activation_range"], ["wrange", "weight_range"]]) {
  // with a session open, the scheme form changes its scheme (the table follows)
  $(id).addEventListener("change", () => {
    if (session) applyScheme({ [key]: $(id).value }, `scheme: ${key.replace("_", " ")} ${LABELS[$(id).value] || $(id).value}`);
  });
}
$("btn-validate").addEventListener("click", async () => {
  const metrics = [];
  if ($("m-top1").checked) metrics.push("top1");
  if ($("m-top5").checked) metrics.push("top5");
  for (const m of $("m-custom").value.split(",").map((x) => x.trim()).filter(Boolean)) metrics.push(m);
  if (await runJob("Validate", "val", () => api("POST", `/api/sessions/${session.id}/validate`,
      { data: $("val-data").value, count: countValue($("val-count")), seed: countValue($("val-seed")), metrics }))) await showValidation();
});
$("btn-sensitivity").addEventListener("click", async () => {
  if (await runJob("Sensitivity", "sens", () => api("POST", `/api/sessions/${session.id}/sensitivity`,
      { data: $("sens-data").value, count: countValue($("sens-count")), metric: $("sens-metric").value.trim() }))) await showSensitivity();
});
$("btn-auto").addEventListener("click", async () => {
  if (await runJob("Precision search", "ap", () => api("POST", `/api/sessions/${session.id}/auto_precision`,
      { data: $("sens-data").value, count: countValue($("ap-count")), metric: $("sens-metric").value.trim(),
        max_drop: Number($("ap-drop").value), max_evaluations: Number($("ap-evals").value) }))) {
    clearResults("The precision search chose a new configuration: validate it.");
    clearSensitivity();
    session = await api("GET", `/api/sessions/${session.id}`);
    $("scheme-text").textContent = schemeText(session.config);
    await afterCalibration();
    await showSearch();
  }
});
$("btn-export-q").addEventListener("click", () => download(`/api/sessions/${session.id}/export/quantizer`, "quantizer.nq"));
$("btn-export-onnx").addEventListener("click", () => download(`/api/sessions/${session.id}/export/onnx`, "network_int8.onnx"));
$("btn-codegen").addEventListener("click", async () => {
  const target = $("code-target").value;
  if (await runJob(target === "cuda" ? "Generate CUDA code" : "Generate C code", "code",
                   () => api("POST", `/api/sessions/${session.id}/codegen`, { target }))) codeReady(target);
});
$("btn-export-code").addEventListener("click", () => download(`/api/sessions/${session.id}/export/code`, `netquant-${$("code-target").value}.zip`));

init();

// The status page of one buffer (docs/operations.md). Everything comes from the web API
// (docs/web-api.md): the channel list and the plots' recent past (/api/v1/history) over HTTP, values
// and the buffer's status over the one websocket. Plots: dygraphs (vendor/, MIT). No build step, no CDN.
"use strict";

const HISTORY_SECONDS = 300;      // the rate plots' span
const SPARK_POINTS = 60;          // a sparkline: the last minute at 1 Hz
const MAX_SPARKLINES = 40;        // dygraphs per page stay few
const TABLE_RATE = 1;             // table values: updates per second per channel
const DETAIL_RATE = 5;            // the selected channel
const TOKEN_KEY = "sf_bsread_token";
const DETAIL_POINTS = 600;        // the selected scalar's plot: the last 600 values (history, then live)
const AXIS_LABEL_WIDTH = 96;      // px: room for 11 digits and a sign at the axis font size

const page = {
  token: new URLSearchParams(location.search).get("token") || sessionStorage.getItem(TOKEN_KEY),
  socket: null, connected: false, retry: 0,
  channels: new Map(),            // name -> {spec, row, spark, points}
  selected: null, detailGraph: null, detailPoints: [], imageLoading: false, imageUrl: null,
  ratePoints: [], bytesPoints: [], rateGraph: null, bytesGraph: null,
};

class Unauthorized extends Error {}

function $(id) { return document.getElementById(id); }

async function api(path) {
  const headers = page.token ? {Authorization: "Bearer " + page.token} : {};
  const answer = await fetch(path, {headers, cache: "no-store"});
  if (answer.status === 401) throw new Unauthorized();
  return answer.json();
}

function withToken(path) {
  return page.token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(page.token) : path;
}

// -- login -------------------------------------------------------------------
function showLogin(message) {
  $("login").hidden = false;
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
  $("token").focus();
}

$("login-form").addEventListener("submit", event => {
  event.preventDefault();
  page.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, page.token);
  start();
});

// -- formatting ----------------------------------------------------------------
// One number format per channel: integers exactly; floats with a fixed number of decimals chosen from the
// channel's first non-zero value (10 significant digits for float64, 7 for float32), in exponent notation
// only for magnitudes a fixed format cannot show. A value never flips between 22458344290 and 2.24583e+10.
function floatFormat(type, first) {
  const significant = type === "float32" ? 7 : 10;
  const magnitude = Math.abs(first);
  if (magnitude >= 1e15 || magnitude < 1e-3) return value => value.toExponential(significant - 1);
  const decimals = Math.max(0, Math.min(12, significant - 1 - Math.floor(Math.log10(magnitude))));
  return value => (Math.abs(value) < 1e21 ? value.toFixed(decimals) : value.toExponential(significant - 1));
}

function formatValue(value, entry) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") {
    if (!entry || !entry.spec.type.startsWith("float")) return String(value);
    if (!entry.format) {
      if (value === 0 || !isFinite(value)) return String(value);
      entry.format = floatFormat(entry.spec.type, value);
    }
    return entry.format(value);
  }
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return "[" + value.length + (Array.isArray(value[0]) ? " x " + value[0].length : "") + "]";
  return String(value);
}

// Axis labels with as many digits as the visible range needs to tell them apart (dygraphs' default keeps
// 2 significant digits: every label of a value near 2.2e10 read "2.25e+10").
function axisLabel(value, granularity, options, graph) {
  const range = graph.yAxisRange();
  const span = Math.abs(range[1] - range[0]) || Math.abs(value) || 1;
  const step = span / 20;
  const magnitude = Math.max(Math.abs(range[0]), Math.abs(range[1]));
  if (magnitude >= 1e15 || (magnitude > 0 && magnitude < 1e-4)) {
    return value.toExponential(Math.max(1, Math.min(15, Math.ceil(Math.log10(magnitude / step)))));
  }
  return value.toFixed(Math.max(0, Math.min(10, Math.ceil(-Math.log10(step)))));
}

const PLOT_AXES = {y: {axisLabelFormatter: axisLabel, axisLabelWidth: AXIS_LABEL_WIDTH}};

function formatAge(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
  return seconds < 10 ? seconds.toFixed(1) + " s" : Math.round(seconds) + " s";
}

function setText(id, text) { $(id).textContent = text; }

// -- the channel table --------------------------------------------------------------
function isScalar(spec) { return spec.shape.length === 1 && spec.shape[0] === 1; }
function isImage(spec) { return spec.shape.length === 2; }

function buildTable(specs) {
  const body = $("channels").querySelector("tbody");
  const names = new Set(specs.map(spec => spec.name));
  for (const [name, entry] of page.channels) {
    if (!names.has(name)) { entry.row.remove(); page.channels.delete(name); }
  }
  let sparks = [...page.channels.values()].filter(entry => entry.sparkHolder).length;
  const added = [];
  for (const spec of specs) {
    if (page.channels.has(spec.name)) continue;
    added.push(spec);
    const row = document.createElement("tr");
    row.dataset.channel = spec.name;
    row.innerHTML = "<td></td><td></td><td></td><td class='value'>-</td><td class='pulse'>-</td><td class='age'>-</td><td></td>";
    row.cells[0].textContent = spec.name;
    row.cells[1].textContent = spec.type;
    row.cells[2].textContent = JSON.stringify(spec.shape);
    row.addEventListener("click", () => select(spec.name));
    body.appendChild(row);
    const entry = {spec, row, spark: null, points: [], lastTime: null, format: null};
    if (isScalar(spec) && spec.type !== "string" && sparks < MAX_SPARKLINES) {
      const holder = document.createElement("div");
      holder.className = "spark";
      row.cells[6].appendChild(holder);
      entry.sparkHolder = holder;
      sparks += 1;
    }
    page.channels.set(spec.name, entry);
  }
  setText("channel-count", "(" + page.channels.size + ")");
  return added;
}

function updateRow(message) {
  const entry = page.channels.get(message.channel);
  if (!entry) return;
  const row = entry.row;
  row.dataset.pulseId = message.pulse_id;
  row.dataset.value = JSON.stringify(message.value);
  row.dataset.timestamp = message.timestamp;
  row.dataset.exact = message.exact || "";
  row.cells[3].textContent = message.too_large ? "image " + JSON.stringify(message.shape)
    : message.exact || formatValue(message.value, entry);  // exact: an integer beyond 2^53, as decimal text
  row.cells[4].textContent = String(message.pulse_id);  // the pulse id this value came with
  entry.lastTime = message.timestamp;
  if (entry.sparkHolder && typeof message.value === "number") {
    entry.points.push([new Date(message.timestamp * 1000), message.value]);
    if (entry.points.length > SPARK_POINTS) entry.points.shift();
    drawSpark(entry);
  }
}

function drawSpark(entry) {
  if (!entry.spark && entry.points.length > 1) {
    entry.spark = new Dygraph(entry.sparkHolder, entry.points, {
      axes: {x: {drawAxis: false, drawGrid: false}, y: {drawAxis: false, drawGrid: false}},
      legend: "never", labels: ["t", "v"], strokeWidth: 1, color: "#5ec962", interactionModel: {}});
  } else if (entry.spark) {
    entry.spark.updateOptions({file: entry.points});
  }
}

function refreshAges() {
  const now = Date.now() / 1000;
  for (const entry of page.channels.values()) {
    entry.row.querySelector(".age").textContent = entry.lastTime ? formatAge(now - entry.lastTime) : "-";
  }
}

// -- the selected channel --------------------------------------------------------------
function select(name) {
  const entry = page.channels.get(name);
  if (!entry) return;
  if (page.selected && page.channels.get(page.selected)) page.channels.get(page.selected).row.classList.remove("selected");
  page.selected = name;
  entry.row.classList.add("selected");
  $("detail").hidden = false;
  setText("detail-title", name);
  setText("detail-info", entry.spec.type + " " + JSON.stringify(entry.spec.shape) +
          (entry.spec.unit ? ", " + entry.spec.unit : ""));
  page.detailPoints = [];
  if (page.detailGraph) { page.detailGraph.destroy(); page.detailGraph = null; }
  $("detail-plot").hidden = isImage(entry.spec);
  $("image-box").hidden = !isImage(entry.spec);
  $("colour-scale").hidden = true;
  send({op: "subscribe", channels: [name], max_rate: isImage(entry.spec) ? 1 : DETAIL_RATE});
  if (isScalar(entry.spec) && entry.spec.type !== "string") loadDetailHistory(name);
}

// The selected scalar's plot starts with what the service kept of the last minutes (web/history.py).
async function loadDetailHistory(name) {
  let history;
  try {
    history = await api("/api/v1/history?channels=" + encodeURIComponent(name));
  } catch (error) { return; }
  const series = history.channels && history.channels[name];
  if (!series || page.selected !== name) return;
  const live = page.detailPoints;
  const firstLive = live.length ? live[0][0].getTime() / 1000 : Infinity;
  const past = [];
  series.timestamp.forEach((t, i) => {
    if (t < firstLive && series.value[i] !== null) past.push([new Date(t * 1000), series.value[i]]);
  });
  page.detailPoints = past.concat(live).slice(-DETAIL_POINTS);
  drawDetail(page.detailPoints, ["time", name]);
}

// Sparklines and the rate plots start with the recent past too, not empty.
async function loadHistory(names) {
  let history;
  try {
    history = await api("/api/v1/history?channels=" + names.map(encodeURIComponent).join(","));
  } catch (error) { return; }
  for (const [name, series] of Object.entries(history.channels || {})) {
    const entry = page.channels.get(name);
    if (!entry || !entry.sparkHolder) continue;
    const firstLive = entry.points.length ? entry.points[0][0].getTime() / 1000 : Infinity;
    const newest = series.timestamp.length ? series.timestamp[series.timestamp.length - 1] : 0;
    const past = [];
    let lastTaken = -Infinity;
    series.timestamp.forEach((t, i) => {  // about one point a second over the sparkline's minute
      if (t < firstLive && t >= newest - SPARK_POINTS && t - lastTaken >= 0.9 && series.value[i] !== null) {
        past.push([new Date(t * 1000), series.value[i]]);
        lastTaken = t;
      }
    });
    entry.points = past.concat(entry.points).slice(-SPARK_POINTS);
    drawSpark(entry);
  }
  const rates = history.rates || {time: []};
  const firstRate = page.ratePoints.length ? page.ratePoints[0][0].getTime() / 1000 : Infinity;
  const ratePast = [], bytesPast = [];
  rates.time.forEach((t, i) => {
    if (t < firstRate) {
      ratePast.push([new Date(t * 1000), rates.messages_per_second[i]]);
      bytesPast.push([new Date(t * 1000), rates.bytes_per_second[i] / 1e6]);
    }
  });
  page.ratePoints = ratePast.concat(page.ratePoints);
  page.bytesPoints = bytesPast.concat(page.bytesPoints);
  drawRates();
}

function updateDetail(message) {
  if (message.channel !== page.selected) return;
  const spec = page.channels.get(page.selected).spec;
  if (isImage(spec)) {
    showImage(message.channel);
    return;
  }
  let points, labels;
  if (Array.isArray(message.value)) {
    points = message.value.map((y, x) => [x, Array.isArray(y) ? y[0] : y]);
    labels = ["index", message.channel];
  } else if (typeof message.value === "number") {
    page.detailPoints.push([new Date(message.timestamp * 1000), message.value]);
    if (page.detailPoints.length > DETAIL_POINTS) page.detailPoints.shift();
    points = page.detailPoints;
    labels = ["time", message.channel];
  } else {
    setText("detail-info", spec.type + ": " + (message.exact || formatValue(message.value)));
    return;
  }
  drawDetail(points, labels);
}

function drawDetail(points, labels) {
  if (points.length < 2) return;
  if (!page.detailGraph) {
    page.detailGraph = new Dygraph($("detail-plot"), points, {labels, color: "#5ec962", strokeWidth: 1.5,
                                                              axisLabelFontSize: 11, axes: PLOT_AXES});
  } else {
    page.detailGraph.updateOptions({file: points});
  }
}

// The service renders the image (downsampled, auto-scaled, colour-mapped PNG: a few kB, not the raw frame)
// and says in headers which pulse it is and which values the colour map's ends stand for. One request at
// a time: an image that takes longer than the updates come is shown at the rate it can be.
async function showImage(channel) {
  if (page.imageLoading) return;
  page.imageLoading = true;
  try {
    const headers = page.token ? {Authorization: "Bearer " + page.token} : {};
    const answer = await fetch("/api/v1/channels/" + encodeURIComponent(channel) + "?format=png",
                               {headers, cache: "no-store"});
    if (!answer.ok || page.selected !== channel) return;
    const blob = await answer.blob();
    const image = $("detail-image");
    const url = URL.createObjectURL(blob);
    await new Promise(resolve => { image.onload = resolve; image.onerror = resolve; image.src = url; });
    if (page.imageUrl) URL.revokeObjectURL(page.imageUrl);
    page.imageUrl = url;
    const pulseId = answer.headers.get("X-Pulse-Id");
    image.dataset.pulseId = pulseId;
    setText("image-pulse", pulseId);
    const low = answer.headers.get("X-Scale-Low"), high = answer.headers.get("X-Scale-High");
    const scale = $("colour-scale");
    if (low !== null && high !== null) {
      scale.dataset.low = low;
      scale.dataset.high = high;
      const format = floatFormat("float64", Math.max(Math.abs(Number(low)), Math.abs(Number(high))) || 1);
      setText("scale-low", format(Number(low)));
      setText("scale-high", format(Number(high)));
      scale.hidden = false;
    } else {
      scale.hidden = true;
    }
  } catch (error) { /* the connection badge says it */ } finally {
    page.imageLoading = false;
  }
}

// -- status --------------------------------------------------------------------------------
function updateStatus(document) {
  if (document.state !== "ok") {
    $("state").className = "badge error";
    setText("state", "buffer not answering");
    return;
  }
  const buffer = document.buffer, ring = buffer.ring, rates = buffer.rates;
  setText("name", buffer.name);
  $("state").className = "badge " + document.status;
  setText("state", document.status.replace(/_/g, " "));
  setText("source", buffer.endpoints.stream);
  $("rate").dataset.value = rates.messages_per_second;
  setText("rate", rates.messages_per_second.toFixed(1) + " msg/s");
  setText("bandwidth", (rates.bytes_per_second / 1e6).toFixed(2) + " MB/s");
  setText("ring", ring.messages + " / " + ring.max_messages);
  setText("ring-bytes", (ring.bytes / 1e6).toFixed(1) + " / " + (ring.max_bytes / 1e6).toFixed(0) + " MB");
  setText("lookback", document.look_back.seconds === null ? "-" : document.look_back.seconds.toFixed(1) + " s");
  setText("pulses", (ring.oldest_pulse_id ?? "-") + " .. " + (ring.newest_pulse_id ?? "-"));
  setText("rejected", String(buffer.rejected_total));
  // A source connection ZeroMQ gave up (a part over twice the size limit) and the buffer made anew: its messages meanwhile are lost.
  const reconnects = buffer.source.reconnects ?? 0;  // absent from an older buffer
  setText("rejected-reasons", Object.entries(buffer.rejected).map(([reason, n]) => reason + " " + n)
    .concat(reconnects ? ["source reconnects " + reconnects] : []).join(", "));
  setText("jumps", buffer.pulse_ids.jumps + " / " + buffer.pulse_ids.resets);
  const archive = buffer.archive;  // --archive (docs/archive.md): lag, what it holds, what it lost
  $("archive-card").hidden = !archive;
  if (archive) {
    $("archive-card").className = "card" + (archive.state === "archiving" ? "" : " warning");
    setText("archive-lag", archive.state !== "archiving" ? archive.state.replace(/_/g, " ") :
            (archive.lag_seconds === null ? "-" : archive.lag_seconds.toFixed(1) + " s"));
    setText("archive-detail", (archive.first_pulse_id ?? "-") + " .. " + (archive.last_pulse_id ?? "-") +
            ", lost " + archive.lost + (archive.error ? " - " + archive.error : ""));
  }
  const at = new Date(buffer.time * 1000);  // the buffer's snapshot time, as the history's points
  for (const [points, value] of [[page.ratePoints, rates.messages_per_second],
                                 [page.bytesPoints, rates.bytes_per_second / 1e6]]) {
    if (!points.length || points[points.length - 1][0] < at) points.push([at, value]);
  }
  drawRates();
  const body = $("writers").querySelector("tbody");
  body.innerHTML = "";
  for (const writer of document.writers || []) {  // web/writers.py: file, range, progress, rate per session
    const row = body.insertRow();
    row.dataset.session = writer.session;
    row.dataset.progress = writer.progress ?? "";
    const progress = writer.progress === null ? "-" : (writer.progress * 100).toFixed(1) + " %";
    const rate = writer.rate === null ? "-" : writer.rate.toFixed(1) + " msg/s";
    const cells = [writer.file ?? "(no file named)", writer.requested, progress, rate, writer.last_pulse_id ?? "-",
                   writer.sent, writer.gaps, writer.lost, writer.session];
    cells.forEach((text, index) => {
      const cell = row.insertCell();
      cell.textContent = String(text);
      if (index === 2) cell.className = "progress";
    });
    row.cells[0].title = writer.file ?? "";
  }
}

function drawRates() {
  const now = Date.now();
  for (const points of [page.ratePoints, page.bytesPoints]) {
    while (points.length && now - points[0][0] > HISTORY_SECONDS * 1000) points.shift();
  }
  if (page.ratePoints.length > 1) {
    if (!page.rateGraph) {
      const options = {color: "#3b528b", strokeWidth: 1.5, axisLabelFontSize: 11, includeZero: true, axes: PLOT_AXES};
      page.rateGraph = new Dygraph($("rate-plot"), page.ratePoints, {...options, labels: ["time", "msg/s"]});
      page.bytesGraph = new Dygraph($("bytes-plot"), page.bytesPoints, {...options, labels: ["time", "MB/s"]});
    } else {
      page.rateGraph.updateOptions({file: page.ratePoints});
      page.bytesGraph.updateOptions({file: page.bytesPoints});
    }
  }
}

// -- the websocket ---------------------------------------------------------------------------------
function send(request) {
  if (page.socket && page.socket.readyState === WebSocket.OPEN) page.socket.send(JSON.stringify(request));
}

function setConnected(connected, text) {
  page.connected = connected;
  $("connection").className = "badge " + (connected ? "connected" : "disconnected");
  setText("connection", text);
}

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + withToken("/api/v1/ws");
  const socket = new WebSocket(url);
  page.socket = socket;
  socket.onopen = () => {
    page.retry = 0;
    setConnected(true, "live");
    send({op: "status"});
    const table = [...page.channels.values()].filter(entry => !isImage(entry.spec)).map(entry => entry.spec.name);
    if (table.length) send({op: "subscribe", channels: table, max_rate: TABLE_RATE});
    if (page.selected) select(page.selected);
  };
  socket.onmessage = event => {
    const frame = JSON.parse(event.data);
    if (frame.type === "batch") {
      for (const message of frame.messages) { updateRow(message); updateDetail(message); }
    } else if (frame.type === "status") {
      updateStatus(frame);
    }
  };
  socket.onclose = () => {
    if (page.socket !== socket) return;
    setConnected(false, "disconnected - reconnecting");
    page.retry += 1;
    setTimeout(start, Math.min(5000, 250 * 2 ** Math.min(page.retry, 5)));
  };
}

// -- start -----------------------------------------------------------------------------------------
async function start() {
  let listing;
  try {
    listing = await api("/api/v1/channels");
  } catch (error) {
    if (error instanceof Unauthorized) {
      showLogin(page.token ? "This token is not accepted." : "");
      return;
    }
    setConnected(false, "service unreachable - retrying");
    page.retry += 1;
    setTimeout(start, Math.min(5000, 250 * 2 ** Math.min(page.retry, 5)));
    return;
  }
  $("login").hidden = true;
  buildTable(listing.channels);
  connect();
  loadHistory([...page.channels.values()].filter(entry => entry.sparkHolder).map(entry => entry.spec.name));
}

setInterval(refreshAges, 1000);
setInterval(async () => {  // new or removed channels: the table follows the stream's data header
  if (!page.connected) return;
  try {
    const added = buildTable((await api("/api/v1/channels")).channels).filter(spec => !isImage(spec));
    if (added.length) send({op: "subscribe", channels: added.map(spec => spec.name), max_rate: TABLE_RATE});
  } catch (error) { /* the socket's state says it */ }
}, 10000);
start();

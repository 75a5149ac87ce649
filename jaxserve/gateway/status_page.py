"""The Gateway's status page at `/`: one static HTML page whose script reads `GET /workers` every
two seconds and shows each worker's health, load, models and launch arguments, with a link to its
live logs (opened in the page over `GET /workers/{id}/logs?follow=true`). The page passes on its own
`?token=`.

Every value from a worker is put in the page as text (`textContent`), never as HTML.
"""

STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxserve gateway</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.healthy { color: #17702a; font-weight: 600; }
.unhealthy { color: #b3261e; font-weight: 600; }
#logs { display: none; margin-top: 1.5em; }
#log-lines { background: #111; color: #ddd; padding: .8em; height: 24em; overflow: auto;
             font: 12px ui-monospace, monospace; white-space: pre-wrap; }
#error { color: #b3261e; }
details.args pre { max-height: 20em; overflow: auto; font-size: 12px; margin: .3em 0; }
.logs-link, summary { white-space: nowrap; }
</style></head>
<body>
<h1>jaxserve gateway</h1>
<p><span id="summary">loading...</span> <span id="error"></span></p>
<table id="workers">
<thead><tr><th>worker</th><th>url</th><th>status</th><th>models</th><th>server</th>
<th>device</th><th>load</th><th>last heartbeat</th><th>launch arguments</th><th>logs</th>
</tr></thead>
<tbody></tbody>
</table>
<section id="logs"><h2>logs of <span id="log-worker"></span></h2><pre id="log-lines"></pre></section>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => token ? path + (path.includes("?") ? "&" : "?") + "token="
  + encodeURIComponent(token) : path;
let source = null;
const openArgs = new Set();  // workers whose launch arguments are unfolded, across refreshes

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function loadText(load) {
  if (!load || Object.keys(load).length === 0) return "-";
  const kv = load.kv_cache_usage == null ? "" : ", KV " + (100 * load.kv_cache_usage).toFixed(0)
    + "%";
  const tput = load.generation_throughput == null ? "" : ", "
    + Number(load.generation_throughput).toFixed(1) + " tok/s";
  return (load.running ?? 0) + " running, " + (load.waiting ?? 0) + " waiting" + kv + tput;
}

function plural(n, word) {
  return n + " " + word + (n === 1 ? "" : "s");
}

function serverText(w) {  // "jaxserve 0.1.0 (vllm flags)": the engine, then the flag dialect
  const engine = (w.engine || "jaxserve") + (w.version ? " " + w.version : "");
  return w.backend ? engine + " (" + w.backend + " flags)" : engine;
}

function showLogs(worker) {
  if (source) source.close();
  document.getElementById("logs").style.display = "block";
  document.getElementById("log-worker").textContent = worker.id + " (" + worker.url + ")";
  const pre = document.getElementById("log-lines");
  pre.textContent = "";
  source = new EventSource(withToken("/workers/" + worker.id + "/logs?follow=true"));
  source.onmessage = (event) => {
    pre.append(JSON.parse(event.data) + "\\n");
    pre.scrollTop = pre.scrollHeight;
  };
}

function render(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  const now = Date.now() / 1000;
  for (const w of workers) {
    const row = body.insertRow();
    row.dataset.worker = w.id;
    cell(row, w.id);
    cell(row, w.url);
    cell(row, w.status, w.status);
    cell(row, w.models.join(", "));
    cell(row, serverText(w));
    cell(row, w.device && w.device.kind ? w.device.count + " x " + w.device.kind : "-");
    cell(row, loadText(w.load) + (w.in_flight ? ", " + w.in_flight + " relayed" : ""));
    cell(row, Math.max(0, now - w.last_heartbeat).toFixed(1) + " s ago");
    const args = document.createElement("details");
    args.className = "args";
    args.open = openArgs.has(w.id);
    args.ontoggle = () => args.open ? openArgs.add(w.id) : openArgs.delete(w.id);
    const summary = document.createElement("summary");
    summary.textContent = plural(Object.keys(w.backend_args).length, "flag");
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(w.backend_args, null, 1);
    args.append(summary, pre);
    row.insertCell().append(args);
    const link = document.createElement("a");
    link.href = withToken("/workers/" + w.id + "/logs?follow=true");
    link.textContent = "live logs";
    link.className = "logs-link";
    link.onclick = (event) => { event.preventDefault(); showLogs(w); };
    row.insertCell().append(link);
  }
  const healthy = workers.filter((w) => w.status === "healthy").length;
  document.getElementById("summary").textContent =
    plural(workers.length, "worker") + ", " + healthy + " healthy";
}

async function refresh() {
  try {
    const response = await fetch(withToken("/workers"));
    if (!response.ok) throw new Error("GET /workers: " + response.status);
    render(await response.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e);
  }
}

refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""

"""The live console: one self-contained page (inline CSS and JS, nothing fetched from elsewhere,
so it works on a machine with no internet), refreshed every second from ``/console/state``.

Token: when ``metrics.token`` is set, open ``/console#token=<token>`` once (the fragment never
leaves the browser: no proxy or access log sees it; ``?token=`` works too); the page keeps the
token in this tab's sessionStorage, removes it from the address bar (and so from history), and
sends it as ``Authorization: Bearer`` on every state request. The page itself needs no token, so
a reload works. The token is taken as written: ``+`` stays ``+`` (base64 tokens).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

_SCRIPT: Final = r"""
"use strict";
// The token as written in the address: URLSearchParams would turn a "+" into a space.
function takeToken(part) {
  const pairs = part.replace(/^[?#]/, "").split("&").filter(p => p !== "");
  const found = pairs.find(p => p.startsWith("token="));
  if (found === undefined) return [null, part];
  const rest = pairs.filter(p => p !== found).join("&");
  return [decodeURIComponent(found.slice(6)), rest ? part[0] + rest : ""];
}
const [inQuery, search] = takeToken(location.search);
const [inFragment, hash] = takeToken(location.hash);
const given = inFragment ?? inQuery;
if (given !== null) {
  sessionStorage.setItem("fastmatch-token", given);
  history.replaceState(null, "", location.pathname + search + hash);
}
const token = sessionStorage.getItem("fastmatch-token");
const headers = token ? {Authorization: "Bearer " + token} : {};
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}
const dash = "\u2014";
const num = (v, digits = 0) => v === null || v === undefined ? dash : Number(v).toFixed(digits);
function dur(ms) {
  if (ms === null || ms === undefined) return dash;
  const s = ms / 1000;
  if (Math.abs(s) < 1) return Math.round(ms) + " ms";
  if (Math.abs(s) < 10) return s.toFixed(1) + " s";
  if (Math.abs(s) < 120) return Math.round(s) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}
const secs = v => v === null || v === undefined ? dash : dur(v * 1000);
function field(name, label, value, cls = "") {
  return el("div", {class: "stat " + cls},
    el("span", {class: "label"}, label), el("span", {class: "value", "data-field": name}, value));
}

function renderMode(m, window_s) {
  const w = m.local.wait_s;
  const card = el("section", {class: "card mode", "data-mode": m.name}, el("h2", {}, m.name));
  const win = Math.round(window_s);
  card.append(el("div", {class: "stats"},
    field("queued", "queued", num(m.queued), "big"),
    field("disconnected", "in resume grace", num(m.disconnected)),
    field("ready_checks", "in ready check", num(m.ready_checks), "big"),
    // The window grows from the first state read to a minute: say which it is. Matches and
    // waits are this host's leaders' (its metrics), unlike the Redis figures around them.
    field("matches_window", (win >= 55 ? "matches / min" : "matches, last " + win + " s") +
          " (this host)", num(m.local.matches_window), "big"),
    field("matches_total", "matches (this host)", num(m.local.matches_total)),
    field("wait", "wait p50 / p95 / p99 (this host)", w.length ? w.map(secs).join(" / ") : dash),
    field("oldest", "longest wait now",
          m.longest_waiting.length ? dur(m.longest_waiting[0].waited_ms) : dash),
    field("skipped", "ticks skipped", num(m.local.ticks_skipped_total)),
    field("leader", "leader", m.leader || "none", m.leader ? "" : "bad"),
    field("epoch", "epoch", num(m.epoch)),
    field("lease", "lease left", dur(m.lease_ms))));
  const waiting = el("ol", {class: "list", "data-list": "waiting"});
  for (const p of m.longest_waiting) waiting.append(el("li", {}, el("code", {}, p.player),
    " " + dur(p.waited_ms)));
  const checks = el("ol", {class: "list", "data-list": "ready_checks"});
  for (const c of m.ready_check_list) checks.append(el("li", {}, el("code", {}, c.match),
    " deadline in " + dur(c.deadline_in_ms)));
  card.append(el("div", {class: "lists"},
    el("div", {}, el("h3", {}, "longest waiting"), waiting),
    el("div", {}, el("h3", {}, "ready checks"), checks)));
  return card;
}

function renderWorkers(workers) {
  const body = el("tbody");
  for (const w of workers) {
    const hb = w.heartbeat_in_ms;
    body.append(el("tr", {"data-worker": w.id || w.process},
      el("td", {}, el("code", {}, w.id || "(not registered)")),
      el("td", {}, w.process || w.host),
      el("td", {}, num(w.pid)),
      el("td", {class: hb !== null && hb < 0 ? "bad" : ""}, hb === null ? dash : dur(hb)),
      el("td", {}, num(w.players)),
      el("td", {}, num(w.connections)),
      el("td", {class: w.breaker && w.breaker !== "closed" ? "bad" : ""}, w.breaker || dash),
      el("td", {}, w.leads.join(", "))));
  }
  return el("table", {}, el("thead", {}, el("tr", {}, ...["worker", "process / host", "pid",
    "heartbeat left", "players", "connections", "breaker", "leads"].map(h => el("th", {}, h)))),
    body);
}

function render(s) {
  const gs = s.game_servers;
  $("#host").textContent = s.host;
  const redis = $("#redis");
  redis.textContent = s.redis_error ? "unreachable: " + s.redis_error : "ok";
  redis.className = "value " + (s.redis_error ? "bad" : "good");
  const breaker = $("#breaker");
  breaker.textContent = s.breaker;
  breaker.className = "value " + (s.breaker === "closed" ? "good" : "bad");
  const listening = $("#gs-listening");
  listening.textContent = num(gs.listening) + " on " + gs.channel;
  listening.className = "value " + (gs.listening ? "good" : "bad");
  const health = $("#gs-health");
  health.textContent = gs.available === null ? dash : gs.available ? "available" : "unavailable";
  health.className = "value " + (gs.available === false ? "bad" : "");
  $("#gs-misses").textContent = num(gs.misses_total);
  $("#connections").textContent = num(s.connections);
  $("#restarts").textContent = num(s.worker_restarts_total);
  $("#refused").textContent = num(s.handshakes_refused_total);
  $("#modes").replaceChildren(...s.modes.map(m => renderMode(m, s.window_s)));
  $("#workers").replaceChildren(renderWorkers(s.workers));
}

async function refresh() {
  const status = $("#updated");
  try {
    const response = await fetch("/console/state", {headers, cache: "no-store"});
    if (response.status === 401) {
      status.textContent = "unauthorised: open /console#token=<metrics.token>";
      status.className = "bad";
    } else if (!response.ok) {
      throw new Error("HTTP " + response.status);
    } else {
      render(await response.json());
      status.textContent = "updated " + new Date().toLocaleTimeString();
      status.className = "";
    }
  } catch (err) {
    status.textContent = "stale: " + err.message;
    status.className = "bad";
  }
  setTimeout(refresh, 1000);
}
refresh();
"""

_STYLE: Final = """
:root { --bg: #f6f7f9; --card: #fff; --ink: #1d2430; --mute: #667085; --bad: #c0262d;
        --good: #16794a; font: 14px/1.4 system-ui, sans-serif; color: var(--ink); }
body { margin: 0; background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: 18px; align-items: baseline; padding: 12px 20px;
         background: var(--ink); color: #fff; }
header h1 { font-size: 18px; margin: 0 12px 0 0; }
header .label { color: #aab3c2; margin-right: 4px; }
header .good { color: #7be0a8; } header .bad { color: #ff9c9c; }
main { padding: 16px 20px; display: grid; gap: 16px; }
#modes { display: grid; gap: 16px; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); }
.card { background: var(--card); border-radius: 8px; padding: 12px 16px;
        box-shadow: 0 1px 3px rgba(0,0,0,.12); }
.card h2 { margin: 0 0 8px; font-size: 16px; }
.card h3 { margin: 8px 0 4px; font-size: 13px; color: var(--mute); font-weight: 600; }
.stats { display: grid; grid-template-columns: repeat(3, 1fr); gap: 8px 16px; }
.stat { display: flex; flex-direction: column; }
.stat .label { color: var(--mute); font-size: 12px; }
.stat.big .value { font-size: 24px; font-weight: 600; }
.lists { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.list { margin: 0; padding-left: 20px; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e4e7ec; }
th { color: var(--mute); font-weight: 600; }
code { font: 12px ui-monospace, monospace; }
.bad, .stat.bad .value { color: var(--bad); } .good { color: var(--good); }
#updated { margin-left: auto; color: #aab3c2; }
"""

# The inline script is allowed by its hash: the page runs nothing else, whatever is injected.
SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CSP: Final = (f"default-src 'none'; script-src 'sha256-{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")

PAGE: Final = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>fastmatch console</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
  <h1>fastmatch</h1>
  <span><span class="label">host</span><span id="host">&#8212;</span></span>
  <span><span class="label">redis</span><span id="redis" class="value">&#8212;</span></span>
  <span><span class="label">breaker</span><span id="breaker" class="value">&#8212;</span></span>
  <span><span class="label">game servers listening</span>
    <span id="gs-listening" class="value">&#8212;</span></span>
  <span><span class="label">health monitor</span><span id="gs-health" class="value">&#8212;</span>
    (<span id="gs-misses">0</span> misses)</span>
  <span><span class="label">connections (this host)</span><span id="connections">&#8212;</span></span>
  <span><span class="label">worker restarts</span><span id="restarts">&#8212;</span></span>
  <span><span class="label">handshakes refused</span><span id="refused">&#8212;</span></span>
  <span id="updated">loading</span>
</header>
<main>
  <div id="modes"></div>
  <section class="card"><h2>workers</h2><div id="workers"></div></section>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
""".encode()

// CYPHONIC console: plain browser JavaScript, no framework, no build step.
//
// The admin token is typed into the login form, checked against GET /v1/console, kept in
// sessionStorage (this tab only) and sent as "Authorization: Bearer" to the /v1 routes of
// this origin. It never goes into a URL. Every value from the API is written with
// textContent, never as markup.
"use strict";

const TOKEN_KEY = "cyphonic.console.token";
const REFRESH_MS = 5000;
const PATTERNS = { 1: "direct", 2: "NAT side connects", 3: "relay" };
const NETWORK_KINDS = {
  ipv6: "IPv6",
  global_ipv4: "public IPv4",
  nat_ipv4: "IPv4 behind NAT",
  dual_stack: "IPv4 + IPv6",
  dual_stack_nat: "IPv4 behind NAT + IPv6",
  none: "no usable address",
};

const state = { info: null, timer: null, busy: false, revoking: null };

// ------------------------------------------------------------------ helpers

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(text, kind, title) {
  return el("span", { class: "badge b-" + kind, title: title }, text);
}

function sub(text) {
  return el("span", { class: "sub" }, text);
}

function shortName(fqdn) {
  return String(fqdn).split(".")[0];
}

function ago(when) {
  if (!when) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(when)) / 1000);
  return duration(seconds) + " ago";
}

function duration(seconds) {
  if (seconds < 1) return "now";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h";
  return Math.round(seconds / 86400) + " d";
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let value = Number(n) || 0;
  while (value >= 1000 && i < units.length - 1) {
    value /= 1000;
    i += 1;
  }
  return (i === 0 ? value : value.toFixed(1)) + " " + units[i];
}

function rate(bitsPerSecond) {
  const units = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
  let i = 0;
  let value = Number(bitsPerSecond) || 0;
  while (value >= 1000 && i < units.length - 1) {
    value /= 1000;
    i += 1;
  }
  return (i === 0 ? Math.round(value) : value.toFixed(1)) + " " + units[i];
}

function fill(tableId, emptyId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
  $(tableId).hidden = rows.length === 0;
  $(emptyId).hidden = rows.length !== 0;
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Paths are relative to the page (/console/): "../v1/nodes" is /v1/nodes, or
// /prefix/v1/nodes behind a proxy that serves the NMS under /prefix/.
async function api(method, path, body, token) {
  const headers = {
    Accept: "application/json",
    Authorization: "Bearer " + (token || sessionStorage.getItem(TOKEN_KEY) || ""),
  };
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "unreachable", "The NMS did not answer (" + err.message + ").");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || "http_" + response.status,
      error.message || response.statusText || "HTTP " + response.status,
    );
  }
  return data;
}

// ------------------------------------------------------------------ sign in / out

function showLogin(message) {
  stopTimer();
  $("app").hidden = true;
  $("session-controls").hidden = true;
  $("login").hidden = false;
  $("replica").textContent = "";
  const error = $("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  const button = $("sign-in");
  if (!token) return;
  button.disabled = true;
  try {
    const info = await api("GET", "../v1/console", undefined, token);
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start(info);
  } catch (err) {
    if (err.status === 401) {
      showLogin("That admin token was not accepted by this NMS. Check it and try again.");
    } else if (err.status === 403) {
      showLogin("This NMS has no admin token configured (CYPHONIC_ADMIN_TOKEN): nobody can sign in.");
    } else {
      showLogin("Could not sign in: " + err.message);
    }
  } finally {
    button.disabled = false;
  }
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.info = null;
  showLogin(message);
}

function start(info) {
  state.info = info;
  $("login").hidden = true;
  $("app").hidden = false;
  $("session-controls").hidden = false;
  refresh();
}

// ------------------------------------------------------------------ refresh

function stopTimer() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

function schedule() {
  stopTimer();
  if ($("auto-refresh").checked && sessionStorage.getItem(TOKEN_KEY)) {
    state.timer = setTimeout(refresh, REFRESH_MS);
  }
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  const status = $("status");
  try {
    const [info, nodes, routes, trs] = await Promise.all([
      api("GET", "../v1/console"),
      api("GET", "../v1/nodes?limit=500"),
      api("GET", "../v1/routes?limit=500"),
      api("GET", "../v1/trs"),
    ]);
    state.info = info;
    render(info, nodes, routes, trs);
    status.className = "status";
    status.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
  } catch (err) {
    if (err.status === 401) {
      signOut("The admin token is no longer accepted. Sign in again.");
      return;
    }
    status.className = "status bad";
    status.textContent = "Refresh failed: " + err.message;
  } finally {
    state.busy = false;
    schedule();
  }
}

function render(info, nodes, routes, trs) {
  $("replica").textContent = "NMS " + info.replica_id + " \u00b7 " + info.domain;
  const online = nodes.items.filter((n) => n.online).length;
  $("sum-online").textContent = online;
  $("sum-nodes").textContent = nodes.total;
  $("sum-direct").textContent = routes.items.filter((r) => r.pattern !== 3).length;
  $("sum-relayed").textContent = routes.items.filter((r) => r.pattern === 3).length;
  $("sum-trs").textContent = trs.replicas.length;
  fill("nodes", "nodes-empty", nodes.items.map((n) => nodeRow(n, info)));
  applyNodeFilter();
  const more = $("nodes-more");
  more.hidden = nodes.total <= nodes.items.length;
  more.textContent = "Showing the first " + nodes.items.length + " of " + nodes.total +
    " nodes (GET /v1/nodes pages through all of them).";
  // A stable order (by pair): rows do not jump about on every refresh.
  const byPair = [...routes.items].sort(
    (a, b) => a.initiator.localeCompare(b.initiator) || a.responder.localeCompare(b.responder),
  );
  const sessions = new Map(trs.sessions.map((s) => [s.route_id, s]));
  fill("routes", "routes-empty", byPair.map((r) => routeRow(r, sessions.get(r.route_id), trs)));
  fill("trs-replicas", "trs-empty", trs.replicas.map(replicaRow));
  fill("trs-sessions", "sessions-empty", trs.sessions.map(sessionRow));
  $("trs-problems").replaceChildren(
    ...trs.problems.map((p) => el("li", {}, p.source + ": " + p.message)),
  );
  const policy = $("policy-section");
  policy.dataset.available = String(Boolean(info.policy_available));
}

// Show only the node rows matching the filter box (any visible text) and "online only".
function applyNodeFilter() {
  const words = $("node-filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const onlineOnly = $("online-only").checked;
  for (const tr of $("nodes").tBodies[0].rows) {
    const text = tr.textContent.toLowerCase();
    const match = words.every((w) => text.includes(w)) && (!onlineOnly || tr.dataset.online === "true");
    tr.hidden = !match;
  }
}

// ------------------------------------------------------------------ rows

function networkCell(net) {
  if (!net) return el("td", {}, badge("unknown", "off"));
  const kind = NETWORK_KINDS[net.kind] || net.kind;
  return el(
    "td",
    { class: "network", dataset: { kind: net.kind } },
    badge(kind, net.behind_nat ? "warn" : "ok", net.behind_nat ? "behind NAT" : "no NAT"),
  );
}

function realCell(net) {
  if (!net) return el("td", {}, "-");
  const seen = [net.observed_ipv4, net.observed_ipv6].filter(Boolean);
  const reported = net.local_addresses.filter((a) => !seen.includes(a));
  return el(
    "td",
    { class: "real" },
    seen.map((a) => el("code", { class: "sub", title: "source address the NMS saw" }, a)),
    reported.length ? sub("reports " + reported.join(", ")) : null,
  );
}

function seenAt(net) {
  return [net.observed_ipv4, net.observed_ipv6].filter(Boolean).join(", ");
}

function handoverCell(handover) {
  if (!handover) return el("td", { class: "handover muted" }, "-");
  // Where the NMS saw it before and after; the reported addresses when that did not change.
  let from = seenAt(handover.old);
  let to = seenAt(handover.new);
  if (from === to) {
    from = handover.old.local_addresses.join(", ") || from;
    to = handover.new.local_addresses.join(", ") || to;
  }
  const kinds = handover.old.kind === handover.new.kind
    ? null
    : sub((NETWORK_KINDS[handover.old.kind] || handover.old.kind) + " \u2192 " +
        (NETWORK_KINDS[handover.new.kind] || handover.new.kind));
  return el("td", { class: "handover" }, ago(handover.at), sub(from + " \u2192 " + to), kinds);
}

function nodeRow(n, info) {
  const revoked = n.state === "revoked";
  const stateKind = revoked ? "bad" : n.state === "active" ? "ok" : "off";
  const button = el(
    "button",
    {
      type: "button",
      class: "small revoke",
      disabled: revoked || !info.revoke_available,
      title: !info.revoke_available
        ? "No AS configured on this NMS (CYPHONIC_AS_URL)"
        : revoked
          ? "Already revoked"
          : "Revoke this node at the AS",
      onclick: () => openRevoke(n.fqdn),
    },
    "Revoke",
  );
  return el(
    "tr",
    { dataset: { fqdn: n.fqdn, online: String(n.online), state: n.state } },
    el("td", { class: "fqdn" }, el("strong", {}, shortName(n.fqdn)), sub(n.fqdn)),
    el("td", { class: "state" }, badge(n.state, stateKind)),
    el(
      "td",
      { class: "presence" },
      badge(n.online ? "online" : "offline", n.online ? "ok" : "off"),
      sub(n.last_seen ? "seen " + ago(n.last_seen) : "never seen"),
    ),
    el(
      "td",
      { class: "virtual" },
      el("code", { class: "sub" }, n.virtual_ipv4 || "-"),
      el("code", { class: "sub" }, n.virtual_ipv6 || "-"),
    ),
    realCell(n.network),
    networkCell(n.network),
    handoverCell(n.last_handover),
    el("td", {}, button),
  );
}

function relayState(r, session, trs) {
  // What the TRS says about a relayed route: only when its replica's admin API was read.
  if (r.pattern !== 3) return null;
  if (session) {
    return sub(session.complete ? "relaying, " + bytes(session.bytes) : "waiting for the peer");
  }
  const replica = trs.replicas.find((x) => x.replica_id === r.trs_replica);
  return replica && replica.counters ? sub("no session at the TRS") : null;
}

function routeRow(r, session, trs) {
  const relayed = r.pattern === 3;
  const connector = r.connector === "initiator" ? r.initiator : r.responder;
  return el(
    "tr",
    { dataset: { routeId: r.route_id, pattern: String(r.pattern), reason: r.reason_code } },
    el(
      "td",
      { class: "pair" },
      el("strong", {}, shortName(r.initiator) + " \u2192 " + shortName(r.responder)),
      sub(r.route_id),
    ),
    el(
      "td",
      { class: "pattern" },
      badge(r.pattern + " " + (PATTERNS[r.pattern] || r.pattern_name), relayed ? "relay" : "direct"),
    ),
    el("td", { class: "transport" }, r.transport),
    el("td", { class: "reason", title: r.reason_code }, r.reason),
    el("td", { class: "trs" }, r.trs_replica || "-", relayState(r, session, trs)),
    el("td", { class: "connector" }, shortName(connector)),
    el("td", { class: "since" }, ago(r.created_at), sub("by " + r.decided_by)),
  );
}

function replicaRow(r) {
  let status;
  if (r.in_directory && r.stale) {
    status = badge("stale", "bad", "its directory entry is not being refreshed: the replica may be down");
  } else if (r.in_directory && r.counters) {
    status = badge("live", "ok", "in the NMS's directory, admin API answers");
  } else if (r.in_directory) {
    status = badge("relaying", "ok", "in the NMS's directory; its admin API is not configured or did not answer");
  } else {
    status = badge("not in directory", "warn", "its admin API answers, but the NMS does not hand it out");
  }
  const c = r.counters;
  const drops = c ? Object.values(c.drops).reduce((a, b) => a + b, 0) : null;
  const dropTitle = c
    ? Object.entries(c.drops)
        .map(([k, v]) => k + ": " + v)
        .join(", ")
    : "";
  return el(
    "tr",
    { dataset: { replica: r.replica_id } },
    el("td", { class: "replica" }, el("strong", {}, r.replica_id), r.server_name ? sub(r.server_name) : null),
    el(
      "td",
      { class: "status" },
      status,
      r.updated_age_s !== null ? sub("refreshed " + duration(r.updated_age_s) + " ago") : null,
      c && c.last_sync_error ? sub("sync: " + c.last_sync_error) : null,
    ),
    el("td", { class: "endpoints" }, r.endpoints.map((e) => el("code", { class: "sub" }, e))),
    el("td", { class: "sessions" }, r.sessions === null ? "-" : String(r.sessions)),
    el("td", {}, c ? bytes(c.forwarded_bytes) : "-", c ? sub(c.forwarded_packets + " packets") : null),
    el("td", {}, c ? rate(c.bits_per_s) : "-", c ? sub(Math.round(c.packets_per_s) + " packets/s") : null),
    el("td", { title: dropTitle }, drops === null ? "-" : String(drops)),
  );
}

function sessionRow(s) {
  return el(
    "tr",
    { dataset: { routeId: s.route_id } },
    el("td", {}, s.replica_id),
    el("td", {}, el("code", {}, s.route_id)),
    el(
      "td",
      { class: "pair" },
      s.pair.map(shortName).join(" \u2194 "),
      s.sides.filter(Boolean).map((side) =>
        sub(shortName(side.fqdn) + " at " + side.address + ", sent " + bytes(side.bytes)),
      ),
    ),
    el("td", {}, badge(s.complete ? "yes" : "waiting", s.complete ? "ok" : "warn")),
    el("td", {}, String(s.packets)),
    el("td", {}, bytes(s.bytes)),
    el("td", {}, duration(s.age_s)),
    el("td", {}, duration(s.idle_s)),
  );
}

// ------------------------------------------------------------------ revoke

function openRevoke(fqdn) {
  state.revoking = fqdn;
  $("revoke-fqdn").textContent = fqdn;
  $("revoke-name").textContent = shortName(fqdn);
  $("revoke-confirm").value = "";
  $("revoke-submit").disabled = true;
  $("revoke-error").hidden = true;
  $("revoke-dialog").showModal();
  $("revoke-confirm").focus();
}

function closeRevoke() {
  state.revoking = null;
  $("revoke-dialog").close();
}

function notice(text, bad) {
  const box = $("notice");
  box.textContent = text;
  box.className = bad ? "notice bad" : "notice";
  box.hidden = false;
}

async function submitRevoke(event) {
  event.preventDefault();
  const fqdn = state.revoking;
  if (!fqdn || $("revoke-confirm").value.trim() !== shortName(fqdn)) return;
  $("revoke-submit").disabled = true;
  try {
    const reason = $("revoke-reason").value.trim() || "unspecified";
    const path = "../v1/nodes/" + encodeURIComponent(fqdn) + "/revoke";
    const answer = await api("POST", path, { reason });
    closeRevoke();
    notice(
      answer.fqdn + " is " + answer.state + " (" + answer.revoked_certificates +
        " certificate(s) revoked). The NMS drops its connection within seconds.",
    );
    refresh();
  } catch (err) {
    if (err.status === 401) {
      closeRevoke();
      signOut("The admin token is no longer accepted. Sign in again.");
      return;
    }
    const box = $("revoke-error");
    box.textContent = "Not revoked: " + err.message;
    box.hidden = false;
    $("revoke-submit").disabled = false;
  }
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("refresh").addEventListener("click", refresh);
  $("auto-refresh").addEventListener("change", schedule);
  $("node-filter").addEventListener("input", applyNodeFilter);
  $("online-only").addEventListener("change", applyNodeFilter);
  $("revoke-form").addEventListener("submit", submitRevoke);
  $("revoke-cancel").addEventListener("click", closeRevoke);
  $("revoke-confirm").addEventListener("input", () => {
    $("revoke-submit").disabled =
      !state.revoking || $("revoke-confirm").value.trim() !== shortName(state.revoking);
  });
  if (sessionStorage.getItem(TOKEN_KEY)) {
    api("GET", "../v1/console")
      .then(start)
      .catch((err) =>
        err.status === 401
          ? signOut("The admin token is no longer accepted. Sign in again.")
          : showLogin("Could not reach the NMS: " + err.message),
      );
  } else {
    showLogin("");
  }
});

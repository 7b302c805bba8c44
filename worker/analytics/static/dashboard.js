// The dashboard: asks for the admin key once (kept in sessionStorage, never in the URL),
// then reads the /v1 query API. All data is inserted as text, never as HTML.
"use strict";
(function () {
  const KEY = "meter.adminKey";
  const $ = (id) => document.getElementById(id);
  const { stackedSeries, horizontalBars, fmt } = window.MeterCharts;
  let currentKey = null;

  class Unauthorized extends Error {}

  async function api(path) {
    const key = sessionStorage.getItem(KEY);
    if (!key) throw new Unauthorized("no key");
    const res = await fetch(path, { headers: { "X-API-Key": key, Accept: "application/json" } });
    const body = await res.json().catch(() => ({}));
    if (res.status === 401 || res.status === 403) throw new Unauthorized(body.message || res.statusText);
    if (!res.ok) throw new Error(`${path}: ${body.message || res.statusText} (request ${body.request_id || "?"})`);
    return body;
  }

  function showLogin(message) {
    document.body.dataset.state = "login";
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("login-key").focus();
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text == null ? "—" : String(text);
    if (cls) td.className = cls;
    tr.append(td);
    return td;
  }
  function keyLink(id) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "key-link";
    b.dataset.keyId = id;
    b.textContent = id;
    b.addEventListener("click", () => showKey(id));
    return b;
  }
  const time = (iso) => (iso ? iso.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, "") : "—");
  const pair = (count, limit) => (count == null && limit == null ? "—" : `${count == null ? "—" : fmt(count)} / ${limit == null ? "∞" : fmt(limit)}`);

  function renderSignals(list, signals) {
    list.replaceChildren();
    if (!signals.length) {
      const li = document.createElement("li");
      li.textContent = "Nothing suspicious in this window.";
      list.append(li);
    }
    for (const s of signals) {
      const li = document.createElement("li");
      li.dataset.kind = s.kind;
      if (s.key_id) li.dataset.keyId = s.key_id;
      const sev = document.createElement("span");
      sev.className = `sev sev-${s.severity}`;
      sev.textContent = s.severity;
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = s.kind.replaceAll("_", " ");
      li.append(sev, kind);
      if (s.key_id) li.append(keyLink(s.key_id), document.createTextNode(" "));
      const text = document.createElement("div");
      text.className = "explanation";
      text.textContent = s.explanation;
      li.append(text);
      list.append(li);
    }
  }

  async function loadOverview() {
    const win = $("window").value;
    const [traffic, topList, blocked, signals] = await Promise.all([
      api("/v1/traffic?granularity=hour&breakdown=status_class"),
      api(`/v1/top?dimension=key&metric=requests&n=10&window=${encodeURIComponent(win)}`),
      api("/v1/blocked"),
      api(`/v1/signals?recent=${encodeURIComponent(win)}`),
    ]);
    const svg = stackedSeries($("traffic-chart"), traffic);
    $("traffic-total").textContent = `${fmt(svg.dataset.total)} requests`;
    $("top-window").textContent = `(${win}, from ${topList.level} rollups)`;
    const blockedIds = new Set(blocked.filter((b) => !b.shadow).map((b) => b.key_id));
    horizontalBars(
      $("top-chart"),
      topList.entries.map((e) => ({
        id: e.id,
        label: e.id.length > 30 ? `${e.id.slice(0, 29)}…` : e.id,
        value: e.requests,
        color: blockedIds.has(e.id) ? "#b42318" : e.rate_limited || e.auth_failures ? "#dc6803" : "#2563eb",
        title: `${e.id} (${e.account_id || "no account"}): ${fmt(e.requests)} requests, ${fmt(e.errors)} errors, ${fmt(e.auth_failures)} 401/403, ${fmt(e.rate_limited)} 429`,
      })),
      showKey,
    );
    const tbody = $("blocked-list").querySelector("tbody");
    tbody.replaceChildren();
    for (const b of blocked) {
      const tr = document.createElement("tr");
      tr.dataset.keyId = b.key_id;
      tr.dataset.shadow = String(Boolean(b.shadow));
      cell(tr, "", "key").append(keyLink(b.key_id));
      // A shadow policy's block: the key is served; the nodes only count the refusals.
      cell(tr, b.shadow ? `${b.window} (shadow)` : b.window);
      cell(tr, pair(b.count, b.limit));
      cell(tr, b.until ? time(b.until) : "until unblocked");
      cell(tr, b.reason);
      tbody.append(tr);
    }
    $("blocked-count").textContent = `(${blocked.length})`;
    renderSignals($("signals-list"), signals.signals);
    $("signals-count").textContent = `(${signals.signals.length})`;
    $("as-of").textContent = `as of ${time(signals.as_of)} UTC`;
  }

  async function showKey(id) {
    currentKey = id;
    $("key-input").value = id;
    $("key-title").textContent = id;
    document.body.dataset.keyState = "loading";
    const until = new Date();
    const since = new Date(until.getTime() - 3 * 3600 * 1000);
    const q = `since=${encodeURIComponent(since.toISOString())}&until=${encodeURIComponent(until.toISOString())}`;
    const path = encodeURIComponent(id);
    try {
      const [state, series, signals] = await Promise.all([
        api(`/v1/keys/${path}/state`),
        api(`/v1/keys/${path}/usage?granularity=minute&breakdown=status_class&${q}`),
        api(`/v1/signals?key_id=${path}`),
      ]);
      if (currentKey !== id) return;
      const limits = $("key-limits");
      limits.replaceChildren();
      const head = document.createElement("div");
      head.className = "limit";
      head.dataset.blocked = String(state.blocked);
      const until = state.blocked_until ? "until " + time(state.blocked_until) + " UTC" : "until an operator unblocks";
      head.textContent = state.blocked
        ? `BLOCKED ${until}`
        : state.shadow_blocked
          ? `SHADOW BLOCK ${until} (dry run: served, refusals counted)`
          : "not blocked";
      if (state.blocked) head.className = "limit blocked-badge";
      limits.append(head);
      for (const w of state.windows) {
        const box = document.createElement("div");
        box.className = "limit";
        box.dataset.window = w.window;
        box.dataset.count = w.count;
        box.textContent = `${w.window}: ${pair(w.count, w.limit)}`;
        const meter = document.createElement("div");
        meter.className = w.over ? "meter over" : "meter";
        const fill = document.createElement("div");
        fill.style.width = `${w.limit ? Math.min(100, (100 * w.count) / w.limit) : 0}%`;
        meter.append(fill);
        box.append(meter);
        limits.append(box);
      }
      stackedSeries($("key-chart"), series, { height: 180 });
      renderSignals($("key-signals"), signals.signals);
      const tbody = $("key-decisions").querySelector("tbody");
      tbody.replaceChildren();
      for (const d of state.history) {
        const tr = document.createElement("tr");
        tr.dataset.action = d.action;
        cell(tr, d.version);
        cell(tr, time(d.decided_at));
        cell(tr, d.shadow ? `${d.action} (shadow)` : d.action);
        cell(tr, d.window);
        cell(tr, pair(d.count, d.limit));
        cell(tr, d.until ? time(d.until) : "—");
        cell(tr, d.source);
        cell(tr, d.reason);
        tbody.append(tr);
      }
      $("key-detail").hidden = false;
      document.body.dataset.keyState = "ready";
    } catch (err) {
      handle(err);
    }
  }

  function handle(err) {
    if (err instanceof Unauthorized) {
      sessionStorage.removeItem(KEY);
      showLogin(err.message === "no key" ? "" : err.message);
      return;
    }
    $("error").textContent = String(err.message || err);
    document.body.dataset.state = "error";
  }

  async function start() {
    if (!sessionStorage.getItem(KEY)) return showLogin("");
    $("login").hidden = true;
    $("main").hidden = false;
    document.body.dataset.state = "loading";
    try {
      await loadOverview();
      $("error").textContent = "";
      document.body.dataset.state = "ready";
      if (currentKey) showKey(currentKey);
    } catch (err) {
      handle(err);
    }
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("login-key").value);
    $("login-key").value = "";
    start();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
  $("refresh").addEventListener("click", start);
  $("window").addEventListener("change", start);
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("key-input").value.trim();
    if (id) showKey(id);
  });
  start();
})();

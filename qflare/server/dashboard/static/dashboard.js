/* QFLARE operator dashboard: fetches the coordinator's JSON, renders it as text (never as HTML), and
   follows the server-sent event stream so every page stays current without reloading. */
"use strict";

(() => {
  const page = document.body.dataset.page;
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ helpers
  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function short(hex) {
    if (!hex) return el("span", "–");
    return el("code", String(hex).slice(0, 16) + "…", { title: String(hex) });
  }

  function num(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return typeof value === "number" && digits !== undefined ? value.toFixed(digits) : String(value);
  }

  function cell(content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content);
    else td.textContent = content === null || content === undefined ? "–" : String(content);
    return td;
  }

  function fill(tableId, rows, cells, empty) {
    const body = $(tableId).tBodies[0];
    const out = rows.map((row) => {
      const tr = document.createElement("tr");
      for (const c of cells(row)) tr.appendChild(cell(c));
      return tr;
    });
    if (!out.length) {
      const tr = document.createElement("tr");
      const td = cell(empty || "Nothing yet.");
      td.colSpan = $(tableId).tHead.rows[0].cells.length;
      tr.appendChild(td);
      out.push(tr);
    }
    body.replaceChildren(...out);
  }

  async function failure(response) {
    try {
      const body = await response.json();
      return new Error(`${body.code || response.status}: ${body.message || response.statusText}`);
    } catch (_) {
      return new Error(`HTTP ${response.status}`);
    }
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) {
      window.location.assign("/dashboard/login");
      throw new Error("logged out");
    }
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  async function postJSON(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: JSON.stringify(body || {}),
    });
    if (response.status === 401) {
      window.location.assign("/dashboard/login");
      throw new Error("logged out");
    }
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  function say(id, text) {
    const node = $(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  // ------------------------------------------------------------------ overview
  const charts = {};

  function renderStatus(s) {
    const current = s.round === null ? s.last_round : s.round;
    say("ov-round", current === null ? "none yet" : `${current} of ${s.rounds_total}`);
    say("ov-state", s.state);
    say("ov-accepted", s.round === null ? "–" : `${s.accepted} of ${s.selected} selected`);
    say("ov-deadline", s.deadline_in_s === null ? "–" : `${Math.round(s.deadline_in_s)} s`);
    say("ov-model", `v${s.model_version} ${String(s.model_sha256 || "").slice(0, 16)}…`);
    const d = s.devices || {};
    say("ov-devices", `${d.active || 0} active, ${d.quarantined || 0} quarantined, ${d.revoked || 0} revoked`);
    say("ov-updates", String(s.updates_total));
    const closedLast = s.last_round_state === "closed" || s.last_round_state === "failed";
    const done = s.state === "finished" ? s.rounds_total : Math.max(0, (s.last_round || 0) - (closedLast ? 0 : 1));
    const progress = $("ov-progress");
    progress.max = Math.max(1, s.rounds_total);
    progress.value = done;
    progress.textContent = `${done} of ${s.rounds_total} rounds`;
    say("ov-stop", s.stop_reason ? `Stopped: ${s.stop_reason}` : "");
  }

  function chart(key, title, series, data) {
    const target = $(key);
    const empty = $(`${key}-empty`);
    const hasData = data[0].length > 0;
    empty.hidden = hasData;
    if (!hasData || typeof uPlot === "undefined") return;
    if (charts[key]) {
      charts[key].setData(data);
      return;
    }
    const width = Math.max(320, target.clientWidth || 640);
    const opts = {
      title,
      width,
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], values: (u, ticks) => ticks.map((t) => String(t)) }, { scale: series[0].scale, label: series[0].label }, { scale: series[1].scale, label: series[1].label, side: 1, grid: { show: false } }],
      series: [{ label: "round" }, ...series],
    };
    charts[key] = new uPlot(opts, data, target);
  }

  function renderCharts(rounds) {
    const evaluated = rounds.filter((r) => r.accuracy !== null && r.accuracy !== undefined);
    chart(
      "chart-quality",
      "Test accuracy and loss",
      [
        { label: "accuracy", scale: "acc", stroke: "#1f5fa8", width: 2 },
        { label: "loss", scale: "loss", stroke: "#a8431f", width: 2, dash: [6, 4] },
      ],
      [evaluated.map((r) => r.round), evaluated.map((r) => r.accuracy), evaluated.map((r) => r.loss)],
    );
    const closed = rounds.filter((r) => r.seconds && r.state === "closed");
    chart(
      "chart-throughput",
      "Examples and updates per second",
      [
        { label: "examples/s", scale: "ex", stroke: "#2b7a3d", width: 2 },
        { label: "updates/s", scale: "up", stroke: "#6b3fa0", width: 2, dash: [6, 4] },
      ],
      [
        closed.map((r) => r.round),
        closed.map((r) => (r.examples || 0) / r.seconds),
        closed.map((r) => (r.updates || 0) / r.seconds),
      ],
    );
  }

  async function loadOverview() {
    const data = await getJSON("/dashboard/api/overview");
    renderStatus(data.status);
    renderCharts(data.rounds);
  }

  // ------------------------------------------------------------------ devices
  function actionButton(text, label, handler) {
    const button = el("button", text, { type: "button", "aria-label": label });
    button.addEventListener("click", handler);
    return button;
  }

  async function deviceAction(deviceId, action, reasonInput) {
    const body = {};
    if (reasonInput) {
      if (!reasonInput.value.trim()) {
        say("devices-msg", `Give a reason to ${action} ${deviceId.slice(0, 16)}….`);
        reasonInput.focus();
        return;
      }
      body.reason = reasonInput.value.trim();
    }
    try {
      const row = await postJSON(`/dashboard/api/devices/${encodeURIComponent(deviceId)}/${action}`, body);
      say("devices-msg", `Device ${deviceId.slice(0, 16)}… is now ${row.status}.`);
    } catch (err) {
      say("devices-msg", `Could not ${action} the device: ${err.message}`);
    }
    await loadDevices();
  }

  function deviceActions(d) {
    const box = el("div", null, { class: "actions" });
    if (d.status === "revoked") {
      box.textContent = "–";
      return box;
    }
    const id = `reason-${d.device_id.slice(0, 16)}`;
    const label = el("label", "Reason", { for: id, class: "visually-hidden" });
    const input = el("input", null, { id, type: "text", maxlength: "2000", placeholder: "reason", class: "reason" });
    box.append(label, input);
    box.append(actionButton("Revoke", `Revoke device ${d.device_id.slice(0, 16)}`, () => deviceAction(d.device_id, "revoke", input)));
    if (d.status === "active") {
      box.append(actionButton("Quarantine", `Quarantine device ${d.device_id.slice(0, 16)}`, () => deviceAction(d.device_id, "quarantine", input)));
    } else if (d.status === "quarantined") {
      box.append(actionButton("Reinstate", `Reinstate device ${d.device_id.slice(0, 16)}`, () => deviceAction(d.device_id, "reinstate", null)));
    }
    return box;
  }

  async function loadDevices() {
    const data = await getJSON("/dashboard/api/devices");
    say("suite", data.suite);
    fill(
      "devices",
      data.devices,
      (d) => [
        short(d.device_id),
        d.sig_alg,
        el("span", d.status, { class: `status status-${d.status}`, "data-device": d.device_id }),
        when(d.enrolled_at),
        when(d.last_seen),
        data.detection ? num(d.reputation, 3) : "detection off",
        d.revoked_reason || d.quarantine_reason || "–",
        deviceActions(d),
      ],
      "No device is enrolled yet.",
    );
  }

  // ------------------------------------------------------------------ rounds
  function detailTable(caption, headings, rows) {
    const table = el("table");
    table.appendChild(el("caption", caption));
    const head = table.createTHead().insertRow();
    for (const h of headings) head.appendChild(el("th", h, { scope: "col" }));
    const body = table.createTBody();
    for (const r of rows) {
      const tr = body.insertRow();
      for (const c of r) tr.appendChild(cell(c));
    }
    if (!rows.length) {
      const td = cell("None.");
      td.colSpan = headings.length;
      body.insertRow().appendChild(td);
    }
    const wrap = el("div", null, { class: "scroll" });
    wrap.appendChild(table);
    return wrap;
  }

  async function showRound(number) {
    const r = await getJSON(`/dashboard/api/rounds/${number}`);
    const box = $("round-detail-body");
    const facts = el("p", `Round ${r.round}: ${r.state}${r.outcome_reason ? ` (${r.outcome_reason})` : ""}, ` +
      `${r.accepted.length} update(s) of ${r.selected} selected, duration ${num(r.seconds, 1)} s, ` +
      `ledger entry ${r.ledger_seq === null ? "–" : r.ledger_seq}.`);
    box.replaceChildren(
      facts,
      detailTable("Participants (selected)", ["Device"], r.selected_devices.map((d) => [short(d)])),
      detailTable("Accepted updates", ["Device", "Update SHA-256", "Examples", "Received"], r.accepted.map((u) => [short(u.device_id), short(u.update_sha256), u.examples, when(u.received_at)])),
      detailTable("Left out of the aggregate", ["Device", "Update SHA-256", "Reason"], r.left_out.map((u) => [short(u.device_id), short(u.update_sha256), u.reason])),
      detailTable("Refused while the round was open", ["Time", "Kind", "Device", "Detail"], r.refused.map((e) => [when(e.at), e.reason, short(e.device_id), e.detail])),
    );
    $("round-detail").hidden = false;
    $("round-detail-h").textContent = `Round ${r.round} detail`;
  }

  let shownRound = null;

  async function loadRounds() {
    const data = await getJSON("/dashboard/api/rounds");
    fill(
      "rounds",
      data.rounds.slice().reverse(),
      (r) => [
        r.round,
        el("span", r.state, { class: `state state-${r.state}` }),
        r.selected,
        num(r.updates),
        num(r.accuracy, 4),
        num(r.loss, 4),
        num(r.seconds, 1),
        short(r.result_model_sha256),
        actionButton("Show", `Show round ${r.round}`, () => {
          shownRound = r.round;
          showRound(r.round);
        }),
      ],
      "No round has opened yet.",
    );
    if (shownRound !== null) await showRound(shownRound);
  }

  // ------------------------------------------------------------------ events
  function eventQuery() {
    const form = $("event-filter");
    const params = new URLSearchParams();
    for (const name of ["reason", "device_id", "since"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }

  async function loadEvents() {
    const params = eventQuery();
    const data = await getJSON(`/dashboard/api/events?${params}`);
    $("reasons").replaceChildren(...data.kinds.map((k) => el("option", null, { value: k })));
    fill(
      "events",
      data.events,
      (e) => [e.id, when(e.at), el("span", e.reason, { class: "kind" }), short(e.device_id), e.remote_addr, e.detail],
      "No security event matches.",
    );
    const filtered = [...params.keys()].length ? " (filtered)" : "";
    say("events-msg", `${data.events.length} event(s)${filtered}.`);
  }

  function setupEvents() {
    const form = $("event-filter");
    const initial = new URLSearchParams(window.location.search);
    for (const name of ["reason", "device_id", "since"]) {
      if (initial.get(name)) form.elements[name].value = initial.get(name);
    }
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const params = eventQuery();
      window.history.replaceState(null, "", `${window.location.pathname}${[...params.keys()].length ? `?${params}` : ""}`);
      loadEvents().catch((err) => say("events-msg", err.message));
    });
    form.addEventListener("reset", () => {
      window.setTimeout(() => form.requestSubmit(), 0);
    });
  }

  // ------------------------------------------------------------------ tokens
  async function loadTokens() {
    const data = await getJSON("/dashboard/api/tokens");
    fill(
      "tokens",
      data.tokens,
      (t) => [
        el("code", t.id, { title: t.token_sha256 }),
        t.label || "–",
        el("span", t.state, { class: `state state-${t.state}`, "data-token": t.id }),
        when(t.created_at),
        when(t.expires_at),
        t.used_by_device ? short(t.used_by_device) : "–",
        t.state === "valid"
          ? actionButton("Revoke", `Revoke token ${t.id}`, async () => {
              try {
                await postJSON(`/dashboard/api/tokens/${t.token_sha256}/revoke`, {});
                say("tokens-msg", `Token ${t.id} revoked.`);
              } catch (err) {
                say("tokens-msg", `Could not revoke token ${t.id}: ${err.message}`);
              }
              await loadTokens();
            })
          : "–",
      ],
      "No token has been minted.",
    );
  }

  function setupTokens() {
    const form = $("mint");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {
        count: Number(form.elements.count.value),
        ttl_s: Number(form.elements.ttl_h.value) * 3600,
        label: form.elements.label.value,
      };
      try {
        const data = await postJSON("/dashboard/api/tokens", body);
        $("minted-list").replaceChildren(...data.tokens.map((t) => {
          const li = el("li");
          li.appendChild(el("code", t, { class: "token" }));
          return li;
        }));
        $("minted").hidden = false;
        say("tokens-msg", `Minted ${data.tokens.length} token(s), valid until ${when(data.expires_at)}.`);
      } catch (err) {
        say("tokens-msg", `Could not mint: ${err.message}`);
      }
      await loadTokens();
    });
  }

  // ------------------------------------------------------------------ ledger
  async function loadLedger() {
    const data = await getJSON("/dashboard/api/ledger");
    fill("lineage", data.lineage.slice().reverse(), (m) => [m.version, num(m.round), short(m.model_sha256), short(m.parent_sha256), when(m.created_at)], "No model yet.");
    fill(
      "ledger",
      data.entries,
      (e) => [e.seq, e.kind, num(e.round), e.outcome || "–", short(e.entry_sha256), short(e.prev_sha256), e.signers.map((s) => s.slice(0, 12)).join(", "), when(e.created_at)],
      "The ledger is empty.",
    );
  }

  // ------------------------------------------------------------------ live updates
  const loaders = { overview: loadOverview, devices: loadDevices, rounds: loadRounds, events: loadEvents, tokens: loadTokens, ledger: loadLedger };
  const areas = { overview: ["overview", "rounds"], devices: ["devices"], rounds: ["rounds", "overview"], events: ["events"], tokens: ["tokens"], ledger: ["ledger"] };

  function connect() {
    const source = new EventSource("/dashboard/api/stream");
    let last = null;
    source.addEventListener("update", (ev) => {
      const data = JSON.parse(ev.data);
      if (page === "overview") renderStatus(data.overview);
      if (data.changed.some((a) => areas[page].includes(a))) {
        const refresh = page === "overview" ? loadOverview : loaders[page];
        refresh().catch((err) => say("live", `Update failed: ${err.message}`));
      }
      const stamp = new Date().toISOString().slice(11, 19);
      if (stamp !== last) {
        last = stamp;
        say("live", `Live: last change ${stamp} UTC`);
      }
    });
    source.addEventListener("logout", () => {
      source.close();
      window.location.assign("/dashboard/login");
    });
    source.addEventListener("error", () => say("live", "Live updates interrupted; reconnecting…"));
  }

  // ------------------------------------------------------------------ start
  if (!(page in loaders)) return;
  if (page === "events") setupEvents();
  if (page === "tokens") setupTokens();
  loaders[page]()
    .catch((err) => say("live", `Could not load: ${err.message}`))
    .finally(connect);
  window.qflareDashboard = { page, loadedAt: Date.now() };
})();

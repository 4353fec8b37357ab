// The agent's activity page: polls the agent for what changed and redraws the table.
"use strict";
(function () {
  const key = window.SLIPSTREAM_ACTIVITY_KEY;
  const transfers = new Map();
  let token = 0;

  function api(path, options) {
    const init = Object.assign({ headers: { "X-Slipstream-Key": key } }, options || {});
    return fetch(path, init).then((r) => r.json());
  }

  function size(bytes) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = bytes, unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return value.toFixed(unit ? 1 : 0) + " " + units[unit];
  }

  function rate(kbps) {
    return kbps >= 1000 ? (kbps / 1000).toFixed(1) + " Mbit/s" : Math.round(kbps) + " kbit/s";
  }

  function eta(usec, status) {
    if (status !== "running" || !usec) return "";
    const s = Math.round(usec / 1e6);
    return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
  }

  function buttons(t) {
    const active = ["initiating", "queued", "running", "willretry"].includes(t.status);
    const out = [];
    if (active) out.push(["stop", "Stop"]);
    if (t.status === "cancelled" || t.status === "failed") out.push(["resume", "Resume"]);
    if (t.status !== "removed") out.push(["remove", "Remove"]);
    return out.map(([action, label]) =>
      `<button data-uuid="${t.uuid}" data-action="${action}">${label}</button>`).join("");
  }

  function escape(text) {
    const div = document.createElement("div");
    div.textContent = text == null ? "" : String(text);
    return div.innerHTML;
  }

  function row(t) {
    const pct = Math.round((t.percentage || 0) * 100);
    const dir = t.transfer_spec && t.transfer_spec.direction === "receive" ? "download" : "upload";
    const error = t.error_desc ? `<div class="error">${escape(t.error_desc)}</div>` : "";
    return `<tr class="${t.status}" data-uuid="${t.uuid}">
      <td class="title" title="${escape(t.current_file || t.title)}">${escape(t.title)}</td>
      <td>${dir}</td>
      <td><div class="bar"><div style="width:${pct}%"></div></div>
          <span class="pct">${pct}% · ${size(t.bytes_written)} of ${size(t.bytes_expected)}</span></td>
      <td>${t.status === "running" ? rate(t.calculated_rate_kbps) : ""}</td>
      <td>${eta(t.remaining_usec, t.status)}</td>
      <td><span class="status">${t.status}</span>${error}</td>
      <td>${escape((t.aspera_connect_settings || {}).back_link || t.app_id)}</td>
      <td>${buttons(t)}</td></tr>`;
  }

  function render() {
    const list = [...transfers.values()].filter((t) => t.status !== "removed");
    list.sort((a, b) => (a.add_time < b.add_time ? 1 : -1));
    document.querySelector("#transfers tbody").innerHTML = list.map(row).join("");
    document.getElementById("empty").style.display = list.length ? "none" : "";
    const running = list.filter((t) => t.status === "running").length;
    document.getElementById("summary").textContent =
      `${list.length} transfer(s), ${running} running`;
  }

  function poll() {
    api("/activity/api/transfers?iteration_token=" + token).then((body) => {
      if (body.transfers) {
        body.transfers.forEach((t) => transfers.set(t.uuid, t));
        token = body.iteration_token;
        render();
      }
    }).catch(() => {}).finally(() => setTimeout(poll, 500));
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    api(`/activity/api/transfers/${button.dataset.uuid}/${button.dataset.action}`,
        { method: "POST" });
  });
  poll();
})();

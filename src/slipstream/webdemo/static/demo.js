// The demo page: the official Connect SDK drives the local Slipstream agent; the page's
// backend (/api/...) asks the server for transfer specs carrying tokens.
"use strict";
(function () {
  const connect = new AW4.Connect({ connectMethod: "http", pollingTime: 500, dragDropEnabled: true });
  const picked = [];
  const transfers = new Map();
  const $ = (id) => document.getElementById(id);

  connect.addEventListener(AW4.Connect.EVENT.STATUS, (_type, status) => {
    $("status").textContent = status;
    if (status === "RUNNING") {
      connect.setDragDropTargets("#drop", { drop: true }, (data) => {
        if (data.files) addPicked(data.files.dataTransfer.files);
      });
    }
  });
  connect.addEventListener(AW4.Connect.EVENT.TRANSFER, (_type, info) => {
    info.transfers.forEach((t) => transfers.set(t.uuid, t));
    render();
    if (info.transfers.some((t) => t.status === "completed")) listRemote();
  });
  connect.initSession();  // a random app_id, kept in this browser's localStorage

  function addPicked(files) {
    files.filter((f) => f.name.startsWith("/")).forEach((f) => {
      if (!picked.includes(f.name)) picked.push(f.name);
    });
    $("picked").innerHTML = picked.map((p) => `<li>${escape(p)}</li>`).join("");
    $("upload").disabled = picked.length === 0;
  }

  function escape(text) {
    const div = document.createElement("div");
    div.textContent = String(text);
    return div.innerHTML;
  }

  async function setup(path, body) {
    const response = await fetch(path, { method: "POST", body: JSON.stringify(body),
                                         headers: { "Content-Type": "application/json" } });
    const answer = await response.json();
    const first = (answer.transfer_specs || [])[0] || answer;
    if (first.error) throw new Error(first.error.user_message || first.error.reason);
    return first.transfer_spec;
  }

  function start(spec) {
    connect.startTransfer(spec, { allow_dialogs: true }, {
      error: (e) => alert("Transfer refused: " + JSON.stringify(e.error || e)),
    });
  }

  $("pick").onclick = () => connect.showSelectFileDialog({
    success: (answer) => addPicked(answer.dataTransfer.files),
  }, { allowMultipleSelection: true });

  $("upload").onclick = async () => {
    const spec = await setup("/api/upload_setup", { destination_root: "/" });
    spec.paths = picked.map((source) => ({ source }));
    start(spec);
  };

  async function listRemote() {
    const listing = await (await fetch("/api/files")).json();
    const items = (listing.items || []).filter((i) => i.type === "file");
    $("remote").innerHTML = items.map((i) =>
      `<li>${escape(i.path)} (${i.size} bytes)
         <button data-path="${escape(i.path)}">Download</button></li>`).join("");
  }
  $("refresh").onclick = listRemote;
  $("remote").onclick = async (event) => {
    const path = event.target.dataset && event.target.dataset.path;
    if (path) start(await setup("/api/download_setup", { paths: [path] }));
  };

  function render() {
    const rows = [...transfers.values()].filter((t) => t.status !== "removed").map((t) => {
      const pct = Math.round((t.percentage || 0) * 100);
      const dir = t.transfer_spec.direction === "send" ? "upload" : "download";
      const rate = t.status === "running" ? ` · ${(t.calculated_rate_kbps / 1000).toFixed(1)} Mbit/s` : "";
      const error = t.error_desc ? `<span class="error">${escape(t.error_desc)}</span>` : "";
      return `<tr class="${t.status}" data-uuid="${t.uuid}"><td>${dir}</td>
        <td>${escape(t.title)}</td>
        <td><div class="bar"><div style="width:${pct}%"></div></div></td>
        <td class="state">${t.status} ${pct}%${rate} ${error}</td></tr>`;
    });
    document.querySelector("#transfers tbody").innerHTML = rows.join("");
  }
  listRemote();
})();

// workflow-manager dashboard: live updates by server-sent events. Every value from a
// workflow is written with textContent, never as HTML.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  const live = document.getElementById("live");
  const params = new URLSearchParams(location.search);
  const filters = { status: params.get("status") || "", definition: params.get("definition") || "",
                    stage: params.get("stage") || "" };
  let after = body.dataset.sequence || "0";

  function when(seconds) {
    if (!seconds) return "-";
    const d = new Date(seconds * 1000), p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }
  function cell(cls, text) { const td = document.createElement("td"); td.className = cls; td.textContent = text; return td; }
  function matches(row) {
    return (!filters.status || row.status === filters.status) &&
      (!filters.definition || row.definition === filters.definition) &&
      (!filters.stage || row.current_stage === filters.stage);
  }
  function rowElement(row) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.workflow_id;
    const id = document.createElement("td"); id.className = "id";
    const a = document.createElement("a"); a.href = "/workflows/" + encodeURIComponent(row.workflow_id);
    a.textContent = row.workflow_id; id.appendChild(a); tr.appendChild(id);
    const status = document.createElement("td"); status.className = "status";
    const pill = document.createElement("span"); status.appendChild(pill); tr.appendChild(status);
    ["stage", "worker", "definition", "prompt", "updated", "error"].forEach((c) => tr.appendChild(cell(c, "")));
    return tr;
  }
  function fill(tr, row) {
    tr.dataset.status = row.status; tr.dataset.definition = row.definition || "";
    tr.dataset.stage = row.current_stage || ""; tr.dataset.created = row.created_at;
    const pill = tr.querySelector(".status span");
    pill.className = "pill st-" + row.status; pill.textContent = row.status;
    tr.querySelector(".stage").textContent = row.current_stage || "-";
    tr.querySelector(".worker").textContent = row.worker || "";
    tr.querySelector(".definition").textContent = row.definition || "-";
    tr.querySelector(".prompt").textContent = row.prompt_file || "-";
    tr.querySelector(".updated").textContent = when(row.updated_at);
    tr.querySelector(".error").textContent = row.error || "";
    tr.classList.remove("flash"); void tr.offsetWidth; tr.classList.add("flash");
  }
  function upsert(row) {
    const tbody = document.querySelector("#workflows tbody");
    let tr = tbody.querySelector(`tr[data-id="${CSS.escape(row.workflow_id)}"]`);
    if (!matches(row)) { if (tr) tr.remove(); return; }
    if (!tr) {
      tr = rowElement(row);
      const later = Array.from(tbody.rows).find((r) => parseFloat(r.dataset.created) > row.created_at);
      tbody.insertBefore(tr, later || null);
    }
    fill(tr, row);
    document.getElementById("no-rows").hidden = tbody.rows.length > 0;
  }
  function counts(all) {
    const box = document.getElementById("counts");
    box.replaceChildren();
    const total = Object.values(all).reduce((a, b) => a + b, 0);
    const entries = [["", "all", total], ...Object.entries(all).map(([s, n]) => [s, s, n])];
    for (const [status, label, n] of entries) {
      const a = document.createElement("a");
      a.className = "count" + (status ? " st-" + status : "");
      a.href = status ? "/?status=" + encodeURIComponent(status) : "/";
      a.dataset.status = status;
      a.append(label + " ");
      const b = document.createElement("b"); b.textContent = String(n); a.appendChild(b);
      box.appendChild(a);
    }
  }
  let refreshing = null;
  function refresh(url, targetId) {
    // Coalesce bursts: one fetch of the server-rendered (escaped) fragment at a time.
    if (refreshing) return;
    refreshing = setTimeout(async () => {
      try {
        const response = await fetch(url, { headers: { "Accept": "text/html" } });
        if (response.ok) {
          const doc = new DOMParser().parseFromString(await response.text(), "text/html");
          document.getElementById(targetId).replaceChildren(...doc.body.childNodes);
          bindActions();
        }
      } catch (error) {
        // The server is away (restarting, stopped): the live marker says so; the next
        // event after it reconnects refreshes again.
      } finally { refreshing = null; }
    }, 150);
  }
  function bindActions() {
    document.querySelectorAll("button.action").forEach((button) => {
      button.onclick = async () => {
        let token = sessionStorage.getItem("workflow-dashboard-token");
        if (!token) { token = prompt("Dashboard token (WORKFLOW_DASHBOARD_TOKEN):") || ""; }
        const response = await fetch(`/api/workflows/${encodeURIComponent(button.dataset.id)}/${button.dataset.action}`,
          { method: "POST", headers: { "Authorization": "Bearer " + token } });
        const answer = await response.json();
        if (response.ok) sessionStorage.setItem("workflow-dashboard-token", token);
        else if (response.status === 401) sessionStorage.removeItem("workflow-dashboard-token");
        document.getElementById("action-result").textContent = response.ok ? `${button.dataset.action}: done` : answer.error;
      };
    });
  }
  bindActions();

  const source = new EventSource("/events?after=" + encodeURIComponent(after));
  source.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
  source.onerror = () => { live.textContent = "reconnecting…"; live.classList.remove("on"); };
  source.addEventListener("reset", () => location.reload());
  source.addEventListener("row", (e) => {
    const row = JSON.parse(e.data);
    if (page === "index") upsert(row);
    if (page === "workflow") {
      const box = document.getElementById("workflow-body");
      if (box && box.dataset.id === row.workflow_id) refresh(location.pathname + "?fragment=1", "workflow-body");
    }
  });
  source.addEventListener("gone", (e) => {
    if (page !== "index") return;
    const id = JSON.parse(e.data).workflow_id;
    const tr = document.querySelector(`#workflows tr[data-id="${CSS.escape(id)}"]`);
    if (tr) tr.remove();
  });
  source.addEventListener("counts", (e) => { if (page === "index") counts(JSON.parse(e.data)); });
  source.addEventListener("health", () => {
    if (page === "health") refresh("/health?fragment=1", "health-body");
    if (page === "workflow") refresh(location.pathname + "?fragment=1", "workflow-body");
  });
})();

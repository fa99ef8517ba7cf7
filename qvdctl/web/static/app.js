// The web admin's only script: select-all, confirmations, and the live VMs table.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('input[name="id"][form="vm-form"]')) {
        box.checked = all.checked;
      }
    });
  }
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  }
  for (const form of document.querySelectorAll("form[data-fetch]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      post(form, event.submitter);
    });
  }
  const live = document.getElementById("live");
  if (live) follow(live);
});

// Posts an action form and lists its results, keeping the page (and its live feed) open:
// the rows show the changes as the feed reports them. Without script, the form posts
// as usual and the server redirects back with the same lines.
async function post(form, button) {
  const results = document.getElementById("results");
  const item = (text, kind) => {
    const li = document.createElement("li");
    li.textContent = text;  // text, never HTML: names are the admins' input
    li.className = kind;
    results.append(li);
  };
  results.replaceChildren();
  results.hidden = false;
  item(`${button.value}: working…`, "ok");
  try {
    // getAttribute: the buttons named "action" shadow form.action.
    const response = await fetch(form.getAttribute("action"), {
      method: "POST", body: new FormData(form, button), headers: {Accept: "application/json"},
    });
    results.replaceChildren();
    if (!response.ok) {
      item(await response.text(), "error");
      return;
    }
    for (const line of await response.json()) {
      item(`${line.what}: ${line.error || "done"}`, line.error ? "error" : "ok");
    }
  } catch (error) {
    results.replaceChildren();
    item(`${button.value}: ${error}`, "error");
  }
}

// Server-sent events carry every VM's state whenever one changed; the rows shown are
// updated in place, so a change made anywhere (CLI, HKD, another browser) shows here.
function follow(status) {
  const feed = new EventSource(status.dataset.feed);
  feed.onopen = () => { status.textContent = "live updates: on"; };
  feed.onerror = () => { status.textContent = "live updates: reconnecting…"; };
  const table = document.getElementById("vms");
  feed.onmessage = (event) => {
    const vms = JSON.parse(event.data);
    const known = new Set(vms.map((vm) => String(vm.id)));
    for (const row of table.querySelectorAll("tr[data-vm]")) {
      if (!known.has(row.dataset.vm)) {  // deleted meanwhile
        row.querySelector(".state").textContent = "deleted";
        row.classList.add("gone");
      }
    }
    const shown = new Set([...table.querySelectorAll("tr[data-vm]")].map((r) => r.dataset.vm));
    const added = table.dataset.filtered ? 0 : vms.filter((vm) => !shown.has(String(vm.id))).length;
    document.getElementById("added").textContent = added ? `${added} VM(s) added: reload to see them` : "";
    for (const vm of vms) {
      const row = table.querySelector(`tr[data-vm="${vm.id}"]`);
      if (!row) continue;  // filtered out, or added since the page was loaded
      const state = row.querySelector(".state");
      state.textContent = vm.state;
      state.className = `state state-${vm.state}`;
      row.querySelector(".host").textContent = vm.host || "-";
      row.querySelector(".user_state").textContent = vm.user_state;
      row.querySelector(".blocked").textContent = vm.blocked ? "yes" : "no";
      const error = row.querySelector(".error");
      if (error) error.textContent = vm.error || "";
    }
    status.textContent = `live updates: on (${new Date().toLocaleTimeString()})`;
  };
}

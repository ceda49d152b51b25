// The visualizer's page: key prompt, session list, the live DAG of one
// session, its timeline, and the details of what is clicked.
import { Api, ApiError } from "./api.js";
import { callDetails, variableDetails } from "./details.js";
import { DagView, PREFIX_COLOURS } from "./graph.js";
import { STATES, countStates, el, prefixGroups } from "./model.js";
import { renderTimeline } from "./timeline.js";

const KEY = "parrot.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  sid: null,
  dag: null,
  selected: null, // {kind, id}
  stream: null, // AbortController of the events stream
  refreshTimer: null,
};

let view = null;

function showLogin(message = "") {
  $("login").hidden = false;
  $("app").hidden = true;
  $("whoami").hidden = true;
  $("login-error").textContent = message;
  $("api-key").focus();
}

async function login(key) {
  const api = new Api(key);
  try {
    await api.sessions();
  } catch (e) {
    sessionStorage.removeItem(KEY);
    showLogin(e instanceof ApiError && e.status === 401 ? "That key was not accepted." : `Could not reach the service: ${e.message}`);
    return;
  }
  sessionStorage.setItem(KEY, key);
  state.api = api;
  $("login").hidden = true;
  $("app").hidden = false;
  $("whoami").hidden = false;
  if (!view) {
    view = new DagView($("graph"), select);
    window.parrotCy = view.cy; // for tests and the curious
    window.parrotView = view;
  }
  await loadSessions();
  startSessionPolling();
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("session");
  if (fromHash) openSession(fromHash);
}

const SESSIONS_EVERY_MS = 5000;
let sessionPoll = null;

/** Keep the session list current while the tab is visible (new sessions, closed ones). */
function startSessionPolling() {
  clearInterval(sessionPoll);
  sessionPoll = setInterval(() => {
    if (state.api && document.visibilityState === "visible") loadSessions().catch(onApiError);
  }, SESSIONS_EVERY_MS);
}

/** A revoked key sends the user back to the key prompt. */
function onApiError(e) {
  if (e instanceof ApiError && e.status === 401) logout("The key is no longer accepted.");
}

function logout(message = "") {
  clearInterval(sessionPoll);
  stopStream();
  sessionStorage.removeItem(KEY);
  state.api = null;
  state.sid = null;
  view?.clear();
  $("api-key").value = "";
  showLogin(typeof message === "string" ? message : "");
}

async function loadSessions() {
  const { sessions } = await state.api.sessions();
  const list = $("session-list");
  list.replaceChildren(...sessions.map((s) => el("li", {},
    el("button", {
      type: "button", class: s.session_id === state.sid ? "current" : "", "data-session-id": s.session_id,
      onclick: () => openSession(s.session_id),
    },
    el("span", { class: "mono" }, s.session_id),
    el("span", { class: `badge ${s.open ? "open" : "closed"}` }, s.open ? "open" : "closed"),
    el("span", { class: "small" }, `${s.calls} call${s.calls === 1 ? "" : "s"}`)))));
  if (!sessions.length) list.append(el("li", { class: "hint" }, "No sessions yet for this tenant."));
}

function stopStream() {
  state.stream?.abort();
  state.stream = null;
  setLive(false);
}

function setLive(on, text) {
  const live = $("live");
  live.classList.toggle("on", on);
  live.textContent = text ?? (on ? "live" : "");
  document.body.dataset.live = on ? "1" : "0";
}

async function openSession(sid) {
  stopStream();
  state.sid = sid;
  state.dag = null;
  state.selected = null;
  view.clear();
  history.replaceState(null, "", `#session=${encodeURIComponent(sid)}`);
  $("session-title").textContent = `Session ${sid}`;
  $("details").replaceChildren(el("p", { class: "hint" }, "Click a call or a variable for its details."));
  for (const b of document.querySelectorAll("#session-list button")) b.classList.toggle("current", b.dataset.sessionId === sid);
  try {
    await refresh();
  } catch (e) {
    $("session-title").textContent = `Session ${sid}: ${e.message}`;
    onApiError(e);
    return;
  }
  if (state.dag?.open) follow(sid);
}

/** Follow the session's events; every event schedules a redraw from the DAG. */
async function follow(sid) {
  const ctl = new AbortController();
  state.stream = ctl;
  setLive(true);
  try {
    await state.api.events(sid, (event) => {
      if (state.sid !== sid) return;
      scheduleRefresh(event.type === "token" ? 250 : 50);
    }, ctl.signal, () => scheduleRefresh(0)); // opened after the first fetch: catch up
  } catch (e) {
    if (ctl.signal.aborted) return;
    setLive(false, "disconnected");
  }
  if (state.sid === sid && !ctl.signal.aborted) {
    setLive(false, "closed");
    await refresh();
    loadSessions().catch(onApiError);
  }
}

function scheduleRefresh(delayMs) {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    try {
      await refresh();
    } catch (e) {
      onApiError(e); // otherwise the next event tries again
    }
  }, delayMs);
}

async function refresh() {
  const sid = state.sid;
  if (!sid) return;
  const dag = await state.api.dag(sid);
  if (state.sid !== sid) return;
  state.dag = dag;
  if (!dag.open && state.stream) {
    // Closed before our stream subscribed: no session_closed will come.
    stopStream();
    setLive(false, "closed");
  }
  view.update(dag);
  renderSummary(dag);
  renderTimeline($("timeline"), dag, select, state.selected?.id);
  if (state.selected) showDetails();
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
}

function renderSummary(dag) {
  const n = countStates(dag.calls);
  const parts = STATES.filter((s) => n[s]).map((s) => el("span", { class: `badge state-${s}`, "data-state": s, "data-count": n[s] }, `${n[s]} ${s}`));
  const vars = dag.variables.length;
  $("summary").replaceChildren(
    el("span", { "data-field": "calls" }, `${dag.calls.length} calls`), " · ",
    el("span", { "data-field": "variables" }, `${vars} variables`), " · ", ...parts);
  const prefixes = prefixGroups(dag.calls);
  $("legend").replaceChildren(
    ...STATES.slice(0, 5).map((s) => el("span", { class: `key state-${s}` }, s)),
    el("span", { class: "key var" }, "variable"),
    el("span", { class: "key group" }, "task group"),
    ...[...prefixes.values()].map((i) => el("span", { class: "key prefix", style: `border-color:${PREFIX_COLOURS[(i - 1) % PREFIX_COLOURS.length]}` }, `shared prefix #${i}`)));
}

function select(kind, id) {
  state.selected = { kind, id };
  view.cy.$(":selected").unselect();
  view.cy.getElementById(id).select();
  showDetails();
  for (const b of document.querySelectorAll("#timeline .bar")) b.classList.toggle("selected", b.dataset.callId === id);
}

async function showDetails() {
  const { kind, id } = state.selected;
  const sid = state.sid;
  const panel = $("details");
  try {
    if (kind === "call") {
      const detail = await state.api.call(sid, id);
      if (state.selected?.id === id) panel.replaceChildren(callDetails(detail));
      return;
    }
    // A variable's value: read it from a call that produces or reads it
    // (reading it through the variables route would record a get()).
    const dag = state.dag;
    const v = dag.variables.find((x) => x.var_id === id);
    const via = v?.producer ?? dag.calls.find((c) => Object.values(c.inputs).includes(id))?.call_id;
    let value = null;
    if (via) {
      const detail = await state.api.call(sid, via);
      value = [...detail.inputs, ...detail.outputs].find((x) => x.var_id === id)?.value ?? null;
    }
    if (state.selected?.id === id) panel.replaceChildren(variableDetails(dag, id, value));
  } catch (e) {
    panel.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

function main() {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("api-key").value.trim());
  });
  $("logout").addEventListener("click", () => logout());
  $("refresh").addEventListener("click", () => loadSessions().catch(onApiError));
  window.addEventListener("resize", () => state.dag && renderTimeline($("timeline"), state.dag, select, state.selected?.id));
  const key = sessionStorage.getItem(KEY);
  if (key) login(key);
  else showLogin();
}

main();

// Local LLM Lab web page: chat with streamed replies and documents with sources.
// Plain browser JavaScript, no build step. It talks to the same API as any OpenAI client:
// POST /v1/chat/completions with stream: true, read as server-sent events from fetch().
"use strict";

const STORE_KEY = "llmlab.chat.v1";
const $ = (id) => document.getElementById(id);

// ---- saved state: the conversation and the controls survive a reload ------------------
function loadState() {
  try {
    return JSON.parse(localStorage.getItem(STORE_KEY)) || {};
  } catch {
    return {};
  }
}
const state = Object.assign({ messages: [], settings: {} }, loadState());
function saveState() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state));
}

const CONTROLS = ["model", "system", "temperature", "top_p", "max_tokens", "seed", "api_key"];

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The server answers errors as {"error": {"message": ...}}; show that message.
async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(id, text) {
  const el = $(id);
  el.textContent = text || "";
  el.hidden = !text;
}

// ---- tabs ---------------------------------------------------------------------------
for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      other.setAttribute("aria-selected", String(other === tab));
      $(other.dataset.panel).hidden = other !== tab;
    }
    if (tab.id === "tab-docs") refreshFiles();
  });
}

// ---- server status and models ---------------------------------------------------------
async function pollHealth() {
  try {
    const r = await fetch("/health");
    const body = await r.json();
    $("health").textContent = body.status === "ok" ? `ready: ${body.model}` : body.status;
    $("health").dataset.status = body.status;
    if (body.status !== "ok") setTimeout(pollHealth, 1000);
  } catch {
    $("health").textContent = "offline";
    setTimeout(pollHealth, 3000);
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers(false) });
    if (!r.ok) throw new Error(await errorMessage(r));
    const body = await r.json();
    select.replaceChildren();
    for (const m of body.data.filter((m) => (m.capabilities || ["chat"]).includes("chat"))) {
      select.append(new Option(m.id, m.id));
    }
    if (state.settings.model) select.value = state.settings.model;
  } catch (err) {
    showError("chat-error", "Could not list models: " + err.message);
  }
}

// ---- controls -------------------------------------------------------------------------
function restoreControls() {
  for (const name of CONTROLS) {
    if (state.settings[name] !== undefined && name !== "model") $(name).value = state.settings[name];
  }
  for (const name of ["temperature", "top_p"]) $(`${name}-value`).value = $(name).value;
}
for (const name of CONTROLS) {
  $(name).addEventListener("input", () => {
    state.settings[name] = $(name).value;
    if ($(`${name}-value`)) $(`${name}-value`).value = $(name).value;
    saveState();
  });
}
// A key typed after the page loaded: list the models again with it.
$("api_key").addEventListener("change", () => {
  showError("chat-error", "");
  loadModels();
});

// ---- chat -----------------------------------------------------------------------------
function addBubble(role, text, note) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  if (note) {
    const small = document.createElement("small");
    small.textContent = note;
    li.append(small);
  }
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return body;
}

function renderConversation() {
  $("messages").replaceChildren();
  for (const m of state.messages) addBubble(m.role, m.content, m.note);
}

// Server-sent events arrive in pieces; yield each complete "data:" payload.
async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

let controller = null;

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function showStats(s) {
  const ttft = s.ttft === null ? "–" : `${(s.ttft * 1000).toFixed(0)} ms`;
  const rate = s.rate === null ? "–" : s.rate.toFixed(1);
  $("stats").textContent = `time to first token: ${ttft}, tokens/s: ${rate}, tokens: ${s.tokens}`;
}

async function sendMessage(text) {
  showError("chat-error", "");
  state.messages.push({ role: "user", content: text });
  saveState();
  addBubble("user", text);
  const reply = { role: "assistant", content: "" };
  const bubble = addBubble("assistant", "");
  bubble.parentElement.classList.add("streaming");

  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of state.messages) messages.push({ role: m.role, content: m.content });
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value) || 256,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  const stats = { ttft: null, rate: null, tokens: 0 };
  let firstAt = null;
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseData(r, controller.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        const now = performance.now();
        if (firstAt === null) {
          firstAt = now;
          stats.ttft = (now - started) / 1000;
        }
        stats.tokens += 1;
        if (stats.tokens > 1) stats.rate = (stats.tokens - 1) / ((now - firstAt) / 1000);
        reply.content += choice.delta.content;
        bubble.textContent = reply.content;
        showStats(stats);
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) {
        stats.tokens = chunk.usage.completion_tokens;
        showStats(stats);
      }
    }
    if (finish === "length") reply.note = "(stopped at max tokens)";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.note = "(stopped)";
    } else {
      reply.note = "(failed)";
      showError("chat-error", err.message);
    }
  } finally {
    controller = null;
    setBusy(false);
    bubble.parentElement.classList.remove("streaming");
    if (reply.note) {
      const small = document.createElement("small");
      small.textContent = reply.note;
      bubble.parentElement.append(small);
    }
    // Keep what arrived, even after Stop: the user's work is never thrown away.
    if (reply.content || reply.note !== "(failed)") state.messages.push(reply);
    saveState();
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  sendMessage(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  state.messages = [];
  saveState();
  renderConversation();
});

// ---- documents --------------------------------------------------------------------------
const collectionUrl = () => `/api/collections/${encodeURIComponent($("collection").value.trim())}`;

async function refreshFiles() {
  showError("docs-error", "");
  const list = $("file-list");
  const r = await fetch(collectionUrl() + "/files", { headers: headers(false) });
  if (!r.ok) {
    list.replaceChildren();
    if (r.status !== 404) showError("docs-error", await errorMessage(r));
    return;
  }
  const body = await r.json();
  list.replaceChildren();
  for (const f of body.files) {
    const li = document.createElement("li");
    li.textContent = `${f.name} (${f.chunks} chunks) `;
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "Delete";
    del.addEventListener("click", async () => {
      const d = await fetch(`${collectionUrl()}/files/${encodeURIComponent(f.name)}`, {
        method: "DELETE",
        headers: headers(false),
      });
      if (!d.ok) showError("docs-error", await errorMessage(d));
      refreshFiles();
    });
    li.append(del);
    list.append(li);
  }
}

$("collection").addEventListener("change", refreshFiles);

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("docs-error", "");
  const files = $("files").files;
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  $("upload-status").textContent = "Uploading and indexing…";
  const r = await fetch(collectionUrl() + "/files", { method: "POST", headers: headers(false), body: form });
  if (r.ok) {
    const body = await r.json();
    $("upload-status").textContent = body.summary;
    $("files").value = "";
  } else {
    $("upload-status").textContent = "";
    showError("docs-error", await errorMessage(r));
  }
  refreshFiles();
});

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("docs-error", "");
  const question = $("question").value.trim();
  if (!question) return;
  $("answer").textContent = "Thinking…";
  $("sources").replaceChildren();
  $("ask").disabled = true;
  try {
    const r = await fetch(collectionUrl() + "/ask", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ question }),
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    const body = await r.json();
    $("answer").textContent = body.answer;
    for (const s of body.sources) {
      const li = document.createElement("li");
      const head = document.createElement("strong");
      head.textContent = `${s.file} (${s.location}) score ${s.score.toFixed(2)}`;
      const quote = document.createElement("blockquote");
      quote.textContent = s.text;
      li.append(head, quote);
      $("sources").append(li);
    }
  } catch (err) {
    $("answer").textContent = "";
    showError("docs-error", err.message);
  } finally {
    $("ask").disabled = false;
  }
});

// ---- start ------------------------------------------------------------------------------
restoreControls();
renderConversation();
pollHealth();
loadModels();

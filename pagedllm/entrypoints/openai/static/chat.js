// The chat page: a conversation kept in this tab, each reply streamed from this server's
// /v1/chat/completions and shown through renderMarkdown (markdown.js), which turns text
// into text nodes only. Stop aborts the fetch; the server sees the disconnect and frees
// the request's KV blocks. An API key, when the server wants one, lives in sessionStorage.
"use strict";

(() => {
  const KEY_STORAGE = "pagedllm-api-key";
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model-name"), messages: $("messages"), emptyHint: $("empty-hint"), composer: $("composer"),
    input: $("input"), send: $("send"), stop: $("stop"), newChat: $("new-chat"), toggleSettings: $("toggle-settings"),
    system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
  };
  const state = {
    history: [], // [{role, content}] without the system prompt, which is read at each send; a new array per chat
    model: null,
    controller: null, // the AbortController of the reply being streamed
    apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
    keyRequest: null, // one pending "ask for the key" shared by every request that got a 401
  };

  // -- talking to the server ------------------------------------------------------------------

  // fetch, and on a 401 ask for the API key and try again with it.
  async function api(path, init = {}) {
    for (;;) {
      const headers = { ...(init.headers || {}) };
      if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      await askForKey(await errorMessage(response));
    }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return "HTTP " + response.status + " " + response.statusText;
  }

  function askForKey(reason) {
    if (!state.keyRequest) {
      state.keyRequest = new Promise((resolve, reject) => {
        ui.keyError.textContent = state.apiKey ? reason : "";
        ui.keyError.hidden = !state.apiKey;
        ui.keyInput.value = "";
        const done = (ok) => {
          ui.keyForm.removeEventListener("submit", onSubmit);
          ui.keyDialog.removeEventListener("cancel", onCancel);
          if (ui.keyDialog.open) ui.keyDialog.close();
          state.keyRequest = null;
          ok ? resolve() : reject(new Error("this server needs an API key"));
        };
        const onSubmit = (event) => {
          event.preventDefault();
          state.apiKey = ui.keyInput.value.trim();
          sessionStorage.setItem(KEY_STORAGE, state.apiKey);
          done(true);
        };
        const onCancel = () => done(false);
        ui.keyForm.addEventListener("submit", onSubmit);
        ui.keyDialog.addEventListener("cancel", onCancel);
        ui.keyDialog.showModal();
        ui.keyInput.focus();
      });
    }
    return state.keyRequest;
  }

  // The server-sent events of a response body, parsed: {data} objects until [DONE].
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const lines = buffer.slice(0, end).split("\n");
          buffer = buffer.slice(end + 2);
          const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data === "[DONE]") return;
          if (data) yield JSON.parse(data);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function loadModel() {
    try {
      const response = await api("/v1/models");
      if (!response.ok) throw new Error(await errorMessage(response));
      const card = (await response.json()).data[0];
      state.model = card.id;
      ui.model.textContent = card.id;
      ui.model.title = `model ${card.id}, context ${card.max_model_len} tokens`;
      ui.maxTokens.max = card.max_model_len;
    } catch (error) {
      ui.model.textContent = "(" + error.message + ")";
    }
  }

  // -- the conversation -----------------------------------------------------------------------

  function addMessage(role, text) {
    ui.emptyHint.hidden = true;
    const root = document.createElement("div");
    root.className = "msg " + role;
    const content = document.createElement("div");
    content.className = "content";
    content.appendChild(renderMarkdown(text));
    root.appendChild(content);
    ui.messages.appendChild(root);
    scrollToEnd(true);
    return { root, content };
  }

  function showText(view, text) {
    const stick = nearEnd();
    view.content.replaceChildren(renderMarkdown(text));
    scrollToEnd(stick);
  }

  function nearEnd() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollToEnd(really) {
    if (really) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function numberSetting(input) {
    const value = parseFloat(input.value);
    return Number.isFinite(value) ? value : undefined;
  }

  function requestBody(history) {
    const system = ui.system.value.trim();
    const body = {
      messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberSetting(ui.temperature),
      top_p: numberSetting(ui.topP),
      max_tokens: numberSetting(ui.maxTokens),
    };
    if (state.model) body.model = state.model;
    return body;
  }

  async function send() {
    const text = ui.input.value;
    if (!text.trim() || state.controller) return;
    ui.input.value = "";
    ui.input.focus(); // after a click on Send too, the next message can be typed at once
    const history = state.history; // "New chat" mid-reply swaps in a new array; this turn stays in its own
    history.push({ role: "user", content: text });
    const userView = addMessage("user", text);
    const ok = await streamReply(history);
    if (!ok && history === state.history) { // the failed turn leaves the conversation; its text comes back for a retry
      history.pop();
      userView.root.classList.add("failed");
      if (!ui.input.value) ui.input.value = text;
    }
  }

  // Streams one assistant reply into a new message; false if it failed or was stopped before any text.
  async function streamReply(history) {
    const view = addMessage("assistant", "");
    view.root.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    const started = performance.now();
    const timing = { firstAt: null, endAt: null };
    let reply = "";
    let usage = null;
    let error = null;
    let pendingRender = false;
    const renderSoon = () => { // at most once a frame, however fast tokens come
      if (pendingRender) return;
      pendingRender = true;
      requestAnimationFrame(() => { pendingRender = false; showText(view, reply); });
    };
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody(history)),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of sseEvents(response.body)) {
        if (data.error) throw new Error(data.error.message);
        if (data.usage) usage = data.usage;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (delta && delta.content) {
          if (timing.firstAt === null) timing.firstAt = performance.now();
          reply += delta.content;
          renderSoon();
        }
      }
      timing.endAt = performance.now();
    } catch (e) {
      if (!controller.signal.aborted) error = e;
    }
    const stopped = controller.signal.aborted;
    if (state.controller === controller) { state.controller = null; setBusy(false); }
    view.root.classList.remove("streaming");
    showText(view, reply);
    if (error) showError(view, error.message);
    view.root.appendChild(statsLine(started, timing, usage, stopped));
    // A stopped reply keeps what came; one that ended in nothing at all is no turn.
    const kept = Boolean(reply) || (!error && !stopped);
    if (kept) history.push({ role: "assistant", content: reply });
    return kept;
  }

  function showError(view, message) {
    const box = document.createElement("div");
    box.className = "error";
    box.textContent = message;
    view.root.appendChild(box);
  }

  // "N tokens · TTFT x s · y tok/s": tok/s counts the tokens after the first over the time
  // after the first (decode speed), so a slow prompt does not hide in it.
  function statsLine(started, timing, usage, stopped) {
    const line = document.createElement("div");
    line.className = "stats";
    const part = (cls, text) => {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      line.appendChild(span);
    };
    if (stopped) part("stat-stopped", "stopped");
    if (usage) part("stat-tokens", `${usage.completion_tokens} tokens`);
    if (timing.firstAt !== null) part("stat-ttft", `TTFT ${((timing.firstAt - started) / 1000).toFixed(2)} s`);
    if (usage && timing.endAt !== null && timing.firstAt !== null && usage.completion_tokens > 1 && timing.endAt > timing.firstAt) {
      const rate = (usage.completion_tokens - 1) / ((timing.endAt - timing.firstAt) / 1000);
      part("stat-rate", `${rate.toFixed(1)} tok/s`);
    }
    return line;
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    ui.messages.replaceChildren(ui.emptyHint);
    ui.emptyHint.hidden = false;
    ui.input.focus();
  }

  // -- wiring ---------------------------------------------------------------------------------

  ui.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  ui.input.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; Enter that confirms an IME composition is neither.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  ui.newChat.addEventListener("click", newChat);
  ui.toggleSettings.addEventListener("click", () => {
    const open = document.body.classList.toggle("settings-open");
    ui.toggleSettings.setAttribute("aria-expanded", String(open));
  });

  loadModel();
  ui.input.focus();
})();

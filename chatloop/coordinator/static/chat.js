// The chat page: conversations kept in localStorage, replies streamed from /v1/chat/completions (SSE).
"use strict";

(function (CL) {
  const STORE = "chatloop.conversations";
  const CURRENT = "chatloop.current";
  const SETTINGS = "chatloop.settings";
  // max_tokens null: the server's default, which also shrinks to the room left in the context.
  const DEFAULTS = { temperature: 0.7, top_p: 0.95, max_tokens: null };
  const $ = (id) => document.getElementById(id);
  const el = CL.el;

  let conversations = load(STORE, []);
  let current = null;
  let settings = { ...DEFAULTS, ...load(SETTINGS, {}) };
  let running = null; // {controller, reply} while a reply streams

  function load(name, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(name));
      return value === null ? fallback : value;
    } catch (_) {
      return fallback;
    }
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(conversations));
      localStorage.setItem(CURRENT, current ? current.id : "");
      localStorage.setItem(SETTINGS, JSON.stringify(settings));
    } catch (err) {
      status(`could not save the conversation in this browser: ${err.message}`, "bad");
    }
  }

  function newConversation() {
    const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "", system: "", messages: [], updated: Date.now() };
    const last = conversations[0];
    if (last) conv.system = last.system || ""; // a system prompt usually carries over
    conversations.unshift(conv);
    return conv;
  }

  // -- rendering ---------------------------------------------------------------------------------------

  function renderList() {
    const list = $("conversations");
    const items = [...conversations]
      .sort((a, b) => b.updated - a.updated)
      .map((conv) =>
        el(
          "li",
          { class: conv === current ? "active" : "" },
          el("button", { class: "conv-open", type: "button", title: conv.title || "New conversation", onclick: () => switchTo(conv) }, conv.title || "New conversation"),
          el("button", { class: "conv-delete", type: "button", title: "Delete this conversation", "aria-label": "Delete", onclick: () => remove(conv) }, "×"),
        ),
      );
    list.replaceChildren(...items);
  }

  function statsText(stats) {
    if (!stats) return "";
    const parts = [`${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`];
    if (stats.tokens_per_second !== null) parts.push(`${stats.tokens_per_second.toFixed(1)} tokens/s`);
    if (stats.ttft_ms !== null) parts.push(`first token ${Math.round(stats.ttft_ms)} ms`);
    if (stats.finish) parts.push(stats.finish === "length" ? "stopped at max tokens" : stats.finish);
    return parts.join(" · ");
  }

  function messageNode(msg, index, isLast) {
    if (msg.role === "error") {
      return el("article", { class: "msg error", "data-index": index }, el("div", { class: "role" }, "Error"), el("div", { class: "body" }, msg.content));
    }
    const body = el("div", { class: "body" });
    if (msg.role === "assistant") body.append(CL.renderMarkdown(msg.content));
    else body.textContent = msg.content;
    if (msg.pending && !msg.content) body.append(el("span", { class: "typing", "aria-label": "waiting for the first token" }, "●●●"));
    const meta = el("footer", { class: "meta" });
    if (msg.role === "assistant") {
      meta.append(el("span", { class: "stats" }, msg.pending ? "generating…" : statsText(msg.stats)));
      if (!msg.pending) {
        meta.append(el("button", { class: "copy", type: "button", onclick: (ev) => copy(msg.content, ev.target) }, "Copy"));
        if (isLast) meta.append(el("button", { class: "regen", type: "button", onclick: regenerate }, "Regenerate"));
      }
    }
    return el(
      "article",
      { class: `msg ${msg.role}${msg.pending ? " pending" : ""}`, "data-index": index },
      el("div", { class: "role" }, msg.role === "user" ? "You" : "Assistant"),
      body,
      meta,
    );
  }

  function renderMessages() {
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const msgs = current.messages;
    let lastAssistant = -1;
    msgs.forEach((m, i) => {
      if (m.role === "assistant") lastAssistant = i;
    });
    const nodes = msgs.map((m, i) => messageNode(m, i, i === lastAssistant && !running));
    if (!nodes.length) {
      nodes.push(
        el("div", { class: "empty" }, el("h2", {}, "Start a conversation"), el("p", {}, "Replies stream from the pipeline of stages; the cluster view shows it working.")),
      );
    }
    if (!running && msgs.length && msgs[msgs.length - 1].role === "error") {
      nodes.push(el("div", { class: "retry-row" }, el("button", { class: "regen", type: "button", onclick: regenerate }, "Try again")));
    }
    box.replaceChildren(...nodes);
    if (atBottom || running) box.scrollTop = box.scrollHeight;
  }

  let frame = 0;
  function renderSoon() {
    // Streaming re-renders at most once per frame however fast tokens arrive.
    if (!frame) frame = requestAnimationFrame(() => ((frame = 0), renderMessages()));
  }

  function renderAll() {
    renderList();
    renderMessages();
    $("system").value = current.system || "";
    const busy = !!running;
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("input").disabled = false;
    document.body.classList.toggle("busy", busy);
  }

  function status(text, kind = "") {
    const node = $("status");
    node.textContent = text;
    node.className = `status ${kind}`;
  }

  // -- actions -----------------------------------------------------------------------------------------

  function switchTo(conv) {
    if (running) stop();
    current = conv;
    save();
    renderAll();
  }

  function remove(conv) {
    if (running && conv === current) stop();
    conversations = conversations.filter((c) => c !== conv);
    if (conv === current) current = conversations[0] || newConversation();
    save();
    renderAll();
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const area = el("textarea", {}, text);
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const old = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = old), 1200);
  }

  function stop() {
    if (running) running.controller.abort();
  }

  function regenerate() {
    if (running) return;
    const msgs = current.messages;
    while (msgs.length && msgs[msgs.length - 1].role !== "user") msgs.pop();
    if (!msgs.length) return;
    generate();
  }

  function submit(ev) {
    ev.preventDefault();
    const input = $("input");
    const text = input.value.trim();
    if (!text || running) return;
    input.value = "";
    current.messages.push({ role: "user", content: text });
    if (!current.title) current.title = text.slice(0, 60);
    generate();
  }

  function requestBody() {
    const messages = [];
    if (current.system && current.system.trim()) messages.push({ role: "system", content: current.system });
    for (const m of current.messages) {
      if ((m.role === "user" || m.role === "assistant") && !m.pending) messages.push({ role: m.role, content: m.content });
    }
    return {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: settings.temperature,
      top_p: settings.top_p,
      ...(settings.max_tokens ? { max_tokens: settings.max_tokens } : {}),
    };
  }

  // Read an SSE body, calling onData(parsed JSON) for every "data:" event until [DONE].
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onData(JSON.parse(data));
        }
      }
    }
  }

  async function generate() {
    const conv = current;
    const body = requestBody();
    const reply = { role: "assistant", content: "", pending: true };
    conv.messages.push(reply);
    conv.updated = Date.now();
    running = { controller: new AbortController(), reply };
    renderAll();
    const t0 = performance.now();
    let tFirst = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    let error = null;
    try {
      const resp = await CL.api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: running.controller.signal,
      });
      await readEvents(resp, (obj) => {
        if (obj.error) throw new CL.ApiError(0, obj.error.message || "the server ended the reply with an error");
        if (obj.usage) usage = obj.usage;
        const choice = obj.choices && obj.choices[0];
        if (!choice) return;
        if (choice.finish_reason) finish = choice.finish_reason;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (tFirst === null) tFirst = performance.now();
          chunks += 1;
          reply.content += piece;
          renderSoon();
        }
      });
    } catch (err) {
      if (err.name === "AbortError") finish = "stopped";
      else error = err;
    }
    const tEnd = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    reply.pending = false;
    reply.stats = {
      tokens,
      ttft_ms: tFirst === null ? null : tFirst - t0,
      tokens_per_second: tFirst !== null && tokens > 1 && tEnd > tFirst ? ((tokens - 1) * 1000) / (tEnd - tFirst) : null,
      finish: finish === "stop" ? null : finish,
    };
    if (error && !reply.content) conv.messages.pop();
    if (error) conv.messages.push({ role: "error", content: error.message });
    running = null;
    conv.updated = Date.now();
    save();
    if (conv === current) renderAll();
    if (error && error.status === 401) askKey(error.message);
  }

  async function askKey(reason) {
    if (await CL.askKey(reason)) {
      updateKeyLabel();
      loadModel();
    }
  }

  // -- settings, status --------------------------------------------------------------------------------

  function bindSettings() {
    const numbers = [
      ["temperature", 0, 2],
      ["top_p", 0, 1],
      ["max_tokens", 1, 1 << 20],
    ];
    for (const [name, min, max] of numbers) {
      const input = $(name);
      input.value = settings[name] ?? "";
      input.addEventListener("change", () => {
        let value = input.value.trim() === "" ? DEFAULTS[name] : Number(input.value);
        if (value !== null) {
          if (!Number.isFinite(value)) value = DEFAULTS[name];
          else value = Math.min(max, Math.max(min, name === "max_tokens" ? Math.round(value) : value));
        }
        settings[name] = value;
        input.value = value ?? "";
        save();
      });
    }
    $("system").addEventListener("input", () => {
      current.system = $("system").value;
      save();
    });
    $("settings-toggle").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("key-change").addEventListener("click", () => askKey("Enter the API key for this server (empty: none)."));
    updateKeyLabel();
  }

  function updateKeyLabel() {
    $("key-state").textContent = CL.getKey() ? "API key: set" : "API key: none";
  }

  async function loadModel() {
    try {
      const resp = await CL.api("/v1/models");
      const body = await resp.json();
      $("model-name").textContent = body.data && body.data[0] ? body.data[0].id : "";
    } catch (err) {
      if (err.status === 401) {
        $("model-name").textContent = "API key needed";
        askKey(err.message);
      } else status(err.message, "bad");
    }
  }

  async function pollReady() {
    try {
      const resp = await fetch("/readyz");
      const body = await resp.json();
      if (resp.ok) status("ready", "ok");
      else status(body.reason || "not ready", "bad");
    } catch (_) {
      status("coordinator unreachable", "bad");
    }
  }

  // -- start -------------------------------------------------------------------------------------------

  function start() {
    const wanted = localStorage.getItem(CURRENT);
    current = conversations.find((c) => c.id === wanted) || conversations[0] || newConversation();
    for (const conv of conversations) {
      for (const m of conv.messages) m.pending = false; // a reply cut off by closing the page
    }
    $("composer").addEventListener("submit", submit);
    $("input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submit(ev);
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      const empty = conversations.find((c) => !c.messages.length);
      switchTo(empty || newConversation());
      $("input").focus();
    });
    $("messages").addEventListener("click", (ev) => {
      if (ev.target.classList.contains("copy-code")) copy(ev.target.parentElement.querySelector("code").textContent, ev.target);
    });
    bindSettings();
    renderAll();
    loadModel();
    pollReady();
    setInterval(pollReady, 5000);
    $("input").focus();
  }

  CL.chat = { stop, regenerate, state: () => ({ current, running: !!running }) };
  document.addEventListener("DOMContentLoaded", start);
})(window.ChatLoop);

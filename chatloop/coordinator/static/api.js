// Shared by both pages: the API key, calls to the coordinator's API, errors as text, a small DOM helper.
"use strict";
window.ChatLoop = window.ChatLoop || {};

(function (CL) {
  const KEY_STORE = "chatloop.apiKey";

  CL.getKey = () => localStorage.getItem(KEY_STORE) || "";
  CL.setKey = (key) => (key ? localStorage.setItem(KEY_STORE, key) : localStorage.removeItem(KEY_STORE));

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }
  CL.ApiError = ApiError;

  // The server's own error text (OpenAI shape {"error": {"message"}}), else the status line.
  async function errorText(resp) {
    let raw = "";
    try {
      raw = await resp.text();
      const body = JSON.parse(raw);
      if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
    } catch (_) {
      // not JSON: fall through to the raw text
    }
    const text = raw.trim().slice(0, 300);
    return `${resp.status} ${resp.statusText || ""}${text ? ": " + text : ""}`.trim();
  }

  // fetch() with the bearer key; a non-2xx answer or a network failure throws an ApiError with readable text.
  CL.api = async function (path, options = {}) {
    const headers = { ...(options.headers || {}) };
    const key = CL.getKey();
    if (key) headers.Authorization = "Bearer " + key;
    let resp;
    try {
      resp = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `cannot reach the coordinator (${err.message})`);
    }
    if (!resp.ok) throw new ApiError(resp.status, await errorText(resp));
    return resp;
  };

  // el("div", {class: "x", text: "y", title: "z"}, child, ...): text always goes in as a Text node.
  CL.el = function (tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  };

  // The API key dialog, made once per page (both pages share it): <dialog id="key-dialog">.
  function keyDialog() {
    let dialog = document.getElementById("key-dialog");
    if (dialog) return dialog;
    dialog = CL.el("dialog", { id: "key-dialog" },
      CL.el("form", { method: "dialog" },
        CL.el("h2", { text: "API key" }),
        CL.el("p", { id: "key-reason" }),
        CL.el("input", { id: "key-input", type: "password", autocomplete: "off", placeholder: "sk-...",
          "aria-label": "API key" }),
        CL.el("menu", {},
          CL.el("button", { value: "cancel", type: "submit", text: "Cancel" }),
          CL.el("button", { value: "save", class: "primary", type: "submit", text: "Save" }))));
    document.body.append(dialog);
    return dialog;
  }

  // Ask for an API key; resolves to true when one was saved.
  CL.askKey = function (reason) {
    const dialog = keyDialog();
    const input = document.getElementById("key-input");
    document.getElementById("key-reason").textContent = reason || "This server needs an API key.";
    input.value = CL.getKey();
    if (!dialog.open) dialog.showModal();
    input.focus();
    return new Promise((resolve) => {
      dialog.addEventListener(
        "close",
        () => {
          if (dialog.returnValue === "save") {
            CL.setKey(input.value.trim());
            resolve(true);
          } else resolve(false);
        },
        { once: true },
      );
    });
  };

  CL.formatBytes = function (n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
  };
})(window.ChatLoop);

// The live cluster page: polls /v1/cluster/live and redraws the pipeline (no page reloads).
"use strict";

(function (CL) {
  const $ = (id) => document.getElementById(id);
  const el = CL.el;
  let timer = 0;
  let asking = false;

  function ms(value) {
    return value === null || value === undefined ? "–" : value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
  }

  function figure(label, value, detail) {
    return el("div", { class: "figure" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), detail ? el("div", { class: "detail" }, detail) : null);
  }

  function latency(label, stats) {
    return el(
      "div",
      { class: "figure wide" },
      el("div", { class: "label" }, `${label} (last minute, ${stats.count} sample${stats.count === 1 ? "" : "s"})`),
      el("div", { class: "percentiles" }, ...["p50", "p90", "p99"].map((p) => el("span", {}, el("small", {}, p), " ", ms(stats[p])))),
    );
  }

  function bar(share, kind) {
    const pct = share === null || share === undefined ? 0 : Math.max(0, Math.min(1, share)) * 100;
    const fill = el("span", { class: `fill ${kind || ""}` });
    fill.style.width = `${pct.toFixed(1)}%`; // CSSOM, allowed by the page's style-src policy
    return el("span", { class: "bar" }, fill);
  }

  // What a replica's colour says: red as soon as a probe fails, before it is taken out of routing.
  function displayState(r) {
    if (r.state === "healthy" && r.consecutive_failures > 0) return ["failing", "bad"];
    return [r.state, { healthy: "ok", draining: "warn" }[r.state] || "bad"];
  }

  function replicaCard(r) {
    const [label, kind] = displayState(r);
    const kvShare = r.kv_tokens_total ? r.kv_tokens_used / r.kv_tokens_total : null;
    const rows = [
      ["sequences", r.live_sequences === null || r.live_sequences === undefined ? "–" : `${r.live_sequences}${r.max_sequences ? " / " + r.max_sequences : ""}`],
      ["queue", r.queue_depth ?? "–"],
      ["KV in use", r.kv_tokens_used === null || r.kv_tokens_used === undefined ? "–" : `${r.kv_tokens_used} / ${r.kv_tokens_total ?? "?"}`, bar(kvShare, "kv")],
      ["busy", r.busy_share === null || r.busy_share === undefined ? "–" : `${Math.round(r.busy_share * 100)}%`, bar(r.busy_share, "busy")],
      ["memory", CL.formatBytes(r.rss_bytes)],
    ];
    return el(
      "div",
      { class: `replica ${kind}`, "data-name": r.name, "data-state": label },
      el("div", { class: "replica-head" }, el("span", { class: `badge ${kind}` }, label), el("span", { class: "replica-name", title: r.url }, r.url.replace(/^https?:\/\//, ""))),
      el(
        "dl",
        { title: kind === "bad" ? "as of the last probe that answered" : null },
        rows.map(([name, value, extra]) => [el("dt", {}, name), el("dd", {}, String(value), extra || null)]),
      ),
      r.last_error ? el("div", { class: "last-error", title: r.last_error }, "last error: ", r.last_error) : null,
      el("div", { class: "muted small" }, r.pid ? `pid ${r.pid}` : "", r.threads ? ` · ${r.threads} thread${r.threads === 1 ? "" : "s"}` : "", r.last_seen ? ` · seen ${ago(r.last_seen)}` : ""),
    );
  }

  let serverSkew = 0;
  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - serverSkew - t);
    return s < 10 ? `${s.toFixed(1)} s ago` : `${Math.round(s)} s ago`;
  }

  function stageColumn(stage, nLayer) {
    const [start, end] = stage.layers || [null, null];
    const layers = start === null || start === undefined ? "layers ?" : `layers ${start}–${end - 1}`;
    const span = nLayer && start !== null && start !== undefined ? el("div", { class: "layer-span" }, layerStrip(start, end, nLayer)) : null;
    const roles = [stage.has_embedding ? "embedding" : null, stage.has_head ? "head" : null].filter(Boolean).join(" + ");
    return el(
      "div",
      { class: "stage", "data-stage": stage.index },
      el("div", { class: "stage-head" }, el("h2", {}, `Stage ${stage.index}`), el("span", { class: "muted" }, layers + (nLayer && start !== null && start !== undefined ? ` (${end - start} of ${nLayer})` : ""))),
      span,
      el("div", { class: "muted small" }, `file ${CL.formatBytes(stage.file_bytes)}${roles ? " · " + roles : ""}`),
      el("div", { class: "replicas" }, stage.replicas.map(replicaCard)),
    );
  }

  function layerStrip(start, end, n) {
    const strip = el("span", { class: "strip" });
    const pre = el("span", { class: "seg off" });
    const mine = el("span", { class: "seg on" });
    const post = el("span", { class: "seg off" });
    pre.style.flexGrow = String(start);
    mine.style.flexGrow = String(end - start);
    post.style.flexGrow = String(n - end);
    strip.append(pre, mine, post);
    return strip;
  }

  function draw(view) {
    serverSkew = Date.now() / 1000 - view.time;
    $("model-name").textContent = view.model;
    const ready = $("ready");
    ready.textContent = view.draining ? "draining" : view.ready ? "ready" : "not ready";
    ready.className = `status ${view.ready ? "ok" : "bad"}`;
    $("interval").textContent = view.health_check_interval_secs;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    const c = view.coordinator;
    $("figures").replaceChildren(
      figure("Running", `${c.running}`, c.max_running ? `of ${c.max_running}` : null),
      figure("Waiting", `${c.waiting}`),
      figure("Tokens/s", c.tokens_per_second.toFixed(1), "last 10 s"),
      latency("Time to first token", c.ttft_ms),
      latency("Inter-token latency", c.itl_ms),
    );
    const columns = [el("div", { class: "stage coordinator-box" }, el("h2", {}, "Coordinator"), el("div", { class: "muted small" }, "tokenizer · scheduler · routing"), el("div", { class: "muted small" }, `${c.running} running · ${c.waiting} waiting`))];
    for (const stage of view.stages) {
      columns.push(el("div", { class: "arrow", "aria-hidden": "true" }, "→"));
      columns.push(stageColumn(stage, view.n_layer));
    }
    $("pipeline").replaceChildren(...columns);
    return view.health_check_interval_secs;
  }

  async function poll() {
    let interval = 1;
    try {
      const resp = await CL.api("/v1/cluster/live", { cache: "no-store" });
      interval = draw(await resp.json());
      $("banner").hidden = true;
    } catch (err) {
      const banner = $("banner");
      banner.textContent = err.message;
      banner.hidden = false;
      if (err.status === 401 && !asking) {
        asking = true;
        await CL.askKey(err.message);
        asking = false;
      }
    }
    // Poll at least twice per health interval so a state change shows within one more interval.
    timer = setTimeout(poll, Math.max(250, Math.min(1000, (interval * 1000) / 2)));
  }

  document.addEventListener("DOMContentLoaded", () => {
    clearTimeout(timer);
    poll();
  });
})(window.ChatLoop);

// A small Markdown renderer for model replies that never builds HTML from text.
//
// Model output is untrusted: a reply may contain <script> or <img onerror=...>. Instead of escaping text into an
// HTML string (where one forgotten escape runs code), every piece of text enters the page as a Text node, and
// the only attribute taken from the text, a link's href, must be an http(s) or mailto URL. What an HTML
// parser would have executed is displayed as the characters it is made of.
//
// Blocks: fenced code (``` or ~~~), headings, lists (one level), block quotes, rules, paragraphs.
// Inline: `code`, **bold**, *italic*, ~~strike~~, [links](https://...), bare https:// links.
"use strict";
window.ChatLoop = window.ChatLoop || {};

(function (CL) {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function h(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function codeBlock(lines, lang) {
    const pre = h("pre", "code-block");
    const code = h("code");
    if (lang) {
      code.dataset.lang = lang;
      const label = h("span", "code-lang");
      label.textContent = lang;
      pre.append(label);
    }
    code.textContent = lines.join("\n");
    const copy = h("button", "copy-code");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.title = "Copy this code";
    pre.append(copy, code);
    return pre;
  }

  // Inline spans, left to right: the earliest match wins, its inside is parsed again (except code).
  const INLINE = [
    { re: /`([^`\n]+)`/, make: (m) => text(h("code"), m[1]) },
    { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: (m) => inline(h("strong"), m[1]) },
    { re: /__(?=\S)([\s\S]*?\S)__/, make: (m) => inline(h("strong"), m[1]) },
    { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m) => inline(h("del"), m[1]) },
    { re: /(^|[^\w*])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![\w*])/, make: (m) => inline(h("em"), m[2]), lead: 1 },
    { re: /(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/, make: (m) => inline(h("em"), m[2]), lead: 1 },
    { re: /\[([^\]\n]+)\]\(([^)\s]+)\)/, make: (m) => link(m[1], m[2]) },
    { re: /https?:\/\/[^\s<>()"']+[^\s<>()"'.,;:!?]/, make: (m) => link(m[0], m[0]) },
  ];

  function text(node, value) {
    node.textContent = value;
    return node;
  }

  function link(label, href) {
    if (!SAFE_URL.test(href)) return document.createTextNode(`[${label}](${href})`);
    const a = h("a");
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    a.textContent = label; // plain text: a link inside a link is not a thing
    return a;
  }

  function inline(parent, src) {
    let rest = src;
    while (rest) {
      let best = null;
      for (const rule of INLINE) {
        const m = rule.re.exec(rest);
        if (!m) continue;
        const lead = rule.lead ? m[rule.lead].length : 0;
        const at = m.index + lead;
        if (!best || at < best.at) best = { at, end: m.index + m[0].length, m, rule };
      }
      if (!best) break;
      if (best.at > 0) parent.append(document.createTextNode(rest.slice(0, best.at)));
      parent.append(best.rule.make(best.m));
      rest = rest.slice(best.end);
    }
    if (rest) parent.append(document.createTextNode(rest));
    return parent;
  }

  // A paragraph keeps the reply's line breaks (models write poems and addresses line by line).
  function paragraph(lines) {
    const p = h("p");
    lines.forEach((line, i) => {
      if (i) p.append(h("br"));
      inline(p, line);
    });
    return p;
  }

  function renderMarkdown(src) {
    const out = document.createDocumentFragment();
    const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i += 1;
        // An unclosed fence (a reply still streaming) runs to the end.
        while (i < lines.length && !lines[i].trimStart().startsWith(fence)) body.push(lines[i++]);
        i += 1;
        out.append(codeBlock(body, m[2]));
      } else if (!line.trim()) {
        i += 1;
      } else if ((m = HEADING.exec(line))) {
        out.append(inline(h("h" + Math.min(6, m[1].length + 2)), m[2]));
        i += 1;
      } else if (RULE.test(line)) {
        out.append(h("hr"));
        i += 1;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
          body.push(m[1]);
          i += 1;
        }
        const quote = h("blockquote");
        quote.append(renderMarkdown(body.join("\n")));
        out.append(quote);
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        const ordered = !BULLET.test(line);
        const list = h(ordered ? "ol" : "ul");
        if (ordered) {
          const start = parseInt(ORDERED.exec(line)[1], 10);
          if (start !== 1) list.start = start;
        }
        const re = ordered ? ORDERED : BULLET;
        while (i < lines.length && (m = re.exec(lines[i]))) {
          const item = [ordered ? m[2] : m[1]];
          i += 1;
          // continuation lines of an item are indented
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !BULLET.test(lines[i]) && !ORDERED.test(lines[i])) {
            item.push(lines[i].trim());
            i += 1;
          }
          list.append(paragraphInto(h("li"), item));
        }
        out.append(list);
      } else {
        const body = [];
        while (
          i < lines.length &&
          lines[i].trim() &&
          !FENCE.test(lines[i]) &&
          !HEADING.test(lines[i]) &&
          !QUOTE.test(lines[i]) &&
          !BULLET.test(lines[i]) &&
          !ORDERED.test(lines[i]) &&
          !RULE.test(lines[i])
        ) {
          body.push(lines[i]);
          i += 1;
        }
        out.append(paragraph(body));
      }
    }
    return out;
  }

  function paragraphInto(node, lines) {
    lines.forEach((line, i) => {
      if (i) node.append(h("br"));
      inline(node, line);
    });
    return node;
  }

  CL.renderMarkdown = renderMarkdown;
})(window.ChatLoop);

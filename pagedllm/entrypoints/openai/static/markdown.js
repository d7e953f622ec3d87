// Markdown -> DOM, for model replies and user messages.
//
// The one rule: text from the model or the user only ever becomes text nodes (textContent,
// createTextNode). Elements are made by name here, never parsed from a string, so a reply
// that says <img src=x onerror=...> or <script> shows those characters and runs nothing.
// Links keep only http(s) and mailto addresses (no javascript: URLs).
//
// Blocks: fenced code (``` or ~~~, unclosed while streaming), headings, lists (nested by
// indent), block quotes, tables, rules, paragraphs (single newlines kept as line breaks).
// Inline: `code`, **bold**, *italic*, ~~strike~~, [text](url).
"use strict";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+/;
const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i++;
    } else if ((match = FENCE.exec(line))) {
      i = renderFence(lines, i, match, parent);
    } else if ((match = HEADING.exec(line))) {
      const heading = el("h" + match[1].length);
      appendInline(match[2], heading);
      parent.appendChild(heading);
      i++;
    } else if (RULE.test(line)) {
      parent.appendChild(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      const quote = el("blockquote");
      renderBlocks(quoted, quote);
      parent.appendChild(quote);
    } else if (LIST_ITEM.test(line)) {
      i = renderList(lines, i, parent);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEPARATOR.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = renderTable(lines, i, parent);
    } else {
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) paragraph.push(lines[i++]);
      if (!paragraph.length) paragraph.push(lines[i++]); // a line no block rule took
      const p = el("p");
      appendInline(paragraph.join("\n"), p);
      parent.appendChild(p);
    }
  }
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

function renderFence(lines, start, match, parent) {
  const marker = match[1];
  const body = [];
  let i = start + 1;
  while (i < lines.length && !(lines[i].trim().startsWith(marker) && /^\s*[`~]+\s*$/.test(lines[i]))) body.push(lines[i++]);
  const block = el("div", "code-block");
  if (match[2]) block.appendChild(el("div", "code-lang", match[2]));
  const pre = el("pre");
  pre.appendChild(el("code", "", body.join("\n")));
  block.appendChild(pre);
  parent.appendChild(block);
  return i + 1; // past the closing fence (or the end, while the reply still streams)
}

function renderList(lines, start, parent) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const item = LIST_ITEM.exec(lines[i]);
    if (!item || item[1].length !== indent || /\d/.test(item[2]) !== ordered) break;
    const contentIndent = item[0].length;
    const body = [lines[i].slice(contentIndent)];
    i++;
    // The item goes on over lines indented past its marker (nested lists, code), and over
    // lazy continuation lines of its paragraph; a blank line ends it unless indented text follows.
    while (i < lines.length) {
      const line = lines[i];
      const lineIndent = line.length - line.trimStart().length;
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() && next.length - next.trimStart().length > indent) { body.push(""); i++; continue; }
        break;
      }
      if (lineIndent > indent) body.push(line.slice(Math.min(lineIndent, contentIndent)));
      else if (!startsBlock(line)) body.push(line.trimStart());
      else break;
      i++;
    }
    const li = el("li");
    renderBlocks(body, li);
    // A tight item's single paragraph is the item's own text.
    if (li.childNodes.length && li.firstChild.tagName === "P") li.replaceChild(unwrap(li.firstChild), li.firstChild);
    list.appendChild(li);
    while (i < lines.length && !lines[i].trim()) {
      const next = LIST_ITEM.exec(lines[i + 1] || "");
      if (!next || next[1].length !== indent) break;
      i++;
    }
  }
  parent.appendChild(list);
  return i;
}

function unwrap(p) {
  const fragment = document.createDocumentFragment();
  while (p.firstChild) fragment.appendChild(p.firstChild);
  return fragment;
}

function splitRow(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
}

function tableRow(line, cellTag) {
  const row = el("tr");
  for (const text of splitRow(line)) {
    const cell = el(cellTag);
    appendInline(text, cell);
    row.appendChild(cell);
  }
  return row;
}

function renderTable(lines, start, parent) {
  const table = el("table");
  const head = el("thead");
  head.appendChild(tableRow(lines[start], "th"));
  table.appendChild(head);
  const body = el("tbody");
  let i = start + 2; // past the header and its |---| line
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) body.appendChild(tableRow(lines[i++], "td"));
  table.appendChild(body);
  const wrapper = el("div", "table-wrap"); // scrolls sideways on a narrow screen
  wrapper.appendChild(table);
  parent.appendChild(wrapper);
  return i;
}

// Inline spans, the first match wins at each position: code spans first, so nothing
// inside backticks is read as emphasis.
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: bold
    /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: bold
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: italic
    /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 6: italic
    /~~(?=\S)([\s\S]*?\S)~~/.source, // 7: strike
    /\[([^\]\n]+)\]\(\s*(\S+?)\s*\)/.source, // 8, 9: link
  ].join("|"),
  "g",
);

function appendInline(text, parent) {
  let last = 0;
  INLINE.lastIndex = 0;
  for (const m of text.matchAll(INLINE)) {
    appendText(text.slice(last, m.index), parent);
    parent.appendChild(inlineElement(m));
    last = m.index + m[0].length;
  }
  appendText(text.slice(last), parent);
}

function inlineElement(m) {
  if (m[2] !== undefined) return el("code", "", m[2].replace(/^ (.*) $/s, "$1"));
  if (m[8] !== undefined) {
    if (!SAFE_URL.test(m[9])) return document.createTextNode(m[0]);
    const link = el("a");
    link.href = m[9];
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    appendInline(m[8], link);
    return link;
  }
  const [tag, inner] = m[3] !== undefined ? ["strong", m[3]] : m[4] !== undefined ? ["strong", m[4]]
    : m[5] !== undefined ? ["em", m[5]] : m[6] !== undefined ? ["em", m[6]] : ["del", m[7]];
  const node = el(tag);
  appendInline(inner, node);
  return node;
}

function appendText(text, parent) {
  const parts = text.split("\n");
  parts.forEach((part, k) => {
    if (k) parent.appendChild(el("br"));
    if (part) parent.appendChild(document.createTextNode(part));
  });
}

// render.js: model output (untrusted markdown) -> sanitised HTML, code blocks highlighted.
// renderMarkdown is pure: same text in, same safe HTML string out; nothing in it ever runs
// script. Highlighting happens before DOMPurify, so its output is sanitised like the rest.

import hljs from "./vendor/highlight.min.js";
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const LANGUAGE_NAME = /^[a-z0-9_+#-]{1,32}$/;

const markdown = new Marked({ gfm: true, breaks: true, async: false,
  renderer: { code: renderCodeBlock } });

/** A fenced block: highlighted when its info string names a bundled language, else plain. */
function renderCodeBlock({ text, lang }) {
  const name = String(lang ?? "").trim().split(/\s/)[0].toLowerCase();
  const known = LANGUAGE_NAME.test(name) && hljs.getLanguage(name) ? name : null;
  const html = known ? hljs.highlight(text, { language: known, ignoreIllegals: true }).value
    : escapeHtml(text);
  const className = known ? `hljs language-${known}` : "hljs";
  return `<pre><code class="${className}">${html}</code></pre>\n`;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const PURIFY_CONFIG = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object",
    "embed", "svg", "math"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction"],
  ALLOW_DATA_ATTR: false,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  // Links from model output open elsewhere and carry no opener or referrer.
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Markdown text -> HTML string that is safe to assign to innerHTML. */
export function renderMarkdown(text) {
  const html = markdown.parse(String(text ?? ""));
  return DOMPurify.sanitize(html, PURIFY_CONFIG);
}

/** Renders `text` as markdown into `element` (replacing its content). */
export function renderInto(element, text) {
  element.innerHTML = renderMarkdown(text);
}

/** Adds a "Copy" button to each code block under `element` (call once a reply is complete). */
export function addCodeCopyButtons(element) {
  for (const pre of element.querySelectorAll("pre")) {
    if (pre.querySelector(".copy-code")) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", () => copyText(pre.querySelector("code")?.textContent ?? pre.textContent, button));
    pre.append(button);
  }
}

/** Copies text to the clipboard and briefly confirms on `button`. */
export async function copyText(text, button) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = label; }, 1200);
}

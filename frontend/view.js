// view.js: builds and updates the page's DOM (conversation list, messages, model badges)
// from plain data. Model output goes through render.js; everything else is textContent.

import { addCodeCopyButtons, copyText, renderInto } from "./render.js";

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  if (text !== null) node.textContent = text;
  return node;
}

/** Sidebar list of saved conversations. */
export function renderConversationList(container, conversations, currentId, handlers) {
  container.replaceChildren();
  if (!conversations.length) {
    container.append(el("p", { className: "muted list-empty" }, "No conversations yet."));
    return;
  }
  for (const conversation of conversations) {
    const isCurrent = conversation.id === currentId;
    const item = el("div", {
      className: `conversation-item${isCurrent ? " current" : ""}`,
      "data-testid": "conversation-item", "data-id": conversation.id,
    });
    const open = el("button", {
      type: "button", className: "conversation-open", "data-testid": "conversation-open",
      "aria-current": isCurrent ? "true" : null,
      "aria-label": `Open conversation: ${conversation.title}`,
    }, conversation.title);
    open.addEventListener("click", () => handlers.onSelect(conversation.id));
    const remove = el("button", {
      type: "button", className: "icon-btn conversation-delete",
      "data-testid": "conversation-delete",
      "aria-label": `Delete conversation: ${conversation.title}`, title: "Delete",
    });
    remove.append(trashIcon());
    remove.addEventListener("click", () => handlers.onDelete(conversation.id));
    item.append(open, remove);
    container.append(item);
  }
}

function trashIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3");
  svg.append(path);
  return svg;
}

/** Capability badges + context length for the selected model. */
export function renderModelBadges(container, model) {
  container.replaceChildren();
  if (!model) return;
  for (const capability of model.capabilities || []) {
    container.append(el("span", {
      className: `badge badge-${capability}`, "data-testid": "capability-badge",
    }, capability));
  }
  if (model.context_length) {
    container.append(el("span", { className: "badge badge-muted", title: "Context length" },
      `${formatCount(model.context_length)} ctx`));
  }
}

/** Text for a model's <option>: id plus what it can do. */
export function modelOptionLabel(model) {
  const caps = (model.capabilities || []).join(", ");
  const note = model.kind === "embedding" ? " (embeddings only)"
    : model.status === "unavailable" ? " (not ready)" : "";
  return `${model.id} — ${caps || model.kind}${note}`;
}

function formatCount(n) {
  return n >= 1024 && n % 1024 === 0 ? `${n / 1024}k` : String(n);
}

/** Empty-conversation placeholder. */
export function renderEmptyState(container, modelId) {
  const box = el("div", { className: "empty-state", "data-testid": "empty-state" });
  box.append(el("h1", {}, "How can I help?"));
  box.append(el("p", { className: "muted" },
    modelId ? `Talking to ${modelId}. Enter sends, Shift+Enter adds a new line.`
      : "Pick a model to start."));
  container.replaceChildren(box);
}

/**
 * A message's DOM. Returns {root, update(message)}; update re-renders content, status and
 * metrics from the message object (cheap enough to call on every streamed delta).
 */
export function createMessageView(message, actions) {
  const root = el("article", {
    className: `message message-${message.role}`, "data-testid": "message",
    "data-role": message.role,
  });
  const header = el("div", { className: "message-head" });
  const who = el("span", { className: "message-who" });
  header.append(who);
  const body = el("div", { className: "message-content", "data-testid": "message-content" });
  const error = el("div", { className: "message-error", "data-testid": "message-error",
    role: "alert", hidden: true });
  const foot = el("div", { className: "message-foot" });
  const meta = el("span", { className: "message-meta", "data-testid": "message-meta" });
  const tools = el("span", { className: "message-tools" });
  foot.append(meta, tools);
  root.append(header, body, error, foot);

  if (message.role === "user") {
    who.textContent = "You";
    body.textContent = message.content;
    foot.hidden = true;
    return { root, update() {} };
  }

  const copy = el("button", { type: "button", className: "link-btn", "aria-label": "Copy reply" },
    "Copy");
  copy.addEventListener("click", () => copyText(message.content, copy));
  tools.append(copy);
  if (actions?.onRegenerate) {
    const again = el("button", { type: "button", className: "link-btn",
      "data-testid": "regenerate", "aria-label": "Regenerate reply" }, "Regenerate");
    again.addEventListener("click", () => actions.onRegenerate(message));
    tools.append(again);
  }

  let renderedContent = null;
  const update = (msg) => {
    const status = msg.status || "done";
    root.dataset.status = status;
    if (msg.requestId) root.dataset.requestId = msg.requestId;
    who.textContent = msg.model ? `${msg.model}${msg.mode === "completion" ? " · completion" : ""}`
      : "Assistant";
    if (msg.content !== renderedContent) {
      renderInto(body, msg.content);
      renderedContent = msg.content;
    }
    body.classList.toggle("is-empty", !msg.content);
    const isStreaming = status === "streaming";
    body.classList.toggle("streaming", isStreaming);
    if (!isStreaming) addCodeCopyButtons(body);
    error.hidden = !msg.error;
    error.textContent = msg.error || "";
    meta.textContent = formatMeta(msg);
    tools.hidden = isStreaming || !msg.content;
  };
  update(message);
  return { root, update };
}

/** "TTFT 180 ms · 23.4 tok/s · 57 tokens", plus how it ended when that is not "stop". */
export function formatMeta(msg) {
  const m = msg.metrics || {};
  const parts = [];
  if (msg.status === "streaming") parts.push(msg.content ? "generating…" : "waiting for first token…");
  if (m.ttftMs != null) parts.push(`TTFT ${Math.round(m.ttftMs)} ms`);
  if (m.tokensPerSecond != null) parts.push(`${m.tokensPerSecond.toFixed(1)} tok/s`);
  if (m.completionTokens != null) {
    const n = m.completionTokens;
    parts.push(`${m.isApproximate ? "~" : ""}${n} ${n === 1 ? "token" : "tokens"}`);
  }
  if (msg.status === "stopped") parts.push("stopped");
  else if (msg.finishReason === "length") parts.push("hit max tokens");
  return parts.join(" · ");
}

// message_view.js: one message's DOM: content (model output through render.js, all else as
// textContent), tool calls, the parsed structured reply, metrics, and its buttons (copy, edit,
// regenerate, inspect, stop, continue, switch branch).

import { parsedReply } from "./options.js";
import { addCodeCopyButtons, copyText, renderInto } from "./render.js";

export function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  if (text !== null) node.textContent = text;
  return node;
}

function button(label, testId, ariaLabel, onClick) {
  const node = el("button", { type: "button", className: "link-btn", "data-testid": testId,
    "aria-label": ariaLabel }, label);
  node.addEventListener("click", onClick);
  return node;
}

/** "‹ 2 / 3 ›" between a message's versions; `branch` = {index, count, siblings}. */
function branchSwitch(branch, onBranch) {
  const box = el("span", { className: "branch-switch", "data-testid": "branch-switch" });
  const previous = el("button", { type: "button", className: "link-btn",
    "data-testid": "branch-previous", "aria-label": "Previous version" }, "‹");
  const next = el("button", { type: "button", className: "link-btn",
    "data-testid": "branch-next", "aria-label": "Next version" }, "›");
  previous.disabled = branch.index <= 0;
  next.disabled = branch.index >= branch.count - 1;
  previous.addEventListener("click", () => onBranch(branch.siblings[branch.index - 1]));
  next.addEventListener("click", () => onBranch(branch.siblings[branch.index + 1]));
  const position = el("span", { "data-testid": "branch-position" },
    `${branch.index + 1} / ${branch.count}`);
  box.append(previous, position, next);
  return box;
}

/**
 * A message's DOM. `actions` (all optional): onEdit(message, text), onRegenerate(message),
 * onInspect(message), onStop(message), onContinue(message), onBranch(sibling), branch.
 * Returns {root, update(message)}; update re-renders from the message object (cheap enough to
 * call on every streamed delta).
 */
export function createMessageView(message, actions = {}) {
  const parts = skeleton(message);
  const { root, body, tools } = parts;
  if (actions.branch?.count > 1 && actions.onBranch) {
    parts.foot.prepend(branchSwitch(actions.branch, actions.onBranch));
  }
  if (message.role === "user") return userView(message, parts, actions);

  const copy = button("Copy", "copy-reply", "Copy reply", () => copyText(message.content, copy));
  tools.append(copy);
  if (actions.onRegenerate) {
    tools.append(button("Regenerate", "regenerate", "Regenerate reply",
      () => actions.onRegenerate(message)));
  }
  if (actions.onInspect) {
    tools.append(button("Inspect", "inspect", "Inspect request",
      () => actions.onInspect(message)));
  }
  if (actions.onContinue) {
    tools.append(button("Continue with this", "continue-with",
      `Continue the conversation with ${message.model ?? "this model"}`,
      () => actions.onContinue(message)));
  }
  const stop = el("button", { type: "button", className: "btn btn-danger btn-small",
    "data-testid": "column-stop", "aria-label": `Stop ${message.model ?? "this reply"}` },
  "Stop");
  stop.addEventListener("click", () => actions.onStop?.(message));
  if (actions.onStop) parts.foot.append(stop);

  let renderedContent = null;
  const update = (msg) => {
    const status = msg.status || "done";
    const isStreaming = status === "streaming";
    root.dataset.status = status;
    if (msg.requestId) root.dataset.requestId = msg.requestId;
    parts.who.textContent = msg.model
      ? `${msg.model}${msg.mode === "completion" ? " · completion" : ""}` : "Assistant";
    if (msg.content !== renderedContent) {
      renderInto(body, msg.content);
      renderedContent = msg.content;
    }
    body.classList.toggle("is-empty", !msg.content);
    body.classList.toggle("streaming", isStreaming);
    if (!isStreaming) addCodeCopyButtons(body);
    renderToolCalls(parts.calls, msg.toolCalls);
    renderParsed(parts.parsed, parsedReply(msg));
    parts.error.hidden = !msg.error;
    parts.error.textContent = msg.error || "";
    parts.meta.textContent = formatMeta(msg);
    tools.hidden = isStreaming;
    copy.hidden = !msg.content;
    stop.hidden = !isStreaming;
  };
  update(message);
  return { root, update };
}

function skeleton(message) {
  const root = el("article", {
    className: `message message-${message.role}`, "data-testid": "message",
    "data-role": message.role, "data-id": message.id,
  });
  const head = el("div", { className: "message-head" });
  const who = el("span", { className: "message-who" });
  head.append(who);
  const body = el("div", { className: "message-content", "data-testid": "message-content" });
  const calls = el("div", { className: "tool-calls", hidden: true });
  const parsed = el("div", { className: "parsed-reply", hidden: true });
  const error = el("div", { className: "message-error", "data-testid": "message-error",
    role: "alert", hidden: true });
  const foot = el("div", { className: "message-foot" });
  const meta = el("span", { className: "message-meta", "data-testid": "message-meta" });
  const tools = el("span", { className: "message-tools" });
  foot.append(meta, tools);
  root.append(head, body, calls, parsed, error, foot);
  return { root, who, body, calls, parsed, error, foot, meta, tools };
}

function userView(message, parts, actions) {
  parts.who.textContent = "You";
  parts.body.textContent = message.content;
  if (actions.onEdit) {
    parts.tools.append(button("Edit", "edit", "Edit message",
      () => startEditing(message, parts, actions.onEdit)));
  }
  parts.foot.hidden = !parts.foot.querySelector("button");
  return { root: parts.root, update() {} };
}

/** Swaps the bubble for a textarea; Save sends the edited text as a new branch. */
function startEditing(message, parts, onEdit) {
  const form = el("form", { className: "edit-form" });
  const input = el("textarea", { "data-testid": "edit-input", rows: 3,
    "aria-label": "Edited message" });
  input.value = message.content;
  const save = el("button", { type: "submit", className: "btn btn-primary btn-small",
    "data-testid": "edit-save" }, "Save & send");
  const cancel = el("button", { type: "button", className: "btn btn-ghost btn-small" }, "Cancel");
  form.append(input, el("div", { className: "edit-actions" }));
  form.lastChild.append(cancel, save);
  const finish = () => form.replaceWith(parts.body);
  cancel.addEventListener("click", finish);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (text) onEdit(message, text);
    else finish();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      finish();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  parts.body.replaceWith(form);
  input.focus();
}

/** Tool calls as calls: name and pretty-printed arguments, never rendered as markdown. */
function renderToolCalls(container, calls) {
  container.hidden = !calls?.length;
  if (!calls?.length) return;
  container.replaceChildren(...calls.map((call) => {
    const box = el("div", { className: "tool-call", "data-testid": "tool-call",
      "data-name": call.function.name });
    box.append(el("div", { className: "tool-call-name" }, `Tool call: ${call.function.name}`));
    box.append(el("pre", { className: "tool-call-args", "data-testid": "tool-call-arguments" },
      prettyJson(call.function.arguments)));
    return box;
  }));
}

function renderParsed(container, parsed) {
  container.hidden = !parsed;
  if (!parsed) return;
  const title = el("div", { className: "parsed-title" },
    parsed.error ? "Structured output" : "Parsed object");
  const value = parsed.error
    ? el("p", { className: "message-error", "data-testid": "parsed-error" }, parsed.error)
    : el("pre", { "data-testid": "parsed-object" }, JSON.stringify(parsed.value, null, 2));
  container.replaceChildren(title, value);
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text; // still streaming, or not JSON: shown as it came
  }
}

/** "TTFT 180 ms · 23.4 tok/s · 57 tokens", plus how it ended when that is not "stop". */
export function formatMeta(msg) {
  const m = msg.metrics || {};
  const parts = [];
  if (msg.status === "streaming") {
    parts.push(msg.content || msg.toolCalls ? "generating…" : "waiting for first token…");
  }
  if (m.ttftMs != null) parts.push(`TTFT ${Math.round(m.ttftMs)} ms`);
  if (m.tokensPerSecond != null) parts.push(`${m.tokensPerSecond.toFixed(1)} tok/s`);
  if (m.completionTokens != null) {
    const n = m.completionTokens;
    parts.push(`${m.isApproximate ? "~" : ""}${n} ${n === 1 ? "token" : "tokens"}`);
  }
  if (msg.status === "stopped") parts.push("stopped");
  else if (msg.finishReason === "length") parts.push("hit max tokens");
  else if (msg.finishReason === "tool_calls") parts.push("tool calls");
  return parts.join(" · ");
}

// view.js: builds the page's DOM around the messages (conversation list, model badges and
// status, empty state) from plain data, all as textContent. Messages: message_view.js.

import { el } from "./message_view.js";

export { createMessageView, formatMeta } from "./message_view.js";

/** What a /v1/models `status` means here; a card without one is ready. */
const STATUS_NOTES = { idle: "idle", loading: "loading…", failed: "failed",
  unavailable: "not ready" };

export function modelStatus(model) {
  return Object.hasOwn(STATUS_NOTES, model?.status ?? "") ? model.status : "ready";
}

/** Sidebar list of saved conversations. */
export function renderConversationList(container, conversations, currentId, handlers) {
  container.replaceChildren();
  if (!conversations.length) {
    container.append(el("p", { className: "muted list-empty" },
      handlers.isFiltered ? "No conversation title matches." : "No conversations yet."));
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
  const status = modelStatus(model);
  container.append(el("span", { className: `badge status-${status}`,
    "data-testid": "model-status", title: "Model status" }, status));
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
  const status = modelStatus(model);
  const note = model.kind === "embedding" ? " (embeddings only)"
    : status !== "ready" ? ` (${STATUS_NOTES[status]})` : "";
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

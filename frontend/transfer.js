// transfer.js: conversations to and from JSON (export / import, and what localStorage holds).
// Imported files are untrusted: every field is type-checked and unknown ones are dropped, so a
// file can carry only data the page already knows how to show safely. Pure data; no DOM.

export const EXPORT_FORMAT = "serve-app.conversations";
export const EXPORT_VERSION = 2;

const ROLES = new Set(["user", "assistant"]);
const STATUSES = new Set(["streaming", "done", "stopped", "error"]);
const MODES = new Set(["chat", "completion"]);
const REQUEST_PATHS = new Set(["/v1/chat/completions", "/v1/completions"]);
const STRING_FIELDS = ["id", "parentId", "model", "requestId", "finishReason", "error",
  "compareId"];
const METRIC_FIELDS = ["ttftMs", "completionTokens", "promptTokens", "tokensPerSecond"];
const USAGE_FIELDS = ["prompt_tokens", "completion_tokens", "total_tokens"];
const MAX_STRING = 1_000_000;

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isText = (v) => typeof v === "string" && v.length <= MAX_STRING;
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

/** The file's text for `conversations`. */
export function exportConversations(conversations) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: EXPORT_VERSION,
    conversations }, null, 2);
}

/** Parses an exported file (or a bare list / one conversation); throws Error with a reason. */
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("The file is not JSON.");
  }
  const list = Array.isArray(data) ? data : isObject(data) && Array.isArray(data.conversations)
    ? data.conversations : isObject(data) && Array.isArray(data.messages) ? [data] : null;
  if (!list) throw new Error("The file holds no conversations.");
  const conversations = list.map(normaliseConversation).filter(Boolean);
  if (!conversations.length) throw new Error("The file holds no valid conversation.");
  return conversations;
}

/** A checked copy of a conversation, or null when it is not one. */
export function normaliseConversation(value) {
  if (!isObject(value) || !isText(value.id) || !Array.isArray(value.messages)) return null;
  const messages = uniqueIds(value.messages.map(normaliseMessage).filter(Boolean));
  const result = {
    id: value.id,
    title: isText(value.title) ? value.title : "Imported chat",
    createdAt: isNumber(value.createdAt) ? value.createdAt : Date.now(),
    updatedAt: isNumber(value.updatedAt) ? value.updatedAt : Date.now(),
    messages,
  };
  if (isObject(value.selected)) {
    result.selected = Object.fromEntries(Object.entries(value.selected)
      .filter(([key, id]) => isText(key) && isText(id)));
  }
  return result;
}

/** Drops messages whose id repeats: the tree must be a tree (no node its own child). */
function uniqueIds(messages) {
  const seen = new Set();
  return messages.filter((m) => {
    if (m.id === undefined) return true;
    if (seen.has(m.id) || m.parentId === m.id) return false;
    seen.add(m.id);
    return true;
  });
}

function normaliseMessage(value) {
  if (!isObject(value) || !ROLES.has(value.role) || !isText(value.content)) return null;
  const message = { role: value.role, content: value.content };
  for (const field of STRING_FIELDS) if (isText(value[field])) message[field] = value[field];
  if (value.parentId === null) message.parentId = null;
  if (isNumber(value.createdAt)) message.createdAt = value.createdAt;
  if (MODES.has(value.mode)) message.mode = value.mode;
  if (STATUSES.has(value.status)) message.status = value.status;
  const metrics = pickNumbers(value.metrics, METRIC_FIELDS);
  if (metrics) {
    if (typeof value.metrics.isApproximate === "boolean") {
      metrics.isApproximate = value.metrics.isApproximate;
    }
    message.metrics = metrics;
  }
  const usage = pickNumbers(value.usage, USAGE_FIELDS);
  if (usage) message.usage = usage;
  const request = normaliseRequest(value.request);
  if (request) message.request = request;
  const toolCalls = normaliseToolCalls(value.toolCalls);
  if (toolCalls) message.toolCalls = toolCalls;
  return message;
}

function pickNumbers(value, fields) {
  if (!isObject(value)) return null;
  return Object.fromEntries(fields.filter((f) => isNumber(value[f])).map((f) => [f, value[f]]));
}

function normaliseRequest(value) {
  if (!isObject(value) || !REQUEST_PATHS.has(value.path) || !isObject(value.body)) return null;
  // The body is shown as JSON text only; a round trip drops anything that is not plain JSON.
  return { path: value.path, body: JSON.parse(JSON.stringify(value.body)) };
}

function normaliseToolCalls(value) {
  if (!Array.isArray(value)) return null;
  const calls = value.filter((c) => isObject(c) && isObject(c.function)
    && isText(c.function.name) && isText(c.function.arguments));
  return calls.map((c) => ({
    id: isText(c.id) ? c.id : "", type: "function",
    function: { name: c.function.name, arguments: c.function.arguments },
  }));
}

// generation.js: one reply's request and stream: the request body from the history and
// settings (chat messages, or a transcript prompt for base models), the stream into the message
// object, and its metrics (TTFT, tok/s, tokens). No DOM: the caller paints.

import { generationRequest, streamGeneration } from "./api.js";
import { addToolCallFragment } from "./options.js";

/** "completion" for base models (they have no chat template), else "chat" when they can. */
export function modeFor(model) {
  const caps = model.capabilities || [];
  if (model.kind === "completion" || !caps.includes("chat")) return "completion";
  return "chat";
}

/**
 * The request ({path, body}) for a reply to `history` (user/assistant messages, oldest
 * first). `fields` (response_format, tools) apply to chat requests only.
 */
export function buildRequest(history, model, mode, settings, fields = {}) {
  const turns = history.filter((m) => (m.role === "user" || m.role === "assistant") && m.content);
  const common = { model: model.id, temperature: settings.temperature,
    max_tokens: settings.maxTokens };
  const system = settings.systemPrompt.trim();
  if (mode === "completion") {
    return generationRequest(mode,
      { ...common, prompt: completionPrompt(turns, system), stop: ["\nUser:"] });
  }
  const messages = turns.map((m) => ({ role: m.role, content: m.content }));
  if (system) messages.unshift({ role: "system", content: system });
  return generationRequest(mode, { ...common, messages, ...fields });
}

/** A base model gets the conversation as a plain transcript ending in "Assistant:". */
function completionPrompt(turns, system) {
  const lines = [];
  if (system) lines.push(system, "");
  for (const m of turns) lines.push(`${m.role === "user" ? "User" : "Assistant"}: ${m.content}`);
  lines.push("Assistant:");
  return lines.join("\n");
}

/**
 * Streams message.request into `message` (content, toolCalls, usage, finishReason, requestId),
 * calling onChange() after each change. Rejects like streamGeneration.
 */
export async function streamInto(message, signal, onChange) {
  const timing = message.timing = { started: performance.now(), firstToken: null, last: null,
    deltas: 0 };
  const arrived = () => {
    const now = performance.now();
    timing.firstToken ??= now;
    timing.last = now;
    timing.deltas += 1;
    onChange();
  };
  await streamGeneration({
    mode: message.mode, request: message.request, signal,
    onStart: ({ requestId }) => {
      if (requestId) message.requestId = requestId;
      onChange();
    },
    onDelta: (text) => {
      message.content += text;
      arrived();
    },
    onToolCall: (fragment) => {
      addToolCallFragment(message, fragment);
      arrived();
    },
    onUsage: (usage) => { message.usage = usage; },
    onFinish: (reason) => { message.finishReason = reason; },
  });
}

/** Turns the stream's timing into message.metrics once it has ended. */
export function finishMetrics(message) {
  const t = message.timing;
  delete message.timing;
  if (!t) return;
  const end = t.last ?? performance.now();
  const usage = message.usage;
  const tokens = usage?.completion_tokens ?? (t.deltas || null);
  const metrics = { isApproximate: !usage };
  if (t.firstToken != null) metrics.ttftMs = t.firstToken - t.started;
  if (tokens != null) metrics.completionTokens = tokens;
  if (usage?.prompt_tokens != null) metrics.promptTokens = usage.prompt_tokens;
  const seconds = t.firstToken != null ? (end - t.firstToken) / 1000 : 0;
  if (tokens > 1 && seconds > 0) metrics.tokensPerSecond = (tokens - 1) / seconds;
  message.metrics = metrics;
}

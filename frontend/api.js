// api.js: talks to serve-app's OpenAI-compatible API (same origin): model list, waking an idle
// model, streamed chat/completions over fetch + ReadableStream, SSE parsing, error
// normalisation.

/** One error type for everything that can go wrong; `kind` says where it came from. */
export class ApiError extends Error {
  /**
   * @param {string} message shown to the user
   * @param {{kind: "http"|"network"|"stream"|"auth"|"protocol", status?: number,
   *          type?: string, code?: string|null, param?: string|null}} info
   */
  constructor(message, info) {
    super(message);
    this.name = "ApiError";
    this.kind = info.kind;
    this.status = info.status ?? null;
    this.type = info.type ?? null;
    this.code = info.code ?? null;
    this.param = info.param ?? null;
  }
}

let apiKeyProvider = () => null;

/** Sets a function returning the API key to send (or null for none). */
export function setApiKeyProvider(provider) {
  apiKeyProvider = provider;
}

function headers(extra = {}) {
  const result = { ...extra };
  const key = apiKeyProvider();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function request(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: headers(init.headers) });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError("Cannot reach the server. Is serve-app running?", { kind: "network" });
  }
  if (!response.ok) throw await errorFromResponse(response);
  return response;
}

/** Builds an ApiError from a non-2xx response with an OpenAI-style `{"error": {...}}` body. */
export async function errorFromResponse(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && typeof body === "object" ? body.error : null;
  const detail = error && typeof error.message === "string" ? error.message
    : `${response.status} ${response.statusText || "error"}`;
  const kind = response.status === 401 ? "auth" : "http";
  return new ApiError(detail, {
    kind, status: response.status, type: error?.type, code: error?.code, param: error?.param,
  });
}

/** GET /v1/models -> list of model cards. */
export async function listModels() {
  const response = await request("/v1/models");
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

/**
 * POST /admin/models/{id}/load: asks the server to wake an idle model. Best effort: a server
 * without the route, or a key without admin rights, is fine, since a request to an idle model
 * wakes it too. Never throws.
 */
export async function loadModel(modelId) {
  try {
    await request(`/admin/models/${encodeURIComponent(modelId)}/load`, { method: "POST" });
    return true;
  } catch {
    return false;
  }
}

/** The path and exact JSON body of a streamed generation (also what the inspector shows). */
export function generationRequest(mode, body) {
  const path = mode === "completion" ? "/v1/completions" : "/v1/chat/completions";
  return { path, body: { ...body, stream: true, stream_options: { include_usage: true } } };
}

/**
 * Incremental Server-Sent Events parser: push() decoded text as it arrives (any chunking),
 * get back the `data` payloads of every event completed so far.
 */
export class SseParser {
  constructor() {
    this.buffer = "";
  }

  /** @param {string} text @returns {string[]} */
  push(text) {
    this.buffer += text;
    const events = [];
    // Events end at a blank line; accept \n, \r\n and \r line endings.
    const pattern = /\r\n\r\n|\n\n|\r\r/;
    let match;
    while ((match = pattern.exec(this.buffer)) !== null) {
      const block = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const data = parseEventData(block);
      if (data !== null) events.push(data);
    }
    return events;
  }

  /** Whatever is left when the stream closes (an event without its trailing blank line). */
  flush() {
    const rest = this.buffer;
    this.buffer = "";
    const data = rest.trim() ? parseEventData(rest) : null;
    return data === null ? [] : [data];
  }
}

function parseEventData(block) {
  const lines = block.split(/\r\n|\n|\r/);
  const data = [];
  for (const line of lines) {
    if (line.startsWith(":")) continue; // comment / keep-alive
    if (line === "data") data.push("");
    else if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

/**
 * Streams one generation from generationRequest(mode, body): `mode` "chat" posts `messages`
 * to /v1/chat/completions, "completion" posts `prompt` to /v1/completions.
 *
 * Callbacks: onStart({requestId}), onDelta(text), onToolCall(fragment) with each streamed
 * delta.tool_calls entry, onUsage(usage), onFinish(reason).
 * Resolves when the stream ends; rejects with ApiError, or an AbortError when `signal` fires.
 */
export async function streamGeneration({ mode, request: generation, signal, ...callbacks }) {
  const response = await request(generation.path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(generation.body),
    signal,
  });
  callbacks.onStart?.({ requestId: response.headers.get("X-Request-Id") });
  if (!response.body) throw new ApiError("The server sent no stream.", { kind: "protocol" });

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  const handle = (data) => handleEvent(data, mode, callbacks);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const data of parser.push(value)) {
        if (handle(data) === "done") return;
      }
    }
    for (const data of parser.flush()) {
      if (handle(data) === "done") return;
    }
  } catch (err) {
    if (err instanceof ApiError || err?.name === "AbortError" || signal?.aborted) throw err;
    throw new ApiError("The connection to the server was lost mid-reply.", { kind: "network" });
  } finally {
    reader.cancel().catch(() => {}); // no-op once the stream is closed; frees it otherwise
  }
}

function handleEvent(data, mode, { onDelta, onToolCall, onUsage, onFinish }) {
  if (data.trim() === "[DONE]") return "done";
  let chunk;
  try {
    chunk = JSON.parse(data);
  } catch {
    throw new ApiError("The server sent a malformed stream event.", { kind: "protocol" });
  }
  if (chunk.error) {
    const e = chunk.error;
    throw new ApiError(e.message || "The server reported an error.", {
      kind: "stream", type: e.type, code: e.code, param: e.param,
    });
  }
  if (chunk.usage) onUsage?.(chunk.usage);
  for (const choice of chunk.choices || []) {
    const text = mode === "completion" ? choice.text : choice.delta?.content;
    if (text) onDelta?.(text);
    // Streamed calls come as fragments in delta.tool_calls; a whole message may carry them too.
    const calls = choice.delta?.tool_calls ?? choice.message?.tool_calls ?? [];
    calls.forEach((call, i) => onToolCall?.({ index: call.index ?? i, ...call }));
    if (choice.finish_reason) onFinish?.(choice.finish_reason);
  }
  return "more";
}

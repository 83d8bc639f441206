// app.js: wires the chat page together: model picker, settings, conversations, sending,
// streaming into the open conversation, Stop, and the API-key prompt on 401.

import { ApiError, listModels, streamGeneration } from "./api.js";
import { initApiKeyDialog, withAuth } from "./auth.js";
import { ConversationStore, loadSettings, saveSettings } from "./store.js";
import {
  createMessageView, modelOptionLabel, renderConversationList, renderEmptyState,
  renderModelBadges,
} from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), openSidebar: $("open-sidebar"),
  closeSidebar: $("close-sidebar"), newChat: $("new-chat"), list: $("conversation-list"),
  model: $("model-select"), mode: $("mode-select"),
  badges: $("model-badges"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  system: $("system-prompt"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), banner: $("banner"),
  messages: $("messages"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"),
};

const SAVE_EVERY_MS = 1000;
const REFRESH_UNAVAILABLE_MS = 5000;
const store = new ConversationStore();
const settings = loadSettings();
let models = [];
let refreshTimer = null;
/** The generation in flight: {conversation, message, view, controller} or null. */
let active = null;

// ---- models -------------------------------------------------------------------------------

function isGenerative(model) {
  const caps = model.capabilities || [];
  return model.kind !== "embedding" && (caps.includes("chat") || caps.includes("completions"));
}

function selectedModel() {
  return models.find((m) => m.id === ui.model.value && isGenerative(m)) ?? null;
}

async function loadModels() {
  try {
    models = await withAuth(() => listModels(), "The server needs an API key to list models.");
  } catch (err) {
    showBanner(err instanceof ApiError ? err.message : String(err), loadModels);
    ui.app.dataset.state = "error";
    return;
  }
  hideBanner();
  fillModelSelect();
  ui.app.dataset.state = "ready";
  // A model still loading (or too busy to answer) is listed as "unavailable": look again soon.
  clearTimeout(refreshTimer);
  if (models.some((m) => m.status === "unavailable")) {
    refreshTimer = setTimeout(loadModels, REFRESH_UNAVAILABLE_MS);
  }
}

function fillModelSelect() {
  ui.model.replaceChildren();
  for (const model of models) {
    const option = new Option(modelOptionLabel(model), model.id);
    option.disabled = !isGenerative(model);
    option.dataset.kind = model.kind;
    ui.model.append(option);
  }
  const usable = models.filter(isGenerative);
  if (!usable.length) {
    ui.model.append(new Option("No chat-capable model", "", true, true));
    showBanner("The server lists no model that can chat or complete text.");
  }
  const wanted = usable.find((m) => m.id === settings.model) ?? usable[0];
  ui.model.value = wanted ? wanted.id : "";
  ui.model.disabled = !usable.length;
  onModelChanged({ keepMode: true });
}

function onModelChanged({ keepMode = false } = {}) {
  const model = selectedModel();
  renderModelBadges(ui.badges, model);
  const caps = model?.capabilities || [];
  const modes = { chat: caps.includes("chat"), completion: caps.includes("completions") };
  for (const option of ui.mode.options) option.disabled = !modes[option.value];
  let mode = keepMode ? settings.mode : (model?.kind === "completion" ? "completion" : "chat");
  if (!modes[mode]) mode = modes.chat ? "chat" : "completion";
  ui.mode.value = mode;
  ui.mode.disabled = !model || !(modes.chat && modes.completion);
  settings.model = model?.id ?? settings.model;
  settings.mode = mode;
  saveSettings(settings);
  if (!store.current()?.messages.length) renderMessages();
}

// ---- settings -----------------------------------------------------------------------------

function initSettings() {
  ui.system.value = settings.systemPrompt;
  ui.temperature.value = String(settings.temperature);
  ui.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
  ui.maxTokens.value = String(settings.maxTokens);
  ui.system.addEventListener("input", () => {
    settings.systemPrompt = ui.system.value;
    saveSettings(settings);
  });
  ui.temperature.addEventListener("input", () => {
    settings.temperature = Number(ui.temperature.value);
    ui.temperatureValue.textContent = settings.temperature.toFixed(2);
    saveSettings(settings);
  });
  ui.maxTokens.addEventListener("change", () => {
    const value = Math.round(Number(ui.maxTokens.value));
    settings.maxTokens = Number.isFinite(value) && value >= 1 ? value : 256;
    ui.maxTokens.value = String(settings.maxTokens);
    saveSettings(settings);
  });
  ui.settingsToggle.addEventListener("click", () => {
    const open = ui.settings.hidden;
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  });
  ui.mode.addEventListener("change", () => {
    settings.mode = ui.mode.value;
    saveSettings(settings);
  });
  ui.model.addEventListener("change", () => onModelChanged());
}

// ---- conversations ------------------------------------------------------------------------

function renderSidebar() {
  renderConversationList(ui.list, store.list(), store.currentId, {
    onSelect: (id) => { store.select(id); renderAll(); closeSidebar(); },
    onDelete: deleteConversation,
  });
}

function deleteConversation(id) {
  const conversation = store.get(id);
  if (!conversation) return;
  if (conversation.messages.length && !confirm(`Delete "${conversation.title}"?`)) return;
  if (active?.conversation === conversation) active.controller.abort();
  store.remove(id);
  renderAll();
}

function renderMessages() {
  const conversation = store.current();
  if (!conversation || !conversation.messages.length) {
    renderEmptyState(ui.messages, selectedModel()?.id);
    return;
  }
  const lastAssistant = conversation.messages.findLast((m) => m.role === "assistant");
  ui.messages.replaceChildren(...conversation.messages.map((message) => {
    if (active?.message === message) return active.view.root;
    const canRegenerate = message === lastAssistant && !active;
    return createMessageView(message, canRegenerate ? { onRegenerate: regenerate } : null).root;
  }));
  scrollToBottom(true);
}

function renderAll() {
  renderSidebar();
  renderMessages();
}

// ---- sending ------------------------------------------------------------------------------

function buildRequest(conversation, model, mode) {
  const history = conversation.messages.filter(
    (m) => (m.role === "user" || m.role === "assistant") && m.content);
  const common = { model: model.id, temperature: settings.temperature,
    max_tokens: settings.maxTokens };
  if (mode === "completion") {
    return { ...common, prompt: completionPrompt(history), stop: ["\nUser:"] };
  }
  const messages = history.map((m) => ({ role: m.role, content: m.content }));
  if (settings.systemPrompt.trim()) {
    messages.unshift({ role: "system", content: settings.systemPrompt.trim() });
  }
  return { ...common, messages };
}

/** A base model gets the conversation as a plain transcript ending in "Assistant:". */
function completionPrompt(history) {
  const lines = [];
  if (settings.systemPrompt.trim()) lines.push(settings.systemPrompt.trim(), "");
  for (const m of history) lines.push(`${m.role === "user" ? "User" : "Assistant"}: ${m.content}`);
  lines.push("Assistant:");
  return lines.join("\n");
}

async function send() {
  const text = ui.prompt.value.trim();
  if (!text || active) return;
  const model = selectedModel();
  if (!model) {
    showBanner("Pick a model that can chat or complete text first.");
    return;
  }
  const conversation = store.current() ?? store.create();
  ui.prompt.value = "";
  autoGrow();
  store.append(conversation, { role: "user", content: text, createdAt: Date.now() });
  await generate(conversation, model, ui.mode.value);
}

async function regenerate(message) {
  const conversation = store.current();
  const model = selectedModel();
  if (active || !conversation || !model) return;
  const index = conversation.messages.indexOf(message);
  if (index < 0) return;
  conversation.messages.splice(index, 1);
  store.touch(conversation);
  await generate(conversation, model, ui.mode.value);
}

async function generate(conversation, model, mode) {
  const message = { role: "assistant", content: "", model: model.id, mode, status: "streaming",
    createdAt: Date.now(), metrics: {} };
  store.append(conversation, message);
  const controller = new AbortController();
  active = { conversation, message, controller, view: createMessageView(message, null) };
  setBusy(true);
  renderAll();
  try {
    await withAuth(() => runStream(conversation, model, mode, message, controller),
      "The server needs an API key to generate.", () => resetMessage(message));
    message.status = "done";
  } catch (err) {
    if (err?.name === "AbortError" || controller.signal.aborted) message.status = "stopped";
    else {
      message.status = "error";
      message.error = err instanceof ApiError ? err.message : `Unexpected error: ${err}`;
    }
  } finally {
    finishMetrics(message);
    active.view.update(message);
    active = null;
    store.touch(conversation);
    setBusy(false);
    renderAll();
  }
}

function resetMessage(message) {
  Object.assign(message, { content: "", error: null, metrics: {}, status: "streaming" });
}

async function runStream(conversation, model, mode, message, controller) {
  const started = performance.now();
  const timing = message.timing = { started, firstToken: null, last: null, deltas: 0 };
  let scheduled = false;
  let savedAt = started;
  const paint = () => {
    scheduled = false;
    if (active?.message === message) active.view.update(message);
    scrollToBottom();
    if (performance.now() - savedAt > SAVE_EVERY_MS) {
      savedAt = performance.now();
      store.save(); // a reload mid-reply keeps what has arrived so far
    }
  };
  await streamGeneration({
    mode, body: buildRequest(conversation, model, mode), signal: controller.signal,
    onStart: ({ requestId }) => {
      message.requestId = requestId;
      ui.app.dataset.lastRequestId = requestId ?? "";
      paint();
    },
    onDelta: (text) => {
      const now = performance.now();
      timing.firstToken ??= now;
      timing.last = now;
      timing.deltas += 1;
      message.content += text;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(paint);
      }
    },
    onUsage: (usage) => { message.usage = usage; },
    onFinish: (reason) => { message.finishReason = reason; },
  });
}

function finishMetrics(message) {
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

function stop() {
  active?.controller.abort();
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.app.dataset.busy = String(busy);
  // Refocus for the next message, except on touch screens where it pops the keyboard up.
  if (!busy && matchMedia("(pointer: fine)").matches) ui.prompt.focus();
}

// ---- small UI helpers ---------------------------------------------------------------------

function showBanner(text, retry = null) {
  ui.banner.replaceChildren(document.createTextNode(text));
  if (retry) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "btn btn-ghost";
    button.textContent = "Retry";
    button.addEventListener("click", retry);
    ui.banner.append(" ", button);
  }
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
  ui.banner.replaceChildren();
}

function scrollToBottom(force = false) {
  const box = ui.messages;
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (force || nearBottom) box.scrollTop = box.scrollHeight;
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}

function openSidebar() {
  ui.app.classList.add("sidebar-open");
  ui.scrim.hidden = false;
  ui.openSidebar.setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  ui.app.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.openSidebar.setAttribute("aria-expanded", "false");
}

function initComposer() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", autoGrow);
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", () => {
    const current = store.current();
    if (!current || current.messages.length) store.create();
    renderAll();
    closeSidebar();
    ui.prompt.focus();
  });
  ui.openSidebar.addEventListener("click", openSidebar);
  ui.closeSidebar.addEventListener("click", closeSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && active) stop();
  });
}

initSettings();
initApiKeyDialog({ onNewKey: () => { if (ui.app.dataset.state === "error") loadModels(); } });
initComposer();
renderAll();
loadModels();

// app.js: wires the chat page together: model picker and status, settings, compare mode,
// conversations and their branches, sending (one model or several side by side), Stop, and the
// API-key prompt on 401. Generations: generation.js; the tree: branches.js.

import { ApiError, listModels, loadModel } from "./api.js";
import { initApiKeyDialog, withAuth } from "./auth.js";
import {
  activePath, branchPosition, historyTo, selectBranch, selectGroup, tailId,
} from "./branches.js";
import { MAX_COMPARE, MIN_COMPARE, createCompareRow, renderComparePicker } from "./compare.js";
import { buildRequest, finishMetrics, modeFor, streamInto } from "./generation.js";
import { initInspector, openInspector } from "./inspector.js";
import {
  autoGrow, closeSidebar, hideBanner, openSidebar, scrollToBottom, showBanner,
} from "./layout.js";
import { requestOptions } from "./options.js";
import { ConversationStore, loadSettings, saveSettings } from "./store.js";
import { initTransfer } from "./transfer_ui.js";
import {
  createMessageView, modelOptionLabel, modelStatus, renderConversationList, renderEmptyState,
  renderModelBadges,
} from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), openSidebar: $("open-sidebar"),
  closeSidebar: $("close-sidebar"), newChat: $("new-chat"), list: $("conversation-list"),
  search: $("conversation-search"), model: $("model-select"), mode: $("mode-select"),
  badges: $("model-badges"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  compareToggle: $("compare-toggle"), comparePanel: $("compare-panel"),
  system: $("system-prompt"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  schema: $("schema-input"), tools: $("tools-input"),
  messages: $("messages"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"),
};

const SAVE_EVERY_MS = 1000;
const REFRESH_MS = 5000;
const REFRESH_AFTER_LOAD_MS = 1500;
const store = new ConversationStore();
const settings = loadSettings();
let models = [];
let refreshTimer = null;
/** Generations in flight, by message id: {conversation, message, view, controller}. */
const generations = new Map();
let savedAt = 0;

// ---- models -------------------------------------------------------------------------------

function isGenerative(model) {
  const caps = model.capabilities || [];
  return model.kind !== "embedding" && (caps.includes("chat") || caps.includes("completions"));
}

const generativeModels = () => models.filter(isGenerative);
const modelById = (id) => generativeModels().find((m) => m.id === id) ?? null;
const selectedModel = () => modelById(ui.model.value);

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
  renderComparePanel();
  ui.app.dataset.state = "ready";
  // A model still starting is listed as loading (or unavailable): look again soon.
  const isSettling = models.some((m) => ["loading", "unavailable"].includes(modelStatus(m)));
  scheduleRefresh(isSettling ? REFRESH_MS : null);
}

function scheduleRefresh(delayMs) {
  clearTimeout(refreshTimer);
  if (delayMs != null) refreshTimer = setTimeout(loadModels, delayMs);
}

/** An idle model was picked: ask the server to load it now, and show its status as it goes. */
async function wakeIfIdle(model) {
  if (modelStatus(model) !== "idle") return;
  await loadModel(model.id); // failures are fine: the first request wakes it as well
  scheduleRefresh(REFRESH_AFTER_LOAD_MS);
}

function fillModelSelect() {
  const current = ui.model.value || settings.model;
  ui.model.replaceChildren();
  for (const model of models) {
    const option = new Option(modelOptionLabel(model), model.id);
    option.disabled = !isGenerative(model);
    option.dataset.kind = model.kind;
    option.dataset.status = modelStatus(model);
    ui.model.append(option);
  }
  const usable = generativeModels();
  if (!usable.length) {
    ui.model.append(new Option("No chat-capable model", "", true, true));
    showBanner("The server lists no model that can chat or complete text.");
  }
  const wanted = usable.find((m) => m.id === current) ?? usable[0];
  ui.model.value = wanted ? wanted.id : "";
  ui.model.disabled = !usable.length;
  onModelChanged({ keepMode: true });
}

function onModelChanged({ keepMode = false, isUserPick = false } = {}) {
  const model = selectedModel();
  renderModelBadges(ui.badges, model);
  const caps = model?.capabilities || [];
  const modes = { chat: caps.includes("chat"), completion: caps.includes("completions") };
  for (const option of ui.mode.options) option.disabled = !modes[option.value];
  let mode = keepMode ? settings.mode : (model ? modeFor(model) : "chat");
  if (!modes[mode]) mode = modes.chat ? "chat" : "completion";
  ui.mode.value = mode;
  ui.mode.disabled = !model || !(modes.chat && modes.completion);
  settings.model = model?.id ?? settings.model;
  settings.mode = mode;
  saveSettings(settings);
  if (isUserPick && model) wakeIfIdle(model);
  if (!store.current()?.messages.length) renderMessages();
}

// ---- settings and compare mode ------------------------------------------------------------

function initSettings() {
  ui.system.value = settings.systemPrompt;
  ui.temperature.value = String(settings.temperature);
  ui.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
  ui.maxTokens.value = String(settings.maxTokens);
  ui.schema.value = settings.schemaText;
  ui.tools.value = settings.toolsText;
  const remember = (key, read) => () => {
    settings[key] = read();
    saveSettings(settings);
  };
  ui.system.addEventListener("input", remember("systemPrompt", () => ui.system.value));
  ui.schema.addEventListener("input", remember("schemaText", () => ui.schema.value));
  ui.tools.addEventListener("input", remember("toolsText", () => ui.tools.value));
  ui.temperature.addEventListener("input", () => {
    remember("temperature", () => Number(ui.temperature.value))();
    ui.temperatureValue.textContent = settings.temperature.toFixed(2);
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
  ui.mode.addEventListener("change", remember("mode", () => ui.mode.value));
  ui.model.addEventListener("change", () => onModelChanged({ isUserPick: true }));
  ui.compareToggle.addEventListener("click", () => setCompare(!settings.isCompare));
  setCompare(settings.isCompare);
}

function setCompare(isOn) {
  settings.isCompare = isOn;
  saveSettings(settings);
  ui.compareToggle.setAttribute("aria-pressed", String(isOn));
  ui.comparePanel.hidden = !isOn;
  ui.app.dataset.compare = String(isOn);
  ui.prompt.placeholder = isOn ? "Send one prompt to every ticked model"
    : "Send a message (Enter to send, Shift+Enter for a new line)";
}

function renderComparePanel() {
  const ids = new Set(generativeModels().map((m) => m.id));
  settings.compareModels = settings.compareModels.filter((id) => ids.has(id));
  renderComparePicker(ui.comparePanel, generativeModels(), settings.compareModels,
    (chosen, changedId) => {
      settings.compareModels = chosen;
      saveSettings(settings);
      const model = modelById(changedId);
      if (model && chosen.includes(changedId)) wakeIfIdle(model);
    });
}

// ---- conversations ------------------------------------------------------------------------

function renderSidebar() {
  const query = ui.search.value;
  renderConversationList(ui.list, store.list(query), store.currentId, {
    isFiltered: Boolean(query.trim()),
    onSelect: (id) => { store.select(id); renderAll(); closeSidebar(); },
    onDelete: deleteConversation,
  });
}

function deleteConversation(id) {
  const conversation = store.get(id);
  if (!conversation) return;
  if (conversation.messages.length && !confirm(`Delete "${conversation.title}"?`)) return;
  for (const g of generations.values()) if (g.conversation === conversation) g.controller.abort();
  store.remove(id);
  renderAll();
}

function renderMessages() {
  const conversation = store.current();
  if (!conversation || !conversation.messages.length) {
    renderEmptyState(ui.messages, selectedModel()?.id);
    return;
  }
  const { messages, group } = activePath(conversation);
  const nodes = messages.map((message) => viewFor(conversation, message, false).root);
  if (group) {
    nodes.push(createCompareRow(group.map((message) => ({ message,
      root: viewFor(conversation, message, true).root }))));
  }
  ui.messages.replaceChildren(...nodes);
  scrollToBottom(true);
}

/** The live view of a reply being generated, or a fresh one with the actions that fit. */
function viewFor(conversation, message, isColumn) {
  const live = generations.get(message.id);
  if (live) return live.view;
  const isIdle = generations.size === 0;
  const actions = {
    branch: branchPosition(conversation, message),
    onBranch: (sibling) => showBranch(conversation, sibling),
    onInspect: message.request ? () => openInspector(message.request) : null,
    onEdit: isIdle && message.role === "user" ? editMessage : null,
    onRegenerate: isIdle && !isColumn ? regenerate : null,
    onContinue: isColumn && isIdle ? continueWith : null,
  };
  if (isColumn) actions.branch = null; // the columns are the branches
  return createMessageView(message, actions);
}

function showBranch(conversation, message) {
  selectBranch(conversation, message);
  store.touch(conversation);
  renderAll();
}

function renderAll() {
  renderSidebar();
  renderMessages();
}

// ---- sending ------------------------------------------------------------------------------

/** The models a new prompt goes to, or null (with a banner saying why). */
function targetModels() {
  if (settings.isCompare) {
    const chosen = settings.compareModels.map(modelById).filter(Boolean);
    if (chosen.length >= MIN_COMPARE && chosen.length <= MAX_COMPARE) return chosen;
    showBanner(`Tick ${MIN_COMPARE} to ${MAX_COMPARE} models to compare.`);
    return null;
  }
  const model = selectedModel();
  if (!model) showBanner("Pick a model that can chat or complete text first.");
  return model ? [model] : null;
}

/** Request fields from the schema / tools boxes, or null (with a banner) when they are bad. */
function extraFields() {
  const result = requestOptions(settings);
  if (result.error) {
    showBanner(result.error);
    return null;
  }
  return result.fields;
}

async function send() {
  const text = ui.prompt.value.trim();
  if (!text || generations.size) return;
  const targets = targetModels();
  const fields = targets && extraFields();
  if (!fields) return;
  hideBanner();
  const conversation = store.current() ?? store.create();
  ui.prompt.value = "";
  autoGrow();
  const prompt = store.append(conversation,
    { role: "user", content: text, createdAt: Date.now() }, tailId(conversation));
  await answer(conversation, prompt, targets, fields);
}

/** An edited prompt is a new sibling of the old one: both stay as branches. */
async function editMessage(message, text) {
  const conversation = store.current();
  const targets = targetModels();
  const fields = targets && extraFields();
  if (!conversation || generations.size || !fields) return;
  const prompt = store.append(conversation,
    { role: "user", content: text, createdAt: Date.now() }, message.parentId);
  await answer(conversation, prompt, targets, fields);
}

/** A new reply beside the old one, from the model now picked. */
async function regenerate(message) {
  const conversation = store.current();
  const model = selectedModel();
  const fields = extraFields();
  if (generations.size || !conversation || !model || !fields) return;
  await generate(conversation, message.parentId, model, ui.mode.value, fields);
}

/** One reply, or a compare turn of several side by side when more than one model is asked. */
async function answer(conversation, prompt, targets, fields) {
  if (targets.length === 1) {
    await generate(conversation, prompt.id, targets[0], ui.mode.value, fields);
    return;
  }
  const compareId = `cmp-${Date.now().toString(36)}`;
  const runs = targets.map((model) =>
    generate(conversation, prompt.id, model, modeFor(model), fields, compareId));
  selectGroup(conversation, prompt.id, compareId);
  store.touch(conversation);
  renderAll();
  await Promise.all(runs);
}

/** Carries a compare column on as the conversation, with its model picked. */
function continueWith(message) {
  const conversation = store.current();
  selectBranch(conversation, message);
  store.touch(conversation);
  setCompare(false);
  if (modelById(message.model)) {
    ui.model.value = message.model;
    settings.mode = message.mode ?? settings.mode;
    onModelChanged({ keepMode: true });
  }
  renderAll();
}

async function generate(conversation, parentId, model, mode, fields, compareId = null) {
  const parent = conversation.messages.find((m) => m.id === parentId);
  const history = parent ? historyTo(conversation, parent) : [];
  const message = { role: "assistant", content: "", model: model.id, mode, status: "streaming",
    createdAt: Date.now(), metrics: {},
    request: buildRequest(history, model, mode, settings, mode === "chat" ? fields : {}) };
  if (compareId) message.compareId = compareId;
  store.append(conversation, message, parentId);
  const controller = new AbortController();
  const view = createMessageView(message, compareId ? { onStop: () => controller.abort() } : {});
  const run = { conversation, message, controller, view };
  generations.set(message.id, run);
  setBusy(true);
  if (!compareId) renderAll();
  try {
    await withAuth(() => streamInto(message, controller.signal, paintSoon(run)),
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
    view.update(message);
    generations.delete(message.id);
    store.touch(conversation);
    setBusy(generations.size > 0);
    renderAll();
  }
}

/** Repaints a reply at most once per animation frame, and saves now and then. */
function paintSoon(run) {
  let isScheduled = false;
  const paint = () => {
    isScheduled = false;
    run.view.update(run.message);
    scrollToBottom();
    if (performance.now() - savedAt > SAVE_EVERY_MS) {
      savedAt = performance.now();
      store.save(); // a reload mid-reply keeps what has arrived so far
    }
  };
  return () => {
    if (run.message.requestId) ui.app.dataset.lastRequestId = run.message.requestId;
    if (!isScheduled) {
      isScheduled = true;
      requestAnimationFrame(paint);
    }
  };
}

function resetMessage(message) {
  Object.assign(message, { content: "", error: null, metrics: {}, status: "streaming" });
  delete message.toolCalls;
}

function stopAll() {
  for (const run of generations.values()) run.controller.abort();
}

function setBusy(isBusy) {
  ui.send.hidden = isBusy;
  ui.stop.hidden = !isBusy;
  ui.app.dataset.busy = String(isBusy);
  // Refocus for the next message, except on touch screens where it pops the keyboard up.
  if (!isBusy && matchMedia("(pointer: fine)").matches) ui.prompt.focus();
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
  ui.stop.addEventListener("click", stopAll);
  ui.search.addEventListener("input", renderSidebar);
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
    if (event.key === "Escape" && generations.size && !document.querySelector("dialog[open]")) {
      stopAll();
    }
  });
}

initSettings();
initApiKeyDialog({ onNewKey: () => { if (ui.app.dataset.state === "error") loadModels(); } });
initInspector();
initTransfer(store, { onImported: renderAll, onError: showBanner, onDone: hideBanner });
initComposer();
renderAll();
loadModels();

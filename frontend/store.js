// store.js: conversations, settings and the API key, kept in localStorage so they survive
// a reload. Pure data; no DOM.

const KEYS = {
  conversations: "serve-app.conversations.v1",
  currentId: "serve-app.current-conversation",
  settings: "serve-app.settings.v1",
  apiKey: "serve-app.api-key",
};

export const DEFAULT_SETTINGS = Object.freeze({
  model: null,
  mode: "chat",
  systemPrompt: "",
  temperature: 0.7,
  maxTokens: 256,
});

const TITLE_LENGTH = 48;

function readJson(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function writeJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // quota exceeded or storage disabled: keep working in memory
  }
}

function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

/** Conversations: [{id, title, createdAt, updatedAt, messages: [{role, content, ...}]}]. */
export class ConversationStore {
  constructor() {
    const saved = readJson(KEYS.conversations, []);
    this.conversations = Array.isArray(saved) ? saved.filter(isConversation) : [];
    for (const conversation of this.conversations) settleInterrupted(conversation);
    this.currentId = localStorage.getItem(KEYS.currentId);
    if (!this.get(this.currentId)) this.currentId = this.conversations[0]?.id ?? null;
  }

  /** Newest first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) ?? null;
  }

  current() {
    return this.get(this.currentId);
  }

  create() {
    const now = Date.now();
    const conversation = { id: newId(), title: "New chat", createdAt: now, updatedAt: now,
      messages: [] };
    this.conversations.push(conversation);
    this.select(conversation.id);
    this.save();
    return conversation;
  }

  select(id) {
    this.currentId = id;
    if (id) localStorage.setItem(KEYS.currentId, id);
    else localStorage.removeItem(KEYS.currentId);
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.select(this.list()[0]?.id ?? null);
    this.save();
  }

  /** Appends a message to a conversation; the first user message names it. */
  append(conversation, message) {
    conversation.messages.push(message);
    if (conversation.title === "New chat" && message.role === "user") {
      conversation.title = makeTitle(message.content);
    }
    this.touch(conversation);
    return message;
  }

  touch(conversation) {
    conversation.updatedAt = Date.now();
    this.save();
  }

  save() {
    return writeJson(KEYS.conversations, this.conversations);
  }
}

function isConversation(value) {
  return value && typeof value.id === "string" && Array.isArray(value.messages);
}

/** A reply that was streaming when the page went away ends as "stopped". */
function settleInterrupted(conversation) {
  for (const message of conversation.messages) {
    if (message.status === "streaming") {
      message.status = "stopped";
      delete message.timing;
    }
  }
}

function makeTitle(text) {
  const line = text.trim().split(/\s+/).join(" ");
  return line.length > TITLE_LENGTH ? `${line.slice(0, TITLE_LENGTH - 1)}…` : line || "New chat";
}

export function loadSettings() {
  const saved = readJson(KEYS.settings, {});
  return { ...DEFAULT_SETTINGS, ...(saved && typeof saved === "object" ? saved : {}) };
}

export function saveSettings(settings) {
  writeJson(KEYS.settings, settings);
}

export function loadApiKey() {
  return localStorage.getItem(KEYS.apiKey) || null;
}

export function saveApiKey(key) {
  if (key) localStorage.setItem(KEYS.apiKey, key);
  else localStorage.removeItem(KEYS.apiKey);
}

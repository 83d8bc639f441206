// store.js: conversations, settings and the API key, kept in localStorage so they survive
// a reload. Pure data; no DOM. The tree inside a conversation is branches.js's concern.

import { linkFlatMessages, selectBranch } from "./branches.js";
import { normaliseConversation } from "./transfer.js";

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
  isCompare: false,
  compareModels: [],
  schemaText: "",
  toolsText: "",
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

/**
 * Conversations: [{id, title, createdAt, updatedAt, selected, messages: [{id, parentId, role,
 * content, ...}]}]; messages holds every branch (see branches.js).
 */
export class ConversationStore {
  constructor() {
    const saved = readJson(KEYS.conversations, []);
    this.conversations = (Array.isArray(saved) ? saved : []).map(normaliseConversation)
      .filter(Boolean);
    for (const conversation of this.conversations) {
      linkFlatMessages(conversation.messages, newId);
      settleInterrupted(conversation);
    }
    this.currentId = localStorage.getItem(KEYS.currentId);
    if (!this.get(this.currentId)) this.currentId = this.conversations[0]?.id ?? null;
  }

  /** Newest first; only those whose title contains `query` (any case) when one is given. */
  list(query = "") {
    const needle = query.trim().toLowerCase();
    return this.conversations
      .filter((c) => !needle || c.title.toLowerCase().includes(needle))
      .sort((a, b) => b.updatedAt - a.updatedAt);
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

  /**
   * Adds a message under `parentId` (null: a first message) and shows its branch; the first
   * user message names the conversation.
   */
  append(conversation, message, parentId) {
    message.id = newId();
    message.parentId = parentId ?? null;
    conversation.messages.push(message);
    selectBranch(conversation, message);
    if (conversation.title === "New chat" && message.role === "user") {
      conversation.title = makeTitle(message.content);
    }
    this.touch(conversation);
    return message;
  }

  /** Adds checked conversations (transfer.js); an id already here gets a new one. */
  importConversations(conversations) {
    for (const conversation of conversations) {
      if (this.get(conversation.id)) conversation.id = newId();
      linkFlatMessages(conversation.messages, newId);
      settleInterrupted(conversation);
      this.conversations.push(conversation);
    }
    if (conversations.length) this.select(conversations[0].id);
    this.save();
  }

  touch(conversation) {
    conversation.updatedAt = Date.now();
    this.save();
  }

  save() {
    return writeJson(KEYS.conversations, this.conversations);
  }
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

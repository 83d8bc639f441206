// transfer_ui.js: the sidebar's Export and Import buttons: a JSON file download of every
// conversation, and reading such a file back in (checked by transfer.js first).

import { exportConversations, normaliseConversation, parseImport } from "./transfer.js";

const $ = (id) => document.getElementById(id);

function download(filename, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function exportFilename() {
  return `serve-app-conversations-${new Date().toISOString().slice(0, 10)}.json`;
}

/** handlers: onImported() after a good file, onError(text), onDone() to clear a shown error. */
export function initTransfer(store, { onImported, onError, onDone }) {
  const input = $("import-file");
  $("export-btn").addEventListener("click", () => {
    const conversations = store.list().map(normaliseConversation).filter(Boolean);
    download(exportFilename(), exportConversations(conversations));
  });
  $("import-btn").addEventListener("click", () => input.click());
  input.addEventListener("change", async () => {
    const file = input.files?.[0];
    input.value = ""; // the same file can be picked again
    if (!file) return;
    try {
      store.importConversations(parseImport(await file.text()));
      onDone();
      onImported();
    } catch (err) {
      onError(`Import failed: ${err.message}`);
    }
  });
}

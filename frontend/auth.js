// auth.js: the optional API key. A 401 from the server opens a dialog asking for a key; the
// key is kept in localStorage (store.js) and sent as `Authorization: Bearer <key>` (api.js).

import { ApiError, setApiKeyProvider } from "./api.js";
import { loadApiKey, saveApiKey } from "./store.js";

const $ = (id) => document.getElementById(id);
let pending = null; // the open dialog's promise, shared by concurrent 401s

setApiKeyProvider(loadApiKey);

/**
 * Runs `action`; on a 401 asks for an API key and tries again until it works or the user
 * cancels (then the 401 error is thrown). `beforeRetry` resets state between tries.
 */
export async function withAuth(action, reason, beforeRetry = null) {
  for (;;) {
    try {
      return await action();
    } catch (err) {
      if (!(err instanceof ApiError) || err.kind !== "auth") throw err;
      const key = await askForApiKey(`${reason} (${err.message})`);
      if (!key) throw err;
      beforeRetry?.();
    }
  }
}

/** Opens the key dialog; resolves with the saved key, or null when cancelled. */
export function askForApiKey(reason) {
  if (pending) return pending;
  const dialog = $("api-key-dialog");
  const input = $("api-key-input");
  $("api-key-reason").textContent = reason;
  input.value = loadApiKey() ?? "";
  pending = new Promise((resolve) => {
    const onClose = () => {
      dialog.removeEventListener("close", onClose);
      pending = null;
      const key = input.value.trim();
      if (dialog.returnValue === "save" && key) {
        saveApiKey(key);
        resolve(key);
      } else resolve(null);
    };
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return pending;
}

/** Wires the dialog's buttons and the sidebar's "API key" button. */
export function initApiKeyDialog({ onNewKey }) {
  const dialog = $("api-key-dialog");
  $("api-key-cancel").addEventListener("click", () => dialog.close(""));
  $("api-key-clear").addEventListener("click", () => {
    saveApiKey(null);
    $("api-key-input").value = "";
    dialog.close("");
  });
  $("api-key-btn").addEventListener("click", async () => {
    const key = await askForApiKey(loadApiKey() ? "Change or forget the stored API key."
      : "Set an API key to send with every request.");
    if (key) onNewKey(key);
  });
}

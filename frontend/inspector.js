// inspector.js: the request inspector dialog: a reply's exact request body as JSON and the same
// request as a curl command. The API key itself never goes into the command (it would land in
// the clipboard and on screen): it reads $SERVE_APP_API_KEY instead.

import { copyText } from "./render.js";
import { loadApiKey } from "./store.js";

const $ = (id) => document.getElementById(id);
const CURL_MAX_TIME_S = 300;

/** Single-quotes a word for a POSIX shell. */
export function shellQuote(text) {
  return `'${String(text).replace(/'/g, "'\\''")}'`;
}

/** `request` = {path, body} as sent; `origin` e.g. "http://127.0.0.1:8000". */
export function curlCommand(request, origin, hasApiKey) {
  const lines = [
    `curl -sS -N --max-time ${CURL_MAX_TIME_S} ${shellQuote(origin + request.path)}`,
    `  -H 'Content-Type: application/json'`,
  ];
  if (hasApiKey) lines.push(`  -H "Authorization: Bearer $SERVE_APP_API_KEY"`);
  lines.push(`  -d ${shellQuote(JSON.stringify(request.body))}`);
  return lines.join(" \\\n");
}

/** Opens the dialog for one reply's request. */
export function openInspector(request) {
  const body = JSON.stringify(request.body, null, 2);
  const curl = curlCommand(request, location.origin, Boolean(loadApiKey()));
  $("inspector-path").textContent = `POST ${request.path}`;
  $("inspector-body").textContent = body;
  $("inspector-curl").textContent = curl;
  $("inspector-key-note").hidden = !loadApiKey();
  $("inspector-dialog").showModal();
}

export function initInspector() {
  const dialog = $("inspector-dialog");
  $("inspector-close").addEventListener("click", () => dialog.close());
  $("inspector-copy-body").addEventListener("click", (event) =>
    copyText($("inspector-body").textContent, event.currentTarget));
  $("inspector-copy-curl").addEventListener("click", (event) =>
    copyText($("inspector-curl").textContent, event.currentTarget));
}

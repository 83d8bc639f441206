// layout.js: small page-wide DOM helpers: the error banner, scrolling the messages, the
// growing prompt box and the conversation drawer at phone width.

const $ = (id) => document.getElementById(id);

export function showBanner(text, retry = null) {
  const banner = $("banner");
  banner.replaceChildren(document.createTextNode(text));
  if (retry) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "btn btn-ghost";
    button.textContent = "Retry";
    button.addEventListener("click", retry);
    banner.append(" ", button);
  }
  banner.hidden = false;
}

export function hideBanner() {
  $("banner").hidden = true;
  $("banner").replaceChildren();
}

/** Follows new text only while the reader is near the bottom (or when forced). */
export function scrollToBottom(force = false) {
  const box = $("messages");
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (force || nearBottom) box.scrollTop = box.scrollHeight;
}

export function autoGrow() {
  const prompt = $("prompt");
  prompt.style.height = "auto";
  prompt.style.height = `${Math.min(prompt.scrollHeight, 200)}px`;
}

export function openSidebar() {
  $("app").classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("open-sidebar").setAttribute("aria-expanded", "true");
}

export function closeSidebar() {
  $("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
  $("open-sidebar").setAttribute("aria-expanded", "false");
}

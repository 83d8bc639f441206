// compare.js: compare mode's DOM: the panel where 2-4 models are ticked, and a compare turn's
// replies side by side in columns (each column is an ordinary message view).

import { el } from "./message_view.js";
import { modelStatus } from "./view.js";

export const MIN_COMPARE = 2;
export const MAX_COMPARE = 4;

/**
 * Fills the panel with one checkbox per usable model. `chosen` is the list of ticked ids;
 * onChange(ids) gets the new list. At most MAX_COMPARE can be ticked.
 */
export function renderComparePicker(container, models, chosen, onChange) {
  const boxes = models.map((model) => {
    const label = el("label", { className: "compare-choice" });
    const box = el("input", { type: "checkbox", value: model.id,
      "data-testid": "compare-model" });
    box.checked = chosen.includes(model.id);
    const status = modelStatus(model);
    label.append(box, ` ${model.id}`);
    if (status !== "ready") label.append(el("span", { className: "muted" }, ` (${status})`));
    return { box, label };
  });
  const sync = () => {
    const ids = boxes.filter((b) => b.box.checked).map((b) => b.box.value);
    for (const { box } of boxes) box.disabled = !box.checked && ids.length >= MAX_COMPARE;
    return ids;
  };
  for (const { box } of boxes) box.addEventListener("change", () => onChange(sync(), box.value));
  const hint = el("span", { className: "muted compare-hint" },
    `Pick ${MIN_COMPARE}–${MAX_COMPARE} models; one prompt goes to all of them at once.`);
  container.replaceChildren(hint, ...boxes.map((b) => b.label));
  sync();
}

/** A row of columns, one per reply view, in the order given. */
export function createCompareRow(views) {
  const row = el("div", { className: "compare-row", "data-testid": "compare-row",
    role: "group", "aria-label": "Replies side by side" });
  for (const { message, root } of views) {
    const column = el("div", { className: "compare-column", "data-testid": "compare-column",
      "data-model": message.model ?? "" });
    column.append(root);
    row.append(column);
  }
  return row;
}

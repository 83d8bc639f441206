// branches.js: a conversation as a tree of messages. Every message keeps its parentId; editing
// or regenerating adds a sibling, so earlier versions stay as branches. Pure data; no DOM.
//
// conversation.messages holds every node ever made (all branches); conversation.selected maps a
// parent's key to the chosen child's id, or to "group:<compareId>" for a compare turn whose
// replies are shown side by side.

const ROOT = "root";
const GROUP = "group:";

const keyOf = (parentId) => parentId ?? ROOT;

export function childrenOf(conversation, parentId) {
  return conversation.messages.filter((m) => (m.parentId ?? null) === (parentId ?? null));
}

export function siblingsOf(conversation, message) {
  return childrenOf(conversation, message.parentId);
}

/**
 * The messages on show, root first: follows each parent's selected child (the newest when none
 * is chosen). Ends early at a compare turn still shown as columns: `group` holds its replies.
 * @returns {{messages: object[], group: object[]|null}}
 */
export function activePath(conversation) {
  const messages = [];
  const seen = new Set(); // a damaged file must not make this loop forever
  let parentId = null;
  for (;;) {
    const kids = childrenOf(conversation, parentId).filter((m) => !seen.has(m));
    if (!kids.length) return { messages, group: null };
    const choice = conversation.selected?.[keyOf(parentId)];
    if (choice?.startsWith(GROUP)) {
      const group = kids.filter((m) => m.compareId === choice.slice(GROUP.length));
      if (group.length) return { messages, group };
    }
    const next = kids.find((m) => m.id === choice) ?? kids[kids.length - 1];
    messages.push(next);
    seen.add(next);
    parentId = next.id;
  }
}

/** Shows `message` (and the newest path below it) from now on. */
export function selectBranch(conversation, message) {
  conversation.selected ??= {};
  conversation.selected[keyOf(message.parentId)] = message.id;
}

/** Shows the replies of a compare turn side by side again. */
export function selectGroup(conversation, parentId, compareId) {
  conversation.selected ??= {};
  conversation.selected[keyOf(parentId)] = `${GROUP}${compareId}`;
}

/**
 * Where a new user message goes: after the last message on show. A compare turn still shown
 * as columns has no single reply to follow, so the new prompt branches beside its prompt.
 */
export function tailId(conversation) {
  const { messages, group } = activePath(conversation);
  const end = group ? messages.length - 1 : messages.length;
  return end > 0 ? messages[end - 1].id : null;
}

/** "2 / 3": this message's place among its siblings of the same role. */
export function branchPosition(conversation, message) {
  const siblings = siblingsOf(conversation, message);
  return { index: siblings.indexOf(message), count: siblings.length, siblings };
}

/** The messages from the root down to `message`, for a request's history. */
export function historyTo(conversation, message) {
  const byId = new Map(conversation.messages.map((m) => [m.id, m]));
  const chain = [];
  for (let node = message; node && !chain.includes(node); node = byId.get(node.parentId)) {
    chain.unshift(node);
  }
  return chain;
}

/** Old (v1) conversations were a flat list: link each message to the one before it. */
export function linkFlatMessages(messages, makeId) {
  let previous = null;
  for (const message of messages) {
    if (typeof message.id !== "string") {
      message.id = makeId();
      message.parentId = previous;
    }
    previous = message.id;
  }
}

// options.js: the structured-output and tools boxes -> request fields (response_format, tools),
// and reading a finished reply back as a parsed object. Pure data; no DOM.

const SCHEMA_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * Request fields from the boxes' text: {fields} or {error} naming what is wrong. Blank boxes
 * add nothing. A schema box may hold a bare JSON schema or {"name": ..., "schema": ...}.
 */
export function requestOptions({ schemaText, toolsText }) {
  const fields = {};
  if (schemaText.trim()) {
    const schema = parseJson(schemaText, "JSON schema");
    if (schema.error) return schema;
    if (!isObject(schema.value)) return { error: "The JSON schema must be a JSON object." };
    fields.response_format = { type: "json_schema", json_schema: schemaFormat(schema.value) };
  }
  if (toolsText.trim()) {
    const tools = parseJson(toolsText, "Tools");
    if (tools.error) return tools;
    if (!Array.isArray(tools.value) || !tools.value.every(isObject)) {
      return { error: "Tools must be a JSON array of tool objects." };
    }
    fields.tools = tools.value;
  }
  if (fields.tools && fields.response_format) {
    return { error: "Use either a JSON schema or tools, not both (the server refuses both)." };
  }
  return { fields };
}

function schemaFormat(value) {
  if (isObject(value.schema)) {
    const name = SCHEMA_NAME.test(value.name ?? "") ? value.name : "response";
    return { ...value, name };
  }
  const name = SCHEMA_NAME.test(value.title ?? "") ? value.title : "response";
  return { name, schema: value };
}

function parseJson(text, what) {
  try {
    return { value: JSON.parse(text) };
  } catch (err) {
    return { error: `${what} is not valid JSON: ${err.message}` };
  }
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** For a reply asked for with a JSON schema: {value} parsed, {error}, or null if not asked. */
export function parsedReply(message) {
  if (message.request?.body?.response_format?.type !== "json_schema") return null;
  if (message.status !== "done") return null;
  try {
    return { value: JSON.parse(message.content) };
  } catch (err) {
    return { error: `The reply is not valid JSON: ${err.message}` };
  }
}

/** Merges one streamed delta.tool_calls fragment into the message's list of calls. */
export function addToolCallFragment(message, fragment) {
  message.toolCalls ??= [];
  const call = message.toolCalls[fragment.index] ??= { id: "", type: "function",
    function: { name: "", arguments: "" } };
  if (fragment.id) call.id = fragment.id;
  const fn = fragment.function ?? {};
  if (typeof fn.name === "string") call.function.name += fn.name;
  if (typeof fn.arguments === "string") call.function.arguments += fn.arguments;
}

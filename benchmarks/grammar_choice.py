"""Which grammar engine for structured outputs: llguidance vs xgrammar, measured on CPU.

Both libraries are driven the way the engine would drive them, on the real SmolLM2-135M-Instruct
tokenizer (logits vocab from config.json), interleaved (A then B each round, median of rounds):

- tokenizer-info construction (once per model);
- compile of a typical JSON schema (cold, then the identical schema again), json_object, a regex,
  a choice and a small lark grammar; also compile + first mask (llguidance compiles lazily);
- mask fill for a batch of 16 rows, each its own matcher advancing through its own valid JSON
  document token by token (sequential per-row fill and each library's batched/threaded fill),
  consume time, and applying the bitmask to [16, vocab] float32 logits;
- correctness: the mask allows every next token of the valid documents and EOS at their end,
  the matcher accepts; greedy decoding from random logits under the mask validates;
- how each reports a schema it cannot compile, and whether compile/mask work can be bounded.

    .venv/bin/python benchmarks/grammar_choice.py --rounds 5 --out results/grammar_choice.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import glob
import importlib.metadata
import json
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch
from transformers import AutoTokenizer

BATCH = 16

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"\d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
NAMES = ["Ada Lovelace", "Grace", "Alan Turing", "Émile Zola", "李雷", "O'Brien", "Zed", "Kim"]
CITIES = ["Paris", "New York", "Tokyo", "Zürich", "Lagos", "São Paulo", "Oslo", "Lima"]
BAD_SPECS: list[tuple[str, str, Any]] = [
    ("unknown type", "json", {"type": "strnig"}),
    ("dangling $ref", "json", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
    ("lookahead pattern", "json", {"type": "string", "pattern": "^(?=a)abc$"}),
    ("unclosed regex group", "regex", "(abc"),
    ("lark undefined rule", "lark", "start: foo\n"),
]
PATHOLOGICAL_REGEX = "(a|b)*a(a|b){24}"


def instances() -> list[dict[str, Any]]:
    docs = []
    for i in range(BATCH):
        doc: dict[str, Any] = {"name": NAMES[i % len(NAMES)], "age": 20 + 7 * i}
        if i % 2:
            doc["email"] = f"user{i}@example.com"
        doc["role"] = ["admin", "user", "guest"][i % 3]
        doc["tags"] = [f"tag{j}" for j in range(i % 4)]
        doc["address"] = {"city": CITIES[i % len(CITIES)], "zip": f"{10000 + 37 * i}"}
        if i % 3 == 0:
            doc["address"] = {"street": f"{i} Main St", **doc["address"]}
        if i % 4 == 1:
            doc["active"] = bool(i % 8 == 1)
        jsonschema.validate(doc, SCHEMA)
        docs.append(doc)
    return docs


def render(doc: dict[str, Any], i: int) -> str:
    if i % 3 == 0:
        return json.dumps(doc, indent=2, ensure_ascii=False)
    if i % 3 == 1:
        return json.dumps(doc, ensure_ascii=False)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return (time.perf_counter() - start) * 1e3, value


class LLGuidance:
    name = "llguidance"

    def __init__(self, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.hf, self.lt = llguidance, llguidance.hf, llguidance.torch
        self.executor = llguidance.LLExecutor(threads)
        self.version = importlib.metadata.version("llguidance")

    def build_tokenizer(self, tokenizer: Any, vocab: int) -> float:
        ms, self.tok = timed(self.hf.from_tokenizer, tokenizer, n_vocab=vocab)
        return ms

    def grammar(self, kind: str, spec: Any) -> str:
        m = self.llg.LLMatcher
        if kind == "json":
            return m.grammar_from_json_schema(spec)
        if kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"})
        if kind == "regex":
            return m.grammar_from_regex(spec)
        if kind == "json_compact":
            return m.grammar_from_json_schema(spec, overrides={"whitespace_flexible": False})
        if kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        return m.grammar_from_lark(spec)

    def compile(self, kind: str, spec: Any) -> Any:
        matcher = self.llg.LLMatcher(self.tok, self.grammar(kind, spec))
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def clear_cache(self) -> None:  # no compile cache in the library
        pass

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, rows: list[tuple[Any, int]], bitmask: torch.Tensor, parallel: bool) -> None:
        if parallel:
            self.lt.fill_next_token_bitmask_par(self.executor, rows, bitmask)
        else:
            for m, i in rows:
                self.lt.fill_next_token_bitmask(m, bitmask, i)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped()) and not matcher.is_error()

    def reset(self, matcher: Any) -> None:
        matcher.reset()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, threads: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.threads = threads
        self.batch = xgrammar.BatchGrammarMatcher(threads)
        self.version = importlib.metadata.version("xgrammar")

    def build_tokenizer(self, tokenizer: Any, vocab: int) -> float:
        ms, self.info = timed(self.xgr.TokenizerInfo.from_huggingface, tokenizer, vocab_size=vocab)
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads)
        return ms

    def compile(self, kind: str, spec: Any) -> Any:
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec))
        if kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}))
        if kind == "json_compact":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        return c.compile_lark(spec)

    def clear_cache(self) -> None:
        self.compiler.clear_cache()

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, rows: list[tuple[Any, int]], bitmask: torch.Tensor, parallel: bool) -> None:
        if parallel:
            matchers, indices = zip(*rows, strict=True)
            self.batch.batch_fill_next_token_bitmask(list(matchers), bitmask, list(indices))
        else:
            for m, i in rows:
                m.fill_next_token_bitmask(bitmask, i)

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())

    def reset(self, matcher: Any) -> None:
        matcher.reset()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


def compile_times(lib: Any, vocab: int) -> dict[str, float]:
    out: dict[str, float] = {}
    specs = [("json_object", None), ("regex", REGEX), ("choice", CHOICES), ("lark", LARK)]
    lib.clear_cache()
    out["schema_cold"], compiled = timed(lib.compile, "json", SCHEMA)
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    out["schema_first_mask"], _ = timed(lib.fill, [(lib.matcher(compiled), 0)], bitmask, False)
    out["schema_repeat"], compiled = timed(lib.compile, "json", copy.deepcopy(SCHEMA))
    out["matcher_from_compiled"], _ = timed(lib.matcher, compiled)
    for kind, spec in specs:
        lib.clear_cache()
        out[kind], compiled = timed(lib.compile, kind, spec)
        out[kind + "_first_mask"], _ = timed(lib.fill, [(lib.matcher(compiled), 0)], bitmask, False)
    out["schema_cold_plus_first_mask"] = out["schema_cold"] + out["schema_first_mask"]
    return out


def walk(
    lib: Any, compiled: Any, docs: list[list[int]], eos: int, steps: int, parallel: bool, vocab: int
) -> dict[str, Any]:
    """Advance 16 matchers through their documents; restart a row when its document ends."""
    matchers = [lib.matcher(compiled) for _ in docs]
    bitmask = torch.zeros((BATCH, (vocab + 31) // 32), dtype=torch.int32)
    pos = [0] * BATCH
    fill_ms, consume_ms, rejects, completed, row0 = [], [], [], 0, []
    for step in range(steps):
        ms, _ = timed(lib.fill, list(zip(matchers, range(BATCH), strict=True)), bitmask, parallel)
        fill_ms.append(ms)
        if not parallel:
            row0.append(bitmask[0].clone())
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            token = docs[i][pos[i]] if pos[i] < len(docs[i]) else eos
            if not allowed(bitmask, i, token):
                rejects.append({"step": step, "row": i, "pos": pos[i], "token": token})
            if token == eos and not lib.accepting(m):
                rejects.append({"step": step, "row": i, "not_accepting_at_end": True})
            if not lib.consume(m, token):
                rejects.append({"step": step, "row": i, "consume_failed": token})
            pos[i] += 1
        consume_ms.append((time.perf_counter() - start) * 1e3)
        for i, m in enumerate(matchers):
            if pos[i] > len(docs[i]):
                completed += lib.finished(m)
                lib.reset(m)
                pos[i] = 0
    return {
        "fill_ms": fill_ms,
        "consume_ms": consume_ms,
        "rejects": rejects,
        "docs_completed": completed,
        "row0": row0,
    }


def apply_times(lib: Any, vocab: int, reps: int) -> dict[str, float]:
    bitmask = torch.zeros((BATCH, (vocab + 31) // 32), dtype=torch.int32)
    bitmask.random_(-(2**31), 2**31 - 1)
    logits = torch.randn(BATCH, vocab)
    first, _ = timed(lib.apply, logits.clone(), bitmask)
    times, plain = [], []
    for _ in range(reps):  # interleaved: library kernel, then plain torch
        x, expect = logits.clone(), logits.clone()
        times.append(timed(lib.apply, x, bitmask)[0])
        plain.append(timed(torch_apply, expect, bitmask)[0])
    lib.apply(x, bitmask)
    return {
        "first_call_ms": first,
        "median_ms": statistics.median(times),
        "plain_torch_median_ms": statistics.median(plain),
        "matches_reference": bool(torch.equal(x, expect)),
    }


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain-torch reference (no torch.compile, no library kernel); same bitmask format."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]] == 0, -torch.inf)


def force_decode(
    lib: Any, compiled: Any, tokenizer: Any, eos: int, vocab: int, cap: int, seed: int
) -> list[dict[str, Any]]:
    """Greedy from random logits under the mask, 16 rows at once."""
    gen = torch.Generator().manual_seed(seed)
    matchers = [lib.matcher(compiled) for _ in range(BATCH)]
    bitmask = torch.zeros((BATCH, (vocab + 31) // 32), dtype=torch.int32)
    tokens: list[list[int]] = [[] for _ in range(BATCH)]
    done, rejected = [False] * BATCH, 0
    for _ in range(cap):
        lib.fill([(m, i) for i, m in enumerate(matchers) if not done[i]], bitmask, True)
        logits = torch.randn(BATCH, vocab, generator=gen)
        lib.apply(logits, bitmask)
        picks = logits.argmax(dim=-1).tolist()
        for i, m in enumerate(matchers):
            if done[i]:
                continue
            rejected += not lib.consume(m, picks[i])
            done[i] = picks[i] == eos or lib.finished(m)
            if picks[i] != eos:
                tokens[i].append(picks[i])
        if all(done):
            break
    return [
        {"text": tokenizer.decode(t), "finished": d, "batch_consume_rejects": rejected}
        for t, d in zip(tokens, done, strict=True)
    ]


def check_decodes(lib: Any, tokenizer: Any, eos: int, vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def schema_ok(text: str) -> None:
        jsonschema.validate(json.loads(text), SCHEMA)

    def regex_ok(text: str) -> None:  # ASCII digits: what a `\d` in an API schema means
        if not re.fullmatch(REGEX, text, re.ASCII):
            raise ValueError("no ASCII match")

    checks = {
        "schema_flexible_ws": ("json", SCHEMA, schema_ok),
        "schema_compact": ("json_compact", SCHEMA, schema_ok),
        "regex": ("regex", REGEX, regex_ok),
        "choice": ("choice", CHOICES, CHOICES.index),
    }
    for label, (kind, spec, check) in checks.items():
        rows = force_decode(lib, lib.compile(kind, spec), tokenizer, eos, vocab, 400, seed=7)
        valid, bad = 0, []
        for row in rows:
            try:
                check(row["text"])
                valid += row["finished"]
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                bad.append(
                    {"text": row["text"][:200], "error": f"{type(exc).__name__}: {exc}"[:200]}
                )
        out[label] = {
            "valid": valid,
            "of": len(rows),
            "failures": bad[:3],
            "sample": rows[0]["text"][:200],
            "consume_rejects_after_mask": rows[0]["batch_consume_rejects"],
        }
    return out


def error_reporting(lib: Any) -> list[dict[str, Any]]:
    out = []
    for label, kind, spec in BAD_SPECS:
        try:
            ms, _ = timed(lib.compile, kind, spec)
            out.append({"case": label, "raised": None, "compiled_ms": ms})
        except Exception as exc:  # noqa: BLE001 - reporting what each library raises
            out.append({"case": label, "raised": type(exc).__name__, "message": str(exc)[:240]})
    return out


def big_enum(size: int) -> dict[str, Any]:
    return {"enum": [f"item-{i:05d}-{'x' * (i % 7)}" for i in range(size)]}


def llg_limits(lib: LLGuidance, enum_size: int) -> dict[str, Any]:
    """LLParserLimits bound grammar size, lexer construction fuel and per-step mask work."""
    llg, out = lib.llg, {}
    grammar = llg.LLMatcher.grammar_from_json_schema(big_enum(enum_size))
    for label, limits in [
        ("big_enum default", None),
        ("big_enum initial_lexer_fuel=1000", llg.LLParserLimits(initial_lexer_fuel=1000)),
    ]:
        ms, matcher = timed(llg.LLMatcher, lib.tok, grammar, limits=limits)
        out[label] = {"construct_ms": ms, "error": matcher.get_error()[:240]}
    grammar = llg.LLMatcher.grammar_from_regex(PATHOLOGICAL_REGEX)
    tokens = lib.tok.tokenize_str("ab" * 20 + "a")
    for label, limits in [
        ("regex walk default", None),
        ("regex walk max_lexer_states=50", llg.LLParserLimits(max_lexer_states=50)),
    ]:
        matcher = llg.LLMatcher(lib.tok, grammar, limits=limits)
        bitmask = lib.lt.allocate_token_bitmask(1, lib.tok.vocab_size)
        start = time.perf_counter()
        for token in tokens:
            lib.lt.fill_next_token_bitmask(matcher, bitmask, 0)
            matcher.consume_token(token)
        out[label] = {
            "walk_ms": (time.perf_counter() - start) * 1e3,
            "error": matcher.get_error()[:240],
        }
    return out


def xgr_unbounded(lib: XGrammar, enum_size: int) -> dict[str, Any]:
    """xgrammar has no compile limit; see whether compile drops the GIL (a thread can time out)."""
    lib.clear_cache()
    ticks, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    spinner = threading.Thread(target=spin)
    spinner.start()
    ms, _ = timed(lib.compile, "json", big_enum(enum_size))
    stop.set()
    spinner.join()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lib.clear_cache()
        future = pool.submit(lib.compile, "json", big_enum(enum_size + 1))
        try:
            future.result(timeout=0.05)
            timeout = "finished within 50 ms"
        except concurrent.futures.TimeoutError:
            timeout = "future.result(timeout) fired; the compile itself cannot be cancelled"
    return {
        "big_enum_compile_ms": ms,
        "python_1ms_ticks_during_compile": ticks[0],
        "thread_timeout": timeout,
    }


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(values),
        "p50": statistics.median(values),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def load_tokenizer(directory: str | None) -> tuple[Any, int, str]:
    if directory is None:
        pattern = os.path.expanduser("~/.cache/serve-app/converted/smollm2-135m-instruct-*")
        directory = sorted(glob.glob(pattern))[0]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = json.loads(Path(directory, "config.json").read_text())["vocab_size"]
    return tokenizer, max(vocab, len(tokenizer)), directory


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer, vocab, directory = load_tokenizer(args.model_dir)
    eos = tokenizer.eos_token_id
    docs = [
        tokenizer.encode(render(d, i), add_special_tokens=False) for i, d in enumerate(instances())
    ]
    libs = [LLGuidance(args.threads), XGrammar(args.threads)]
    per: dict[str, dict[str, Any]] = {
        lib.name: {
            "tok": [],
            "compile": [],
            "seq": [],
            "par": [],
            "consume": [],
            "rejects": [],
            "docs": 0,
        }
        for lib in libs
    }
    for r in range(args.rounds):
        order = libs if r % 2 == 0 else libs[::-1]
        for lib in order:
            rec = per[lib.name]
            rec["tok"].append(lib.build_tokenizer(tokenizer, vocab))
            rec["compile"].append(compile_times(lib, vocab))
            compiled = lib.compile("json", SCHEMA)
            for parallel in (False, True):
                w = walk(lib, compiled, docs, eos, args.steps, parallel, vocab)
                rec["par" if parallel else "seq"].extend(w["fill_ms"][1:])
                rec["consume"].extend(w["consume_ms"])
                rec["rejects"].extend(w["rejects"])
                rec["docs"] += w["docs_completed"]
                if r == 0 and not parallel:
                    rec["row0"] = w["row0"]
            print(f"round {r} {lib.name} done", flush=True)
    results: dict[str, Any] = {
        "model_dir": directory,
        "vocab": vocab,
        "len_tokenizer": len(tokenizer),
        "batch": BATCH,
        "rounds": args.rounds,
        "steps": args.steps,
        "threads": args.threads,
        "doc_tokens": [len(d) for d in docs],
        "libs": {},
    }
    for lib in libs:
        rec = per[lib.name]
        keys = rec["compile"][0].keys()
        results["libs"][lib.name] = {
            "version": lib.version,
            "tokenizer_info_ms": statistics.median(rec["tok"]),
            "compile_ms": {k: statistics.median(c[k] for c in rec["compile"]) for k in keys},
            "mask_batch16_seq_ms": summarize(rec["seq"]),
            "mask_batch16_batched_ms": summarize(rec["par"]),
            "consume_batch16_ms": summarize(rec["consume"]),
            "apply": apply_times(lib, vocab, 50),
            "walk_rejects": rec["rejects"][:5],
            "walk_reject_count": len(rec["rejects"]),
            "docs_completed": rec["docs"],
            "force_decode": check_decodes(lib, tokenizer, eos, vocab),
            "errors": error_reporting(lib),
        }
    a, b = (per[lib.name]["row0"] for lib in libs)
    same = sum(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    count = [sum(popcount(m) for m in rows) / len(rows) for rows in (a, b)]
    results["mask_agreement_row0"] = {
        "identical_steps": same,
        "steps": len(a),
        "mean_allowed": dict(zip(["llguidance", "xgrammar"], count, strict=True)),
    }
    results["enum_size"] = args.enum_size
    results["libs"]["llguidance"]["limits"] = llg_limits(libs[0], args.enum_size)
    results["libs"]["xgrammar"]["limits"] = xgr_unbounded(libs[1], args.enum_size)
    return results


def popcount(mask: torch.Tensor) -> int:
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return int(bits.sum())


def print_table(res: dict[str, Any]) -> None:
    libs = res["libs"]
    names = list(libs)
    rows: list[tuple[str, Any]] = [
        ("version", lambda d: d["version"]),
        ("tokenizer info ms", lambda d: d["tokenizer_info_ms"]),
    ]
    for key in libs[names[0]]["compile_ms"]:
        rows.append((f"compile {key} ms", lambda d, k=key: d["compile_ms"][k]))
    for label, key in [
        ("mask b16 sequential", "mask_batch16_seq_ms"),
        ("mask b16 batched", "mask_batch16_batched_ms"),
        ("consume b16", "consume_batch16_ms"),
    ]:
        rows.append((f"{label} mean ms", lambda d, k=key: d[k]["mean"]))
        rows.append((f"{label} p95 ms", lambda d, k=key: d[k]["p95"]))
    rows += [
        ("apply [16,V] median ms", lambda d: d["apply"]["median_ms"]),
        ("apply first call ms", lambda d: d["apply"]["first_call_ms"]),
        ("apply plain-torch median ms", lambda d: d["apply"]["plain_torch_median_ms"]),
        ("apply matches reference", lambda d: d["apply"]["matches_reference"]),
        ("walk rejects", lambda d: d["walk_reject_count"]),
        ("docs completed", lambda d: d["docs_completed"]),
    ]
    for label in ("schema_flexible_ws", "schema_compact", "regex", "choice"):
        rows.append(
            (
                f"force-decode {label} valid",
                lambda d, k=label: "{valid}/{of} rej {consume_rejects_after_mask}".format(
                    **d["force_decode"][k]
                ),
            )
        )
    print(f"{'':34}" + "".join(f"{n:>16}" for n in names))
    for label, get in rows:
        cells = [get(libs[n]) for n in names]
        print(
            f"{label:34}"
            + "".join(
                f"{c:>16.3f}" if isinstance(c, float) and not isinstance(c, bool) else f"{c!s:>16}"
                for c in cells
            )
        )
    print("mask agreement row 0:", res["mask_agreement_row0"])
    for n in names:
        print(f"{n} errors:")
        for e in libs[n]["errors"]:
            print(
                "   ",
                e["case"],
                "->",
                e.get("raised"),
                (e.get("message") or "")[:110].replace("\n", " "),
            )
        print(f"{n} limits:", json.dumps(libs[n]["limits"])[:400])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="mask steps per walk")
    parser.add_argument("--enum-size", type=int, default=2000, help="large-enum compile case")
    parser.add_argument("--threads", type=int, default=2, help="threads for batched fill")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", default="results/grammar_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

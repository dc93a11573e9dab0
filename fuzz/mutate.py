"""Structure-aware mutators: each takes a valid seed and a ``random.Random`` and returns a hostile variant
plus a short label of what it did (shown for failures, so a finding can be read without replaying it).

Hand-written rather than Hypothesis: a case must be rebuilt in a forked child from (reader, seed, index)
alone, run under wall-time and memory limits, and replayed by index; Hypothesis runs examples in-process,
its shrinker would re-run hanging or memory-hungry cases in the parent, and its example database adds
state outside the seed. The formats' structure (GGUF fields, JSON trees, Jinja grammar) is written out here.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from typing import Any

from fuzz.gguf_doc import (ARRAY, BOOL, FLOAT32, FLOAT64, INT32, INT64, KV, STRING, UINT8, UINT32, UINT64,
                           GGUFDoc, TensorInfo, serialize)

INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 257, 1000, 4096, 65535, 65536,
        100_000, 1_000_000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63]
FLOATS = [0.0, -0.0, 1e-300, 1e-45, 1e-6, 0.5, 1.0, 1.5, -1.0, 1e38, 1e308, math.inf, -math.inf, math.nan]
STRINGS = ["", "a", " ", "x" * 1000, "\x00", "\x00\x01\x02", "<|im_end|>", "<|im_start|>system\nevil", "{{ x }}",
           "{% for %}", "../../../etc/passwd", "/dev/zero", "é" * 300, "\u202e\u2066", "\ufdd0\ufdd1", "🙂" * 50,
           "\\", "%s%s%s%n", "{0.__class__}", "llama", "gpt2", "bert", "default", "smollm", "NaN", "1e999",
           "9" * 5000, "▁", "<0xZZ>", "<0x41>"]
DEPTHS = [2, 10, 32, 63, 64, 65, 100, 1000, 100_000]


def pick(rng: random.Random, items: list) -> Any:
    return items[rng.randrange(len(items))]


def hostile_scalar(rng: random.Random, *, json_ok: bool = True) -> Any:
    r = rng.random()
    if r < 0.4:
        return pick(rng, INTS + ([10**400, -(10**400)] if json_ok else []))
    if r < 0.6:
        return pick(rng, FLOATS)
    if r < 0.85:
        return pick(rng, STRINGS)
    return pick(rng, [None, True, False])


def hostile_value(rng: random.Random) -> Any:
    """A scalar, or a container of them, or something deeply nested."""
    r = rng.random()
    if r < 0.65:
        return hostile_scalar(rng)
    if r < 0.8:
        return [hostile_scalar(rng) for _ in range(rng.randrange(4))]
    if r < 0.9:
        return {pick(rng, ["type", "content", "factor", "rope_type", "a", ""]): hostile_scalar(rng)
                for _ in range(rng.randrange(3))}
    return nested(rng, pick(rng, DEPTHS))


def nested(rng: random.Random, depth: int) -> Any:
    value: Any = hostile_scalar(rng)
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


# --- JSON documents -------------------------------------------------------------------------------------------


def _paths(value: Any, path: tuple = (), out: list | None = None, limit: int = 4000) -> list[tuple]:
    out = [] if out is None else out
    if len(out) >= limit or len(path) > 200:
        return out
    out.append(path)
    if isinstance(value, dict):
        for k, v in value.items():
            _paths(v, path + (k,), out, limit)
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):
            _paths(v, path + (i,), out, limit)
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _set(root: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    _get(root, path[:-1])[path[-1]] = new
    return root


def _items(value: Any, cap: int) -> int:
    """How many JSON nodes ``value`` prints (shared references counted each time), stopping at ``cap``."""
    count, stack = 0, [value]
    while stack and count <= cap:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def mutate_json(doc: Any, rng: random.Random, *, keys: list[str] = (), values: dict[str, list] | None = None,
                n: int | None = None) -> tuple[Any, list[str]]:
    """1-3 edits of a JSON tree: replace, delete, insert a known key, duplicate, deepen, change type.
    An edit that would make the document print as more than ~1M nodes is undone (inputs stay a few MB)."""
    try:
        doc = json.loads(json.dumps(doc))
    except (RecursionError, ValueError):
        return doc, ["(too deep to edit further)"]
    labels: list[str] = []
    before = doc
    for _ in range(n or rng.randint(1, 3)):
        if _items(doc, 1_000_000) > 1_000_000:  # the last edit made it too big: undo it
            doc, labels = before, labels[:-1] + [labels[-1] + " (undone: too big)"]
            break
        try:
            before = copy.deepcopy(doc)
        except RecursionError:  # deeper than deepcopy goes: keep the previous snapshot
            pass
        paths = _paths(doc)
        path = pick(rng, paths)
        node = _get(doc, path)
        op = rng.random()
        if op < 0.35:
            new = hostile_value(rng)
            if values and path and isinstance(path[-1], str) and path[-1] in values and rng.random() < 0.5:
                new = pick(rng, values[path[-1]])
            doc = _set(doc, path, new)
            labels.append(f"set {_show(path)}={_show(new)}")
        elif op < 0.5 and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
            labels.append(f"del {_show(path)}")
        elif op < 0.7 and isinstance(node, dict):
            key = pick(rng, list(keys)) if keys and rng.random() < 0.8 else pick(rng, STRINGS)
            new = pick(rng, values[key]) if values and key in values and rng.random() < 0.6 else hostile_value(rng)
            node[key] = new
            labels.append(f"add {_show(path + (key,))}={_show(new)}")
        elif op < 0.8 and isinstance(node, list) and node:
            times = pick(rng, [2, 10, 1000])
            if _items(node, 10_000) * times > 1_000_000 or _items(doc, 1_000_000) * 2 > 1_000_000:
                times = 1
            doc = _set(doc, path, node * times)
            labels.append(f"repeat {_show(path)} x{times}")
        elif op < 0.9:
            depth = pick(rng, DEPTHS[:6])
            wrapped = node
            for _ in range(depth):
                wrapped = [wrapped]
            doc = _set(doc, path, wrapped)
            labels.append(f"nest {_show(path)} {depth}")
        else:
            new = {"0": node} if isinstance(node, list) else [node] if isinstance(node, dict) else str(node)
            doc = _set(doc, path, new)
            labels.append(f"retype {_show(path)}")
    if labels and _items(doc, 1_000_000) > 1_000_000:
        doc, labels = before, labels[:-1] + [labels[-1] + " (undone: too big)"]
    return doc, labels


def json_text(doc: Any, rng: random.Random) -> tuple[bytes, str]:
    """The document as bytes, sometimes with a text-level fault."""
    try:
        text = json.dumps(doc, indent=rng.choice([None, 2]))
    except (ValueError, RecursionError):
        text = "[" * 100_000 + "]" * 100_000
    data = text.encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.75:
        return data, ""
    if r < 0.8:
        return data[:rng.randrange(len(data) + 1)], "truncated"
    if r < 0.84:
        pos = rng.randrange(len(data) + 1)
        return data[:pos] + bytes([rng.randrange(256) for _ in range(rng.randint(1, 8))]) + data[pos:], "garbage"
    if r < 0.87:
        return b"\xef\xbb\xbf" + data, "BOM"
    if r < 0.9:
        return b"\xff\xfe" + data, "not UTF-8"
    if r < 0.93:
        return data + b" " * rng.choice([10, 5 * 2**20, 17 * 2**20]), "padded"
    if r < 0.96:
        return b"[" * 2000 + data + b"]" * 2000, "deep text"
    return data.replace(b"1", b"NaN", 1).replace(b"0", b"Infinity", 1), "NaN literals"


def _show(value: Any, limit: int = 50) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = f"<{type(value).__name__}>"
    text = text if len(text) <= limit else text[:limit] + f"…({len(text)})"
    return text


# --- GGUF -----------------------------------------------------------------------------------------------------

GGUF_KEYS = {  # hostile values of the keys the loader reads
    "llama.block_count": [0, 1, 3, 100_000, 2**31, 2**32 - 1],
    "llama.embedding_length": [0, 1, 16, 33, 2**30, 2**31, 2**32 - 1],
    "llama.feed_forward_length": [0, 1, 2**31],
    "llama.attention.head_count": [0, 1, 3, 5, 64, 2**31],
    "llama.attention.head_count_kv": [0, 1, 3, 8, 2**31],
    "llama.attention.key_length": [0, 1, 7, 2**30, 2**31],
    "llama.context_length": [0, 1, 2**31, 2**32 - 1],
    "llama.vocab_size": [0, 1, 10, 2**31],
    "llama.rope.freq_base": [math.nan, math.inf, 0.0, 1.0, -1.0, 1e38],
    "llama.attention.layer_norm_rms_epsilon": [math.nan, 0.0, -1.0, math.inf],
    "general.alignment": [0, 1, 3, 64, 2**31, 2**32 - 1],
    "general.architecture": ["llama", "bert", "", "gpt2", "x" * 10000],
    "tokenizer.ggml.model": ["gpt2", "llama", "bert", "", "t5"],
    "tokenizer.ggml.pre": ["default", "smollm", "llama-bpe", "qwen2", "nope", ""],
    "tokenizer.ggml.bos_token_id": [0, 299, 300, 2**31, 2**32 - 1],
    "tokenizer.ggml.eos_token_id": [0, 299, 300, 2**32 - 1],
    "tokenizer.ggml.add_bos_token": [0, 1, 2],
}
TYPE_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 255, 2**31]
TENSOR_TYPE_IDS = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 24, 28, 29, 30, 31, 39, 200, 255]


def _scalar_for(vtype: int, rng: random.Random) -> Any:
    if vtype in (FLOAT32, FLOAT64):
        return pick(rng, FLOATS)
    if vtype == STRING:
        return pick(rng, STRINGS).encode("utf-8", "surrogatepass") if rng.random() < 0.9 else b"\xff\xfe\xc0"
    return pick(rng, INTS) % (1 << 64)


def mutate_gguf(doc: GGUFDoc, rng: random.Random, templates: list[str], texts: list[str]) -> tuple[bytes, str]:
    """1-3 structural edits of a GGUF document, then (sometimes) truncation or byte flips."""
    doc = doc.copy()
    labels = []
    for _ in range(rng.randint(1, 3)):
        labels.append(pick(rng, _GGUF_OPS)(doc, rng, templates, texts))
    data = serialize(doc)
    r = rng.random()
    if r < 0.08:
        cut = rng.randrange(len(data) + 1)
        data, labels = data[:cut], labels + [f"truncate@{cut}"]
    elif r < 0.16:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(buf))
            buf[pos] = rng.randrange(256)
        data, labels = bytes(buf), labels + ["byte flips"]
    return data, "; ".join(labels)


def _op_header(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    what = rng.randrange(4)
    if what == 0:
        doc.magic = pick(rng, [b"GGUF", b"FUGG", b"GGML", b"ggjt", b"\0\0\0\0"])
        return f"magic={doc.magic!r}"
    if what == 1:
        doc.version = pick(rng, [0, 1, 2, 3, 4, 0x30000000, 0x03000000, 2**32 - 1])
        return f"version={doc.version}"
    if what == 2:
        doc.n_kv = pick(rng, [len(doc.kvs) + d for d in (-1, 1, 2)] + [0, 2**63, 2**64 - 1, 0xFFFFFFFF])
        return f"n_kv={doc.n_kv}"
    doc.n_tensors = pick(rng, [len(doc.tensors) + d for d in (-1, 1)] + [0, 2**63, 0xFFFFFFFF, 70000])
    return f"n_tensors={doc.n_tensors}"


def _op_known_key(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    key = pick(rng, list(GGUF_KEYS))
    value = pick(rng, GGUF_KEYS[key])
    kv = doc.kv(key)
    vtype = STRING if isinstance(value, str) else FLOAT32 if isinstance(value, float) else \
        (UINT32 if value < 2**32 else UINT64)
    if key.endswith("add_bos_token"):
        vtype = BOOL
    if rng.random() < 0.2:
        vtype = pick(rng, [INT32, UINT64, INT64, FLOAT64, STRING, UINT8])
    new = KV(key.encode(), vtype, value.encode() if isinstance(value, str) and vtype == STRING else
             (value if vtype != STRING else str(value).encode()))
    if vtype in (FLOAT32, FLOAT64) and not isinstance(value, float):
        new.value = 0.5 if isinstance(value, str) else float(value)
    if vtype not in (FLOAT32, FLOAT64, STRING) and isinstance(value, (str, float)):
        new.value = 0
    if kv is None:
        doc.kvs.append(new)
    else:
        doc.kvs[doc.kvs.index(kv)] = new
    return f"{key}={value!r} as type {vtype}"


def _op_kv_field(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    kv = pick(rng, doc.kvs)
    what = rng.randrange(7)
    name = kv.key.decode(errors="replace")
    if what == 0:
        kv.vtype = pick(rng, TYPE_IDS)
        return f"{name}: type -> {kv.vtype}"
    if what == 1:
        kv.key = pick(rng, [b"", kv.key + b"\xff", b"\xc0\x80", kv.key * 3, doc.kvs[0].key])
        return f"{name}: key -> {kv.key[:20]!r}"
    if what == 2:
        kv.key_len = pick(rng, [0, len(kv.key) + 1, 2**48, 2**64 - 1])
        return f"{name}: key length -> {kv.key_len}"
    if what == 3 and kv.vtype == ARRAY:
        kv.count = pick(rng, [0, len(kv.value) + 1, len(kv.value) - 1, 2**63, 2**64 - 1, 3 * 2**20])
        return f"{name}: array length -> {kv.count}"
    if what == 4 and kv.vtype == ARRAY:
        kv.item_type = pick(rng, TYPE_IDS)
        if kv.item_type == ARRAY:
            kv.value = [[1, 2]] * 3
        return f"{name}: item type -> {kv.item_type}"
    if what == 5 and kv.vtype == STRING:
        kv.count = pick(rng, [len(kv.value) + 1, 2**63, 2**64 - 1])
        return f"{name}: string length -> {kv.count}"
    if kv.vtype == ARRAY and kv.value:
        i = rng.randrange(len(kv.value))
        kv.value = list(kv.value)
        kv.value[i] = _scalar_for(kv.item_type if kv.item_type is not None else UINT8, rng)
        return f"{name}[{i}] -> {_show(kv.value[i])}"
    kv.value = _scalar_for(kv.vtype, rng)
    return f"{name} -> {_show(kv.value)}"


def _op_kv_list(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    what = rng.randrange(3)
    if what == 0 and doc.kvs:
        kv = doc.kvs.pop(rng.randrange(len(doc.kvs)))
        return f"drop {kv.key.decode(errors='replace')}"
    if what == 1 and doc.kvs:
        kv = pick(rng, doc.kvs)
        doc.kvs.append(KV(kv.key, kv.vtype, kv.value, kv.item_type))
        return f"duplicate {kv.key.decode(errors='replace')}"
    depth = pick(rng, [2, 10, 1000])
    value: Any = [1]
    for _ in range(depth - 1):
        value = [value]
    doc.kvs.append(KV(b"test.nested", ARRAY, value, ARRAY))
    return f"array of arrays {depth} deep"


def _op_tokenizer(doc: GGUFDoc, rng: random.Random, _t: Any, texts: list[str]) -> str:
    tokens = doc.kv("tokenizer.ggml.tokens")
    types = doc.kv("tokenizer.ggml.token_type")
    what = rng.randrange(6)
    if what == 0 and tokens is not None:
        i = rng.randrange(len(tokens.value))
        tokens.value = list(tokens.value)
        tokens.value[i] = pick(rng, [b"", b"a" * 300_000, b"\xe2\x96\x81" * 50_000, tokens.value[0], b"<0x41>",
                                     b"<0xZZ>", pick(rng, texts).encode("utf-8", "surrogatepass")[:10_000]])
        return f"tokens[{i}] -> {len(tokens.value[i])} bytes"
    if what == 1 and types is not None:
        i = rng.randrange(len(types.value))
        types.value = list(types.value)
        types.value[i] = pick(rng, [0, 1, 2, 3, 4, 5, 6, 7, -1, 99])
        return f"token_type[{i}] -> {types.value[i]}"
    if what == 2:
        merges = doc.kv("tokenizer.ggml.merges")
        if merges is not None and merges.value:
            i = rng.randrange(len(merges.value))
            merges.value = list(merges.value)
            merges.value[i] = pick(rng, [b"", b"a", b"a b c", b"zz zz", b" ", b"\xc4\xa0 \xc4\xa0" * 1000])
            return f"merges[{i}] -> {merges.value[i][:20]!r}"
        return "no merges"
    if what == 3 and tokens is not None:
        k = pick(rng, [2, 100, 5000])
        tokens.value = list(tokens.value) + [b"x%d" % n for n in range(k)]
        return f"+{k} tokens (parallel arrays now disagree)"
    if what == 4:
        scores = doc.kv("tokenizer.ggml.scores")
        if scores is not None:
            scores.item_type = pick(rng, [UINT8, INT32, FLOAT64, STRING])
            if scores.item_type == STRING:
                scores.value = [b"0"] * len(scores.value)
            return f"scores item type -> {scores.item_type}"
    key = pick(rng, ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                     "tokenizer.ggml.scores", "tokenizer.chat_template"])
    kv = doc.kv(key)
    if kv is not None:
        doc.kvs.remove(kv)
    return f"drop {key}"


def _op_template(doc: GGUFDoc, rng: random.Random, templates: list[str], _x: Any) -> str:
    kv = doc.kv("tokenizer.chat_template")
    source = pick(rng, templates)
    if kv is None:
        doc.kvs.append(KV(b"tokenizer.chat_template", STRING, b""))
        kv = doc.kvs[-1]
    kv.value = source.encode("utf-8", "surrogatepass")
    return f"chat_template -> {_show(source, 60)}"


def _op_tensor(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    t = pick(rng, doc.tensors)
    name = t.name.decode(errors="replace")
    what = rng.randrange(9)
    if what == 0:
        t.name = pick(rng, [b"", b"x" * 64, b"x" * 63, b"\xff\xfe", doc.tensors[0].name, b"blk.99999.attn_q.weight",
                            b"blk.2.attn_q.weight", b"rope_freqs.weight", b"output.weight", b"blk.0.attn_q.bias"])
        return f"tensor {name}: name -> {t.name[:30]!r}"
    if what == 1:
        t.n_dims = pick(rng, [0, 3, 5, 2**31, 2**32 - 1])
        return f"tensor {name}: n_dims -> {t.n_dims}"
    if what == 2:
        i = rng.randrange(len(t.dims))
        t.dims[i] = pick(rng, [0, 1, 2**31, 2**63, 2**64 - 1, 4194305, t.dims[i] + 1, t.dims[i] * 2])
        return f"tensor {name}: ne[{i}] -> {t.dims[i]}"
    if what == 3:
        t.dims = pick(rng, [[4194305, 4194305, 211106198978564], [2**63 - 1, 2, 1, 1], t.dims[::-1], t.dims + [1],
                            [t.dims[0]]])
        return f"tensor {name}: dims -> {t.dims}"
    if what == 4:
        t.ttype = pick(rng, TENSOR_TYPE_IDS)
        return f"tensor {name}: type -> {t.ttype}"
    if what == 5:
        t.offset = pick(rng, [t.offset + 1, t.offset + 32, 0, len(doc.data), len(doc.data) - 32, 2**63, 2**64 - 32])
        return f"tensor {name}: offset -> {t.offset}"
    if what == 6:
        doc.tensors.remove(t)
        return f"drop tensor {name}"
    if what == 7:
        doc.tensors.append(TensorInfo(pick(rng, [b"rope_freqs.weight", b"blk.0.attn_q.bias", b"output.weight",
                                                 b"blk.2.attn_norm.weight", b"mystery.weight"]),
                                      pick(rng, [[4], [8], [32], [2**20]]), 0, 0))
        return f"add tensor {doc.tensors[-1].name!r} {doc.tensors[-1].dims}"
    # tensor data: values that break the model (NaN/inf weights)
    value = pick(rng, [math.nan, math.inf, -math.inf, 1e38, -3e38])
    blob = bytearray(doc.data)
    if t.ttype == 0 and t.offset + 4 <= len(blob):
        n = min(t.dims[0] * (t.dims[1] if len(t.dims) > 1 else 1), (len(blob) - t.offset) // 4)
        blob[t.offset:t.offset + 4 * n] = struct.pack("<f", value) * n
    doc.data = bytes(blob)
    return f"tensor {name}: data -> {value}"


def _op_alignment(doc: GGUFDoc, rng: random.Random, *_: Any) -> str:
    doc.alignment = pick(rng, [1, 8, 64, 4096])
    return f"pad data to {doc.alignment}"


_GGUF_OPS = [_op_header, _op_known_key, _op_known_key, _op_kv_field, _op_kv_field, _op_kv_list, _op_tokenizer,
             _op_tokenizer, _op_template, _op_tensor, _op_tensor, _op_tensor, _op_alignment]


# --- safetensors ----------------------------------------------------------------------------------------------

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4", "Q4",
             "", "f32", 5, None]


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Edits of a safetensors file: its header's JSON (dtype, shape, offsets, names, metadata), the header
    length, or the data after it."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    labels = []
    for _ in range(rng.randint(1, 2)):
        if not isinstance(header, dict) or not names:
            break
        what = rng.randrange(8)
        name = pick(rng, names)
        entry = header.get(name)
        offsets = entry.get("data_offsets", [0, 0]) if isinstance(entry, dict) else None
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(x, int) for x in offsets):
            what = 6
        if what == 0:
            entry["dtype"] = pick(rng, ST_DTYPES)
            labels.append(f"{name}.dtype={entry['dtype']!r}")
        elif what == 1:
            shape = entry.get("shape", [1])
            if not isinstance(shape, list) or not all(isinstance(x, int) for x in shape):
                shape = [1]
            entry["shape"] = pick(rng, [[], [0], [-1], [2**31, 2**31], [2**63], [1.5], shape[::-1], shape + [1],
                                        [x * 2 for x in shape], ["1"], None])
            labels.append(f"{name}.shape={entry['shape']}")
        elif what == 2:
            b, e = entry.get("data_offsets", [0, 0])
            entry["data_offsets"] = pick(rng, [[e, b], [b, e + 4], [b, len(body) + 1], [0, 4], [b - 4, e - 4],
                                               [b, b], [0, 2**64], [b], [b, e, 0], ["0", e], [-4, e]])
            labels.append(f"{name}.data_offsets={entry['data_offsets']}")
        elif what == 3:
            new = pick(rng, ["model.layers.2.mlp.up_proj.weight", "lm_head.weight", "x" * 300, "", "model.norm.weight.",
                             "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.99999999999.input_layernorm.weight"])
            header[new] = header.pop(name)
            labels.append(f"rename {name} -> {new[:40]}")
        elif what == 4:
            del header[name]
            labels.append(f"drop {name}")
        elif what == 5:
            header["__metadata__"] = pick(rng, [{"format": 5}, [1], "x", {"a": {"b": 1}}, None, {"format": "pt" * 1000}])
            labels.append(f"__metadata__={_show(header['__metadata__'])}")
        else:
            header, more = mutate_json(header, rng, n=1)
            labels += more
            names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    try:
        text = json.dumps(header).encode()
    except (ValueError, RecursionError):
        text, labels = b"[" * 100_000, labels + ["header nested 100000 deep"]
    if rng.random() < 0.3:
        text += b" " * rng.randrange(16)
    length = len(text)
    r = rng.random()
    if r < 0.1:
        length = pick(rng, [0, length - 1, length + 1, len(text) + len(body) + 1, 2**63, 200 * 2**20])
        labels.append(f"header length={length}")
    elif r < 0.18:
        body = body[:rng.randrange(len(body) + 1)]
        labels.append(f"data cut to {len(body)}")
    elif r < 0.22:
        body = body + b"\0" * rng.choice([1, 4, 4096])
        labels.append("data extended")
    elif r < 0.26:
        text = text.replace(b"{", b"\xff{", 1)
        labels.append("header not UTF-8")
    out = struct.pack("<Q", length & (2**64 - 1)) + text + body
    if rng.random() < 0.04:
        out = out[:rng.randrange(len(out) + 1)]
        labels.append("file truncated")
    return out, "; ".join(labels)

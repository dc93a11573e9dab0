"""The anatomy of a loaded model: every component as a tree, with its shape, parameter count and bytes.

    from qkv.explain.anatomy import anatomy, render_tree, render_diagram
    a = anatomy(qkv.load("smollm2"))      # Anatomy: the tree, totals, the numbers of the diagram
    print(render_tree(a)); print(render_diagram(a))
    a.to_dict()                           # the same as JSON-ready data (`qkv info --tree --format json`)

The tree is the loaded module tree (what runs), with two views applied so it reads like the paper: the
fused projections qkv runs (``qkv_proj``, ``gate_up_proj``: one matmul instead of three or two) are shown
split into q/k/v and gate/up again, each with its own rows, and the identical layers of a ``ModuleList``
are collapsed into one entry ``×N`` (layers that differ — say, a file with mixed quantisation types — form
their own groups). A parameter shared by two modules (a tied unembedding) is counted once, where it is
first seen, and the second place says which tensor it is.

Bytes: "file" is what the weights file stores for the tensor (GGUF: its ggml type and exact byte size from
the header; safetensors: its dtype); float32 / bfloat16 / float16 are numel × 4 / 2 / 2; int4 is qkv's
packed layout for one-token steps (``qkv.nn.quant``: 4-bit codes + a bfloat16 scale and zero per group of
32 weights = 0.625 bytes per weight), given for the projection matrices qkv packs (a Llama's ``*_proj``
weights) and absent for everything else, which stays in float.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ModelFormatError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_DTYPES = ("float32", "bfloat16", "float16", "int4")
INT4_GROUP = 32  # weights per (scale, zero) pair in qkv's int4 layout
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SPLICE = ("LlamaModel", "BertEncoder", "ModuleList", "Sequential")  # containers: their children move up
ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the paper's order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def int4_bytes(numel: int) -> int:
    """Bytes of ``numel`` weights in qkv's int4 layout: half a byte each + two bfloat16 per group of 32."""
    return numel // 2 + (numel // INT4_GROUP) * 4


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor as the loaded model holds it (a row block of a fused tensor is its own)."""

    name: str  # qkv's (Hugging Face) name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]
    file_type: str | None = None  # what the file stored: a GGUF ggml type or a safetensors dtype; None: unknown
    file_bytes: int | None = None
    tied_to: str | None = None  # the same Parameter as this tensor, listed earlier: counted once, there
    stored_as: str | None = None  # "qkv_proj[a:b]": rows a..b-1 of the fused matrix qkv runs
    int4: bool = False  # a matrix qkv packs to int4 for one-token steps

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def parameters(self) -> int:
        return 0 if self.tied_to else self.numel

    def bytes(self, dtype: str) -> int | None:
        """Bytes in a runtime dtype (0 when tied: held once elsewhere); None for int4 where qkv keeps no int4."""
        if dtype == "int4":
            return None if not self.int4 else 0 if self.tied_to else int4_bytes(self.numel)
        return self.parameters * DTYPE_BYTES[dtype]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "parameters": self.parameters,
                "file_type": self.file_type, "file_bytes": None if self.tied_to else self.file_bytes,
                "bytes": {d: self.bytes(d) for d in RUNTIME_DTYPES}, "tied_to": self.tied_to,
                "stored_as": self.stored_as}


@dataclass
class Component:
    """A module of the tree: its own tensors, its children, and how many identical copies it stands for."""

    name: str
    kind: str
    tensors: list[Tensor] = field(default_factory=list)
    children: list["Component"] = field(default_factory=list)
    repeat: int = 1
    indices: tuple[int, ...] = ()  # the layer indices a collapsed group stands for

    def parameters(self) -> int:
        """Of one copy (multiply by ``repeat`` for the group)."""
        return sum(t.parameters for t in self.tensors) + sum(c.parameters() * c.repeat for c in self.children)

    def bytes(self, dtype: str) -> int | None:
        own = [t.bytes(dtype) for t in self.tensors]
        kids = [(c.bytes(dtype), c.repeat) for c in self.children]
        parts = [b for b in own if b is not None] + [b * r for b, r in kids if b is not None]
        return sum(parts) if parts else None

    def file_bytes(self) -> int | None:
        own = [t.file_bytes for t in self.tensors if not t.tied_to]
        kids = [(c.file_bytes(), c.repeat) for c in self.children]
        if any(b is None for b in own) or any(b is None for b, _ in kids):
            return None
        return sum(own) + sum(b * r for b, r in kids)

    def file_types(self) -> list[str]:
        seen = [t.file_type for t in self.tensors if t.file_type and not t.tied_to]
        for c in self.children:
            seen += c.file_types()
        return list(dict.fromkeys(seen))

    def walk(self):
        """(component, copies) for every node below and including this one; copies multiply down the tree."""
        stack = [(self, self.repeat)]
        while stack:
            comp, n = stack.pop()
            yield comp, n
            stack.extend((c, n * c.repeat) for c in reversed(comp.children))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "repeat": self.repeat, "layers": list(self.indices) or None,
                "parameters": self.parameters(), "file_bytes": self.file_bytes(),
                "bytes": {d: self.bytes(d) for d in RUNTIME_DTYPES},
                "tensors": [t.to_dict() for t in self.tensors], "children": [c.to_dict() for c in self.children]}


@dataclass
class Anatomy:
    """The tree of one loaded model, its totals and the numbers its diagram is labelled with."""

    model: str
    architecture: str
    format: str
    source: str
    root: Component
    numbers: dict  # vocab, C, N layers, heads, kv heads, head dim, intermediate, context, rope …
    files: dict  # {"types": [...], "tensor_bytes": int | None, "file_bytes": int | None}
    held: dict  # what this process holds now: parameter and buffer bytes in their current dtypes
    notes: list[str] = field(default_factory=list)

    @property
    def tied(self) -> list[Tensor]:
        return [t for comp, _ in self.root.walk() for t in comp.tensors if t.tied_to]

    def totals(self) -> dict:
        r = self.root
        return {"parameters": r.parameters(), "file_bytes": r.file_bytes(),
                "bytes": {d: r.bytes(d) for d in RUNTIME_DTYPES},
                "tied": [{"name": t.name, "same_as": t.tied_to, "parameters_not_counted_again": t.numel}
                         for t in self.tied]}

    def to_dict(self) -> dict:
        return {"model": self.model, "architecture": self.architecture, "format": self.format,
                "source": self.source, "numbers": self.numbers, "files": self.files, "totals": self.totals(),
                "held": self.held, "dtype_bytes": {**DTYPE_BYTES, "int4": f"0.5 + 4/{INT4_GROUP}"},
                "notes": self.notes, "tree": self.root.to_dict()}


# --- building the tree --------------------------------------------------------------------------------------


def anatomy(loaded) -> Anatomy:
    """The anatomy of a ``qkv.load`` result (any model qkv loads: Llama GGUF / HF directory, BERT, a run)."""
    cfg = loaded.config
    ctx = _Context(file_tensors(loaded), llama=type(cfg).__name__ == "LlamaConfig")
    root = _component(loaded.model, type(loaded.model).__name__, "", ctx)
    notes = []
    if ctx.fused:
        notes.append(f"fused: {' and '.join(ctx.fused)} are one matrix each in the loaded model (one matmul instead "
                     "of several); shown split as the file stores them, = name[a:b] marks the rows")
    return Anatomy(loaded.name, type(loaded.model).__name__, loaded.format, str(loaded.source), root,
                   model_numbers(cfg), _file_summary(loaded, root), held_bytes(loaded.model), notes)


class _Context:
    """What the walk needs across modules: the file's facts, parameters already seen (ties), what was fused."""

    def __init__(self, facts: dict[str, tuple[str, int | None]], llama: bool):
        self.facts, self.llama = facts, llama
        self.seen: dict[int, str] = {}
        self.fused: list[str] = []

    def tensor(self, name: str, shape: tuple[int, ...], *, param=None, stored_as: str | None = None) -> Tensor:
        tied = None
        if param is not None:
            tied = self.seen.get(id(param))
            self.seen.setdefault(id(param), name)
        ftype, fbytes = self.facts.get(name, (None, None))
        int4 = self.llama and name.endswith("proj.weight") and len(shape) == 2 and shape[1] % INT4_GROUP == 0
        return Tensor(name, tuple(shape), ftype, fbytes, tied, stored_as, int4)


def _compact_weight(module: nn.Module):
    """(shape, identity) of a compact matrix or embedding (qkv.weights.compact) whose float32 weight is not
    resident; None for any other module. A tied unembedding shares its embedding's identity."""
    from ..nn.quant import CompactEmbedding, CompactLinear

    if "weight" in module._parameters:
        return None
    if isinstance(module, CompactLinear):
        return (module.out_features, module.in_features), getattr(module, "tie_key", module)
    if isinstance(module, CompactEmbedding):
        return (module.num_embeddings, module.embedding_dim), module
    return None


def _component(module: nn.Module, name: str, prefix: str, ctx: _Context) -> Component:
    own = [ctx.tensor(prefix + n, tuple(p.shape), param=p) for n, p in module.named_parameters(recurse=False)]
    compact = _compact_weight(module)
    if compact is not None:
        own.insert(0, ctx.tensor(prefix + "weight", compact[0], param=compact[1]))
    comp = Component(name, type(module).__name__, own)
    for cname, child in module.named_children():
        full = prefix + cname
        if cname in FUSED:
            comp.children += _split(module, child, cname, full, ctx)
        elif isinstance(child, nn.ModuleList):
            comp.children += _groups(child, cname, full, ctx)
        elif type(child).__name__ in SPLICE:
            inner = _component(child, cname, full + ".", ctx)
            comp.tensors += inner.tensors
            comp.children += [_renamed(c, f"{cname}.{c.name}") for c in inner.children]
        else:
            sub = _component(child, cname, full + ".", ctx)
            if sub.tensors or sub.children:  # modules without weights (RoPE, dropout, activations) are left out
                comp.children.append(sub)
    comp.children.sort(key=lambda c: ORDER.index(c.name) if c.name in ORDER else -1)  # stable for the rest
    return comp


@dataclass
class _Shape:
    shape: tuple[int, ...]


def _renamed(c: Component, name: str) -> Component:
    c.name = name
    return c


def _split(parent: nn.Module, fused: nn.Module, cname: str, full: str, ctx: _Context) -> list[Component]:
    """A fused projection as the separate ones it stacks (rows in order), each with its own file facts."""
    parts = FUSED[cname]
    compact = _compact_weight(fused)
    w = fused.weight if compact is None else _Shape(compact[0])
    if cname == "qkv_proj":
        d = parent.head_dim
        rows = [parent.n_heads * d, parent.n_kv_heads * d, parent.n_kv_heads * d]
    else:
        rows = [w.shape[0] // 2] * 2
    if sum(rows) != w.shape[0]:
        raise ModelFormatError(f"{full}: fused matrix of {w.shape[0]} rows does not split into {rows}")
    ctx.tensor(full + ".weight", tuple(w.shape), param=w if compact is None else compact[1])  # a tie would be found
    if cname not in ctx.fused:
        ctx.fused.append(cname)
    out, start = [], 0
    prefix = full[: -len(cname)]
    for part, n in zip(parts, rows):
        where = f"{cname}[{start}:{start + n}]"  # rows of the fused matrix
        tensors = [ctx.tensor(f"{prefix}{part}.weight", (n, w.shape[1]), stored_as=where)]
        if getattr(fused, "bias", None) is not None:
            tensors.append(ctx.tensor(f"{prefix}{part}.bias", (n,), stored_as=where))
        out.append(Component(part, f"= {where}", tensors))
        start += n
    return out


def _groups(mods: nn.ModuleList, cname: str, full: str, ctx: _Context) -> list[Component]:
    """The modules of a list, identical ones (same names, shapes, file types) collapsed into one ×N entry."""
    groups: dict[tuple, list] = {}
    for i, m in enumerate(mods):
        comp = _component(m, f"{cname}.{i}", f"{full}.{i}.", ctx)
        key = _signature(comp, f"{full}.{i}.", top=True)
        groups.setdefault(key, []).append((i, comp))
    out = []
    for members in groups.values():
        idx = tuple(i for i, _ in members)
        first = members[0][1]
        if len(members) > 1:
            first = _template(first, f"{full}.{idx[0]}.", f"{full}.{{i}}.")
        first.name, first.repeat, first.indices = f"{cname}.{_ranges(idx)}", len(idx), idx
        out.append(first)
    return out


def _signature(comp: Component, prefix: str, top: bool = False) -> tuple:
    """What must agree for two layers to be shown as one: names below the layer, kinds, shapes, file facts."""
    rel = lambda s: s.replace(prefix, "", 1) if s else s  # noqa: E731
    own = tuple((rel(t.name), t.shape, t.file_type, t.file_bytes, rel(t.tied_to), t.stored_as, t.int4)
                for t in comp.tensors)
    return (None if top else comp.name, comp.kind, own, tuple(_signature(c, prefix) for c in comp.children),
            comp.repeat)


def _template(comp: Component, prefix: str, pattern: str) -> Component:
    """Tensor names of a group's first member written with ``{i}`` for the layer index."""
    def sub(s):
        return s.replace(prefix, pattern, 1) if s else s
    comp.tensors = [Tensor(sub(t.name), t.shape, t.file_type, t.file_bytes, sub(t.tied_to), t.stored_as, t.int4)
                    for t in comp.tensors]
    comp.children = [_template(c, prefix, pattern) for c in comp.children]
    return comp


def _ranges(idx: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- what the file stored -----------------------------------------------------------------------------------


def file_tensors(loaded) -> dict[str, tuple[str, int | None]]:
    """qkv name -> (type the file stored it in, its bytes in the file), read from the file's header again
    (a GGUF's tensor table, a safetensors header). Empty for a training run's checkpoint."""
    src = Path(loaded.source)
    if loaded.format == "gguf":
        return _gguf_facts(src)
    if loaded.format == "hf":
        return _safetensors_facts(src, bert=type(loaded.config).__name__ == "BertConfig")
    return {}


def _gguf_facts(path: Path) -> dict[str, tuple[str, int | None]]:
    from ..weights.gguf import read_gguf
    from ..weights.maps import GGUF_ROPE_FREQS, gguf_to_hf_name

    with read_gguf(path) as f:
        return {gguf_to_hf_name(n, source=str(path)): (i.ggml_type, i.nbytes)
                for n, i in f.tensors.items() if n != GGUF_ROPE_FREQS}


def _safetensors_facts(root: Path, *, bert: bool) -> dict[str, tuple[str, int | None]]:
    from safetensors import SafetensorError, safe_open

    from ..weights import hf
    from ..weights.maps import hf_bert_state

    out: dict[str, tuple[str, int | None]] = {}
    for f in hf.weight_files(root):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():
                    s = st.get_slice(key)
                    dt = s.get_dtype()
                    size = SAFETENSORS_ITEMSIZE.get(dt)
                    out[key] = (dt, None if size is None else math.prod(s.get_shape()) * size)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelFormatError(f"{f}: cannot read the safetensors header ({type(e).__name__})") from None
    return hf_bert_state(out, source=str(root)) if bert else out


def _file_summary(loaded, root: Component) -> dict:
    src = Path(loaded.source)
    if loaded.format == "gguf":
        paths = [src]
    elif loaded.format == "hf":
        from ..weights import hf

        paths = hf.weight_files(src)
    else:
        paths = []
    return {"types": root.file_types(), "tensor_bytes": root.file_bytes(),
            "file_bytes": sum(os.path.getsize(p) for p in paths) if paths else None}


def held_bytes(model: nn.Module) -> dict:
    """What the loaded model holds now: unique parameters and buffers (e.g. qkv's int4 / float16 decode
    copies, which are buffers) in the dtypes they have."""
    params = {id(p): p for p in model.parameters()}.values()
    bufs = {id(b): (n.rsplit(".", 1)[-1], b) for n, b in model.named_buffers()}.values()
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    kinds = {"packed": "int4 decode copies", "scales_zeros": "int4 decode copies", "blocks": "int4 decode copies",
             "weight16": "float16 decode copies",
             "w8": "int8 decode copies", "scales8": "int8 decode copies"}
    parts: dict[str, int] = {}
    for name, b in bufs:
        key = kinds.get(name, "other buffers")
        parts[key] = parts.get(key, 0) + b.numel() * b.element_size()
    return {"parameter_bytes": sum(p.numel() * p.element_size() for p in params), "parameter_dtypes": dtypes,
            "buffer_bytes": sum(parts.values()), "buffers": parts}


# --- the numbers of the diagram -----------------------------------------------------------------------------


def model_numbers(cfg) -> dict:
    """The numbers the architecture diagram is labelled with, from the config (for an architecture without a
    diagram — a `qkv train` encoder–decoder — its config's fields as they are)."""
    llama = type(cfg).__name__ == "LlamaConfig"
    if not llama and type(cfg).__name__ != "BertConfig":
        import dataclasses

        return {"kind": "other", **(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {})}
    scaling = getattr(cfg, "rope_scaling", None)
    return {
        "kind": "llama" if llama else "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "context": cfg.max_position_embeddings, "rope_theta": getattr(cfg, "rope_theta", None) if llama else None,
        "rope_scaling": None if scaling is None else dict(vars(scaling), rope_type="llama3"),
        "rope_freq_factors": getattr(cfg, "rope_freq_factors", None) is not None,
        "tied_embeddings": getattr(cfg, "tie_word_embeddings", None),
        "norm_eps": getattr(cfg, "rms_norm_eps", getattr(cfg, "layer_norm_eps", None)),
        "activation": "silu (SwiGLU)" if llama else getattr(cfg, "hidden_act", None),
        "pooler": getattr(cfg, "add_pooling_layer", None),
    }


# --- rendering ----------------------------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    """Decimal units from an exact integer (the same text on every machine)."""
    if n is None:
        return "—"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _shape(c: Component) -> str:
    parts = []
    for t in c.tensors:
        s = "×".join(map(str, t.shape))
        parts.append(s if t.name.endswith("weight") or not parts else f"+{s}")
    return " ".join(parts)


def _file(c: Component) -> str:
    if c.tensors and all(t.tied_to for t in c.tensors):
        return "tied"
    types = "+".join(dict.fromkeys(t.file_type for t in c.tensors if t.file_type and not t.tied_to))
    b = c.file_bytes()
    return f"{types} {fmt_bytes(b)}".strip() if types else fmt_bytes(b)


def _row(c: Component, label: str) -> list[str]:
    only_tied = bool(c.tensors) and not c.children and all(t.tied_to for t in c.tensors)
    params = "0 (tied)" if only_tied else f"{c.parameters():,}"
    return [label, _shape(c), params, _file(c), fmt_bytes(c.bytes("float32")), fmt_bytes(c.bytes("bfloat16")),
            fmt_bytes(c.bytes("int4"))]


def _label(c: Component) -> str:
    s = f"{c.name}  {c.kind}"
    if c.repeat > 1:
        s = f"{c.name} ×{c.repeat}  {c.kind}, each"
    tied = [t for t in c.tensors if t.tied_to]
    if tied:
        s += f"  = {tied[0].tied_to.removesuffix('.weight')}"
    return s


def render_tree(a: Anatomy) -> str:
    """The tree as a table: one row per component, numbers per copy (×N rows stand for N identical ones)."""
    head = ["component", "shape", "parameters", "file", "float32", "bf16/fp16", "int4*"]
    rows = [head, [f"{a.root.name}  (the whole model)"] + [""] * (len(head) - 1)]
    _tree_rows(a.root, "", rows)
    tot = a.totals()
    rows.append(["total", "", f"{tot['parameters']:,}", fmt_bytes(tot["file_bytes"]),
                 fmt_bytes(tot["bytes"]["float32"]), fmt_bytes(tot["bytes"]["bfloat16"]),
                 fmt_bytes(tot["bytes"]["int4"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]  # box drawing and × are one cell wide
    right = {2, 4, 5, 6}
    lines = [_heading(a, tot)]
    for r in rows:
        cells = [x.rjust(w) if i in right else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines += _footnotes(a, tot)
    return "\n".join(lines) + "\n"


def _tree_rows(comp: Component, indent: str, rows: list) -> None:
    for k, c in enumerate(comp.children):
        last = k == len(comp.children) - 1
        rows.append(_row(c, indent + ("└─ " if last else "├─ ") + _label(c)))
        _tree_rows(c, indent + ("   " if last else "│  "), rows)


def _heading(a: Anatomy, tot: dict) -> str:
    types = ", ".join(a.files["types"])
    where = f"{a.format} file ({types})" if types else a.format
    return f"{a.model} · {a.architecture} · {where} · {tot['parameters']:,} parameters"


def _footnotes(a: Anatomy, tot: dict) -> list[str]:
    out = ["numbers are per copy: a ×N row stands for N identical layers, the total counts each once"]
    for t in tot["tied"]:
        out.append(f"tied: {t['name']} is {t['same_as']} (the same {t['parameters_not_counted_again']:,} numbers), "
                   "counted once — the total equals the loaded state dict's tensors with the tie counted once")
    f = a.files
    if f["file_bytes"] is not None and f["tensor_bytes"] is not None:
        rest = "header, metadata and tokenizer" if a.format == "gguf" else "the safetensors header"
        out.append(f"file: {fmt_bytes(f['file_bytes'])} on disk, {fmt_bytes(f['tensor_bytes'])} of it weights "
                   f"(the rest: {rest})")
    if tot["bytes"]["int4"] is not None:
        out.append("int4*: the projection matrices in qkv's packed int4 layout (4-bit codes + bfloat16 scale and "
                   "zero per 32 weights = 0.625 B/weight), which qkv keeps for one-token steps when it loads a "
                   "Q4_0/Q4_1 GGUF on the CPU; other tensors stay in float")
    else:
        out.append("int4*: qkv packs int4 copies only for a Llama's projection matrices; this model has none")
    h = a.held
    extra = "".join(f" + {fmt_bytes(n)} {what}" for what, n in h["buffers"].items() if n)
    out.append(f"held now: {fmt_bytes(h['parameter_bytes'])} of {'/'.join(h['parameter_dtypes'])} weights{extra}")
    return out + a.notes


def render_diagram(a: Anatomy) -> str:
    """The architecture as the lecture draws it, labelled with this model's numbers."""
    n = a.numbers
    if n["kind"] == "other":
        return f"(no diagram for {a.architecture}: qkv draws the Llama decoder and the BERT encoder)\n"
    return _llama_diagram(n) if n["kind"] == "llama" else _bert_diagram(n)


def _box(title: str, body: list[str]) -> list[str]:
    width = max(len(s) for s in [title + "──"] + body) + 2
    top = f"┌─ {title} " + "─" * (width - len(title) - 3) + "┐"
    return [top] + [f"│ {s}{' ' * (width - len(s) - 1)}│" for s in body] + ["└" + "─" * width + "┘"]


def _residual(line: str) -> list[str]:
    """``line`` and under it the skip connection: from its ┬ to the + of its (+)."""
    a, b = line.index("┬"), line.index("(+)") + 1
    label = " residual "
    run = b - a - 1
    left = (run - len(label)) // 2
    return [line, " " * a + "└" + "─" * left + label + "─" * (run - left - len(label)) + "┘"]


def _rope_text(n: dict) -> str:
    s = f"RoPE θ = {n['rope_theta']:,g}"
    if n["rope_scaling"]:
        r = n["rope_scaling"]
        s += f", llama3 scaling ×{r['factor']:g} (original context {r['original_max_position_embeddings']:,})"
    elif n["rope_freq_factors"]:
        s += ", per-frequency factors from the file"
    return s


def _llama_diagram(n: dict) -> str:
    v, c, h, k = n["vocab_size"], n["hidden_size"], n["heads"], n["kv_heads"]
    d, i = n["head_dim"], n["intermediate_size"]
    tie = "tied: the embedding matrix, transposed" if n["tied_embeddings"] else "its own matrix"
    layer = [
        *_residual("x ─┬─► RMSNorm ─► GQA attention with RoPE ─► (+) ─► h"),
        *_residual("h ─┬─► RMSNorm ─► SwiGLU MLP ──────────────► (+) ─► x"),
        "",
        f"attention: H = {h} query heads, KV = {k} key/value heads ({h // k} queries per kv head),",
        f"           head dim D = {d}, causal, {_rope_text(n)}",
        f"SwiGLU:    down(silu(gate(h)) · up(h)),  C {c:,} → I {i:,} → C {c:,}",
    ]
    lines = [f"token ids (B, T), each < V = {v:,}", "   │", "   ▼",
             f"embedding  V × C = {v:,} × {c:,}", "   │  x: (B, T, C = {:,})".format(c), "   ▼",
             *_box(f"N = {n['layers']} × decoder layer (pre-norm)", layer), "   │", "   ▼",
             f"RMSNorm  C = {c:,}", "   │", "   ▼",
             f"unembedding (lm_head)  C → V = {c:,} → {v:,}  ({tie})", "   │", "   ▼",
             f"logits (B, T, V = {v:,})  ·  context {n['context']:,} positions"]
    return "\n".join(lines) + "\n"


def _bert_diagram(n: dict) -> str:
    v, c, h, d, i = n["vocab_size"], n["hidden_size"], n["heads"], n["head_dim"], n["intermediate_size"]
    layer = [
        *_residual("x ─┬─► self-attention ─► (+) ─► LayerNorm ─► h"),
        *_residual("h ─┬─► FFN ────────────► (+) ─► LayerNorm ─► x"),
        "",
        f"attention: H = {h} heads, head dim D = {d}, bidirectional (no causal mask), no RoPE",
        f"FFN:       W2 {n['activation']}(W1 h),  C {c:,} → I {i:,} → C {c:,}",
    ]
    lines = [f"token ids (B, T), each < V = {v:,}  (+ segment ids)", "   │", "   ▼",
             f"embeddings: word {v:,} × {c:,} + learned position {n['context']:,} × {c:,} + segment → LayerNorm",
             "   │  x: (B, T, C = {:,})".format(c), "   ▼",
             *_box(f"N = {n['layers']} × encoder layer (post-norm)", layer), "   │", "   ▼",
             f"hidden states (B, T, C = {c:,})" + ("  → pooler: tanh(W h[CLS])" if n["pooler"] else "")]
    return "\n".join(lines) + "\n"

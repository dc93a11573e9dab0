"""The compact CPU mode of a GGUF Llama (``qkv.load(..., dtype="auto")`` on the CPU): the file's quantised
values kept as they are, nothing dequantised to a resident float32 copy.

* Q4_0/Q4_1 matrices: their 4-bit codes re-packed once into the layout of PyTorch's int4 kernel, with a
  bfloat16 scale and zero per group of 32 (q/k/v and gate/up fused, one matmul each) — or, where the
  native 4-bit operator decodes (qkv.weights.matvec: AVX2 CPUs), the file's own blocks, rows in qkv's order.
* Any other matrix type, and the unembedding whatever its type: int8 per row (symmetric, round to
  nearest) of its exact values, multiplied by ``torch.ops.aten._weight_int8pack_mm`` — the unembedding by
  qkv's native ``q8_mv`` where qkv.weights.matvec is built (AVX2 and AVX-512 CPUs).
* The embedding: rows dequantised from the mapped file when they are looked up (exact).
* Norms stay float32 parameters.

One-token decode steps and short prompts run on the compact copies: up to this machine's crossover where
``qkv compile`` measured it (qkv.weights.crossover), else up to ``COMPACT_ROWS`` = 64 tokens,
``COMPACT_ROWS_BF16`` = 40 where prompts run in bfloat16 and ``COMPACT_ROWS_Q4`` = 20 on the native operator's
blocks. Longer prompts and every exact analysis (``qkv.nn.quant.exact_weights``) multiply by the exact float32
weights, dequantised from the mapped file for the call. The re-packed tensors are cached on disk
(``qkv.weights.cache``) and mapped on later loads. The GGUF file stays open (mapped, read-only) for the
model's lifetime.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..errors import ConfigError
from ..nn.quant import COMPACT_ROWS, COMPACT_ROWS_BF16, COMPACT_ROWS_Q4, CompactEmbedding, CompactLinear, pack_int4
from . import cache as disk, crossover
from .convert import gguf_to_rotate_half
from .int4 import INT4_TYPES, TORCH_DEQUANT, dequantize_into, dequantize_rows, int4_codes
from .maps import GGUF_ROPE_PERMUTED
from .matvec import KINDS as Q4_KINDS, kernels as native_kernels
from .native import dequantizer

LAYOUT = "llama-compact-2"  # what the cached tensors are; changes when their meaning changes
LAYOUT_BLOCKS = "llama-compact-blocks-1"  # the same with the native operator's blocks for the 4-bit matrices
FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
SINGLE = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def _raw(f, name: str) -> torch.Tensor:
    with warnings.catch_warnings():  # the mapping is read-only and is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(f.raw(name))


class _Part:
    """One GGUF matrix: its name, type, (N, K) shape and the head count if its rows need GGUF's RoPE order
    changed to rotate-half (q and k)."""

    def __init__(self, f, gguf_name: str, heads: int | None):
        info = f.tensors[gguf_name]
        self.f, self.name, self.type, self.shape, self.heads = f, gguf_name, info.ggml_type, tuple(info.shape), heads

    def exact(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float32 (N, K), the file's exact values, in qkv's row order (or those rounded once to ``dtype``)."""
        return self.exact_into(torch.empty(self.shape, dtype=dtype))

    def exact_into(self, out: torch.Tensor) -> torch.Tensor:
        """The same, written into ``out`` (N, K) float32 or bfloat16: the raw blocks are put in qkv's row order
        first (bytes, not floats, are moved) and dequantised in place — by the native dequantiser of
        ``qkv compile`` where one is cached (qkv.weights.native: one pass, the same bits), else by the eager one."""
        if self.type not in TORCH_DEQUANT:
            return out.copy_(self._order(self.f.tensor(self.name)))
        n, k = self.shape
        raw = _raw(self.f, self.name).view(n, -1)
        if self.heads is not None:
            raw = self._order(raw)
        blocks, rows = raw.reshape(-1, TORCH_DEQUANT[self.type]), out.view(-1, 32)
        fast = dequantizer(self.type, out.dtype)
        if fast is not None and fast(blocks, rows):
            return out
        if out.dtype == torch.float32:
            return dequantize_into(blocks, self.type, rows).view(n, k)
        return out.copy_(dequantize_into(blocks, self.type, torch.empty(rows.shape)).view(n, k))

    def blocks(self) -> torch.Tensor:
        """(N, K / 32 * block bytes) uint8: the file's blocks, rows in qkv's order."""
        n = self.shape[0]
        return self._order(_raw(self.f, self.name).view(n, -1)).contiguous()

    def codes(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._order(t) for t in int4_codes(self.f.raw(self.name), self.type, self.shape,
                                                         name=f"{self.f.path}: {self.name}"))

    def _order(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.heads is None else gguf_to_rotate_half(t, self.heads, name=f"{self.f.path}: {self.name}")


def _exact_fn(parts: list[_Part]):
    """The exact float32 weight of (fused) parts, each dequantised into its rows of one output (or rounded once
    to the ``dtype`` asked for: a bfloat16 prompt weight without a float32 one in between)."""
    rows = [p.shape[0] for p in parts]

    def exact(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(sum(rows), parts[0].shape[1], dtype=dtype)
        for p, block in zip(parts, out.split(rows)):
            p.exact_into(block)
        return out
    return exact


def _matrices(f, cfg, hf_to_gguf: dict[str, str]) -> dict[str, list[_Part]]:
    """Module path -> its GGUF parts, for every matrix the compact model holds (fused where possible)."""
    heads = {part: getattr(cfg, field) for part, field in GGUF_ROPE_PERMUTED.items()}  # RoPE-ordered rows
    out: dict[str, list[_Part]] = {}
    for i in range(cfg.num_hidden_layers):
        for block, (fused, names) in FUSED.items():
            out[f"model.layers.{i}.{block}.{fused}"] = [
                _Part(f, hf_to_gguf[f"model.layers.{i}.{block}.{n}.weight"], heads.get(f"{block}.{n}")) for n in names]
        for block, name in SINGLE:
            out[f"model.layers.{i}.{block}.{name}"] = [_Part(f, hf_to_gguf[f"model.layers.{i}.{block}.{name}.weight"], None)]
    head = "lm_head.weight" if "lm_head.weight" in hf_to_gguf else "model.embed_tokens.weight"
    out["lm_head"] = [_Part(f, hf_to_gguf[head], None)]
    return out


def _kind(path: str, parts: list[_Part], native: frozenset = frozenset()) -> str:
    """``q4`` (qkv's native operator on the file's blocks: all parts of one 4-bit type), ``int4`` (torch's
    kernel), ``int8`` (the unembedding, and matrices of other types) or ``q8`` (those int8 rows, qkv's native
    operator); ``native`` holds the native kinds this load may use (qkv.weights.matvec.kernels)."""
    if path == "lm_head" or not all(p.type in INT4_TYPES for p in parts):  # q8: the unembedding's one row a step
        return "q8" if path == "lm_head" and "q8" in native and parts[0].shape[1] % 32 == 0 else "int8"
    return "q4" if "q4" in native and len({p.type for p in parts}) == 1 else "int4"


def _pack(path: str, parts: list[_Part], native: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """The compact tensors of one matrix (the slow part of a first load)."""
    kind = _kind(path, parts, native)
    if kind == "q4":
        return {f"{path}.blocks": torch.cat([p.blocks() for p in parts])}
    if kind == "int4":
        c, s, z = (torch.cat(list(t), dim=0) for t in zip(*(p.codes() for p in parts)))
        packed, sz = pack_int4(c, s, z)
        return {f"{path}.packed": packed, f"{path}.scales_zeros": sz}
    w8, scales = CompactLinear.quantize_int8(_exact_fn(parts)())
    return {f"{path}.w8": w8, f"{path}.scales8": scales}


def build(model, f, cfg, hf_to_gguf: dict[str, str], *, use_cache: bool = True) -> dict:
    """Swap compact modules into ``model`` (built on the meta device, norms assigned) in place; return facts
    for ``Loaded.info`` (what was made, whether the disk cache was used, and its path)."""
    mats = _matrices(f, cfg, hf_to_gguf)
    native = native_kernels()
    layout = LAYOUT_BLOCKS if "q4" in native else LAYOUT
    info: dict = {}
    tensors = None
    path = None
    if use_cache:
        sha = disk.known_sha256(f.path)
        path = disk.cache_path(sha, layout)
        meta = {"gguf_sha256": sha, "layout": layout}
        try:
            tensors = disk.read(path, meta)
            info["compact_cache"] = f"hit {path}"
        except FileNotFoundError:
            info["compact_cache"] = f"built {path}"
        except (OSError, disk.CacheInvalid) as e:
            info["compact_cache"] = f"rebuilt {path} (the old file was unusable: {e})"
    if tensors is not None and not _fits(tensors, mats, native):
        info["compact_cache"] = f"rebuilt {path} (its tensors do not fit this model)"
        tensors = None
    if tensors is None:
        tensors = {}
        for p, parts in mats.items():
            tensors.update(_pack(p, parts, native))
        if use_cache:
            try:
                disk.write(path, tensors, meta)
            except OSError as e:  # a read-only home is no reason to fail: the next load packs again
                info["compact_cache"] = f"not written ({e.strerror or e})"
        else:
            info["compact_cache"] = "off"
    # the block types its prompts dequantise (what `qkv compile` reports the native dequantiser for)
    model.compact_block_types = sorted({q.type for parts in mats.values() for q in parts if q.type in TORCH_DEQUANT})
    kinds = {"q4": 0, "int4": 0, "int8": 0, "q8": 0}
    prompt = prompt_dtype()
    for p, parts in mats.items():
        kind = _kind(p, parts, native)
        kinds[kind] += len(parts)
        shape = (sum(q.shape[0] for q in parts), parts[0].shape[1])
        exact = _exact_fn(parts)
        if kind == "q4":
            mod = CompactLinear.from_blocks(tensors[f"{p}.blocks"], Q4_KINDS[parts[0].type], exact, shape=shape)
        elif kind == "int4":
            mod = CompactLinear.from_int4(tensors[f"{p}.packed"], tensors[f"{p}.scales_zeros"], exact, shape=shape)
        else:
            mod = CompactLinear.from_int8(tensors[f"{p}.w8"], tensors[f"{p}.scales8"], exact, native=kind == "q8")
        mod.prompt_dtype = prompt
        mod.small_m = (COMPACT_ROWS_Q4 if kind == "q4" else
                       COMPACT_ROWS_BF16 if prompt == torch.bfloat16 else COMPACT_ROWS)
        _place(model, p, mod)
    emb = _Part(f, hf_to_gguf["model.embed_tokens.weight"], None)
    model.model.embed_tokens = CompactEmbedding(emb.shape[0], emb.shape[1], _rows_fn(emb), emb.exact)
    if getattr(cfg, "tie_word_embeddings", False):  # one resident table if either side is read
        model.lm_head._exact_fn = _table_of(model.model.embed_tokens)
        object.__setattr__(model.lm_head, "tie_key", model.model.embed_tokens)  # qkv info shows the tie (not a child)
    described = {"q4": "int4 (the file's blocks, qkv's native operator)", "int4": "int4",
                 "int8": "int8 (per row)", "q8": "int8 (per row, qkv's native operator)"}
    made = ", ".join(f"{n} matrices {described[k]}" for k, n in kinds.items() if n)
    info["decode_weights"] = (f"{made} (the unembedding int8); embedding rows read from the file; prompts on the "
                              "weights dequantised per call "
                              f"({str(prompt).removeprefix('torch.')}); analyses on the exact float32 weights")
    info["prompt_dtype"] = str(prompt).removeprefix("torch.")
    # this machine's crossover, where `qkv compile` measured it; QKV_COMPILE=0 uses nothing it made
    rows = crossover.cached(model) if disk.compile_mode() != "0" else None
    if rows is not None:
        crossover.apply(model, rows)
    most = "/".join(map(str, sorted({m.small_m for m in crossover.layer_matrices(model)})))
    how = "measured here by qkv compile" if rows is not None else "the default; qkv compile measures this machine's"
    info["compact_rows"] = f"prompts of up to {most} tokens on the compact matrices ({how})"
    return info


def _fits(tensors: dict[str, torch.Tensor], mats: dict[str, list[_Part]], native: frozenset = frozenset()) -> bool:
    """Every tensor the model needs is there, with the dtype and the N/K dimensions it must have."""
    want = set()
    for p, parts in mats.items():
        n, k = sum(q.shape[0] for q in parts), parts[0].shape[1]
        kind = _kind(p, parts, native)
        if kind == "q4":
            checks = {f"{p}.blocks": (torch.uint8, (n, k // 32 * INT4_TYPES[parts[0].type]))}
        elif kind == "int4":
            checks = {f"{p}.packed": (None, n), f"{p}.scales_zeros": (torch.bfloat16, (k // 32, n, 2))}
        else:
            checks = {f"{p}.w8": (torch.int8, (n, k)), f"{p}.scales8": (torch.bfloat16, (n,))}
        for name, (dt, shape) in checks.items():
            t = tensors.get(name)
            if t is None or (dt is not None and t.dtype != dt) or \
                    (tuple(t.shape) != shape if isinstance(shape, tuple) else t.shape[0] != shape):
                return False
            want.add(name)
    return set(tensors) == want


def prompt_dtype() -> torch.dtype:
    """bfloat16 for prompts' matmuls where the CPU has AMX and ATen runs its AVX-512 kernels (several times
    faster than float32 there; on AVX2-only CPUs bfloat16 matmuls are far slower), else float32.
    QKV_PROMPT_DTYPE=float32 or bfloat16 overrides it."""
    choice = os.environ.get("QKV_PROMPT_DTYPE", "auto")
    if choice in ("float32", "bfloat16"):
        return getattr(torch, choice)
    if choice != "auto":
        raise ConfigError(f"QKV_PROMPT_DTYPE={choice!r} is not auto, float32 or bfloat16; fix: set one of those "
                          "or unset it")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if amx and torch.backends.cpu.get_cpu_capability() == "AVX512" else torch.float32


def _table_of(embedding: CompactEmbedding):
    """The tied unembedding's exact weight: the embedding's resident table if something made it resident,
    else the table dequantised for this call."""
    def table(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = embedding._parameters.get("weight")
        return p.detach().to(dtype) if p is not None else embedding._table_fn(dtype)
    return table


def _rows_fn(part: _Part):
    if part.type in TORCH_DEQUANT:
        return lambda ids: dequantize_rows(_raw(part.f, part.name), part.type, part.shape, ids)
    return lambda ids: part.exact().index_select(0, ids)


def _place(model, path: str, mod) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if leaf == "qkv_proj":
        owner.fuse_qkv(mod)
    elif leaf == "gate_up_proj":
        owner.fuse_gate_up(mod)
    else:
        setattr(owner, leaf, mod)


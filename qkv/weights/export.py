"""Export a Llama-architecture decoder: a Hugging Face directory or a GGUF file, the inverse of ``qkv.load``.

    save_hf_dir(loaded.model, loaded.tokenizer, "out/my-model")      # config.json + model.safetensors + tokenizer
    save_gguf(loaded.model, loaded.tokenizer, "out/my-model.gguf")   # one GGUF v3 file, F32 (or dtype="f16")

Why both: a model trained or converted with qkv should run in transformers and in llama.cpp, and come
back through ``qkv.load`` with the same logits (tests/weights/test_export.py proves the round trips).

The weights are the model's exact float weights, under the names of a plain ``LlamaForCausalLM``:
``qkv.load(dtype="auto")`` swaps in fast-decode layers (qkv.nn.quant) that keep those float weights,
fusing q/k/v and gate/up into one matrix each; those are split back here. Every file is written whole
or not at all (qkv.io): a temp file beside the target, fsync, rename. The GGUF bytes themselves are
qkv.weights.gguf_write's; this module decides what goes in them (names, row order, metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import LlamaConfig
from ..errors import ConfigError, InputError, TokenizerError
from ..io import atomic_file, atomic_path, write_text
from ..load import check_state
from ..models.llama import LlamaForCausalLM
from ..nn.rope import rope_frequencies
from ..text.tokenizer import Tokenizer
from .convert import rotate_half_to_gguf
from .gguf_write import gguf_header, write_tensor
from .maps import GGUF_LLAMA_CONFIG, GGUF_ROPE_FREQS, GGUF_ROPE_PERMUTED, hf_to_gguf_name

ARCH = "llama"
# llama.cpp's types for the tokenizer arrays; other tokenizer keys get theirs from the Python value
TOKENIZER_TYPES = {"tokenizer.ggml.tokens": "ARRAY[STRING]", "tokenizer.ggml.merges": "ARRAY[STRING]",
                   "tokenizer.ggml.token_type": "ARRAY[INT32]", "tokenizer.ggml.scores": "ARRAY[FLOAT32]"}
UNUSED_TOKEN = 5  # llama.cpp's token type of the [PAD{i}] tokens that fill the vocabulary up to vocab_size
# files of an existing directory that qkv.load would read instead of (or beside) what is exported
STALE_HF_FILES = ("model.safetensors.index.json", "chat_template.jinja", "special_tokens_map.json",
                  "run.json")  # run.json: qkv.load reads the directory as a `qkv train` run


# --- shared: the model's config and float weights -------------------------------------------------------


def _llama_config(model: Any, tokenizer: Any) -> LlamaConfig:
    """The config of a qkv Llama; anything else is refused before a file is touched."""
    if not isinstance(model, LlamaForCausalLM) or not isinstance(getattr(model, "config", None), LlamaConfig):
        raise ConfigError(f"export writes Llama-architecture decoders (qkv.models.llama.LlamaForCausalLM), got a "
                          f"{type(model).__name__}; fix: export a Llama model (a text-task run, a llama GGUF or "
                          "HF directory, or the .model of one loaded)")
    if not isinstance(tokenizer, Tokenizer):
        raise TokenizerError(f"export needs a qkv.text.Tokenizer, got {type(tokenizer).__name__}; "
                             "fix: pass the .tokenizer of the loaded model")
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}; fix: pass the tokenizer the model was trained with")
    return cfg


def _float_state(model: LlamaForCausalLM, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Float32 CPU tensors under a plain LlamaForCausalLM's names, in its order, checked by name and shape."""
    h, k, d, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    fused = {"self_attn.qkv_proj": (("q_proj", h * d), ("k_proj", k * d), ("v_proj", k * d)),
             "mlp.gate_up_proj": (("gate_proj", f), ("up_proj", f))}
    state: dict[str, torch.Tensor] = {}
    from ..nn.quant import exact_state_dict

    for name, t in exact_state_dict(model).items():  # a compact model's matrices too, exact
        t = t.detach().to("cpu", torch.float32)
        module, _, leaf = name.rpartition(".")  # model.layers.0.self_attn.qkv_proj, weight
        key = next((fk for fk in fused if module.endswith("." + fk)), None)
        if key is None:
            state[name] = t
            continue
        stem = module[:-len(key)] + key.split(".")[0]  # model.layers.0.self_attn
        parts = t.split([rows for _, rows in fused[key]], dim=0)  # fused rows: q then k then v (gate then up)
        for (proj, _), part in zip(fused[key], parts):
            state[f"{stem}.{proj}.{leaf}"] = part.clone()  # own storage: safetensors refuses shared memory
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        reference = LlamaForCausalLM(cfg)
    check_state(reference, state, source=f"the {type(model).__name__} to export")
    return {n: state[n].contiguous() for n in reference.state_dict() if n in state}


# --- Hugging Face directory ------------------------------------------------------------------------------


def save_hf_dir(model: LlamaForCausalLM, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                chat_template: str | None = None) -> Path:
    """Write a Hugging Face model directory that ``qkv.load`` and ``transformers`` both read.

    Files: config.json, model.safetensors (float32; no lm_head.weight when tied), tokenizer.json,
    tokenizer_config.json (BOS/EOS names, add_bos_token, chat template), generation_config.json (stop ids).
    config.json is written last, so an interrupted export is a directory qkv.load refuses by name.
    A model whose RoPE came from a GGUF ``rope_freqs`` keeps it as ``rope_freq_factors`` in config.json:
    qkv reads it back, transformers has no such key.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    cfg = _llama_config(model, tokenizer)
    state = _float_state(model, cfg)
    out = _prepare_dir(Path(out_dir))
    stops = list(dict.fromkeys([*tokenizer.eos_ids, *cfg.eos_token_id]))
    try:
        with atomic_path(out / "model.safetensors") as tmp:  # streamed: no second copy of the weights in memory
            save_file(state, tmp, metadata={"format": "pt"})
    except SafetensorError as e:
        raise InputError(f"cannot write {out / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
    save_tokenizer(tokenizer, out, chat_template=chat_template)
    write_text(out / "generation_config.json", _json({"bos_token_id": tokenizer.bos_id, "eos_token_id": stops}))
    write_text(out / "config.json", _json(hf_config(cfg)))
    return out


def save_tokenizer(tokenizer: Tokenizer, out: Path, *, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template): what Tokenizer.from_hf_dir reads."""
    tokenizer_json, tokenizer_config = tokenizer.to_hf_json()
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template:
        tokenizer_config["chat_template"] = template
    write_text(Path(out) / "tokenizer.json", tokenizer_json)
    write_text(Path(out) / "tokenizer_config.json", _json(tokenizer_config))


def _prepare_dir(out: Path) -> Path:
    """The output directory, made if needed; refused if it holds files qkv.load would read with ours."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a directory; fix: give a new or existing directory for the model")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create directory {out}: {e.strerror or e}; fix: choose a writable location") from None
    stale = [n for n in STALE_HF_FILES if (out / n).exists()]
    if stale:
        raise InputError(f"{out / stale[0]} is left from another model and qkv.load would read it with the "
                         "exported files; fix: export into a new or empty directory")
    return out


def hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """config.json: LlamaConfig.to_dict (HF keys, Llama 3 rope_scaling) plus what transformers expects."""
    d = {k: v for k, v in cfg.to_dict().items() if v is not None or k in ("rope_scaling", "bos_token_id")}
    return {**d, "hidden_act": "silu", "torch_dtype": "float32"}


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --- GGUF ------------------------------------------------------------------------------------------------


def save_gguf(model: LlamaForCausalLM, tokenizer: Tokenizer, path: str | os.PathLike, *,
              chat_template: str | None = None, dtype: str = "f32") -> Path:
    """Write one GGUF v3 file, laid out as llama.cpp's converter writes a Llama, that ``qkv.load`` reads back.

    ``dtype="f16"`` stores the matrices as F16 (norms and biases stay F32, as llama.cpp keeps them).
    Q/K rows go in llama.cpp's interleaved-RoPE order; Llama 3 RoPE scaling becomes ``rope_freqs``.
    The file is streamed to a temp file beside ``path`` and renamed: never half written, never all in memory.
    """
    if dtype not in ("f32", "f16"):
        raise ConfigError(f"GGUF dtype {dtype!r} is not one of f32, f16")
    cfg = _llama_config(model, tokenizer)
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target} is a directory; fix: give a file path such as {target / 'model.gguf'}")
    state = _float_state(model, cfg)
    plan = [(hf_to_gguf_name(n, source="export"), "F16" if dtype == "f16" and t.dim() == 2 else "F32", n, t)
            for n, t in state.items()]  # (GGUF name, ggml type, HF name, tensor in HF layout)
    freqs = _rope_freqs(cfg)
    if freqs is not None:
        plan.append((GGUF_ROPE_FREQS, "F32", GGUF_ROPE_FREQS, freqs))
    template = chat_template if chat_template is not None else tokenizer.chat_template
    kvs = _model_kvs(cfg, dtype) + _tokenizer_kvs(tokenizer, cfg, template)
    with atomic_file(target) as f:
        f.write(gguf_header(kvs, [(g, ggml_type, tuple(t.shape)) for g, ggml_type, _, t in plan]))
        for _, ggml_type, name, t in plan:
            write_tensor(f, _gguf_layout(name, t, cfg), ggml_type)
    return target


def _rope_freqs(cfg: LlamaConfig) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (one divisor per frequency) when RoPE is not plain theta^(-2i/D)."""
    if cfg.rope_freq_factors is not None:
        return torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    if cfg.rope_scaling is None:
        return None
    plain = rope_frequencies(cfg.head_dim, cfg.rope_theta)  # (D/2,) float64
    return (plain / cfg.rope_scaling.apply(plain)).float()


def _gguf_layout(name: str, t: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Q/K rows (weights and biases) in llama.cpp's interleaved-RoPE order; everything else as it is."""
    for part, heads_field in GGUF_ROPE_PERMUTED.items():
        if f".{part}." in name:
            return rotate_half_to_gguf(t, getattr(cfg, heads_field), name=name)
    return t


def _model_kvs(cfg: LlamaConfig, dtype: str) -> list[tuple[str, str, Any]]:
    """general.* and llama.* metadata: the keys qkv.weights.maps reads, plus llama.cpp's required extras."""
    kvs = [("general.architecture", "STRING", ARCH), ("general.name", "STRING", cfg.name),
           ("general.file_type", "UINT32", 1 if dtype == "f16" else 0)]  # llama.cpp's ALL_F32 / MOSTLY_F16
    for key, field in GGUF_LLAMA_CONFIG.items():
        if key.startswith("{arch}."):  # the token ids come with the tokenizer
            value = getattr(cfg, field)
            kvs.append((key.replace("{arch}", ARCH), "FLOAT32" if isinstance(value, float) else "UINT32", value))
    kvs += [(f"{ARCH}.attention.value_length", "UINT32", cfg.head_dim),
            (f"{ARCH}.rope.dimension_count", "UINT32", cfg.head_dim)]
    return kvs


def _tokenizer_kvs(tokenizer: Tokenizer, cfg: LlamaConfig, template: str | None) -> list[tuple[str, str, Any]]:
    """tokenizer.* metadata, the vocabulary padded to vocab_size as llama.cpp's converter pads it."""
    meta = tokenizer.to_gguf_metadata()
    tokens = list(meta["tokenizer.ggml.tokens"])
    extra = cfg.vocab_size - len(tokens)
    if extra > 0:  # llama.cpp wants one token per embedding row
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
        meta["tokenizer.ggml.token_type"] = list(types) + [UNUSED_TOKEN] * extra
        if meta.get("tokenizer.ggml.scores") is not None:
            meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [-1000.0] * extra
    if template:
        meta["tokenizer.chat_template"] = template
    return [(k, TOKENIZER_TYPES.get(k) or _value_type(k, v), v) for k, v in meta.items() if v is not None]


def _value_type(key: str, v: Any) -> str:
    """The GGUF type llama.cpp uses for a Python value (ids UINT32, flags BOOL, numbers FLOAT32)."""
    if isinstance(v, (list, tuple)):
        return f"ARRAY[{_value_type(key, v[0]) if v else 'STRING'}]"
    for kind, name in ((bool, "BOOL"), (str, "STRING"), (float, "FLOAT32")):
        if isinstance(v, kind):
            return name
    if isinstance(v, int):
        return "UINT32" if 0 <= v < 2**32 else "INT64"
    raise TokenizerError(f"tokenizer metadata {key} holds a {type(v).__name__}, which GGUF cannot store; "
                         "fix: rebuild the tokenizer from its file")

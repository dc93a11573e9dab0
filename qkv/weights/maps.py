"""Name and config maps between file formats and qkv's (Hugging Face) names — data, not code paths."""

from __future__ import annotations

import re

from ..errors import ModelFormatError

# GGUF tensor name -> Hugging Face parameter name; {i} is the layer index.
GGUF_LLAMA_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
# tensors whose rows GGUF stores for interleaved RoPE; value: the config field with their head count
GGUF_ROPE_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}
# the tensor llama.cpp writes for Llama 3.1-style RoPE scaling: one divisor per frequency (config, not a weight)
GGUF_ROPE_FREQS = "rope_freqs.weight"
# config flags implied by which optional tensors a file has (HF config key -> GGUF name patterns)
GGUF_OPTIONAL_FLAGS = {
    "attention_bias": re.compile(r"^blk\.\d+\.attn_(q|k|v|output)\.bias$"),
    "mlp_bias": re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.bias$"),
}

# tensors of older Hugging Face checkpoints that hold no weights (RoPE frequencies saved as buffers)
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# GGUF metadata key (with {arch}) -> HF config.json key
GGUF_LLAMA_CONFIG: dict[str, str] = {
    "{arch}.context_length": "max_position_embeddings",
    "{arch}.embedding_length": "hidden_size",
    "{arch}.feed_forward_length": "intermediate_size",
    "{arch}.block_count": "num_hidden_layers",
    "{arch}.attention.head_count": "num_attention_heads",
    "{arch}.attention.head_count_kv": "num_key_value_heads",
    "{arch}.attention.key_length": "head_dim",
    "{arch}.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "{arch}.rope.freq_base": "rope_theta",
    "{arch}.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
}
GGUF_LLAMA_ARCHS = ("llama",)


def _patterns(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in table.items()]


_GGUF_PATTERNS = _patterns(GGUF_LLAMA_TENSORS)
_HF_PATTERNS = _patterns({hf: gguf for gguf, hf in GGUF_LLAMA_TENSORS.items()})  # the same table, read backwards


def _rename(name: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for pat, target in patterns:
        m = pat.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def gguf_to_hf_name(name: str, *, source: str) -> str:
    """Map one GGUF tensor name; an unknown name is a ModelFormatError naming it."""
    hf_name = _rename(name, _GGUF_PATTERNS)
    if hf_name is None:
        raise ModelFormatError(f"{source}: unexpected tensor {name!r} for a llama model")
    return hf_name


def hf_to_gguf_name(name: str, *, source: str) -> str:
    """The inverse of :func:`gguf_to_hf_name` (used when exporting to GGUF)."""
    gguf_name = _rename(name, _HF_PATTERNS)
    if gguf_name is None:
        raise ModelFormatError(f"{source}: parameter {name!r} has no GGUF name in the llama tensor map")
    return gguf_name


def gguf_llama_config(metadata: dict, *, source: str) -> dict:
    """HF-style config dict from GGUF metadata (validation happens in LlamaConfig)."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_LLAMA_ARCHS:
        raise ModelFormatError(f"{source}: general.architecture is {arch!r}; qkv runs {', '.join(GGUF_LLAMA_ARCHS)} "
                               "GGUF models")
    d = {hf: metadata[k.replace("{arch}", arch)] for k, hf in GGUF_LLAMA_CONFIG.items()
         if k.replace("{arch}", arch) in metadata}
    if "vocab_size" not in d and isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        d["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    d["name"] = str(metadata.get("general.name") or arch)
    return d


# Hugging Face BERT parameter name -> qkv's (qkv.models.bert); {i} is the layer index. Identity except
# the attention block, which is the shared MultiHeadAttention (q/k/v/o_proj) with its Add & Norm beside it.
HF_BERT_TENSORS: dict[str, str] = {
    **{f"embeddings.{n}.{p}": f"embeddings.{n}.{p}"
       for n, p in (("word_embeddings", "weight"), ("position_embeddings", "weight"),
                    ("token_type_embeddings", "weight"), ("LayerNorm", "weight"), ("LayerNorm", "bias"))},
    **{f"encoder.layer.{{i}}.{hf}.{p}": f"encoder.layer.{{i}}.{ours}.{p}" for p in ("weight", "bias")
       for hf, ours in (("attention.self.query", "attention.q_proj"),
                        ("attention.self.key", "attention.k_proj"),
                        ("attention.self.value", "attention.v_proj"),
                        ("attention.output.dense", "attention.o_proj"),
                        ("attention.output.LayerNorm", "attention_layernorm"),
                        ("intermediate.dense", "intermediate.dense"),
                        ("output.dense", "output.dense"),
                        ("output.LayerNorm", "output.LayerNorm"))},
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
# prefix a BERT checkpoint saved from a task model (BertForMaskedLM, …) puts before the encoder's names
HF_BERT_PREFIX = "bert."
# tensors that are not encoder weights: the position-id buffer, and the pretraining heads (MLM/NSP)
HF_BERT_IGNORED = ("embeddings.position_ids", "cls.")

_HF_BERT_PATTERNS = _patterns(HF_BERT_TENSORS)


def hf_bert_state(state: dict, *, source: str) -> dict:
    """Rename a BERT checkpoint's tensors to qkv's names (with or without the ``bert.`` prefix).

    Ignored tensors are dropped; a name the table does not know is kept as it is, so that the strict
    check after it lists it as unexpected together with everything else that does not fit.
    """
    out: dict = {}
    for name, t in state.items():
        bare = name.removeprefix(HF_BERT_PREFIX)
        if bare.startswith(HF_BERT_IGNORED):
            continue
        target = next((tgt.replace("{i}", m.group(1)) if m.groups() else tgt
                       for pat, tgt in _HF_BERT_PATTERNS if (m := pat.match(bare))), name)
        if target in out:
            raise ModelFormatError(f"{source}: tensor {target!r} appears both with and without the "
                                   f"{HF_BERT_PREFIX!r} prefix")
        out[target] = t
    return out

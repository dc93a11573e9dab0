"""Model configurations: one frozen dataclass per architecture, passed whole.

``from_dict`` reads Hugging Face ``config.json`` keys, validates every value with a clear error and
ignores unknown keys — code-bearing keys (``auto_map``, ``trust_remote_code``, …) are reported in a
warning and never acted on: nothing in a config is ever imported or run.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from .errors import ConfigError
from .nn.rope import Llama3Scaling

CODE_KEYS = ("auto_map", "trust_remote_code", "model_file", "_attn_implementation_internal", "custom_pipelines")


def _pos_int(name: str, v, where: str, *, zero_ok: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1) or v > 2**31:
        raise ConfigError(f"{where}: {name} must be a {'non-negative' if zero_ok else 'positive'} integer "
                          f"(at most 2^31), got {v!r}")
    return v


def _pos_float(name: str, v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def _warn_code_keys(d: dict, where: str) -> None:
    found = [k for k in CODE_KEYS if k in d]
    if found:
        warnings.warn(f"{where}: ignoring {', '.join(found)} — qkv never imports or runs code named by a config",
                      stacklevel=3)


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-architecture decoder (Llama 2/3, SmolLM, TinyLlama, …), Hugging Face field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3Scaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF rope_freqs: each frequency divided by its factor
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default=())
    name: str = "llama"
    where: str = field(default="config", compare=False, repr=False)

    def __post_init__(self):
        w = self.where
        for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"):
            _pos_int(n, getattr(self, n), w)
        kv = self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads
        _pos_int("num_key_value_heads", kv, w)
        if self.num_attention_heads % kv:
            raise ConfigError(f"{w}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={kv}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads} and no head_dim is given")
        hd = self.head_dim or self.hidden_size // self.num_attention_heads
        _pos_int("head_dim", hd, w)
        if hd % 2:
            raise ConfigError(f"{w}: head_dim={hd} must be even for rotary embeddings")
        object.__setattr__(self, "num_key_value_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        _pos_float("rms_norm_eps", self.rms_norm_eps, w)
        if _pos_float("rope_theta", self.rope_theta, w) <= 1:
            raise ConfigError(f"{w}: rope_theta must be > 1, got {self.rope_theta}")
        if self.rope_freq_factors is not None:
            if not isinstance(self.rope_freq_factors, (list, tuple)):
                raise ConfigError(f"{w}: rope_freq_factors must be a list of numbers")
            factors = tuple(_pos_float("rope_freq_factors entry", f, w) for f in self.rope_freq_factors)
            if len(factors) != hd // 2 or self.rope_scaling is not None:
                raise ConfigError(f"{w}: rope_freq_factors needs head_dim/2 = {hd // 2} entries (got {len(factors)}) "
                                  "and no rope_scaling beside it")
            object.__setattr__(self, "rope_freq_factors", factors)
        for tid in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + tuple(self.eos_token_id):
            if not 0 <= _pos_int("token id", tid, w, zero_ok=True) < self.vocab_size:
                raise ConfigError(f"{w}: special token id {tid} is outside the vocabulary (size {self.vocab_size})")

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config.json") -> "LlamaConfig":
        """Build from HF config.json keys; unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        _warn_code_keys(d, where)
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "eos_token_id", "where"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        rope = _rope_parameters(d, where)
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kw]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        eos = d.get("eos_token_id")
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
        kw["rope_scaling"] = _rope_scaling(rope, where)
        return cls(**kw, where=where)

    def to_dict(self) -> dict:
        """HF-style config.json content."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("where", "name")}
        d["eos_token_id"] = list(self.eos_token_id)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.rope_freq_factors is not None:
            d["rope_freq_factors"] = list(self.rope_freq_factors)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"])
        return d


def _rope_parameters(d: dict, where: str) -> dict:
    """RoPE settings, from the ``rope_theta``/``rope_scaling`` keys or transformers 5's ``rope_parameters``.

    transformers >= 5 writes only ``rope_parameters`` (theta and scaling in one object); older files
    only the two top-level keys. Both together must agree.
    """
    merged = {}
    for key in ("rope_scaling", "rope_parameters"):
        part = d.get(key)
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"{where}: {key} must be an object or null")
        for k, v in (part or {}).items():
            if k in merged and merged[k] != v:
                raise ConfigError(f"{where}: rope_scaling and rope_parameters disagree on {k} ({merged[k]!r} vs {v!r})")
            merged[k] = v
    if d.get("rope_theta") is not None:
        if "rope_theta" in merged and merged["rope_theta"] != d["rope_theta"]:
            raise ConfigError(f"{where}: rope_theta {d['rope_theta']!r} disagrees with rope_parameters "
                              f"({merged['rope_theta']!r})")
        merged["rope_theta"] = d["rope_theta"]
    return merged


def _rope_scaling(rs: dict, where: str) -> Llama3Scaling | None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported (supported: llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    try:
        return Llama3Scaling(**{k: rs[k] for k in keys if k in rs})
    except TypeError as e:
        raise ConfigError(f"{where}: rope_scaling: {e}") from None


BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class BertConfig:
    """BERT-architecture encoder (BERT, MiniLM, all-MiniLM sentence encoders), Hugging Face field names.

    ``add_pooling_layer`` is not a config.json key: the loader sets it from whether the weights hold a
    pooler. The Llama-style read-only properties (``head_dim``, ``num_key_value_heads``, …) let code that
    describes any model (``qkv info``, ``qkv.explain``) read one set of names.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    add_pooling_layer: bool = True
    name: str = "bert"
    where: str = field(default="config", compare=False, repr=False)

    def __post_init__(self):
        w = self.where
        for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "type_vocab_size"):
            _pos_int(n, getattr(self, n), w)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{w}: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        _pos_float("layer_norm_eps", self.layer_norm_eps, w)
        for n in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, n)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"{w}: {n} must be a number in [0, 1), got {p!r}")
        if self.hidden_act not in BERT_ACTIVATIONS:
            raise ConfigError(f"{w}: hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(BERT_ACTIVATIONS)})")
        if self.position_embedding_type != "absolute":
            raise ConfigError(f"{w}: position_embedding_type {self.position_embedding_type!r} is not supported "
                              "(supported: absolute)")
        if self.pad_token_id is not None and not 0 <= _pos_int("pad_token_id", self.pad_token_id, w,
                                                               zero_ok=True) < self.vocab_size:
            raise ConfigError(f"{w}: pad_token_id {self.pad_token_id} is outside the vocabulary "
                              f"(size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads  # plain multi-head attention

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config.json", add_pooling_layer: bool = True) -> "BertConfig":
        """Build from HF config.json keys; unknown keys are ignored, a decoder configuration is refused."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        _warn_code_keys(d, where)
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{where}: is_decoder/add_cross_attention is set; qkv runs BERT as an encoder only")
        names = {f.name for f in dataclasses.fields(cls)} - {"add_pooling_layer", "where"}
        kw = {k: d[k] for k in names if k in d and (d[k] is not None or k == "pad_token_id")}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kw]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        return cls(**kw, add_pooling_layer=add_pooling_layer, where=where)

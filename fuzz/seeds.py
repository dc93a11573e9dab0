"""The valid inputs every mutation starts from, built here (no network, no test fixtures):

* a tiny Llama (2 layers, hidden 32, 4 heads / 2 kv heads, seeded random weights) with a byte-level BPE
  tokenizer trained on a few lines; as a GGUF written by gguf-py (F32 norms, Q8_0 and Q4_0 matrices,
  tokenizer, chat template) and as a Hugging Face directory (config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json with the template, generation_config.json);
* a second GGUF whose tokenizer is SentencePiece-style (``tokenizer.ggml.model = "llama"``: '▁' pieces,
  256 byte tokens, scores and no merges — the path that derives merges from scores);
* chat templates: the embedded SmolLM2's, ChatML, a Llama-3 style one with tools, a Mistral style one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TOOLS = (
    "{{- bos_token }}{%- if tools is not none %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- for t in tools %}{{- t|tojson(indent=4) }}{{- '\n\n' }}{%- endfor %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls is defined %}"
    "{%- for call in message.tool_calls %}{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}"
    "{{- call.function.arguments|tojson }}{{- '}' }}{%- endfor %}{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']|trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}")
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}{%- else %}"
    "{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}")
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def attention(q, k, v):\n    return softmax(q @ k.T / sqrt(d)) @ v\n",
    "Attention is all you need; the transformer attends to every token it has seen.",
    "Café, naïve, façade — accents and dashes; 12345 numbers and 3.14159 too.",
]
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
HF_TO_GGUF = [
    ("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
]


@dataclass
class Seeds:
    root: Path
    gguf_bpe: Path  # byte-level BPE tokenizer, mixed F32/Q8_0/Q4_0 tensors
    gguf_spm: Path  # SentencePiece-style tokenizer (merges derived from scores)
    hf_dir: Path
    templates: dict[str, str]
    spm_metadata: dict[str, Any]


def bpe_tokenizer(vocab_size: int = 300, lines: list[str] | None = None) -> Any:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on ``lines`` (default: this module's few lines, three
    times): the specials, 256 bytes, merges. tests/models/conftest.py trains it on its own lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_TRAIN_TEXT if lines is None else lines) * 3, trainer)
    return tok


def tiny_state(vocab: int, seed: int = 0) -> dict[str, Any]:
    """Seeded random weights of the tiny Llama, by Hugging Face name (tied embeddings: no lm_head)."""
    import torch

    from qkv.config import LlamaConfig
    from qkv.load import llama_shapes

    cfg = LlamaConfig(vocab_size=vocab, **CONFIG)
    g = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else 0.2 * torch.randn(shape, generator=g)
            for name, shape in llama_shapes(cfg).items()}


def _gguf_name(hf: str) -> str:
    for ours, theirs in HF_TO_GGUF:
        if hf == ours:
            return theirs
        if hf.startswith("model.layers.") and hf.endswith(ours):
            return f"blk.{hf.split('.')[2]}.{theirs}"
    raise KeyError(hf)


def _write_gguf(path: Path, state: dict[str, Any], tokenizer_kvs: dict[str, tuple[str, Any]], template: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz-tiny")
    w.add_context_length(CONFIG["max_position_embeddings"])
    w.add_embedding_length(CONFIG["hidden_size"])
    w.add_feed_forward_length(CONFIG["intermediate_size"])
    w.add_block_count(CONFIG["num_hidden_layers"])
    w.add_head_count(CONFIG["num_attention_heads"])
    w.add_head_count_kv(CONFIG["num_key_value_heads"])
    w.add_key_length(CONFIG["head_dim"])
    w.add_value_length(CONFIG["head_dim"])
    w.add_layer_norm_rms_eps(CONFIG["rms_norm_eps"])
    w.add_rope_freq_base(CONFIG["rope_theta"])
    for key, (kind, value) in tokenizer_kvs.items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_chat_template(template)
    for i, (name, t) in enumerate(state.items()):
        arr = t.numpy().astype(np.float32)
        qtype = None
        if arr.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q4_0 if i % 3 == 0 else gguf.GGMLQuantizationType.Q8_0
        if qtype is None:
            w.add_tensor(_gguf_name(name), arr)
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bpe_kvs(tok: Any) -> dict[str, tuple[str, Any]]:
    spec = json.loads(tok.to_str())
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(n)]
    return {
        "tokenizer.ggml.model": ("string", "gpt2"), "tokenizer.ggml.pre": ("string", "gpt2"),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.token_type": ("array", [3 if t in SPECIALS else 1 for t in tokens]),
        "tokenizer.ggml.merges": ("array", [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]),
        "tokenizer.ggml.bos_token_id": ("uint32", tok.token_to_id(SPECIALS[0])),
        "tokenizer.ggml.eos_token_id": ("uint32", tok.token_to_id(SPECIALS[2])),
        "tokenizer.ggml.add_bos_token": ("bool", False),
    }


def spm_vocab() -> dict[str, tuple[str, Any]]:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then '▁' pieces with scores."""
    words = sorted({w.strip(".,;:()—") for line in _TRAIN_TEXT for w in line.split()} - {""})
    pieces: list[str] = ["▁"]
    for w in words:
        for cut in range(1, len(w) + 1):
            for p in ("▁" + w[:cut], w[cut - 1:]):
                if p not in pieces:
                    pieces.append(p)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces[:200]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return {
        "tokenizer.ggml.model": ("string", "llama"), "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.token_type": ("array", types), "tokenizer.ggml.scores": ("array", scores),
        "tokenizer.ggml.unknown_token_id": ("uint32", 0), "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2), "tokenizer.ggml.add_bos_token": ("bool", True),
    }


def _write_hf_dir(path: Path, state: dict[str, Any], tok: Any, vocab: int) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "bos_token_id": tok.token_to_id(SPECIALS[0]), "eos_token_id": tok.token_to_id(SPECIALS[2]),
              "hidden_act": "silu", "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False, **CONFIG}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "add_bos_token": False, "chat_template": CHATML}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(SPECIALS[2])]}))


def smollm_template() -> str:
    from qkv.weights.embedded import embedded_path
    from qkv.weights.gguf import read_gguf

    with read_gguf(embedded_path("smollm2")) as f:
        return str(f.metadata["tokenizer.chat_template"])


def build(root: Path) -> Seeds:
    """Write every seed under ``root`` (a few hundred kB; ~1 s)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = bpe_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    state = tiny_state(vocab)
    gguf_bpe, gguf_spm, hf_dir = root / "bpe.gguf", root / "spm.gguf", root / "hf"
    _write_gguf(gguf_bpe, state, _bpe_kvs(tok), CHATML)
    spm = spm_vocab()
    _write_gguf(gguf_spm, tiny_state(len(spm["tokenizer.ggml.tokens"][1]), seed=1), spm, MISTRAL)
    _write_hf_dir(hf_dir, state, tok, vocab)
    templates = {"smollm2": smollm_template(), "chatml": CHATML, "llama3-tools": LLAMA3_TOOLS, "mistral": MISTRAL}
    return Seeds(root, gguf_bpe, gguf_spm, hf_dir, templates, {k: v for k, (_, v) in spm.items()})

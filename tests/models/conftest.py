"""Fixtures for the model tests: tiny random Llamas written here both ways, and shared checks.

The tiny models are real ``transformers.LlamaForCausalLM`` objects with seeded random weights, saved
as a Hugging Face directory (``save_pretrained`` + a byte-level BPE ``tokenizer.json`` trained here)
and as GGUF files with ``gguf.GGUFWriter`` (F32, F16, Q8_0). The GGUF side is written the way
llama.cpp's converter writes it — its tensor names, its metadata keys, its Q/K row order for
interleaved RoPE, its ``rope_freqs`` tensor for Llama-3 scaling — from this file's own tables, never
from ``qkv.weights``, so a mistake in qkv's maps cannot cancel out against the same mistake here.

No network: transformers runs offline (``HF_HUB_OFFLINE``) and every file is written by the tests.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

# before transformers / huggingface_hub are imported anywhere: offline, quiet, no progress bars
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gguf  # dev dependencies: a missing install must fail, not skip
import transformers
transformers.logging.disable_progress_bar()

# --- shared numerics ---------------------------------------------------------------------------------


def mean_kl(ref_logits: torch.Tensor, our_logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref ‖ ours), in float64 (RELIABILITY R7)."""
    p = torch.log_softmax(ref_logits.double().reshape(-1, ref_logits.shape[-1]), dim=-1)
    q = torch.log_softmax(our_logits.double().reshape(-1, our_logits.shape[-1]), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def one_line(exc: BaseException) -> str:
    """The error's message, asserted to be one non-empty line (what the CLI prints)."""
    msg = str(exc)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


# --- the tiny tokenizer ------------------------------------------------------------------------------

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS = "<|endoftext|>", "<|im_end|>"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def attention(q, k, v):\n    return softmax(q @ k.T / sqrt(d)) @ v\n",
    "Attention is all you need; the transformer attends to every token it has seen.",
    "Café, naïve, façade — accents and dashes; 12345 numbers and 3.14159 too.",
    "for i in range(10):\n\tprint(i * i)  # squares\n",
]


def tiny_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on a few lines: 3 specials, 256 bytes, merges."""
    from fuzz.seeds import SPECIALS as FUZZ_SPECIALS, bpe_tokenizer

    assert FUZZ_SPECIALS == SPECIALS  # the ids the goldens below rely on
    return bpe_tokenizer(vocab_size, _TRAIN_TEXT)


# --- the tiny model ----------------------------------------------------------------------------------

BASE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=True)
VARIANTS = {
    "base": {},
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "untied_bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=20000.0),
}


def random_llama(tok: Any, seed: int = 0, **overrides: Any) -> Any:
    """A transformers Llama with seeded weights large enough that attention is far from uniform."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = transformers.LlamaConfig(vocab_size=vocab, bos_token_id=tok.token_to_id(BOS),
                                   eos_token_id=tok.token_to_id(EOS), **{**BASE_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def write_hf_dir(path: Path, model: Any, tok: Any, **save_kwargs: Any) -> Path:
    """save_pretrained (safetensors) + tokenizer.json + tokenizer_config.json with the chat template."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True, **save_kwargs)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "chat_template": TEMPLATE}))
    return path


# --- GGUF, as llama.cpp's converter writes it ---------------------------------------------------------

# Hugging Face parameter name -> llama.cpp tensor name (gguf-py's TensorNameMap for LLAMA), as regexes
_GGUF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"blk.\1.ffn_\2.\3"),
]


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for one Hugging Face Llama parameter."""
    for pattern, target in _GGUF_NAMES:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return m.expand(target)
    raise AssertionError(f"no GGUF name for {hf_name}")


def gguf_row_order(n_rows: int, n_heads: int) -> list[int]:
    """Row r of a GGUF Q/K tensor is row ``order[r]`` of the Hugging Face one.

    llama.cpp's ``LlamaModel.permute``: within each head of D rows, GGUF row 2i + j holds HF row
    j·D/2 + i — the rotate-half pairs (i, i + D/2) become adjacent rows (2i, 2i + 1).
    """
    d = n_rows // n_heads
    return [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in (0, 1)]


def llama3_rope_factors(cfg: Any) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for rope_type llama3: the divisor of each of the head_dim/2 frequencies."""
    rp = cfg.rope_parameters
    dim = cfg.head_dim
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rp["rope_theta"] ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tiny_gguf(path: Path, weight_type: str, seed: int) -> Path:
    """A tiny random Llama (random_llama, tiny_tokenizer) written to ``path`` as a GGUF of ``weight_type``."""
    tok = tiny_tokenizer()
    write_gguf(path, random_llama(tok, seed=seed), tok, weight_type=weight_type)
    return path


def write_gguf(path: Path, model: Any, tok: Any, *, weight_type: str = "F32", permute: bool = True,
               drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """``model`` + ``tok`` as a llama.cpp-style GGUF; 2-D weights stored as ``weight_type``.

    Returns the weights the file actually holds (gguf-py's own dequantisation, back in HF row order),
    by HF name — what transformers must run to be the oracle for a quantised file.
    ``permute=False`` writes Q/K in HF row order: a deliberately wrong file for sensitivity checks;
    ``drop`` (GGUF names) leaves tensors out and ``extra`` adds some, for the load-error tests.
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    _write_gguf_tokenizer(w, tok)

    held: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, t in state.items():
        if gguf_name(name) in drop:
            continue
        arr = t.detach().float().numpy()
        order = None
        if permute and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            order = gguf_row_order(arr.shape[0], heads)
            arr = arr[order]
        if arr.ndim == 2 and weight_type == "F16":
            data = arr.astype(np.float16)
            w.add_tensor(gguf_name(name), data)
            back = data.astype(np.float32)
        elif arr.ndim == 2 and weight_type != "F32":
            qtype = gguf.GGMLQuantizationType[weight_type]
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(arr.shape)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(arr))
            back = arr
        if order is not None:
            back = back[np.argsort(order)]
        held[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    if cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _write_gguf_tokenizer(w: Any, tok: Any) -> None:
    spec = json.loads(tok.to_str())
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # CONTROL / NORMAL
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.token_to_id(BOS))
    w.add_eos_token_id(tok.token_to_id(EOS))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)


def with_weights(model: Any, weights: dict[str, torch.Tensor]) -> Any:
    """A copy of a transformers model running ``weights`` (e.g. the dequantised ones of a GGUF)."""
    ref = copy.deepcopy(model)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return ref.eval()


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tiny_tok: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The base tiny model as a transformers object, an HF directory and an F32 GGUF (do not modify)."""
    model = random_llama(tiny_tok, seed=0)
    root = tmp_path_factory.mktemp("tiny_base")
    hf_dir = write_hf_dir(root / "hf", model, tiny_tok)
    gguf_path = root / "tiny-f32.gguf"
    write_gguf(gguf_path, model, tiny_tok)
    return SimpleNamespace(model=model, tok=tiny_tok, hf_dir=hf_dir, gguf=gguf_path)


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The writers and checks above, for tests that build their own variants."""
    return SimpleNamespace(random_llama=random_llama, write_hf_dir=write_hf_dir, write_gguf=write_gguf,
                           with_weights=with_weights, gguf_name=gguf_name, gguf_row_order=gguf_row_order,
                           mean_kl=mean_kl, one_line=one_line, VARIANTS=VARIANTS, TEMPLATE=TEMPLATE,
                           SPECIALS=SPECIALS)

"""What a run trains: the model, its data, its loss, its evaluation — one class per kind of task.

Legend: B batch, S source length, T target length, V vocabulary.

``Seq2SeqJob``: the 2017 encoder–decoder on a built-in task (date, reverse, sort); evaluated by exact
match of greedy decodes. ``LMJob``: a Llama-style decoder on a text file, from scratch (byte-level or a
model's tokenizer) or fine-tuning a loaded model; evaluated by held-out loss and perplexity.
Both describe themselves as a JSON-ready ``spec`` (run.json) from which ``qkv.load(run_dir)`` rebuilds the
same model — which is also how ``qkv eval`` and ``qkv explain --model RUN`` get it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..errors import ConfigError
from ..models.encoder_decoder import EncoderDecoder, Seq2SeqConfig
from ..models.llama import LlamaForCausalLM
from ..text.tokenizer import Tokenizer
from .config import SEQ2SEQ_POSITIONS, TrainConfig
from .data import Seq2SeqBatch, TextData, collate, read_text, seq2seq_batch, text_batch, text_eval_batches
from .tasks import BOS, EOS, PAD, CharVocab, make_task



def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Small normal weights, zero biases, unit norms: the usual start for a transformer trained from scratch."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class Seq2SeqJob:
    kind = "seq2seq"

    def __init__(self, cfg: TrainConfig, *, chars: str | None = None):
        self.cfg = cfg
        self.data = make_task(cfg.task, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                              max_len=cfg.max_len)
        self.vocab = CharVocab(chars) if chars is not None else self.data.vocab
        v = self.vocab.size
        self.model_config = Seq2SeqConfig(v, v, d_model=cfg.d_model, n_heads=cfg.n_heads, n_encoder_layers=cfg.n_layers,
                                          n_decoder_layers=cfg.n_layers, d_ff=cfg.d_ff, dropout=cfg.dropout,
                                          max_len=SEQ2SEQ_POSITIONS, norm_first=cfg.norm_first)

    def build(self) -> EncoderDecoder:
        model = EncoderDecoder(self.model_config)
        init_weights(model)
        return model

    @staticmethod
    def blocks(model: EncoderDecoder) -> list[nn.Module]:
        return [*model.encoder, *model.decoder]

    def spec(self) -> dict:
        return {"kind": self.kind, "model": asdict(self.model_config), "chars": self.vocab.chars}

    def batch(self, micro_step: int) -> Seq2SeqBatch:
        return seq2seq_batch(self.data.train, self.vocab, seed=self.cfg.seed, micro_step=micro_step,
                             batch_size=self.cfg.batch_size)

    @staticmethod
    def n_targets(batch: Seq2SeqBatch) -> int:
        return batch.n_tokens

    @staticmethod
    def n_processed(batch: Seq2SeqBatch) -> int:
        return int(batch.src_mask.sum()) + batch.n_tokens

    @staticmethod
    def loss_sum(model, batch: Seq2SeqBatch) -> torch.Tensor:
        logits = model(batch.src, batch.tgt_in, batch.src_mask)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=PAD,
                               reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: EncoderDecoder, split: str = "val", limit: int | None = None,
                 device="cpu", beam_size: int = 1) -> dict:
        """Exact match of greedy (or beam-search) decodes and the mean target-token loss over a split."""
        pairs = self.data.split(split)[:limit]
        hits, loss, n_tok, preds = 0, 0.0, 0, []
        for i in range(0, len(pairs), 256):
            chunk = pairs[i:i + 256]
            b = collate(chunk, self.vocab).to(device)
            loss += float(self.loss_sum(model, b))
            n_tok += b.n_tokens
            room = self.model_config.max_len - 1  # the decoder's positions: <bos> + what it writes
            budget = dict(bos=BOS, eos=EOS, max_new_tokens=min(b.labels.shape[1] + 4, room), src_mask=b.src_mask)
            out = model.greedy(b.src, **budget) if beam_size == 1 else model.beam_search(b.src, beam_size=beam_size,
                                                                                       **budget)
            for (_, tgt), ids in zip(chunk, out):
                preds.append(self.vocab.decode(ids))
                hits += preds[-1] == tgt
        return {"split": split, "examples": len(pairs), "exact_match": hits / max(1, len(pairs)),
                "loss": loss / max(1, n_tok), "predictions": preds}

    def samples(self, model: EncoderDecoder, result: dict, n: int) -> list[str]:
        pairs = self.data.split(result["split"])
        return [f"{src} -> {pred} {'ok' if pred == tgt else f'(want {tgt})'}"
                for (src, tgt), pred in list(zip(pairs, result["predictions"]))[:n]]


class LMJob:
    kind = "lm"

    def __init__(self, cfg: TrainConfig, *, model_config: LlamaConfig | None = None, tokenizer: Tokenizer | None = None,
                 loaded=None):
        self.cfg, self.loaded = cfg, loaded
        if loaded is None and cfg.init and model_config is None:
            loaded = self.loaded = _load_llama(cfg.init, "--init")
        if loaded is not None:
            tokenizer, model_config = loaded.tokenizer, loaded.config
        self.tokenizer = tokenizer or _scratch_tokenizer(cfg.tokenizer)
        self.model_config = model_config or _scratch_config(cfg, self.tokenizer)
        self._data: TextData | None = None

    @property
    def data(self) -> TextData:
        if self._data is None:
            ids = self.tokenizer.encode(read_text(self.cfg.data), add_bos=False, add_special=False)
            self._data = TextData.from_ids(ids, block_size=self.cfg.block_size, source=str(self.cfg.data))
        return self._data

    def build(self) -> LlamaForCausalLM:
        if self.loaded is not None:  # fine-tuning: a fresh float32 copy of the loaded weights each time
            return copy.deepcopy(self.loaded.model).float().train()
        model = LlamaForCausalLM(self.model_config)
        init_weights(model)
        return model

    @staticmethod
    def blocks(model: LlamaForCausalLM) -> list[nn.Module]:
        return list(model.model.layers)

    def spec(self) -> dict:
        from ..weights.export import hf_config

        return {"kind": self.kind, "model": hf_config(self.model_config)}

    def batch(self, micro_step: int) -> torch.Tensor:
        return text_batch(self.data.train, seed=self.cfg.seed, micro_step=micro_step, batch_size=self.cfg.batch_size,
                          block_size=self.cfg.block_size)

    @staticmethod
    def n_targets(batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    n_processed = n_targets

    @staticmethod
    def loss_sum(model, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: LlamaForCausalLM, split: str = "val", limit: int | None = None, device="cpu") -> dict:
        """Mean next-token loss and perplexity over the held-out tail of the text."""
        loss, n = 0.0, 0
        for b in text_eval_batches(self.data.val, batch_size=self.cfg.batch_size, block_size=self.cfg.block_size,
                                   max_windows=limit):
            loss += float(self.loss_sum(model, b.to(device)))
            n += self.n_targets(b)
        mean = loss / max(1, n)
        return {"split": "held-out", "windows": n // self.cfg.block_size, "tokens": n, "loss": mean,
                "perplexity": math.exp(min(mean, 700.0))}

    def samples(self, model: LlamaForCausalLM, result: dict, n: int) -> list[str]:
        from ..generate.loop import generate_ids
        from ..generate.sampling import SamplingOptions

        room = model.config.max_position_embeddings
        if room < 2:
            return []
        prompt = self.data.val[:min(16, room // 2)].tolist()
        new = list(generate_ids(model, prompt, SamplingOptions(temperature=0.0), max_new_tokens=min(48, room - len(prompt)),
                                stop_ids=self.tokenizer.eos_ids))
        return [f"{self.tokenizer.decode(prompt)!r} -> {self.tokenizer.decode(new)!r}"][:n]


def _scratch_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return Tokenizer.byte_level()
    return _load_llama(name, "--tokenizer").tokenizer


def _load_llama(name: str, flag: str):
    """A Llama-architecture model to start from or borrow a tokenizer from; anything else is refused."""
    from ..load import load

    loaded = load(name, dtype="float32", device="cpu")
    if not isinstance(loaded.model, LlamaForCausalLM) or not isinstance(loaded.tokenizer, Tokenizer):
        raise ConfigError(f"{flag} {name}: a {type(loaded.model).__name__} cannot start a decoder LM; give a "
                          "Llama-architecture model (smollm2, a .gguf, an HF llama directory, a text-task run)")
    return loaded


def _scratch_config(cfg: TrainConfig, tok: Tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.block_size,
                       tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tuple(tok.eos_ids),
                       name="qkv-lm")


def make_job(cfg: TrainConfig):
    return LMJob(cfg) if cfg.task == "text" else Seq2SeqJob(cfg)

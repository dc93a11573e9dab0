"""The BERT encoder (BERT, MiniLM, the all-MiniLM sentence encoders), top to bottom as in the paper.

Legend: B batch, T tokens, C hidden size, I intermediate size, V vocabulary.

token ids -> word + position + token-type embeddings -> LayerNorm -> N x [
    LayerNorm(x + self-attention(x))          every token sees every real token, no causal mask
    LayerNorm(h + W2 GELU(W1 h)) ]            post-norm: the norm comes after each residual add
-> hidden states (B, T, C)  [-> pooler: tanh(W h_[CLS]) (B, C)]

Parameter names are Hugging Face's except inside the attention block, which is the shared
``qkv.nn.MultiHeadAttention`` (``attention.q_proj`` … ``o_proj``); the table that maps a checkpoint's
names lives in ``qkv.weights.maps.HF_BERT_TENSORS``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..config import BertConfig
from ..errors import ShapeError
from ..nn import MultiHeadAttention
from ..nn.modules import embedding

# hidden_act -> module; "gelu" is the exact (erf) GELU of the original BERT, the others its tanh approximation
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


class BertEmbeddings(nn.Module):
    """A token's vector is the sum of what it is, where it is, and which segment it belongs to."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = embedding(cfg.max_position_embeddings, cfg.hidden_size)  # learned, absolute
        self.token_type_embeddings = embedding(cfg.type_vocab_size, cfg.hidden_size)  # sentence A / B
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,): padding sits on the right
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))  # (B, T, C)
        return self.dropout(self.LayerNorm(x))


class BertOutput(nn.Module):
    """The feed-forward's second projection with its Add & Norm: LayerNorm(residual + W2 x)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)  # I -> C
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # (B, T, I), (B, T, C) -> (B, T, C)
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertLayer(nn.Module):
    """Post-norm block: h = LayerNorm(x + attn(x)), then LayerNorm(h + FFN(h))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads, bias=True,
                                            dropout=cfg.attention_probs_dropout_prob)
        self.attention_dropout = nn.Dropout(cfg.hidden_dropout_prob)  # on the block's output, before the add
        self.attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Sequential(OrderedDict(
            dense=nn.Linear(cfg.hidden_size, cfg.intermediate_size),  # C -> I
            act=ACTIVATIONS[cfg.hidden_act]()))
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None, observer=None) -> torch.Tensor:
        a = self.attention(x, mask=mask, causal=False, observer=observer)  # (B, T, C)
        z = x + self.attention_dropout(a)
        h = self.attention_layernorm(z)
        out = self.output(self.intermediate(h), h)
        if observer is not None:  # the residual stream and the post-norm, for the faithfulness measures
            observer.residual(x, z, norm=self.attention_layernorm, out=out)
        return out


class BertEncoder(nn.Module):
    """The stack of N identical layers (a container only, so that names read ``encoder.layer.{i}``)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    """The sentence vector of the next-sentence objective: tanh(W h_[CLS]) from the first token."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C)
        return self.activation(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings and the encoder: ids (B, T) -> hidden states (B, T, C); :meth:`pool` adds the pooler."""

    is_causal = False  # every token attends to every real token (qkv.explain records kind "self")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if cfg.add_pooling_layer else None

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, observer=None) -> torch.Tensor:
        """ids (B, T) -> last hidden states (B, T, C) in float32.

        Args:
            attention_mask: (B, T), 1 (or True) for real tokens, 0 for padding; padding keys are hidden
                from every query. Hidden states at padding positions are computed but meaningless.
            token_type_ids: (B, T) segment ids (0 = sentence A, 1 = B); default all 0.
            observer: an ``AttentionObserver`` (qkv.explain) that sees each layer's q and k.
        """
        self._check_ids(input_ids, "input_ids", self.config.vocab_size)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        self._check_ids(token_type_ids, "token_type_ids", self.config.type_vocab_size, like=input_ids)
        mask = None if attention_mask is None else self._key_padding(attention_mask, input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        for i, layer in enumerate(self.encoder.layer):
            if observer is not None:
                observer.layer = i
            x = layer(x, mask=mask, observer=observer)
        return x.float()

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler's (B, C) output for hidden states from :meth:`forward` (BERT's [CLS] sentence vector)."""
        if self.pooler is None:
            raise ShapeError("this checkpoint has no pooler weights (pooler.dense); use the hidden states")
        return self.pooler(hidden.to(self.pooler.dense.weight.dtype)).float()

    @staticmethod
    def _key_padding(attention_mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ShapeError(f"attention_mask must be a tensor shaped like input_ids {tuple(ids.shape)}, got {got}")
        return attention_mask.to(ids.device).bool()[:, None, None, :]  # (B, 1, 1, T): padding keys hidden

    def _check_ids(self, ids, name: str, n: int, like: torch.Tensor | None = None) -> None:
        """Integer (B, T) ids inside their table, and no longer than the learned positions."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ShapeError(f"{name} must be an integer tensor of shape (batch, length)")
        if like is not None and ids.shape != like.shape:
            raise ShapeError(f"{name} is {tuple(ids.shape)}, expected the shape of input_ids {tuple(like.shape)}")
        if ids.shape[1] == 0:
            raise ShapeError(f"{name} is empty: give at least one token")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ShapeError(f"{ids.shape[1]} tokens exceed the {self.config.max_position_embeddings} positions "
                             "this encoder has learned; truncate the text")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ShapeError(f"{name} must be in [0, {n}), got {int(ids.min())}..{int(ids.max())}")

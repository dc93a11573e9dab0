"""Faithfulness measures: what the attention weights multiply, and what a layer's output is made of.

Legend: H query heads, K kv heads, R query rows, S keys, D head dim, C model dim, L layers.

Attention weights alone are not an explanation: a head that puts 0.6 of its weight on a token whose value
vector is near zero moves almost nothing from it (the "attention sink"). Each measure here is one formula
of what the model computes anyway — queries, keys, values, the output projection, the residual stream and
its norms — evaluated next to the fast kernels, never instead of them:

* ``weights`` α^h_ij — the softmax weights (qkv.nn.attention.weight_rows).
* ``norms`` (Kobayashi et al., EMNLP 2020) — per head ‖α^h_ij · W_O^h v^h_j‖, the size of what head h
  actually adds to query i from key j; per layer ‖Σ_h α^h_ij · W_O^h v^h_j‖, the norm of the *sum* over heads
  (heads can cancel, so the layer's vector is what reaches the residual stream, not the sum of the heads'
  norms). Shown as shares of each row's total so that they compare with the weights.
* ``mixing`` (ALTI, Ferrando et al., EMNLP 2022) — each input vector's contribution to the layer's output
  at query i, the residual path and the normalisation included. The output is an exact sum of per-token
  vectors, y_i = Σ_j T_i(x_j) + b_i, and token j's share is
  c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁) / Σ_k max(0, ‖y_i‖₁ − ‖y_i − T_i(x_k)‖₁)  (Manhattan distance,
  as the paper). Adaptation to the two block kinds qkv runs:
    - pre-RMSNorm Llama blocks: y_i = x_i + Σ_h Σ_j α^h_ij W_O^h W_V^h RMSNorm(x_j) (+ o_proj bias). RMSNorm
      acts on x_j alone, so T_i(x_j) = Σ_h α^h_ij W_O^h v^h_j + [i = j] x_i is exact, with no linearisation;
      b_i is the o_proj bias (none in Llama).
    - post-LayerNorm BERT blocks: y_i = LN(z_i), z_i = x_i + attention_i. LayerNorm is linear once its
      scale σ(z_i) is fixed at the value the model computed, so
      T_i(x_j) = γ ⊙ (t_ij − mean(t_ij)) / σ(z_i) with t_ij = Σ_h α^h_ij W_O^h v^h_j + [i = j] x_i, and
      b_i = γ ⊙ (b_O − mean(b_O)) / σ(z_i) + β (value biases are inside v, so they travel with their token).
    - the encoder–decoder's cross-attention (pre- or post-norm): the keys are the encoder's output at the
      source tokens, and the decoder's own state x_i reaches y_i through the residual alone, so
      T_i(m_j) = Σ_h α^h_ij W_O^h v^h_j for each source position j and T_i(residual) = x_i, a column of its
      own (the post-norm case linearised as for BERT). A row's source shares sum to 1 − its residual share.
      Whole-model (ALTI+, Ferrando et al. 2022, "Towards Opening the Black Box of NMT"): each decoder state
      is a mixture of source tokens and target-side input tokens (<bos> and the tokens generated so far);
      the decoder's self-attention mixes the target positions' mixtures (as in a Llama block), its
      cross-attention adds each source position's encoder mixture (the encoder's own ALTI map) with its
      share, and the residual share keeps the state's own. The model view is the final state's source part;
      the rest is the target prefix's share.
  The feed-forward acts on each position alone and moves nothing between tokens, so a layer's mixing
  matrix is its attention sublayer's. Across layers the maps compose: M^l = C^l · M^(l−1) (ALTI's
  rollout), the whole-model map of how much each input token makes up each position's final state.
* ``rollout`` (Abnar & Zuidema, ACL 2020) — a **baseline**: the mean of the heads' weights with the
  residual identity, Â = ½A + ½I, multiplied through the layers. It ignores values and norms entirely.
* ``logit`` and ``alti-logit`` (Ferrando et al., ACL 2023) — for a decoder's next-token prediction at
  position n, each position's contribution to logit(target) − logit(foil). The final RMSNorm is linear given
  its scale rms(x_n), so with u = g ⊙ (W_U[target] − W_U[foil]) / rms(x_n) the logit difference is u·x_n,
  and x_n = x⁰_n + Σ_l (attention^l_n + mlp^l_n). Each layer's attention update splits exactly over the
  keys j it reads (Σ_h α^h_nj W_O^h v^h_j), and the embedding x⁰_n belongs to token n. ``logit`` credits
  key j's part to position j (the paper's layer-wise logit decomposition, before ALTI): what the heads read
  at position j, whose state by layer l has mixed in earlier tokens. ``alti-logit`` (ALTI-Logit proper)
  carries key j's part back to the input tokens through the ALTI mixing map of the layers below,
  M^(l−1)ᵀ. What no position explains — the MLPs' updates and output biases — is the remainder, so
  contributions + remainder = the logit difference, exactly, for both. Which attributes better is an
  empirical question: bench/faithfulness.py answers it for SmolLM2 (BENCHMARKS.md).
"""

from __future__ import annotations

import torch

MEASURES = ("weights", "norms", "mixing", "rollout", "logit", "alti-logit")
PREDICTION = ("logit", "alti-logit")  # measures of one next-token prediction (one row, signed, in logits)

DEFINITIONS = {
    "weights": "softmax attention weight α (each row sums to 1)",
    "norms": "‖α·W_O v_j‖ (Kobayashi et al. 2020): per head, and per layer the norm of the sum over heads; "
             "shown as a share of each row's total",
    "mixing": "ALTI (Ferrando et al. 2022): each input token's share of a layer's output, residual and norm "
              "included; the whole-model view multiplies the layers' maps",
    "rollout": "attention rollout (Abnar & Zuidema 2020), ½A + ½I multiplied through the layers — a baseline "
               "that ignores values and norms",
    "logit": "each position's contribution to logit(target) − logit(foil) through every layer's attention at "
             "the prediction row, credited to the key position read (Ferrando et al. 2023, layer-wise), in "
             "logits; the MLPs' and biases' part is the remainder",
    "alti-logit": "ALTI-Logit (Ferrando et al. 2023): the logit measure's per-layer contributions carried back "
                  "to the input tokens through the ALTI mixing maps of the layers below, in logits; the MLPs' "
                  "and biases' part is the remainder",
}

ROW_BLOCK = 64  # query rows per block of the per-layer norms (an (R, S, H, H) intermediate)
ALTI_BLOCK = 16  # query rows per block of ALTI's (S, R, C) token vectors: small enough to stay in cache


def head_projections(out_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """W_O (C, H·D) -> its heads' slices (H, C, D): head h maps its value vector v (D,) to W_O^h v (C,)."""
    c, hd = out_weight.shape
    return out_weight.reshape(c, n_heads, hd // n_heads).permute(1, 0, 2)


def expand_heads(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Values (K, S, D) -> (H, S, D): kv head j serves query heads j·G .. j·G+G−1 (grouped-query)."""
    g = n_heads // v.shape[0]
    return v if g == 1 else v.repeat_interleave(g, dim=0)


def head_vectors(v: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """f^h_j = W_O^h v^h_j for every head and key: v (H, S, D), wo (H, C, D) -> (H, S, C)."""
    return torch.matmul(v, wo.transpose(1, 2))  # (H, S, D) @ (H, D, C)


def value_norms(v: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """‖W_O^h v^h_j‖ (H, S) through each head's Gram matrix W_O^hᵀ W_O^h (D, D): O(H·S·D²), no (H, S, C)."""
    gram = torch.matmul(wo.transpose(1, 2), wo)  # (H, D, D)
    sq = (torch.matmul(v, gram) * v).sum(-1)  # (H, S)
    return sq.clamp(min=0).sqrt()


def key_grams(v: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """G_j[h, g] = (W_O^h v^h_j)·(W_O^g v^g_j), (S, H, H): with it ‖Σ_h α_h f^h_j‖² = αᵀ G_j α, so the norm of
    a layer's per-key vector costs H² per (query, key) instead of C."""
    f = head_vectors(v, wo)  # (H, S, C)
    return torch.einsum("hsc,gsc->shg", f, f)


def layer_norms(alpha: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """‖Σ_h α^h_ij W_O^h v^h_j‖ (R, S) from weights (H, R, S) and key grams (S, H, H)."""
    out = []
    for r0 in range(0, alpha.shape[1], ROW_BLOCK):
        a = alpha[:, r0:r0 + ROW_BLOCK]  # (H, Rb, S)
        sq = torch.einsum("hrs,shg,grs->rs", a, grams, a)
        out.append(sq.clamp(min=0).sqrt())
    return torch.cat(out)


def shares(x: torch.Tensor) -> torch.Tensor:
    """Each row (last dim) as a share of its total; an all-zero row stays zero."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, torch.ones_like(total)), x)


def token_vectors(alpha: torch.Tensor, f: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                  norm: torch.nn.Module | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """T_i(x_j) (R, S, C): what each key j adds to the layer's output at each query row i (module docstring).

    alpha (H, R, S) weights of the rows, f (H, S, C) from :func:`head_vectors`, x (S, C) the layer's input,
    rows (R,) the query positions; for a post-norm block ``norm`` (a LayerNorm) and z (S, C) its input."""
    t = torch.einsum("hrs,hsc->rsc", alpha, f)  # (R, S, C): Σ_h α^h_ij f^h_j
    t[torch.arange(len(rows)), rows] += x[rows]  # the residual path: x_i reaches y_i through itself alone
    if norm is None:
        return t
    return _layer_norm_linear(t, z[rows], norm)


def step_token_vectors(alpha: torch.Tensor, f: torch.Tensor, x: torch.Tensor, own: int | None,
                       norm: torch.nn.Module | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """T_i(x_j) of one query row (S or S + 1, C): alpha (H, S), f (H, S, C), x (C,) the row's residual input.

    ``own``: the key that is the query's own position (self-attention: the residual joins that key); None
    (cross-attention): the residual is a column of its own, after the S keys. A post-norm block's ``norm``
    is linearised at its input z (C,), as in :func:`token_vectors`."""
    t = torch.einsum("hs,hsc->sc", alpha, f)  # (S, C)
    if own is None:
        t = torch.cat([t, x[None]])
    else:
        t[own] += x
    return t if norm is None else _layer_norm_linear(t[None], z[None], norm)[0]


def _layer_norm_linear(t: torch.Tensor, z: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """LayerNorm with its scale σ(z_i) fixed: γ ⊙ (t − mean t) / σ(z_i), (R, S, C) — linear in t."""
    sigma = (z.var(-1, unbiased=False) + norm.eps).sqrt()  # (R,)
    return norm.weight * (t - t.mean(-1, keepdim=True)) / sigma[:, None, None]


def output_bias(out_bias: torch.Tensor | None, z: torch.Tensor, rows: torch.Tensor, c: int,
                norm: torch.nn.Module | None = None) -> torch.Tensor:
    """b_i (R, C): the part of the output no token brings (o_proj's bias, and a post-norm's shift)."""
    b = torch.zeros(c, dtype=z.dtype, device=z.device) if out_bias is None else out_bias.to(z.dtype)
    if norm is None:
        return b.expand(len(rows), c)
    sigma = (z[rows].var(-1, unbiased=False) + norm.eps).sqrt()  # (R,)
    return norm.weight * (b - b.mean()) / sigma[:, None] + norm.bias


def alti(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ALTI's contributions (R, S) from outputs y (R, C) and token vectors t (R, S, C), rows summing to 1."""
    d = (y[:, None, :] - t).abs().sum(-1)  # (R, S) Manhattan distance of each token vector to the output
    return shares((y.abs().sum(-1, keepdim=True) - d).clamp(min=0))


def alti_rows(alpha: torch.Tensor, f_by_key: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
              norm: torch.nn.Module | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`alti` of :func:`token_vectors`, the same numbers computed the fast way: keys as the batch of one
    (S, R, H) @ (S, H, C) matmul and the distance taken in place, for ``f_by_key`` = f.transpose(0, 1)
    (S, H, C). A few rows at a time keeps the (S, R, C) block in cache: ~4x faster than the readable form."""
    t = torch.bmm(alpha.permute(2, 1, 0), f_by_key)  # (S, R, C): Σ_h α^h_ij f^h_j
    t[rows, torch.arange(len(rows))] += x[rows]  # the residual path
    if norm is not None:
        sigma = (z[rows].var(-1, unbiased=False) + norm.eps).sqrt()  # (R,)
        t = norm.weight * (t - t.mean(-1, keepdim=True)) / sigma[None, :, None]
    d = t.sub_(y[rows][None]).abs_().sum(-1)  # (S, R): ‖y_i − T_i(x_j)‖₁
    return shares((y[rows].abs().sum(-1)[None] - d).clamp_(min=0).T)  # (R, S)


def rollout_step(mean_weights: torch.Tensor) -> torch.Tensor:
    """One layer of attention rollout: ½A + ½I on the full (S, S) head-mean weights (rows sum to 1)."""
    return 0.5 * mean_weights + 0.5 * torch.eye(mean_weights.shape[-1], dtype=mean_weights.dtype,
                                                 device=mean_weights.device)


def logit_by_key(alpha: torch.Tensor, v: torch.Tensor, wo: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each key's part of one row's attention update in the direction u, (S,): Σ_h α^h_j v^h_j·(W_O^hᵀ u) —
    u·Σ_h α^h_j W_O^h v^h_j without building the (S, C) vectors. alpha (H, S), v (K or H, S, D), wo (H, C, D)."""
    w = wo.transpose(1, 2) @ u  # (H, D): each head's output map pulled back onto its values
    return (alpha * (expand_heads(v, wo.shape[0]) @ w[:, :, None])[..., 0]).sum(0)


def logit_direction(unembed: torch.Tensor, final_norm: torch.nn.Module, x_last: torch.Tensor, target: int,
                    foil: int | None) -> torch.Tensor:
    """u (C,) with u·x_n = logit(target) − logit(foil) for the final RMSNorm with its scale fixed at x_n's."""
    w = unembed[target] - (unembed[foil] if foil is not None else 0)
    rms = (x_last.pow(2).mean() + final_norm.eps).sqrt()
    return final_norm.weight * w / rms

"""The faithfulness measures as slow float64 loops over heads, queries and keys — the spec of
qkv.explain.measures, written from the papers' formulas and Hugging Face modules only (nothing of qkv).

Input: a transformers ``LlamaForCausalLM`` (cast to float64 here) and token ids. Everything is read off
that model: the hidden states entering each layer, its eager attention weights, its own modules for
RMSNorm, v_proj and o_proj, and a hook on each attention module for the output that the residual adds.
"""

from __future__ import annotations

import copy
import math

import torch


@torch.no_grad()
def llama_measures(hf_model, ids: list[int], target: int, foil: int | None) -> dict:
    """Per layer: weights (H, T, T), per-head norm shares, per-layer norm shares, ALTI C (T, T),
    rollout up to the layer, ALTI composed; and the logit contributions at the last position, by key position
    and (ALTI-Logit) carried back through the ALTI maps of the layers below."""
    m = copy.deepcopy(hf_model).double().eval()
    cfg = m.config
    h_n, kv_n = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h_n
    attn_out = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, out, i=i: attn_out.__setitem__(i, out[0][0].detach()))
        for i, layer in enumerate(m.model.layers)]
    mlp_out = {}
    hooks += [layer.mlp.register_forward_hook(lambda mod, args, out, i=i: mlp_out.__setitem__(i, out[0].detach()))
              for i, layer in enumerate(m.model.layers)]
    m.config._attn_implementation = "eager"  # the only transformers path that returns the weights
    with torch.no_grad():
        out = m(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    t = len(ids)
    res = {"weights": [], "head_norms": [], "layer_norms": [], "alti": [], "rollout": [], "alti_composed": [],
           "y": [], "logit_layers": []}
    roll = torch.eye(t, dtype=torch.float64)
    mix = torch.eye(t, dtype=torch.float64)
    final_n = t - 1
    updates = []  # per layer: (T, C) what each key adds at the last row through attention
    mixes_before = []
    for li, layer in enumerate(m.model.layers):
        x = out.hidden_states[li][0]  # (T, C) entering layer li
        alpha = out.attentions[li][0]  # (H, T, T)
        n = layer.input_layernorm(x)
        v = layer.self_attn.v_proj(n)  # (T, K·D), with its bias
        wo = layer.self_attn.o_proj.weight  # (C, H·D)
        f = torch.zeros(h_n, t, cfg.hidden_size, dtype=torch.float64)
        for h in range(h_n):
            g = h // (h_n // kv_n)
            for j in range(t):
                f[h, j] = wo[:, h * d:(h + 1) * d] @ v[j, g * d:(g + 1) * d]
        head_norms = torch.zeros(h_n, t, t, dtype=torch.float64)
        layer_norms = torch.zeros(t, t, dtype=torch.float64)
        tvec = torch.zeros(t, t, cfg.hidden_size, dtype=torch.float64)
        for i in range(t):
            for j in range(t):
                s = torch.zeros(cfg.hidden_size, dtype=torch.float64)
                for h in range(h_n):
                    head_norms[h, i, j] = alpha[h, i, j] * f[h, j].norm()
                    s += alpha[h, i, j] * f[h, j]
                layer_norms[i, j] = s.norm()
                tvec[i, j] = s + (x[i] if i == j else 0)
        y = x + attn_out[li]  # the residual stream after attention, as the model computed it
        c = torch.zeros(t, t, dtype=torch.float64)
        for i in range(t):
            for j in range(t):
                c[i, j] = max(0.0, float(y[i].abs().sum() - (y[i] - tvec[i, j]).abs().sum()))
            c[i] /= c[i].sum()
        updates.append(tvec[final_n] - torch.nn.functional.one_hot(torch.tensor(final_n), t).double()[:, None]
                       * x[final_n])
        mixes_before.append(mix.clone())
        mix = c @ mix
        roll = (0.5 * alpha.mean(0) + 0.5 * torch.eye(t, dtype=torch.float64)) @ roll
        res["weights"].append(alpha)
        res["head_norms"].append(_shares(head_norms))
        res["layer_norms"].append(_shares(layer_norms))
        res["alti"].append(c)
        res["rollout"].append(roll.clone())
        res["alti_composed"].append(mix.clone())
        res["y"].append(y)
    x_last = _pre_final_norm(m, out, attn_out, mlp_out, final_n)
    w_u = m.lm_head.weight
    direction = w_u[target] - (w_u[foil] if foil is not None else 0)
    rms = math.sqrt(float(x_last.pow(2).mean()) + m.model.norm.variance_epsilon)
    u = m.model.norm.weight * direction / rms
    by_key = [updates[li] @ u for li in range(len(updates))]  # per layer (T,): each key position's part
    carried = torch.stack([mixes_before[li].T @ by_key[li] for li in range(len(updates))])  # (L, T)
    embedding = torch.zeros(t, dtype=torch.float64)
    embedding[final_n] = out.hidden_states[0][0][final_n] @ u
    logits = out.logits[0, final_n]
    res["logit_layers"] = torch.stack(by_key)
    res["logit_model"] = res["logit_layers"].sum(0) + embedding
    res["alti_logit_layers"] = carried
    res["alti_logit_model"] = carried.sum(0) + embedding
    res["logit_difference"] = float(logits[target] - (logits[foil] if foil is not None else 0))
    biases = [layer.self_attn.o_proj.bias for layer in m.model.layers if layer.self_attn.o_proj.bias is not None]
    rest = sum(mlp_out[li][final_n] for li in mlp_out) + sum(biases, torch.zeros_like(u))
    res["remainder"] = float(rest @ u)
    return res


def _pre_final_norm(m, out, attn_out, mlp_out, n):
    """x_n after the last layer, before the final norm: the embedding plus every attention and MLP update."""
    x = out.hidden_states[0][0][n].clone()
    for li in range(len(m.model.layers)):
        x = x + attn_out[li][n] + mlp_out[li][n]
    return x


def _shares(x: torch.Tensor) -> torch.Tensor:
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, torch.ones_like(total)), x)

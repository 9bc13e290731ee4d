"""`ICLTransformer` written out in NumPy float64 from its parameters: the independent reference
the model, hook and probe tests compare with (every hook's value by name, the attention mask by
brute force, and the read-out lens with the per-layer attention patterns of one prompt)."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from mi_krr.models import ICLTransformer

EPS = 1e-5


def brute_force_allowed(layout: str, seq: int, n_support: int, causal: bool) -> np.ndarray:
    """allowed[i, j]: may position i attend to j, written out position by position."""
    allowed = np.zeros((seq, seq), dtype=bool)
    for i in range(seq):
        for j in range(seq):
            if layout == "interleaved":
                allowed[i, j] = j <= i
            elif i < n_support:  # support token: supports (causal: only j <= i)
                allowed[i, j] = j < n_support and (j <= i or not causal)
            else:  # query token: every support token and itself
                allowed[i, j] = j < n_support or j == i
    return allowed


def _norm(x: np.ndarray, kind: str, module) -> np.ndarray:
    if kind == "none":
        return x
    weight = module.weight.detach().numpy()
    if kind == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + EPS) * weight + module.bias.detach().numpy()
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + EPS) * weight  # rmsnorm


def numpy_forward(model: ICLTransformer, tokens: np.ndarray, allowed: np.ndarray) -> dict[str, np.ndarray]:
    """The documented architecture in NumPy float64, returning every intermediate by hook name."""
    cfg = model.cfg
    p = {name: value.detach().numpy() for name, value in model.named_parameters()}
    out: dict[str, np.ndarray] = {}
    h = tokens @ p["read_in.weight"].T + p["read_in.bias"]
    out["hook_embed"] = h
    if cfg.layout == "interleaved":
        h = h + p["W_pos"][: tokens.shape[1]]
    n_keys = allowed.sum(-1, keepdims=True)
    for layer, block in enumerate(model.blocks):
        pre = f"blocks.{layer}."
        out[pre + "hook_resid_pre"] = h
        a = _norm(h, cfg.norm, block.ln1)
        q, k, v = (np.einsum("bpm,hmd->bphd", a, p[pre + f"attn.W_{x}"]) + p[pre + f"attn.b_{x}"] for x in "QKV")
        raw = np.einsum("bqhd,bkhd->bhqk", q, k)
        if cfg.attention == "softmax":
            scores = np.where(allowed, raw / math.sqrt(cfg.d_head), -np.inf)
            pattern = np.exp(scores - scores.max(-1, keepdims=True))
            pattern = pattern / pattern.sum(-1, keepdims=True)
        else:
            scores = np.where(allowed, raw, 0.0)
            pattern = (scores if cfg.attention == "linear" else np.maximum(scores, 0.0)) / n_keys
        z = np.einsum("bhqk,bkhd->bqhd", pattern, v)
        attn_out = np.einsum("bqhd,hdm->bqm", z, p[pre + "attn.W_O"]) + p[pre + "attn.b_O"]
        out.update({pre + "attn.hook_q": q, pre + "attn.hook_k": k, pre + "attn.hook_v": v, pre + "attn.hook_attn_scores": scores,
                    pre + "attn.hook_pattern": pattern, pre + "attn.hook_z": z, pre + "hook_attn_out": attn_out})
        h = h + attn_out
        if cfg.mlp:
            out[pre + "hook_resid_mid"] = h
            m = _norm(h, cfg.norm, block.ln2)
            hidden = m @ p[pre + "mlp.fc_in.weight"].T + p[pre + "mlp.fc_in.bias"]
            act = 0.5 * hidden * (1.0 + erf(hidden / math.sqrt(2.0)))  # exact GELU
            mlp_out = act @ p[pre + "mlp.fc_out.weight"].T + p[pre + "mlp.fc_out.bias"]
            out.update({pre + "mlp.hook_pre": hidden, pre + "mlp.hook_post": act, pre + "hook_mlp_out": mlp_out})
            h = h + mlp_out
        out[pre + "hook_resid_post"] = h
    final = _norm(h, cfg.norm, model.ln_final)
    out["output"] = (final @ p["read_out.weight"].T + p["read_out.bias"])[..., 0]
    return out


def numpy_lens_and_patterns(model: ICLTransformer, xs: np.ndarray, ys: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """For a concat-layout, non-causal model: one prompt's read-out lens `[L + 1, m]` (final norm
    and read-out applied to the embeddings and to every block's output at the query tokens) and
    each layer's attention pattern `[H, S, S]`, from tokens [x_i, y_i] and [x_*, 0] built here."""
    n, m = len(ys), len(xq)
    tokens = np.concatenate([np.c_[xs, ys], np.c_[xq, np.zeros(m)]]).astype(np.float64)[None]
    out = numpy_forward(model, tokens, brute_force_allowed("concat", n + m, n, causal=False))
    stream = [out["hook_embed"]] + [out[f"blocks.{layer}.hook_resid_post"] for layer in range(model.cfg.n_layers)]
    read_out = {name: value.detach().double().numpy() for name, value in model.read_out.named_parameters()}
    lens = [(_norm(r[0, n:], model.cfg.norm, model.ln_final) @ read_out["weight"].T + read_out["bias"])[:, 0] for r in stream]
    patterns = [out[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)]
    return np.stack(lens), patterns

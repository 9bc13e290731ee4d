"""Usage review: side effects and interventions. A researcher runs the probes in a notebook where
other things go on: hooks of their own (ablations, activation patching, caches), seeded RNGs,
grad modes, frozen or half-trained models, and probes called from inside hooks.

Covered, on an `ICLTransformer` (softmax and linear attention), a `BridgeICLModel` and the CG
construction (`cg_transformer`):
- state hygiene of every public entry point (attach, both lens methods, label sensitivities,
  attention kernels, kernel alignment, stream_probes, diagnose with and without sensitivities,
  solver_sensitivities): hooks, train/eval mode, parameters (values bit for bit, requires_grad,
  .grad, dtype, device), grad / inference mode, default dtype, torch / NumPy / `random` RNG
  states, thread count, deterministic flag, NumPy error state, warning filters, the task's
  tensors; also when a user hook raises midway (RuntimeError, KeyboardInterrupt);
- interventions: the probes under a user's hooks (`with model.hooks(...)`, `add_hook`,
  permanent hooks, a lazily computed activation patch) against the same ablation computed by
  hand: `run_with_hooks` residuals and a NumPy LayerNorm + read-out written from the weights,
  central finite differences for the sensitivities;
- re-entrancy: probes inside a user hook of another forward, two models interleaved, two
  `attach` wrappers, repeated calls; TransformerLens `run_with_cache` / `ActivationCache` use.

References are independent of the library (NumPy read-outs from the state dict, finite
differences, bit-for-bit snapshots taken before the call). The four problems this review found
(a nested pass of the model blamed on the model, probes recording their prompts' n_support on the
model, the bridge models' missing add_hook / add_perma_hook, no `cfg` on the constructions for
`ActivationCache`) were fixed in session 22; their tests now pass."""

from __future__ import annotations

import dataclasses
import random
import warnings

import numpy as np
import pytest
import sympy  # noqa: F401  # torch's vmap imports it lazily and sympy adds a warning filter on import: not the probes' doing
import torch
from transformer_lens import ActivationCache

import probes
from mi_krr.construct import cg_transformer
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import GPRegressionSampler

SAMPLER = GPRegressionSampler(dim=2, noise_std=0.3)
TINY = dict(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")


def build(kind: str):
    torch.manual_seed(0)
    if kind == "cg":
        return cg_transformer(n_steps=1, lam=0.5, dim=2)
    if kind == "bridge":
        return BridgeICLModel(ICLTransformerConfig(**TINY)).eval()
    return ICLTransformer(ICLTransformerConfig(**TINY, attention=kind)).eval()


def task_of(batch=4, n=5, m=2, seed=1):
    return SAMPLER.sample(batch, n_support=n, n_query=m, seed=seed, dtype=torch.float64)


def hook_points(model):
    return model.hook_dict.values()


def attached(model) -> int:
    """Hooks attached anywhere: TransformerLens handles and torch's own hook dicts."""
    tl = sum(len(getattr(p, "fwd_hooks", [])) + len(getattr(p, "bwd_hooks", [])) for p in hook_points(model))
    torch_hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                      for name, m in model.named_modules() if "_original_component.ln" not in name)
    return tl + torch_hooks


def tl_hooks(model) -> int:
    """TransformerLens hook handles attached (each also shows as one torch forward hook)."""
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in hook_points(model))


def context_level(model) -> int:
    return model.bridge.context_level if hasattr(model, "bridge") else model.context_level


def snapshot(model, task) -> dict:
    return {
        "hooks": attached(model),
        "context_level": context_level(model),
        "modes": [m.training for m in model.modules()],
        "params": [(n, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone(), p.dtype, p.device)
                   for n, p in model.named_parameters()],
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "torch_rng": torch.get_rng_state().clone(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "np_err": np.geterr(),
        "warning_filters": list(warnings.filters),
        "task": [getattr(task, f).clone() for f in ("x_support", "y_support", "x_query", "y_query")],
    }


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for key in a:
        x, y = a[key], b[key]
        if key == "params":
            for (n, v, rg, g, dt, dev), (_, v2, rg2, g2, dt2, dev2) in zip(x, y):
                if not torch.equal(v, v2) or rg != rg2 or dt != dt2 or dev != dev2 or (g is None) != (g2 is None) or (
                        g is not None and not torch.equal(g, g2)):
                    out.append(f"param {n}")
        elif key == "task":
            out += [f"task tensor {i}" for i, (u, v) in enumerate(zip(x, y)) if not torch.equal(u, v)]
        elif isinstance(x, torch.Tensor):
            out += [] if torch.equal(x, y) else [key]
        elif isinstance(x, np.ndarray):
            out += [] if np.array_equal(x, y) else [key]
        elif x != y:
            out.append(f"{key}: {x} -> {y}")
    return out


def ablate_head0(pattern, hook):
    pattern = pattern.clone()
    pattern[:, 0] = 0
    return pattern


def numpy_readout(model, resid: np.ndarray) -> np.ndarray:
    """The model's final LayerNorm and read-out written from its weights (ICLTransformer or bridge)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    if isinstance(model, BridgeICLModel):
        g, b = sd["bridge.ln_final._original_component.weight"], sd["bridge.ln_final._original_component.bias"]
        w, bias = sd["bridge.unembed._original_component.weight"][0], sd["read_out_bias"]
    else:
        g, b, w, bias = sd["ln_final.weight"], sd["ln_final.bias"], sd["read_out.weight"][0], sd["read_out.bias"][0]
    centred = resid - resid.mean(-1, keepdims=True)
    return (centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * g + b) @ w + bias


def lens_by_hand(model, task, fwd_hooks) -> np.ndarray:
    """[batch, L + 1, n_query]: residuals cached by `run_with_hooks` with the user's hooks, read
    out in NumPy at the query positions (concat layout: the last n_query positions)."""
    prompt = model.encode(task)
    store = []
    with torch.no_grad():
        model.run_with_hooks(prompt.tokens, fwd_hooks=list(fwd_hooks) + [
            (name, lambda act, hook: store.append(act.detach().double().numpy().copy())) for name in model.residual_hook_names()])
    assert len(store) == model.n_layers + 1
    return np.stack([numpy_readout(model, r[:, -task.n_query:]) for r in store], 1)


# ---------------------------------------------------------------- state hygiene


@pytest.mark.parametrize("kind", ["softmax", "linear", "bridge", "cg"])
def test_every_public_probe_leaves_model_global_and_task_state_bit_for_bit_unchanged(kind):
    """A frozen first parameter, a stale .grad, train mode, seeded RNGs: none of it moves under any
    entry point, and the task (already float64: no cast shields it) is not modified in place."""
    model, task = build(kind), task_of(batch=6)
    first = next(p for p in model.parameters() if p.requires_grad) if any(p.requires_grad for p in model.parameters()) else None
    if first is not None:
        first.grad = torch.full_like(first, 0.25)
    model.train()
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    calls = {
        "attach": lambda: probes.attach(model),
        "readout lens": lambda: probes.layer_predictions(model, task),
        "ridge lens": lambda: probes.layer_predictions(model, task, method="ridge", train_task=task_of(batch=12, seed=5)),
        "sensitivities": lambda: probes.label_sensitivities(model, task),
        "attention": lambda: probes.attention_kernels(model, task, source="scores"),
        "stream": lambda: probes.stream_probes(model, model.encode(task), layers=[0, 1], blocks=("support", "query")),
        "diagnose": lambda: probes.diagnose(model, task, bootstrap=20, progress=False, n_steps=4),
        "diagnose+sens": lambda: probes.diagnose(model, task, bootstrap=20, progress=False, n_steps=4, sensitivities=True),
    }
    if kind in ("softmax", "bridge"):
        calls["alignment"] = lambda: probes.kernel_alignment(model, task)
    K = torch.exp(-torch.cdist(task.x_support, task.x_support) ** 2)
    Kq = torch.exp(-torch.cdist(task.x_query, task.x_support) ** 2)
    solver_inputs = [K.clone(), Kq.clone(), task.y_support.clone()]
    calls["solver_sensitivities"] = lambda: probes.solver_sensitivities("cg", K, Kq, 0.1, 3, y=task.y_support)
    for name, call in calls.items():
        before = snapshot(model, task)
        call()
        assert not differences(before, snapshot(model, task)), (name, differences(before, snapshot(model, task)))
    assert all(torch.equal(a, b) for a, b in zip(solver_inputs, (K, Kq, task.y_support)))
    assert model.training


@pytest.mark.parametrize("kind", ["softmax", "bridge", "cg"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_user_hook_raising_midway_restores_hooks_context_and_the_callers_no_grad(kind, error):
    """Ctrl-C (or an error) raised from a user's hook during the backward-ready pass of
    label_sensitivities and during diagnose's second pass: under the caller's no_grad the grad
    mode is off again afterwards, no hook is left, the hook context level is back, and the next
    call gives the clean numbers bit for bit."""
    model, task = build(kind), task_of()
    clean = probes.layer_predictions(model, task)
    last = model.residual_hook_names()[-1]
    for call, raise_at in ((lambda: probes.label_sensitivities(model, task), 1),
                           (lambda: probes.diagnose(model, task, bootstrap=0, progress=False, n_steps=3, sensitivities=True), 2)):
        fired = []

        def interrupt(act, hook):
            fired.append(1)
            if len(fired) == raise_at:
                raise error("user hook")

        with torch.no_grad():
            with pytest.raises(error), model.hooks(fwd_hooks=[(last, interrupt)]):
                call()
            assert not torch.is_grad_enabled()  # the caller's no_grad survives the interrupted probe
        assert len(fired) == raise_at and torch.is_grad_enabled()
        assert attached(model) == 0 and context_level(model) == 0
    assert torch.equal(probes.layer_predictions(model, task), clean)


# ---------------------------------------------------------------- interventions


@pytest.mark.parametrize("kind", ["softmax", "linear", "bridge"])
def test_lens_and_attention_under_a_users_head_ablation_equal_the_ablation_computed_by_hand(kind):
    """Zero-ablate head 0 of block 0: with `with model.hooks(...)`, and (own models) with
    `add_hook` and a permanent hook left on the model, every layer's lens equals a NumPy read-out
    of `run_with_hooks` residuals under the same ablation (and differs from the clean lens), the
    attention probe shows the zeroed head, and the user's hooks are still attached afterwards."""
    model, task = build(kind), task_of()
    clean = probes.layer_predictions(model, task).numpy()
    fwd = [("blocks.0.attn.hook_pattern", ablate_head0)]
    expected = lens_by_hand(model, task, fwd)
    assert np.abs(expected - clean).max() > 1e-3
    np.testing.assert_allclose(clean, lens_by_hand(model, task, []), rtol=0, atol=1e-12)
    with model.hooks(fwd_hooks=fwd):
        np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), expected, rtol=0, atol=1e-12)
        assert tl_hooks(model) == 1
    owner = model.bridge if kind == "bridge" else model
    for permanent in (False, True):
        owner.add_hook("blocks.0.attn.hook_pattern", ablate_head0, is_permanent=permanent)
        np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), expected, rtol=0, atol=1e-12)
        attention = probes.attention_kernels(model, task)
        assert attention.query[:, 0, 0].abs().max() == 0 and attention.query[:, 0, 1].abs().max() > 0
        probes.diagnose(model, task, bootstrap=0, progress=False, n_steps=3, kernels=())
        assert tl_hooks(model) == 1
        owner.reset_hooks(including_permanent=True)
    assert attached(model) == 0


def test_label_sensitivities_under_a_users_ablation_equal_finite_differences_of_the_ablated_lens():
    model, task = build("softmax"), task_of(batch=3, n=4, m=2)
    fwd = [("blocks.0.attn.hook_pattern", ablate_head0)]
    with model.hooks(fwd_hooks=fwd):
        got = probes.label_sensitivities(model, task).numpy()
    h, fd = 1e-5, np.zeros_like(got)
    for i in range(task.n_support):
        step = torch.zeros_like(task.y_support)
        step[:, i] = h
        plus = lens_by_hand(model, dataclasses.replace(task, y_support=task.y_support + step), fwd)
        minus = lens_by_hand(model, dataclasses.replace(task, y_support=task.y_support - step), fwd)
        fd[..., i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=0, atol=1e-8)
    assert np.abs(got - probes.label_sensitivities(model, task).numpy()).max() > 1e-3  # the ablation matters


def test_bridge_model_takes_add_hook_and_add_perma_hook_like_the_other_hooked_models():
    model, task = build("bridge"), task_of()
    expected = lens_by_hand(model, task, [("blocks.0.attn.hook_pattern", ablate_head0)])
    model.add_hook("blocks.0.attn.hook_pattern", ablate_head0)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), expected, rtol=0, atol=1e-12)
    model.reset_hooks()
    model.add_perma_hook("blocks.0.attn.hook_pattern", ablate_head0)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "bridge"])
def test_activation_patch_computed_lazily_inside_the_users_hook_is_probed_like_a_precomputed_one(kind):
    """Activation patching where the clean activation is computed on first use, inside the hook
    (a nested forward of the same model): the lens must equal the same patch precomputed, read
    out by hand."""
    model, task = build(kind), task_of()
    clean_tokens = model.encode(task_of(seed=7)).tokens
    store = []
    model.run_with_hooks(clean_tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: store.append(a.detach().clone()))])
    expected = lens_by_hand(model, task, [("blocks.0.hook_resid_post", lambda act, hook: store[0])])
    lazy = {}

    def patch(act, hook):
        if "clean" not in lazy:
            lazy["clean"] = None
            kept = []
            model.run_with_hooks(clean_tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: kept.append(a.detach().clone()))])
            lazy["clean"] = kept[0]
        return act if lazy["clean"] is None else lazy["clean"]

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", patch)]):
        got = probes.layer_predictions(model, task).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "bridge"])
def test_a_nested_pass_a_users_hook_abandons_midway_leaves_the_probes_own_pass_readable(kind):
    """A user's hook runs the model again and swallows an error raised inside that nested pass; the
    hook then returns the activation unchanged, so the lens is the model's own, read out by hand."""
    model, task = build(kind), task_of()
    expected = lens_by_hand(model, task, [])
    tokens = model.encode(task_of(seed=7)).tokens

    def stop(act, hook):
        raise RuntimeError("stop here")

    def nested(act, hook):
        if not ran:  # the nested pass fires this hook too
            ran.append(True)
            with pytest.raises(RuntimeError, match="stop here"):
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", stop)])
        return act

    ran: list[bool] = []

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", nested)]):
        got = probes.layer_predictions(model, task).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert not any(point.fwd_hooks for point in hook_points(model))  # nothing of the probe's left behind


@pytest.mark.parametrize("kind", ["softmax", "bridge"])
def test_probing_another_task_does_not_change_how_the_model_runs_the_users_own_tokens(kind):
    """The concat layout resolves n_support of un-annotated tokens (slices, copies) from the
    splits the model has encoded; a probe on a task of the same length but another split must
    not change that: the user's own call works and gives the same outputs after the probe."""
    model = build(kind)
    mine = model.encode(task_of(n=5, m=2)).tokens[:2]  # a slice: resolved from the model's encoded splits
    before = model(mine)
    probes.layer_predictions(model, task_of(n=4, m=3, seed=3))  # same sequence length 7, other split
    assert torch.equal(model(mine), before)


# ---------------------------------------------------------------- re-entrancy and TransformerLens use


@pytest.mark.parametrize("kind", ["softmax", "bridge", "cg"])
def test_probes_inside_a_users_hook_of_another_forward_and_interleaved_models_read_clean_numbers(kind):
    """A probe called from a user's hook during `run_with_hooks` on the same model, and a probe of
    a second model called from a hook during a probe of the first, give the stand-alone numbers;
    the outer forward's outputs are the model's own; two attach wrappers agree; nothing stays."""
    model, other, task = build(kind), build("softmax"), task_of()
    if kind != "cg":
        torch.manual_seed(1)
        other = type(model)(ICLTransformerConfig(**TINY)).eval()
    clean, other_clean = probes.layer_predictions(model, task), probes.layer_predictions(other, task)
    prompt = model.encode(task)
    inner, busy = [], [False]

    def probe_inside(act, hook):
        if not busy[0]:
            busy[0] = True
            try:
                inner.append(probes.layer_predictions(model, task))
            finally:
                busy[0] = False

    outputs = model.run_with_hooks(prompt.tokens, fwd_hooks=[(model.residual_hook_names()[1], probe_inside)])
    assert torch.equal(inner[0], clean) and torch.equal(prompt.gather_queries(outputs), clean[:, -1])
    seen = []
    with model.hooks(fwd_hooks=[(model.residual_hook_names()[1], lambda act, hook: seen.append(probes.layer_predictions(other, task)))]):
        assert torch.equal(probes.layer_predictions(model, task), clean)
    assert torch.equal(seen[0], other_clean)
    first, second = probes.attach(model), probes.attach(model)
    assert torch.equal(first.layer_predictions(task), second.layer_predictions(task)) and probes.attach(first).model is model
    assert attached(model) == 0 and attached(other) == 0


@pytest.mark.parametrize("kind", ["softmax", "bridge"])
def test_tl_logit_lens_from_activation_cache_equals_the_probes_lens(kind):
    """`run_with_cache` + `ActivationCache.accumulated_resid(apply_ln=True)` (TransformerLens's
    own logit lens) through the model's read-out weights, at the query positions, is the probes'
    lens; the cache's pattern has the TransformerLens shape."""
    model, task = build(kind), task_of()
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache, model)
    stack = cache.accumulated_resid(apply_ln=True)[:, :, -task.n_query:].detach().numpy()  # [L + 1, batch, m, d]
    w = (model.bridge.unembed._original_component.weight if kind == "bridge" else model.read_out.weight)[0].detach().numpy()
    bias = float((model.read_out_bias if kind == "bridge" else model.read_out.bias[0]).detach())
    np.testing.assert_allclose((stack @ w + bias).transpose(1, 0, 2), probes.layer_predictions(model, task).numpy(), rtol=0, atol=1e-12)
    assert tuple(cache["pattern", 0].shape) == (task.batch_size, TINY["n_heads"], 7, 7)


def test_construction_cache_wraps_as_an_activation_cache_like_the_other_hooked_models():
    model, task = build("cg"), task_of()
    prompt = model.encode(task)
    _, raw = model.run_with_cache(prompt.tokens)
    cache = ActivationCache(raw, model)
    stack = cache.accumulated_resid()
    assert stack.shape[0] == model.n_layers + 1
    torch.testing.assert_close(stack[-1], raw[f"blocks.{model.n_layers - 1}.hook_resid_post"], rtol=0, atol=0)

"""The CG transformer runs conjugate gradient exactly: checked step by step against
mi_krr.solvers.cg, an independent NumPy CG, and SciPy's direct solve."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from mi_krr.construct import cg_transformer, gd_transformer
from mi_krr.construct.primitives import ReluRangeError
from mi_krr.construct.studies import conditioned_linear_task
from construct_references import numpy_cg_predictions
from mi_krr.feature_maps import PositiveRandomFeatures
from mi_krr.models.adapter import adapter_for
from mi_krr.solvers import cg
from mi_krr.tasks import ICLTask


def per_step_predictions(model, task: ICLTask) -> torch.Tensor:
    """The prediction read after each step from `blocks.{t * L - 1}.hook_resid_post` -> `[batch, T, m]`."""
    prompt = model.encode(task)
    names = [f"blocks.{t * model.layers_per_step - 1}.hook_resid_post" for t in range(1, model.n_steps + 1)]
    _, cache = model.run_with_cache(prompt.tokens, names_filter=names)
    return torch.stack([prompt.gather_queries(model.readout(cache[name])) for name in names], dim=1)


def numpy_cg_states(K: np.ndarray, y: np.ndarray, lam: float, n_steps: int) -> dict[str, np.ndarray]:
    """Textbook CG from alpha = 0 on one system; per step t = 1..T: alpha_t, r_t and the
    direction p_{t-1} that step t moved along."""
    A = K + lam * np.eye(len(y))
    alpha, r = np.zeros_like(y), y.copy()
    p = r.copy()
    states = {"alpha": [], "r": [], "p": []}
    for _ in range(n_steps):
        a = (r @ r) / (p @ A @ p)
        alpha = alpha + a * p
        r_next = r - a * (A @ p)
        states["alpha"].append(alpha)
        states["r"].append(r_next)
        states["p"].append(p)
        p = r_next + (r_next @ r_next) / (r @ r) * p
        r = r_next
    return {name: np.stack(values) for name, values in states.items()}


@pytest.fixture(scope="module")
def well_conditioned():
    """20 CG steps on prompts with cond(K + lam I) = 100, n = 64, and the residual stream after
    each step's blocks (`blocks.{t * L - 1}.hook_resid_post`), from one cached forward pass.

    kappa = 100, n = 64 is the edge of the regime where two float64 CG implementations agree to
    1e-9 after 20 steps (rounding differences grow as CG nears convergence)."""
    lam = 1e-3
    task = conditioned_linear_task(batch_size=6, n_support=64, kappa=100.0, lam=lam, n_query=5, seed=3)
    model = cg_transformer(n_steps=20, lam=lam, dim=task.dim)
    prompt = model.encode(task)
    names = [f"blocks.{t * model.layers_per_step - 1}.hook_resid_post" for t in range(1, 21)]
    _, cache = model.run_with_cache(prompt.tokens, names_filter=names)
    resid = torch.stack([cache[name] for name in names], dim=1)  # [batch, T, seq, d_model]
    return task, lam, model, prompt, resid


def test_cg_transformer_prediction_matches_solver_cg_at_every_step(well_conditioned):
    task, lam, model, prompt, resid = well_conditioned
    K = task.x_support @ task.x_support.mT
    reference = cg(K, task.y_support, lam, 20, K_query=task.x_query @ task.x_support.mT)
    assert 99 < np.linalg.cond(K[0].numpy() + lam * np.eye(task.n_support)) < 100.001
    assert model.layers_per_step == 4 and model.n_layers == 80
    model_pred = model.readout(resid[:, :, prompt.query_positions])  # [batch, T, m]
    scale = reference.pred.abs().max().item()
    torch.testing.assert_close(model_pred, reference.pred[:, 1:], rtol=1e-9, atol=1e-9 * scale)


def test_cg_transformer_states_equal_numpy_cg(well_conditioned):
    task, lam, model, prompt, resid = well_conditioned
    n = task.n_support
    for b in range(task.batch_size):
        x = task.x_support[b].numpy()
        expected = numpy_cg_states(x @ x.T, task.y_support[b].numpy(), lam, 20)
        for name in ("alpha", "r", "p"):
            got = resid[b, :, :n, model.state_coordinates[name]].numpy()
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(got, expected[name], rtol=1e-9, atol=1e-9 * scale, err_msg=name)
    # the r coordinate is the true residual y - (K + lam I) alpha_t
    alpha = resid[:, :, :n, model.state_coordinates["alpha"]]
    K = task.x_support @ task.x_support.mT
    true_residual = task.y_support[:, None] - alpha @ K - lam * alpha
    torch.testing.assert_close(resid[:, :, :n, model.state_coordinates["r"]], true_residual, rtol=0, atol=1e-9)


def test_cg_transformer_error_curve_tracks_the_solver_when_ill_conditioned():
    """cond(K + lam I) = 1e4: finite-precision CG loses orthogonality, and two implementations
    (the model forms K p by a recurrence, the solver directly) follow different rounding paths, so
    the A-norm error curves agree to a factor 10^0.3 (measured: 10^0.14), not to 1e-9."""
    lam = 1e-8
    task = conditioned_linear_task(batch_size=2, n_support=24, kappa=1e4, lam=lam, n_query=4, seed=1)
    model = cg_transformer(n_steps=30, lam=lam, dim=task.dim)
    K = (task.x_support @ task.x_support.mT).numpy()
    A = K + lam * np.eye(24)
    alpha_star = np.stack([scipy.linalg.solve(A[b], task.y_support[b].numpy(), assume_a="pos") for b in range(2)])

    def a_norm_ratio(alpha: np.ndarray) -> np.ndarray:
        error = alpha - alpha_star[:, None]
        return np.sqrt(np.einsum("bti,bij,btj->bt", error, A, error) / np.einsum("bi,bij,bj->b", alpha_star, A, alpha_star)[:, None])

    model_curve = a_norm_ratio(model.step_states(task).support["alpha"].numpy())
    solver_curve = a_norm_ratio(cg(torch.as_tensor(K), task.y_support, lam, 30).alpha.numpy())
    assert np.abs(np.log10(model_curve / solver_curve)).max() < 0.3
    assert (model_curve[:, -1] < 0.1).all() and (np.diff(model_curve, axis=1) <= 1e-12).all()  # CG: A-norm error never rises


def test_cg_transformer_with_random_features_runs_cg_on_the_feature_kernel_exactly():
    generator = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(4, 32, 3, generator=generator, dtype=torch.float64)
    x_query = 0.5 * torch.randn(4, 6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 32, generator=generator, dtype=torch.float64)
    task = ICLTask(x, y, x_query, torch.zeros(4, 6, dtype=torch.float64))
    lam = 0.5  # positive-feature kernels decay fast: a ridge of 1/100 of K's top eigenvalue keeps kappa <= 100
    model = cg_transformer(n_steps=6, lam=lam, kernel="exp", dim=3, head_width=16, temperature=2.0, seed=7)
    features = PositiveRandomFeatures(3, 16, kind="exp", temperature=2.0, seed=7)
    phi, phi_query = features(x).numpy(), features(x_query).numpy()
    K = phi @ phi.transpose(0, 2, 1)
    assert np.linalg.cond(K + lam * np.eye(32)).max() < 100
    reference = cg(K, y, lam, 6, K_query=phi_query @ phi.transpose(0, 2, 1))
    # compare before CG reaches rounding level (after it, any two float64 CGs drift apart)
    assert (reference.residual_norm[:, -1] > 1e-7 * reference.residual_norm[:, 0]).all()
    assert model.d_head == 16
    scale = reference.pred.abs().max().item()
    torch.testing.assert_close(model.step_states(task).pred, reference.pred, rtol=1e-9, atol=1e-9 * scale)


def test_cg_transformer_attention_pattern_is_the_kernel_matrix(well_conditioned):
    task, lam, *_ = well_conditioned
    model = cg_transformer(n_steps=1, lam=lam, dim=task.dim)
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"][:, 0]  # head 0: K r on support tokens
    n = task.n_support
    torch.testing.assert_close(pattern[:, :n, :n], task.x_support @ task.x_support.mT)
    assert (pattern[:, n:, :] == 0).all() and (pattern[:, :, n:] == 0).all()


def test_cg_transformer_implements_the_icl_model_protocol(well_conditioned):
    task, lam, *_ = well_conditioned
    model = adapter_for(cg_transformer(n_steps=2, lam=lam, dim=task.dim + 3))
    assert len(model.residual_hook_names()) == model.n_layers + 1
    assert model.predict(task).shape == (task.batch_size, task.n_query)
    assert model.step_hook_names()[2] == "blocks.7.hook_resid_post"
    assert model.state_coordinates["is_support"] == 0 and model.state_coordinates["pred"] > 0
    assert model.d_model == 20 + 3 * (task.dim + 3)  # the documented layout: exact features, m = dim


def test_cg_transformer_relu_error_shrinks_with_mlp_width(well_conditioned):
    task, lam, model, prompt, resid = well_conditioned
    exact = model.readout(resid[:, :6, prompt.query_positions])
    errors = [
        (per_step_predictions(cg_transformer(n_steps=6, lam=lam, dim=task.dim, mlp="relu", mlp_width=width, recip_range=(1e-4, 1e4)), task) - exact)
        .abs()
        .max()
        .item()
        for width in (16, 64, 256)
    ]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0


def test_cg_transformer_relu_too_coarse_for_its_steps_is_refused_naming_recip_range_and_mlp_width(well_conditioned):
    """At 8 ReLU units over 10 decades the reciprocal overshoots 1/s by (r + 1)^2 / (4 r), r the
    knot ratio (computed here), CG's squared norms grow step by step past recip_range's high end
    1e4, and the forward refuses (a ValueError) naming both knobs and that overshoot, instead of
    returning the NaN it would reach."""
    task, lam, *_ = well_conditioned
    ratio = 1e10 ** (1 / 7)
    overshoot = (ratio + 1) ** 2 / (4 * ratio)
    coarse = cg_transformer(n_steps=10, lam=lam, dim=task.dim, mlp="relu", mlp_width=8)
    with pytest.raises(ReluRangeError, match=rf"beyond recip_range's high end 1e\+04 .*mlp_width \(now 8: 1/s overshot by up to {overshoot:.4g}x\)"):
        coarse.predict(task)


def test_a_diverging_construction_warns_that_its_read_out_overflowed():
    """GD with lr = 50 on a linear task: |1 - lr (s + lam)| > 1, so the iterates grow
    geometrically and overflow within 200 steps; the forward returns them (inf/NaN) with a
    RuntimeWarning naming the likely cause. A stable lr gives no warning."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    task = ICLTask(x_support=x, y_support=x.sum(-1), x_query=x[:, :2], y_query=x[:, :2].sum(-1))
    with pytest.warns(RuntimeWarning, match=r"gd construction \(200 steps\): the read-out holds inf/NaN: the iteration diverged") as caught:
        prediction = gd_transformer(200, lr=50.0, lam=0.1, dim=2).predict(task)
    assert not torch.isfinite(prediction).all()
    assert [record.filename for record in caught] == [__file__]  # the warning names the caller's line, not torch's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(gd_transformer(200, lr=0.01, lam=0.1, dim=2).predict(task)).all()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_steps": 0, "lam": 0.1}, "n_steps"),
        ({"n_steps": 2, "lam": 0.0}, "lam"),
        ({"n_steps": 2, "lam": -1.0}, "lam"),
        ({"n_steps": 2, "lam": 0.1, "kernel": "laplace"}, "kernel"),
        ({"n_steps": 2, "lam": 0.1, "kernel": "exp"}, "head_width"),
        ({"n_steps": 2, "lam": 0.1, "mlp": "gelu"}, "mlp"),
        ({"n_steps": 2, "lam": 0.1, "mlp": "relu", "mlp_width": 1}, "mlp_width"),
    ],
)
def test_cg_transformer_rejects_bad_arguments_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cg_transformer(**kwargs)


def test_encode_rejects_a_task_dimension_larger_than_the_construction(well_conditioned):
    task, lam, *_ = well_conditioned
    with pytest.raises(ValueError, match="task dimension"):
        cg_transformer(n_steps=1, lam=lam, dim=task.dim - 1).encode(task)


def test_later_steps_share_the_first_steps_weights_with_hook_points_of_their_own(well_conditioned):
    """Blocks of steps 2..T hold step 1's weight tensors (so memory holds one step's weights),
    also after a dtype move, while each block keeps its own hook points: a hook on step 2's
    first block fires once per forward, and a state-dict round trip still matches NumPy CG."""
    task, lam, *_ = well_conditioned
    model = cg_transformer(n_steps=3, lam=lam, dim=task.dim)
    per_step = model.layers_per_step
    moved = cg_transformer(n_steps=3, lam=lam, dim=task.dim).to(torch.float32)
    assert moved.blocks[2 * per_step].attn.W_Q is moved.blocks[0].attn.W_Q and moved.blocks[0].attn.W_Q.dtype == torch.float32
    for t in (1, 2):
        for b in range(per_step):
            for name, tensor in model.blocks[b].named_parameters():
                assert model.blocks[t * per_step + b].get_parameter(name) is tensor
    unique = {tensor.data_ptr() for tensor in model.parameters()}
    assert len(unique) == len({p.data_ptr() for block in model.blocks[:per_step] for p in block.parameters()}) + 1  # + W_E
    calls = []
    model.run_with_hooks(model.encode(task).tokens, fwd_hooks=[(f"blocks.{per_step}.hook_resid_post", lambda act, hook: calls.append(hook.name))])
    assert calls == [f"blocks.{per_step}.hook_resid_post"]
    rebuilt = cg_transformer(n_steps=3, lam=lam, dim=task.dim)
    rebuilt.load_state_dict({name: value.clone() for name, value in model.state_dict().items()})
    x, xq, y = (t.numpy() for t in (task.x_support, task.x_query, task.y_support))
    got = rebuilt.predict(task).numpy()
    for b in range(task.batch_size):
        expected = numpy_cg_predictions(x[b] @ x[b].T, y[b], lam, xq[b] @ x[b].T, 3)[-1]
        np.testing.assert_allclose(got[b], expected, rtol=1e-9, atol=1e-12)

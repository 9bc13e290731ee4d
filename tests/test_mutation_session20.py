"""Mutation review of session 20's changes (d043f47..daf54f9 in mi_krr/ and probes/; code only
moved between modules and pure type annotations left out).

Mutated: the width reproduction (default heads, the head its tolerance width reads, floor_gap over
the heads, the key number's label and the JSON's head), cg_rate_study's checks (empty kappas,
n_steps) and figure titles, softmax_ood's seed check and title, richardson_profile's fitted steps
in the JSON, its size checks, its error-profile panel (margins, curves drawn once or per lens,
where the layers sit, non-finite layers) and its runner-up text, `RNGState.capture`'s
non-MT19937 error, `ICLTask.select`'s rewritten index handling, `mi-krr construct`'s cg
temperature / bandwidth arguments, and the typing commit's rewrites that carry logic
(`summed_over_prompts`, `_difference_text`, diagnose's attention kernels without blocks,
streaming's missing scores hook, `scalar_jacobi`, the Brent update's argument order,
load_checkpoint's checked device).

Counts: 46 mutants planted one at a time, 25 killed by the existing tests, 17 survived and are
killed by the tests below, 4 equivalent (no observable change): width's tolerance width read at
the last ridge and its floor_gap taken over every ridge (`width()` passes no `lams`, so its study
holds the one ridge `lam`); a profile curve drawn only when every lens has it (both lenses
diagnose the same default candidates, so each name is in both or neither); load_checkpoint
handing the loaders the unchecked device (load_model and load_garg_checkpoint run check_device
themselves). Survivors: width's default heads cut to the first, the tolerance head without random
features the last instead of the first given, floor_gap over the tolerance head only and without
abs, the key number's label and the JSON's head hard-coded to random features; cg_rate_study's
n_steps minimum 0 (its message then says ">= 0"), either cg-rate panel title without "median";
softmax_ood's title without the Frobenius fit; richardson_profile's margin of 15 decades and
none above the layers, the layers drawn at CG's aligned steps, non-finite layers setting the
y-limits (the figure then fails); RNGState.capture's check removed (a bare unpacking error) and
its message naming the state's type instead of the generator; `mi-krr construct cg --kernel
gaussian` ignoring --bandwidth.

Each test asserts against a reference independent of the library: the width heads in NumPy (my
own eigenprojection of the joint kernel matrix, textbook CG, KRR by np.linalg.solve,
`construct_references.random_projection_width_errors` for x W / sqrt(m)); NumPy CG's A-norm
ratios and their lower median; NumPy CG on the Gaussian positive random features and exact
Gaussian KRR; the documented defaults, messages and figure rules (docs/reproductions.md: one
line style per lens, a shared curve "drawn once", the y axis "the layers' range +- 1.5 decades");
numpy's own PCG64 bit generator state.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from construct_references import assert_construct_cg_feature_head_matches_numpy, numpy_cg_a_norm_ratios, numpy_cg_predictions, random_projection_width_errors
from mi_krr.construct.studies import conditioned_linear_task
from mi_krr.reproductions import cg_rate, width
from mi_krr.reproductions.richardson_profile import LensResult, RichardsonProfileResult
from mi_krr.reproductions.softmax_ood import SoftmaxOODResult
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train.checkpoint import RNGState

# ---- width: references -----------------------------------------------------------------------


def top_m_width_errors(x, xq, y, lam, widths, n_steps, gram):
    """The "top_eigen" head by hand: per prompt, the best rank-m approximation G_m of the joint
    (support + query) kernel matrix G (my eigendecomposition, negative eigenvalues dropped), then
    `n_steps` of textbook CG on G_m's support block and KRR on it, each as the relative query
    error to oracle KRR on G, averaged over prompts. Returns (model errors, feature-KRR errors)."""
    n = x.shape[1]
    model, floor = [], []
    for m in widths:
        per_model, per_krr = [], []
        for b in range(len(x)):
            G = gram(np.concatenate([x[b], xq[b]]))
            mu, U = np.linalg.eigh(G)
            G_m = (U[:, -m:] * np.clip(mu[-m:], 0.0, None)) @ U[:, -m:].T
            oracle = G[n:, :n] @ np.linalg.solve(G[:n, :n] + lam * np.eye(n), y[b])
            cg_pred = numpy_cg_predictions(G_m[:n, :n], y[b], lam, G_m[n:, :n], n_steps)[-1]
            krr_pred = G_m[n:, :n] @ np.linalg.solve(G_m[:n, :n] + lam * np.eye(n), y[b])
            per_model.append(np.linalg.norm(cg_pred - oracle) / np.linalg.norm(oracle))
            per_krr.append(np.linalg.norm(krr_pred - oracle) / np.linalg.norm(oracle))
        model.append(np.mean(per_model))
        floor.append(np.mean(per_krr))
    return np.array(model), np.array(floor)


def first_width_below(widths, errors, tolerance):
    below = [w for w, e in zip(widths, errors) if e < tolerance]
    return below[0] if below else None


# exp kernel, lam 0.01, 6 CG steps: at m = 8 early-stopped CG (0.62) beats KRR on the head (1.12)
EXP_SETTING = {"widths": (4, 8), "kernels": ("exp",), "dim": 4, "n_support": 10, "n_query": 4, "lam": 0.01, "n_steps": 6,
               "batch_size": 3, "seed": 0, "tolerance": 1.0}


def exp_prompts():
    task = GPRegressionSampler(4, kernel="exp", temperature=1.0).sample(3, 10, 4, seed=0, dtype=torch.float64)
    return task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()


# ---- width: tests ----------------------------------------------------------------------------


def test_width_default_measures_every_documented_head():
    """width()'s docstring: `heads` defaults to every head of WIDTH_HEADS, which the module
    docstring lists: random features, a Gaussian sketch and the top-m eigenprojection."""
    result = width(widths=(2,), kernels=("linear",), dim=3, n_support=6, n_query=2, n_steps=2, batch_size=2)
    assert result.study.heads == ["random_features", "gaussian_sketch", "top_eigen"]
    assert result.head == "random_features"


def test_width_floor_gap_keeps_its_sign_and_the_tolerance_width_reads_the_models_error_on_the_top_m_head():
    """One top-m head where early stopping beats KRR on the head (model error below feature-KRR
    error at m = 8): floor_gap is max |model - feature KRR| (here from the negative difference),
    the tolerance width is the first width whose *model* error is below 1 (feature KRR: none),
    and the head read is named in the JSON and the key number."""
    x, xq, y = exp_prompts()
    model, floor = top_m_width_errors(x, xq, y, 0.01, (4, 8), 6, lambda X: np.exp(X @ X.T))
    assert model[1] < floor[1] - 0.3 and np.max(model - floor) < 1e-6  # precondition: only a negative gap is large
    result = width(heads=("top_eigen",), **EXP_SETTING)
    curve = result.study.curve("exp", "top_eigen")
    np.testing.assert_allclose(curve.error, model, rtol=1e-6)
    np.testing.assert_allclose(curve.feature_krr_error, floor, rtol=1e-6)
    assert result.floor_gap["exp"] == pytest.approx(np.max(np.abs(model - floor)), rel=1e-6)
    assert result.width_for_tolerance["exp"] == first_width_below((4, 8), model, 1.0) == 8
    assert first_width_below((4, 8), floor, 1.0) is None
    assert result.head == "top_eigen" and result.to_dict()["head"] == "top_eigen"
    assert result.key_numbers()["exp: smallest width with error < 1 (top eigen)"] == 8


def test_width_without_random_features_reads_the_first_head_given():
    """WidthResult's docstring: `head` is "random_features" where it was measured, else the first
    of study.heads; its tolerance width is that head's (my top-m reference: 8)."""
    x, xq, y = exp_prompts()
    model, _ = top_m_width_errors(x, xq, y, 0.01, (4, 8), 6, lambda X: np.exp(X @ X.T))
    result = width(heads=("top_eigen", "gaussian_sketch"), **EXP_SETTING)
    assert result.head == "top_eigen"
    assert result.width_for_tolerance["exp"] == first_width_below((4, 8), model, 1.0)
    assert "exp: smallest width with error < 1 (top eigen)" in result.key_numbers()


def test_width_floor_gap_is_the_largest_over_every_head_measured():
    """Linear kernel, 3 CG steps, random features and the top-m head: floor_gap is the larger of
    the two heads' max |model - feature KRR| (the top-m head's, 0.78, not random features' 0.007),
    each from NumPy."""
    setting = {"widths": (2, 4), "dim": 4, "n_support": 10, "n_query": 4, "lam": 0.1, "n_steps": 3, "batch_size": 3, "seed": 0}
    task = LinearRegressionSampler(4, condition_number=100.0, noise_std=0.1).sample(3, 10, 4, seed=0, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    rf_model, rf_floor = random_projection_width_errors(x, xq, y, 0.1, (2, 4), 3, 0)
    top_model, top_floor = top_m_width_errors(x, xq, y, 0.1, (2, 4), 3, lambda X: X @ X.T)
    gaps = [np.max(np.abs(rf_model - rf_floor)), np.max(np.abs(top_model - top_floor))]
    assert gaps[1] > 10 * gaps[0]  # precondition: the head that is not read for the tolerance sets the gap
    result = width(kernels=("linear",), heads=("random_features", "top_eigen"), n_seeds=1, **setting)
    assert result.head == "random_features"
    assert result.floor_gap["linear"] == pytest.approx(max(gaps), rel=1e-6)


# ---- cg-rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_steps", [-1, 2.5])
def test_cg_rate_step_count_message_states_the_documented_minimum_of_one(n_steps):
    """cg_transformer's contract: CG steps T >= 1; the study's refusal must say so (not '>= 0')."""
    with pytest.raises(ValueError, match=r"n_steps must be an integer >= 1"):
        cg_rate(kappas=(10.0,), n_support=8, n_steps=n_steps, batch_size=2)


def test_cg_rate_both_panels_say_median_over_prompts_and_draw_numpys_lower_median():
    """Each panel's title says its curves are medians over prompts (the left one: model and
    solver), and the left panel's model curve is the lower median of NumPy CG's A-norm ratios."""
    kappa, n, steps, batch, lam = 10.0, 8, 4, 3, 1e-4
    result = cg_rate(kappas=(kappa,), n_support=n, n_steps=steps, batch_size=batch, lam=lam)
    task = conditioned_linear_task(batch, n, kappa, lam, n_query=16, seed=0)
    x, y = task.x_support.numpy(), task.y_support.numpy()
    ratios = np.sort([numpy_cg_a_norm_ratios(x[b] @ x[b].T, y[b], lam, steps) for b in range(batch)], axis=0)
    figure = result.plot()
    left, right = figure.axes[:2]
    model_line = next(line for line in left.get_lines() if line.get_label().startswith("model"))
    titles = (left.get_title(), right.get_title())
    plt.close(figure)
    np.testing.assert_allclose(model_line.get_ydata(), ratios[(batch - 1) // 2], rtol=1e-6, atol=1e-13)
    assert "model and solver: median over prompts" in titles[0]
    assert "median over prompts" in titles[1]


# ---- softmax-ood ------------------------------------------------------------------------------


def test_softmax_ood_figure_says_tau_is_fitted_by_frobenius_distance():
    """The module docstring: the operator distance is reported at the Frobenius-fitted tau (an
    upper bound on the best over tau); the panel drawing it must say which tau it is at."""
    blocks = [0, 1]
    values = {"in_distribution": [0.5, 0.6]}
    result = SoftmaxOODResult("softmax_gp", ["in_distribution"], blocks, values, values, values, {"in_distribution": [1.0, 2.0]},
                              {"in_distribution": [0.4, 0.5]}, values, 2, 8, 4)
    figure = result.plot()
    title = figure.axes[0].get_title()
    plt.close(figure)
    assert "Frobenius" in title


# ---- richardson-profile ------------------------------------------------------------------------

STEPS = 6  # profiles [T + 1 = 7]
CG_PROFILE = [0.0, -1.0, -2.5, -5.0, -12.0, -25.0, -31.0]  # CG has no fitted step: one curve under every lens


def lens(best, model_profile, shift, aligned, runner_up=None, gap=None, gap_ci=None):
    """A LensResult by hand: gd / row-sum / heavy ball curves shifted by this lens's `shift` (their
    fitted steps differ between lenses), CG's the same; `aligned` the layers' steps per algorithm."""
    names = ("richardson_rowsum", "gd", "heavy_ball", "cg")
    profiles = {name: [-0.3 * (i + 1) * t + shift for t in range(STEPS + 1)] for i, name in enumerate(names[:3])}
    profiles["cg"] = list(CG_PROFILE)
    scores = {name: 0.9 - 0.1 * i for i, name in enumerate(names)}
    return LensResult(scores=scores, score_ci={name: (s - 0.01, s + 0.01) for name, s in scores.items()},
                      profile_distance={name: 0.1 * (i + 1) for i, name in enumerate(names)}, aligned_steps=aligned,
                      model_profile=list(model_profile), algorithm_profiles=profiles, best=best, identified=False,
                      runner_up=runner_up, gap=gap, gap_ci=gap_ci, equivalent=[], message="")


def profile_result(ridge_model=(-0.9, -1.3, -2.2)):
    aligned = {"richardson_rowsum": [1, 3, 5], "gd": [1, 2, 4], "heavy_ball": [2, 3, 6], "cg": [1, 1, 2]}
    lenses = {"readout": lens("richardson_rowsum", (-0.5, -1.0, -1.6), 0.0, aligned, "heavy_ball", 0.0155, (-0.0408, 0.0221)),
              "ridge": lens("heavy_ball", ridge_model, -0.2, aligned)}
    return RichardsonProfileResult("checkpoints/softmax_gp", lenses, [1, 2, 3], STEPS, 0.04, "gaussian", 4, 8, "fitted")


def profile_panel_lines(result):
    figure = result.plot()
    axis = figure.axes[1]
    lines = [(line.get_label(), line.get_linestyle(), np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))
             for line in axis.get_lines()]
    limits = axis.get_ylim()
    plt.close(figure)
    return lines, limits


def test_richardson_profile_panel_spans_the_layers_plus_minus_one_and_a_half_decades():
    """docs/reproductions.md: the error-profile panel's y axis is 'the layers' range +- 1.5 decades'
    (layers of both lenses: -2.2 .. -0.5), whatever the solver curves reach (CG: -31)."""
    _, limits = profile_panel_lines(profile_result())
    np.testing.assert_allclose(limits, (-2.2 - 1.5, -0.5 + 1.5), atol=1e-12)


def test_richardson_profile_panel_ignores_non_finite_layers_for_its_axis():
    """A layer whose log10 MSE is -inf (exactly KRR) or NaN is left out of the range: the axis is
    the finite layers' range +- 1.5 decades, and the figure is drawn."""
    for value in (-math.inf, math.nan):
        _, limits = profile_panel_lines(profile_result(ridge_model=(-0.9, -1.3, value)))
        np.testing.assert_allclose(limits, (-1.6 - 1.5, -0.5 + 1.5), atol=1e-12)


def test_richardson_profile_panel_draws_a_curve_shared_by_the_lenses_once_and_each_lens_curve_in_its_style():
    """docs/reproductions.md: one line style per lens; a curve without a fitted step, such as
    CG's, is the same under both lenses and drawn once (solid). Each lens's layers sit at their
    aligned steps of that lens's best solver, not of another."""
    result = profile_result()
    lines, _ = profile_panel_lines(result)
    cg = [line for line in lines if line[0].split(",")[0] == "cg"]
    assert len(cg) == 1 and cg[0][1] == "-"
    np.testing.assert_allclose(cg[0][3], CG_PROFILE)
    gd = {label: (style, y) for label, style, _, y in lines if label.split(",")[0] == "gd"}
    assert set(gd) == {"gd, readout lens", "gd, ridge lens"} and gd["gd, readout lens"][0] != gd["gd, ridge lens"][0]
    for name, lens_result in result.lenses.items():
        np.testing.assert_allclose(gd[f"gd, {name} lens"][1], lens_result.algorithm_profiles["gd"])
        layers = [line for line in lines if line[0].startswith(f"model layers, {name} lens")]
        assert len(layers) == 1
        np.testing.assert_array_equal(layers[0][2], lens_result.aligned_steps[lens_result.best])
        np.testing.assert_allclose(layers[0][3], lens_result.model_profile)


# ---- RNGState.capture -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:get_state and legacy can only be used with the MT19937")
def test_rng_capture_names_a_non_mt19937_global_numpy_generator():
    """After np.random.set_bit_generator(PCG64), np.random.get_state(legacy=True) is a dict
    naming "PCG64" (numpy's own); capture refuses in one line naming MT19937 and PCG64."""
    saved = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(0))
    try:
        assert np.random.get_state(legacy=True)["bit_generator"] == "PCG64"
        with pytest.raises(ValueError, match=r"MT19937.*PCG64"):
            RNGState.capture()
    finally:
        np.random.set_bit_generator(saved)
    assert isinstance(np.random.get_state(legacy=True), tuple)


# ---- mi-krr construct cg --kernel gaussian --------------------------------------------------------


def test_construct_cg_with_a_gaussian_head_uses_the_given_bandwidth_for_its_random_features(capsys):
    """cg --kernel gaussian --head-width m --bandwidth 0.7: the solver column is NumPy CG on
    phi phi^T for the positive random features of the Gaussian kernel at sigma = 0.7
    (phi(x) = exp(w . x' - |x'|^2) / sqrt(m), x' = x / sigma), against exact Gaussian KRR at 0.7."""
    sigma = 0.7

    def features(points, W):
        scaled = points / sigma
        return np.exp(scaled @ W - (scaled**2).sum(-1, keepdims=True))

    def gaussian(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))

    assert_construct_cg_feature_head_matches_numpy(capsys, "gaussian", sigma, features, gaussian)

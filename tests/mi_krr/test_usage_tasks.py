"""Usage review of the task distributions (`mi_krr.tasks`: samplers, shifts, task sets, the
Bayes-optimal ridge) as a researcher calls them from a notebook: the prompt laws checked
statistically against the documented definitions (NumPy / SciPy references written here, Monte
Carlo error bars), and the problems that review found, kept as regression tests now that they
are fixed."""

from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from mi_krr.checkpoints import task_sets
from mi_krr.tasks import (
    DEFAULT_SHIFTS,
    SAMPLERS,
    GPRegressionSampler,
    LinearRegressionSampler,
    Shift,
    applicable_shifts,
    apply_shift,
    bayes_optimal_ridge,
    shift_applies,
)


def numpy_gram(sampler, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The prior covariance of the labels between point sets `a [n, d]` and `b [m, d]`, written
    from the documented definitions: x.z / d for linear regression (w ~ N(0, I/d)), the Gaussian
    kernel exp(-|x - z|^2 / (2 bandwidth^2)) or the exp kernel exp(x.z / temperature) for GPs."""
    if sampler.name == "linear_regression":
        return a @ b.T / sampler.dim
    if sampler.kernel == "gaussian":
        return np.exp(-cdist(a, b, "sqeuclidean") / (2 * sampler.bandwidth**2))
    return np.exp(a @ b.T / sampler.temperature)


def whitened_labels(sampler, task) -> np.ndarray:
    """[support labels, query targets] of each prompt times L^-1, L the Cholesky factor of the
    documented joint covariance given the inputs: prior gram + noise_std^2 on the support
    diagonal only (query targets are noise-free), plus for GPs the documented relative jitter
    (jitter x mean(diag K)) on every diagonal entry. Under the documented law every row is N(0, I)."""
    xs, ys, xq, yq = (t.double().numpy() for t in (task.x_support, task.y_support, task.x_query, task.y_query))
    n, m = xs.shape[1], xq.shape[1]
    x = np.concatenate([xs, xq], axis=1)
    y = np.concatenate([ys, yq], axis=1)
    gram = np.stack([numpy_gram(sampler, p, p) for p in x])
    noise = np.diag(np.r_[np.full(n, sampler.noise_std**2), np.zeros(m)])
    jitter = getattr(sampler, "jitter", 0.0) * np.einsum("bii->b", gram) / (n + m) + 1e-12
    factor = np.linalg.cholesky(gram + noise + jitter[:, None, None] * np.eye(n + m))
    return np.linalg.solve(factor, y[..., None])[..., 0]


def assert_standard_normal_rows(z: np.ndarray, n_se: float = 5.0) -> None:
    """Rows of `z [B, p]` i.i.d. N(0, I_p): mean 0 (SE 1/sqrt(N)), per-position variance 1 (SE
    sqrt(2/B)) and off-diagonal covariances 0 (SE 1/sqrt(B))."""
    b, p = z.shape
    assert abs(z.mean()) < n_se / math.sqrt(z.size), z.mean()
    covariance = z.T @ z / b
    np.testing.assert_array_less(np.abs(np.diag(covariance) - 1), n_se * math.sqrt(2 / b))
    off = covariance[~np.eye(p, dtype=bool)]
    np.testing.assert_array_less(np.abs(off), n_se / math.sqrt(b))
    assert abs(np.diag(covariance).mean() - 1) < n_se * math.sqrt(2 / z.size)


# ----- the prompt laws --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [
        GPRegressionSampler(2, noise_std=0.3, bandwidth=0.7, condition_number=4.0, input_mean=(0.5, -0.2)),
        GPRegressionSampler(3, kernel="exp", temperature=2.0, noise_std=0.2),
        GPRegressionSampler(1, noise_std=0.5, bandwidth=0.4, input_mean=0.7),
        LinearRegressionSampler(8, noise_std=0.3, condition_number=10.0, input_mean=0.5),
    ],
    ids=["gaussian_anisotropic_shifted_mean", "exp", "gaussian_d1", "linear_anisotropic"],
)
def test_sampled_labels_have_the_documented_joint_law_given_the_inputs(sampler):
    """sample(): [y_support, y_query] given the inputs is N(0, gram + noise_std^2 on the support
    only). Whitened with the NumPy/SciPy covariance written from the docstrings, 1500 prompts x
    8 labels are i.i.d. N(0, 1): moments within 5 Monte-Carlo standard errors. Noise on the
    queries, a wrong kernel parameter or a missing 1/d would move the variances by >> 5 SE."""
    task = sampler.sample(1500, 5, 3, seed=17, dtype=torch.float64)
    assert_standard_normal_rows(whitened_labels(sampler, task))


def test_every_applicable_default_shift_still_draws_the_documented_law():
    """Each DEFAULT_SHIFTS entry applied to an anisotropic exp-kernel GP sampler draws labels
    whose whitened values (shifted sampler's own documented covariance) are N(0, 1)."""
    base = GPRegressionSampler(2, kernel="exp", noise_std=0.2, condition_number=3.0, input_mean=0.3)
    for label, shift in applicable_shifts(base).items():
        shifted = apply_shift(base, shift)
        z = whitened_labels(shifted, shifted.sample(600, 4, 2, seed=5, dtype=torch.float64))
        assert_standard_normal_rows(z), label


@pytest.mark.parametrize("d", [2, 3])
def test_input_rotation_is_haar_across_rotation_seeds(d):
    """input_basis() is documented Haar-distributed: over 2000 rotation seeds the (0, 0) entry has
    mean 0, E[U00^2] = 1/d and E[U00^4] = 3 / (d (d + 2)) (moments of a uniform unit vector's
    coordinate), and det = +1 / -1 equally often; QR without the sign fix fails the mean/det."""
    bases = np.stack([LinearRegressionSampler(d, condition_number=2.0, rotation_seed=s).input_basis().numpy() for s in range(2000)])
    np.testing.assert_allclose(np.einsum("sij,sik->sjk", bases, bases), np.broadcast_to(np.eye(d), bases.shape), atol=1e-12)
    u = bases[:, 0, 0]
    n = u.size
    assert abs(u.mean()) < 5 * math.sqrt(1 / d / n)
    assert abs((u**2).mean() - 1 / d) < 5 * math.sqrt((3 / (d * (d + 2)) - 1 / d**2) / n)
    fourth = 3 / (d * (d + 2))
    eighth = 105 / (d * (d + 2) * (d + 4) * (d + 6))
    assert abs((u**4).mean() - fourth) < 5 * math.sqrt((eighth - fourth**2) / n)
    assert abs((np.linalg.det(bases) > 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(n)


# ----- shifts: exactly what their names say, and nothing else ------------------------------------


def test_each_default_shift_changes_exactly_the_documented_fields():
    """apply_shift with every DEFAULT_SHIFTS label on a GP sampler (tuple mean, kappa 3, x1.5 prompts):
    the config differs from the base in exactly the fields the module docstring names, with the
    values computed here by hand."""
    base = GPRegressionSampler(2, noise_std=0.1, condition_number=3.0, input_mean=(0.3, -0.1), n_support_factor=1.5, bandwidth=0.8)
    std = 1 / math.sqrt(2)
    expected = {
        "input_scale_x2": {"input_std": 2 * std, "input_mean": [0.6, -0.2]},
        "input_scale_x0.5": {"input_std": 0.5 * std, "input_mean": [0.15, -0.05]},
        "mean_shift_1std": {"input_mean": [0.3 + std, -0.1 + std]},
        "anisotropy_kappa10": {"condition_number": 10.0},
        "covariance_rotation": {"rotation_seed": 1_000_003},
        "longer_prompts_x2": {"n_support_factor": 3.0},
        "bandwidth_x0.5": {"bandwidth": 0.4},
        "bandwidth_x2": {"bandwidth": 1.6},
        "label_noise_0.5": {"noise_std": 0.5},
    }
    assert set(applicable_shifts(base)) == set(expected)
    before = base.to_config()
    for label, changes in expected.items():
        after = apply_shift(base, label).to_config()
        changed = {key for key in before if before[key] != after[key]}
        assert changed == set(changes), label
        for key, value in changes.items():
            np.testing.assert_allclose(after[key], value, rtol=1e-14, err_msg=label)


def test_same_seed_keeps_what_a_shift_does_not_touch():
    """Same seed before and after a shift: label_noise keeps x and the noise-free query targets,
    and its support noise is the same standard normals at the new std ((y - f) / std agree between
    std 0.1 and 0.5, f the noise-std-0 draw); bandwidth keeps the inputs; longer_prompts x2 draws
    round(2 n) support pairs."""
    base = GPRegressionSampler(3, noise_std=0.1, kernel="exp")
    a = base.sample(4, 6, 3, seed=21, dtype=torch.float64)
    noisy = apply_shift(base, "label_noise_0.5").sample(4, 6, 3, seed=21, dtype=torch.float64)
    clean = apply_shift(base, Shift("label_noise", {"noise_std": 0.0})).sample(4, 6, 3, seed=21, dtype=torch.float64)
    for name in ("x_support", "x_query", "y_query"):
        assert torch.equal(getattr(noisy, name), getattr(a, name)) and torch.equal(getattr(clean, name), getattr(a, name)), name
    np.testing.assert_allclose(((noisy.y_support - clean.y_support) / 0.5).numpy(), ((a.y_support - clean.y_support) / 0.1).numpy(), rtol=1e-9, atol=1e-12)
    assert abs(float((a.y_support - clean.y_support).std()) - 0.1) < 0.05
    wide = apply_shift(base, "bandwidth_x2").sample(4, 6, 3, seed=21, dtype=torch.float64)
    assert torch.equal(wide.x_support, a.x_support) and not torch.equal(wide.y_query, a.y_query)
    assert apply_shift(base, "longer_prompts_x2").sample(4, 7, 3, seed=21).n_support == 14


@pytest.mark.parametrize("kernel", ["gaussian", "exp"])
@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_bandwidth_shift_is_exactly_the_input_rescaling_x_over_factor(kernel, factor):
    """Module docstring: the bandwidth shift is "the same rescaling x -> x/factor" for both kernels.
    With one seed, the shifted sampler's GP draw at x equals the base sampler's draw at x / factor
    (same covariance, same normals); and for the Gaussian kernel input_scale x2 draws exactly the
    labels of bandwidth x0.5."""
    x = torch.as_tensor(np.random.default_rng(3).normal(size=(20, 6, 2)))
    base = GPRegressionSampler(2, kernel=kernel, bandwidth=0.9, temperature=1.7)
    shifted = apply_shift(base, Shift("bandwidth", {"factor": factor}))
    np.testing.assert_allclose(shifted.sample_functions(x, seed=4).numpy(), base.sample_functions(x / factor, seed=4).numpy(), rtol=1e-10, atol=1e-12)
    if kernel == "gaussian":
        scaled = apply_shift(base, "input_scale_x2").sample(3, 5, 2, seed=8, dtype=torch.float64)
        narrow = apply_shift(base, "bandwidth_x0.5").sample(3, 5, 2, seed=8, dtype=torch.float64)
        np.testing.assert_allclose(scaled.y_support.numpy(), narrow.y_support.numpy(), rtol=1e-10, atol=1e-12)


def test_task_sets_are_the_shifted_samplers_drawn_with_consecutive_seeds():
    """checkpoints.task_sets docstring: "in_distribution" with `seed`, then each applicable
    DEFAULT_SHIFTS entry, in order, with seed + 1, seed + 2, ...; checked against drawing each
    apply_shift(sampler, shift) by hand, and label_scale multiplies both label fields."""
    sampler = LinearRegressionSampler(3, noise_std=0.2)
    sets, notes = task_sets(sampler, 3, 5, 2, seed=40, label_scale=2.5)
    expected = ["in_distribution", *applicable_shifts(sampler)]
    assert list(sets) == expected and len(notes) == len(DEFAULT_SHIFTS) - len(expected) + 1
    for index, name in enumerate(expected):
        drawn = (sampler if index == 0 else apply_shift(sampler, name)).sample(3, 5, 2, seed=40 + index)
        assert torch.equal(sets[name].x_support, drawn.x_support), name
        assert torch.equal(sets[name].y_support, 2.5 * drawn.y_support), name
        assert torch.equal(sets[name].y_query, 2.5 * drawn.y_query), name
        assert sets[name].info["seed"] == 40 + index


# ----- the Bayes-optimal ridge -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [
        LinearRegressionSampler(4, noise_std=0.4, input_mean=1.0, condition_number=10.0),
        GPRegressionSampler(2, noise_std=0.2, bandwidth=0.5),
        GPRegressionSampler(2, kernel="exp", temperature=4.0, noise_std=0.3),
    ],
    ids=["linear", "gaussian", "exp"],
)
def test_krr_at_the_bayes_ridge_attains_the_posterior_variance_and_beats_other_ridges(sampler):
    """KRR (NumPy solve, the sampler's kernel; the plain linear kernel x.z for linear regression)
    at lam = bayes_optimal_ridge: its per-query squared error against the noise-free targets has
    the closed-form posterior variance k** - k*^T (K/c + s^2 I)^-1 k* as its mean (c = d for
    linear regression), within 5 Monte-Carlo SE over 2000 prompts; ridges x0.3 and x3 do worse
    (paired differences, 5 SE)."""
    task = sampler.sample(2000, 8, 4, seed=9, dtype=torch.float64)
    xs, ys, xq, yq = (t.numpy() for t in (task.x_support, task.y_support, task.x_query, task.y_query))
    scale = sampler.dim if sampler.name == "linear_regression" else 1.0
    lam = bayes_optimal_ridge(sampler)
    K = np.stack([scale * numpy_gram(sampler, a, a) for a in xs])
    Kq = np.stack([scale * numpy_gram(sampler, q, a) for q, a in zip(xq, xs)])
    Kqq = np.stack([scale * np.diag(numpy_gram(sampler, q, q)) for q in xq])

    def squared_errors(ridge):
        alpha = np.linalg.solve(K + ridge * np.eye(8), ys[..., None])
        return ((Kq @ alpha)[..., 0] - yq) ** 2

    posterior_variance = (Kqq - np.einsum("bmn,bmn->bm", Kq, np.linalg.solve(K + lam * np.eye(8), Kq.transpose(0, 2, 1)).transpose(0, 2, 1))) / scale
    gap = (squared_errors(lam) - posterior_variance).mean(1)
    assert abs(gap.mean()) < 5 * gap.std() / math.sqrt(gap.size)
    for factor in (0.1, 10.0):
        loss = (squared_errors(factor * lam) - squared_errors(lam)).mean(1)
        assert loss.mean() > 5 * loss.std() / math.sqrt(loss.size), factor


def test_bayes_ridge_from_a_task_info_equals_the_samplers_and_ignores_label_scale():
    """bayes_optimal_ridge(task.info) = bayes_optimal_ridge(sampler) (noise_std^2 d = 0.36 here), and
    for task_sets with label_scale (labels and noise scaled alike, the ridge is scale free)."""
    sampler = LinearRegressionSampler(4, noise_std=0.3)
    assert bayes_optimal_ridge(sampler.sample(1, 2, 1, seed=0).info) == pytest.approx(0.36, rel=1e-14)
    sets, _ = task_sets(sampler, 1, 2, 1, seed=0, shifts=False, label_scale=7.0)
    assert bayes_optimal_ridge(sets["in_distribution"].info) == pytest.approx(0.36, rel=1e-14)


# ----- problems found ----------------------------------------------------------------------------


@pytest.mark.parametrize("index", [torch.tensor(2), np.array(2)], ids=["tensor", "ndarray"])
def test_select_with_a_zero_dimensional_index_is_select_of_that_int(index):
    """select's docstring: an int keeps the batch dimension; a 0-d tensor (what argmax returns)
    is an int index and must give the same prompt as select([2]); a 0-d float or bool is no
    prompt index and is refused naming `index`."""
    task = LinearRegressionSampler(2).sample(4, 3, 2, seed=0)
    assert torch.equal(task.select(index).x_support, task.x_support[[2]])
    for wrong in (torch.tensor(2.0), np.array(True)):
        with pytest.raises(ValueError, match="index must be"):
            task.select(wrong)


def test_a_shift_pickles_deep_copies_and_hashes():
    """A frozen-dataclass Shift should survive pickle (multiprocessing over shifts) and
    copy.deepcopy (configs holding shifts) and be usable as a dict key, like the samplers."""
    shift = DEFAULT_SHIFTS["input_scale_x2"]
    assert pickle.loads(pickle.dumps(shift)) == shift
    assert copy.deepcopy(shift) == shift
    assert {shift: 1}[Shift("input_scale", {"factor": 2.0})] == 1


def test_bayes_ridge_of_a_linear_config_without_dim_names_dim():
    """A hand-written linear-regression config lacking dim: one-line ValueError naming 'dim'."""
    with pytest.raises(ValueError, match="dim"):
        bayes_optimal_ridge({"sampler": "linear_regression", "noise_std": 0.1})


@pytest.mark.parametrize("noise_std", [-0.5, "abc", True])
def test_bayes_ridge_of_a_config_with_a_bad_noise_std_names_noise_std(noise_std):
    """A hand-written config whose noise_std no sampler would take (negative, not a number, a
    bool): ValueError naming noise_std, not noise_std^2 = 0.25 for -0.5."""
    with pytest.raises(ValueError, match=r"info_or_sampler\['noise_std'\] must be a finite number >= 0"):
        bayes_optimal_ridge({"sampler": "gp_regression", "noise_std": noise_std})


def test_bayes_ridge_refuses_a_registered_sampler_without_a_known_posterior(monkeypatch):
    """Docstring: "Raises ValueError for a sampler without a known posterior". A user sampler
    registered in the public SAMPLERS (so configs and checkpoints round-trip) whose labels are
    sign(x.w) has no KRR posterior mean; it used to get noise_std^2 silently."""

    @dataclass(frozen=True)
    class SignRegressionSampler(LinearRegressionSampler):
        name: ClassVar[str] = "sign_regression"

        def _function_values(self, x, generator):
            return torch.sign(super()._function_values(x, generator))

    monkeypatch.setitem(SAMPLERS, "sign_regression", SignRegressionSampler)
    with pytest.raises(ValueError, match="known posterior.*got 'sign_regression'"):
        bayes_optimal_ridge(SignRegressionSampler(3, noise_std=0.3))


def test_shifting_a_config_dict_is_refused_naming_the_sampler():
    """bayes_optimal_ridge takes a sampler or its config; apply_shift and shift_applies take only a
    sampler, but on a config dict they used to raise AttributeError ('dict' has no 'input_mean') or
    say False (bandwidth on a GP config). Each is a ValueError naming `sampler` and pointing to
    sampler_from_config; the sampler class, or a list for `shifts`, likewise."""
    config = GPRegressionSampler(2).to_config()
    with pytest.raises(ValueError, match=r"^sampler must be .* got dict: .*sampler_from_config"):
        apply_shift(config, "input_scale_x2")
    with pytest.raises(ValueError, match=r"^sampler must be .* got dict"):
        shift_applies(config, "bandwidth_x2")
    with pytest.raises(ValueError, match=r"^sampler must be .* got the class GPRegressionSampler"):
        apply_shift(GPRegressionSampler, "input_scale_x2")
    with pytest.raises(ValueError, match=r"^shifts must be a mapping"):
        applicable_shifts(GPRegressionSampler(2), ["input_scale_x2"])


def test_task_sets_notes_give_the_real_reason_a_shift_was_left_out():
    """An isotropic GP sampler: covariance_rotation is left out because the inputs are isotropic
    (apply_shift's own error says "needs anisotropic inputs"), not because of the sampler family."""
    _, notes = task_sets(GPRegressionSampler(2), 2, 4, 1, seed=0)
    (note,) = [n for n in notes if "covariance_rotation" in n]
    assert "anisotropic" in note
    # d = 1: anisotropy is left out because one coordinate has no spectrum, not because of the family
    _, notes = task_sets(GPRegressionSampler(1), 2, 4, 1, seed=0)
    (note,) = [n for n in notes if "anisotropy_kappa10" in n]
    assert "dim >= 2" in note and "gp_regression" not in note


def test_gp_covariance_refuses_inputs_of_another_dimension():
    """sample_functions refuses x whose last dim is not the sampler's; covariance(x) (same
    docstring shape [..., N, d]) used to compute a kernel on 5-D points for a d = 2 sampler."""
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., N, d=2\]"):
        GPRegressionSampler(2).covariance(np.zeros((3, 5)))


def test_a_boolean_positive_parameter_is_refused_by_name():
    """bandwidth=True / Shift factor=True used to become 1.0 silently while noise_std=True was
    refused. A bool (Python or NumPy) is a typo for a number everywhere: one ValueError naming
    the argument."""
    with pytest.raises(ValueError, match="bandwidth must be a positive number, got True"):
        GPRegressionSampler(2, bandwidth=True)
    with pytest.raises(ValueError, match="input_std must be a positive number, got True"):
        LinearRegressionSampler(2, input_std=True)
    with pytest.raises(ValueError, match="factor"):
        Shift("input_scale", {"factor": True})
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        GPRegressionSampler(2, noise_std=np.True_)


def test_a_generator_that_is_not_a_torch_generator_is_refused_by_name():
    """sample(generator=42) (a seed passed to the wrong keyword): ValueError naming `generator`."""
    with pytest.raises(ValueError, match="generator"):
        LinearRegressionSampler(2).sample(2, 3, 1, generator=42)

"""The reproductions in small configurations, their numbers checked against NumPy: the CG
transformer's A-norm errors against NumPy CG and the CG bound, d_eff against its trace formula,
the attention-to-exp-kernel distance against a NumPy recomputation from the attention pattern, and
the read-out lens's last-layer error against NumPy KRR."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from construct_references import numpy_cg_a_norm_ratios
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.cli import main
from mi_krr.construct.studies import conditioned_linear_task
from mi_krr.reproductions import cg_rate, reproduction, richardson_profile, softmax_ood, width
from mi_krr.tasks import LinearRegressionSampler, sampler_from_config
from mi_krr.train import load_model, read_run_config


def test_cg_rate_errors_follow_numpy_cg_and_stay_below_the_cg_bound():
    kappas, n, steps, lam, batch = (10.0, 100.0), 24, 12, 1e-4, 5  # odd: torch.median of an even count is the lower middle
    result = cg_rate(kappas=kappas, n_support=n, n_steps=steps, lam=lam, batch_size=batch, seed=0)
    t = np.arange(steps + 1)
    for kappa in kappas:
        key = str(kappa)
        root = np.sqrt(kappa)
        bound = 2 * ((root - 1) / (root + 1)) ** t
        model = np.array(result.study.a_norm_ratio[key])
        assert np.all(model <= bound * (1 + 1e-9))
        assert result.within_bound[key] is True
        task = conditioned_linear_task(batch, n, kappa, lam, n_query=16, seed=0)
        x, y = task.x_support.numpy(), task.y_support.numpy()
        expected = np.median([numpy_cg_a_norm_ratios(x[b] @ x[b].T, y[b], lam, steps) for b in range(batch)], axis=0)
        np.testing.assert_allclose(model, expected, rtol=1e-6, atol=1e-12)
        assert result.max_ratio_to_bound[key] == pytest.approx(np.max(model / bound), rel=1e-9)
    assert "kappa=100: within bound: True" in result.summary()
    plt.close(result.plot())


def test_width_error_falls_with_width_to_the_feature_krr_floor_and_d_eff_matches_its_trace_formula():
    widths, dim, n, lam, batch = (4, 16, 64), 8, 24, 0.1, 4
    result = width(widths=widths, kernels=("linear",), dim=dim, n_support=n, n_steps=24, batch_size=batch, lam=lam, seed=0,
                   heads=("random_features",), n_seeds=1)
    errors = result.study.model_error["linear"]
    assert errors[-1] < errors[0] / 5
    assert result.floor_gap["linear"] < 1e-8  # converged: the model's error is KRR-on-features'
    task = LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1).sample(batch, n, 16, seed=0, dtype=torch.float64)
    x = task.x_support.numpy()
    d_eff = np.mean([np.sum(mu / (mu + lam)) for mu in (np.linalg.eigvalsh(x[b] @ x[b].T) for b in range(batch))])
    assert result.study.d_eff["linear"] == pytest.approx(d_eff, rel=1e-8)
    below = [w for w, e in zip(widths, errors) if e < result.tolerance]
    assert result.width_for_tolerance["linear"] == (below[0] if below else None)
    plt.close(result.plot())


@pytest.fixture(scope="module")
def softmax_checkpoint():
    return shipped_checkpoint("softmax_gp")


def test_softmax_ood_distance_matches_a_numpy_recomputation_from_the_attention_pattern(softmax_checkpoint):
    batch = 8
    result = softmax_ood(softmax_checkpoint, batch_size=batch, shifts=("input_scale_x2",), seed=0)
    assert result.task_sets == ["in_distribution", "input_scale_x2"]
    description = read_run_config(softmax_checkpoint)
    task = sampler_from_config(description["sampler"]).sample(batch, result.n_support, result.n_query, seed=0)
    model = load_model(softmax_checkpoint)
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    xs, xq = task.x_support.double().numpy(), task.x_query.double().numpy()
    support, query = prompt.support_positions.numpy(), prompt.query_positions.numpy()
    squared_distance = ((xq[:, :, None] - xs[:, None]) ** 2).sum(-1)  # [B, m, n]

    def head_distances(pattern, logits):
        """Mean over prompts of ||attn - softmax(logits)||_2 / ||softmax(logits)||_2 per head."""
        per_head = []
        for head in range(model.n_heads):
            distances = []
            for b in range(batch):
                attn = pattern[b, head][np.ix_(query, support)]
                attn = attn / attn.sum(1, keepdims=True)
                ref = np.exp(logits[b] - logits[b].max(1, keepdims=True))
                ref /= ref.sum(1, keepdims=True)
                distances.append(np.linalg.norm(attn - ref, 2) / np.linalg.norm(ref, 2))
            per_head.append(np.mean(distances))
        return per_head

    for layer in range(model.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double().numpy()  # [B, H, seq, seq]
        tau, sigma = result.best_tau["in_distribution"][layer], result.best_bandwidth["in_distribution"][layer]
        # the best head, at its fitted scale, reproduces the reported distance (other heads have their own scale)
        for per_head, reported in (
            (head_distances(pattern, xq @ xs.transpose(0, 2, 1) / tau), result.best_distance["in_distribution"][layer]),
            (head_distances(pattern, -squared_distance / (2 * sigma**2)), result.best_gaussian_distance["in_distribution"][layer]),
        ):
            assert any(value == pytest.approx(reported, rel=1e-5) for value in per_head), (per_head, reported)
        assert result.best_distance["in_distribution"][layer] <= result.mean_distance["in_distribution"][layer] + 1e-12
    plt.close(result.plot())


def test_richardson_profile_scores_every_candidate_with_both_lenses_and_its_readout_profile_matches_numpy_krr(softmax_checkpoint):
    function, quick = reproduction("richardson-profile")
    assert function is richardson_profile
    result = richardson_profile(softmax_checkpoint, **quick)
    from probes.diagnose import DEFAULT_ALGORITHMS

    for lens in ("readout", "ridge"):
        assert set(result.lenses[lens].scores) == set(DEFAULT_ALGORITHMS)
        assert result.lenses[lens].best == max(result.lenses[lens].scores, key=result.lenses[lens].scores.get)
    description = read_run_config(softmax_checkpoint)
    sampler = sampler_from_config(description["sampler"])
    task = sampler.sample(quick["batch_size"], description["train"]["n_support"], description["train"]["n_query"], seed=0)
    prediction = load_model(softmax_checkpoint).predict(task).double().detach().numpy()
    xs, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    bandwidth, lam = sampler.bandwidth, sampler.noise_std**2
    krr = []
    for b in range(xs.shape[0]):
        K = np.exp(-((xs[b][:, None] - xs[b][None]) ** 2).sum(-1) / (2 * bandwidth**2))
        K_query = np.exp(-((xq[b][:, None] - xs[b][None]) ** 2).sum(-1) / (2 * bandwidth**2))
        krr.append(K_query @ np.linalg.solve(K + lam * np.eye(len(K)), y[b]))
    expected = np.log10(np.mean((prediction - np.array(krr)) ** 2))
    assert result.lenses["readout"].model_profile[-1] == pytest.approx(expected, abs=1e-5)
    assert result.lam == pytest.approx(lam)
    plt.close(result.plot())


def test_reproduce_command_writes_figure_and_json_and_prints_key_numbers(tmp_path, capsys):
    assert main(["reproduce", "cg-rate", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "== cg-rate" in text and "within bound: True" in text
    assert (tmp_path / "cg-rate.png").read_bytes().startswith(b"\x89PNG")
    document = json.loads((tmp_path / "cg-rate.json").read_text())
    assert document["quick"] is True and document["result"]["within_bound"]["10.0"] is True


@pytest.mark.parametrize("name, study", [("cg-rate", "cg_rate_study"), ("width", "width_study")])
def test_cg_rate_and_width_run_their_study_on_the_given_device(name, study, monkeypatch):
    """The device reaches the study ("cpu:0": a valid name distinct from the default "cpu"; the
    study's placement of every tensor is checked in tests/mi_krr/test_construct_studies.py)."""
    import mi_krr.construct.studies as studies

    seen, original = [], getattr(studies, study)

    def spy(**kwargs):
        seen.append(kwargs.get("device"))
        return original(**kwargs)

    monkeypatch.setattr(studies, study, spy)
    function, quick = reproduction(name)
    function(**quick, device="cpu:0")
    assert seen == ["cpu:0"]
    with pytest.raises(ValueError, match=r"device 'nonsense' cannot be used here \(not a torch device name, such as 'cpu' or 'cuda'\): pass e.g. 'cpu'"):
        function(**quick, device="nonsense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("name", ["cg-rate", "width"])
def test_cg_rate_and_width_on_cuda_give_the_cpu_numbers(name):
    """On a GPU the quick run computes there (same prompts and heads, drawn on the CPU) and gives
    the CPU's numbers up to rounding."""
    function, quick = reproduction(name)
    on_cpu, on_cuda = (_study_numbers(function(**quick, device=device).study) for device in ("cpu", "cuda"))
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-6, atol=1e-9)


def _study_numbers(study) -> np.ndarray:
    """The model's per-step A-norm ratios (cg-rate) or per-width errors of every curve (width)."""
    if hasattr(study, "curves"):
        return np.array([curve.error for curve in study.curves])
    return np.array([study.a_norm_ratio[key] for key in study.a_norm_ratio])

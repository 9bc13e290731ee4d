"""The shipped checkpoints load and predict within 2x of the Bayes-optimal error on fresh prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from mi_krr.tasks.samplers import sampler_from_config
from mi_krr.train import load_model

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def _posterior_mean_numpy(config: dict, xs: np.ndarray, ys: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Bayes-optimal predictions of one prompt, written out with NumPy/SciPy."""
    noise_var = config["noise_std"] ** 2
    if config["sampler"] == "linear_regression":  # w ~ N(0, I/d): ridge with lam = noise_var * d
        d = xs.shape[1]
        weights = np.linalg.solve(xs.T @ xs + noise_var * d * np.eye(d), xs.T @ ys)
        return xq @ weights
    assert config["kernel"] == "gaussian"
    scale = 2 * config["bandwidth"] ** 2
    gram = np.exp(-cdist(xs, xs, "sqeuclidean") / scale)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram + noise_var * np.eye(len(xs))), ys)
    return np.exp(-cdist(xq, xs, "sqeuclidean") / scale) @ alpha


@pytest.mark.parametrize("run", ["softmax_gp", "linear_lr"])
def test_shipped_model_is_within_2x_of_bayes_optimal_on_fresh_prompts(run):
    run_dir = CHECKPOINTS / run
    config = json.loads((run_dir / "config.json").read_text())
    sampler = sampler_from_config(config["sampler"])
    task = sampler.sample(400, config["train"]["n_support"], 8, seed=987_654)
    model = load_model(run_dir)
    with torch.no_grad():
        pred = model.predict(task).double().numpy()
    arrays = [t.double().numpy() for t in (task.x_support, task.y_support, task.x_query, task.y_query)]
    optimal = np.stack([_posterior_mean_numpy(config["sampler"], xs, ys, xq) for xs, ys, xq, _ in zip(*arrays)])
    target = arrays[3]
    model_mse, optimal_mse = np.mean((pred - target) ** 2), np.mean((optimal - target) ** 2)
    assert model_mse < 2.0 * optimal_mse
    assert model_mse < 0.5 * np.mean(target**2)  # far better than predicting the prior mean
    assert sum(path.stat().st_size for path in run_dir.iterdir()) < 2_000_000

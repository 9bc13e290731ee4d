"""Held-out evaluation against the Bayes-optimal predictor of the task family.

GP regression (f ~ GP(0, k), label noise sigma^2): the posterior mean is KRR with the sampler's
own kernel and lam = sigma^2. Linear regression (w ~ N(0, I/d)): the posterior mean is ridge
regression with lam = sigma^2 d, i.e. KRR with the linear kernel x.z and lam = sigma^2 d. Both are
computed in float64 with `mi_krr.solvers.krr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch

from mi_krr._repr import compact_repr
from mi_krr.kernels import kernel_matrix
from mi_krr.tasks import ICLTask, bayes_optimal_ridge
from mi_krr.train.config import TrainConfig
from mi_krr.train.seeding import EVAL_STREAM, derived_generator

# Noise-free tasks have a singular prior Gram (linear kernel) or one at jitter level; the
# posterior mean is then the limit lam -> 0, approximated with this relative ridge.
NOISELESS_RELATIVE_LAM = 1e-8


@dataclass
class EvalReference:
    """Held-out prompts and what the optimal predictor scores on them.

    Attributes:
        task: held-out prompts (float32 on the training device).
        optimal_pred: Bayes-optimal query predictions `[batch, n_query]` (float64, CPU).
        optimal_mse: their mean squared error against `task.y_query`.
        zero_mse: the error of always predicting 0 (the prior mean).
    """

    __repr__ = compact_repr

    task: ICLTask
    optimal_pred: torch.Tensor
    optimal_mse: float
    zero_mse: float


def optimal_ridge(sampler: Any) -> tuple[str, dict[str, float], float]:
    """The KRR problem whose solution is the sampler's posterior mean: (kernel name, kernel
    parameters, lam). Raises ValueError for samplers without a known posterior."""
    lam = bayes_optimal_ridge(sampler)
    if sampler.name == "gp_regression":
        return sampler.kernel, sampler.kernel_params(), lam
    return "linear", {}, lam


def bayes_optimal_predictions(sampler: Any, task: ICLTask) -> torch.Tensor:
    """Posterior-mean predictions `[batch, n_query]` (float64, CPU) for prompts drawn from `sampler`."""
    from mi_krr.solvers import krr

    kernel, params, lam = optimal_ridge(sampler)
    x_support = task.x_support.detach().to("cpu", torch.float64)
    x_query = task.x_query.detach().to("cpu", torch.float64)
    y_support = task.y_support.detach().to("cpu", torch.float64)
    gram = kernel_matrix(kernel, x_support, None, **params)
    if lam == 0.0:
        lam = NOISELESS_RELATIVE_LAM * float(torch.diagonal(gram, dim1=-2, dim2=-1).mean())
    alpha = krr(gram, y_support, lam)
    return torch.einsum("bmn,bn->bm", kernel_matrix(kernel, x_query, x_support, **params), alpha)


def held_out_task(sampler: Any, cfg: TrainConfig) -> ICLTask:
    """`cfg.eval_prompts` prompts at the final prompt length and full dimension, drawn from a seed
    stream training never uses (so they are held out), on `cfg.device`."""
    generator = derived_generator(cfg.eval_seed, EVAL_STREAM, 0)
    return sampler.sample(cfg.eval_prompts, cfg.n_support, cfg.n_query, generator=generator).to(device=cfg.device)


def held_out_reference(sampler: Any, cfg: TrainConfig) -> EvalReference:
    """`held_out_task` with its optimal predictions precomputed."""
    task = held_out_task(sampler, cfg)
    optimal = bayes_optimal_predictions(sampler, task)
    target = task.y_query.detach().to("cpu", torch.float64)
    return EvalReference(
        task=task,
        optimal_pred=optimal,
        optimal_mse=float((optimal - target).square().mean()),
        zero_mse=float(target.square().mean()),
    )


@torch.no_grad()
def model_predictions(model: torch.nn.Module, task: ICLTask, chunk: int = 256) -> torch.Tensor:
    """`model.predict(task)` in eval mode, `chunk` prompts at a time -> `[batch, n_query]` float64 CPU."""
    was_training = model.training
    model.eval()
    try:
        predict = cast(Callable[[ICLTask], torch.Tensor], model.predict)  # torch's stub: Tensor | Module
        parts = [predict(task.select(slice(i, i + chunk))) for i in range(0, task.batch_size, chunk)]
    finally:
        model.train(was_training)
    return torch.cat(parts).to("cpu", torch.float64)


def evaluate(model: torch.nn.Module, reference: EvalReference) -> dict[str, float]:
    """Held-out query errors: `model_mse`, `optimal_mse`, `ratio` = model / optimal, `zero_mse`
    (predicting 0), and `gap_to_optimal_mse` = mean (model - optimal)^2."""
    pred = model_predictions(model, reference.task)
    target = reference.task.y_query.detach().to("cpu", torch.float64)
    model_mse = float((pred - target).square().mean())
    return {
        "model_mse": model_mse,
        "optimal_mse": reference.optimal_mse,
        "ratio": model_mse / reference.optimal_mse if reference.optimal_mse > 0 else math.inf,
        "zero_mse": reference.zero_mse,
        "gap_to_optimal_mse": float((pred - reference.optimal_pred).square().mean()),
    }

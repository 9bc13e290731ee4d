"""Every documented misuse of the probes' public functions raises ONE-line ValueError that names the
argument (and, where there is one, the fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks.samplers import GPRegressionSampler
from probes.attention_kernels import AttentionKernels
from probes.diagnose import diagnose, resolve_lam
from probes.fitted_probes import fit_layer_probes
from probes.identifiability import algorithm_agreement
from probes.alignment_metrics import alignment_metrics
from probes.kernel_alignment import kernel_alignment
from probes.scoring import monotone_alignment, score_algorithm, score_algorithms
from probes.sensitivity import solver_sensitivities
from probes.spectral_trajectories import spectral_system

MODEL = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=2, n_heads=1))
TASK = GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0)
STEPS = np.random.default_rng(0).normal(size=(4, 3, 2))


def _unknown_sampler_task():
    task = GPRegressionSampler(dim=3).sample(2, 4, 1, seed=0)
    task.info = {"sampler": "my_own"}
    return task


def _query_block_only():
    attention = probes.attention_kernels(MODEL, TASK)
    return AttentionKernels(support=None, query=attention.query, source="pattern")


CASES = {
    "kernel_alignment fit": (lambda: kernel_alignment(MODEL, TASK, fit="lstsq"), "fit must be one of 'distance', 'log_lstsq'"),
    "kernel_alignment missing block": (
        lambda: kernel_alignment(MODEL, TASK, block="support", attention=_query_block_only()),
        "attention lacks the 'support' block that block='support' compares",
    ),
    "kernel_alignment representation width": (
        lambda: kernel_alignment(MODEL, TASK, representation=(torch.zeros(4, 5, 3), torch.zeros(4, 2, 4))),
        "representation's support and query features must have the same width p",
    ),
    "kernel_alignment representation shape": (
        lambda: kernel_alignment(MODEL, TASK, representation=(torch.zeros(4, 6, 3), torch.zeros(4, 2, 3))),
        r"representation\[0\] must be \[batch=4, 5, p\]",
    ),
    "alignment_metrics mask": (
        lambda: alignment_metrics(torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(2, 3)),
        r"mask must be a bool tensor of shape \(2, 3\)",
    ),
    "alignment_metrics shapes": (lambda: alignment_metrics(torch.ones(2, 3), torch.ones(3, 2)), "K_attn and K_ref must have the same shape"),
    "score kappa shape": (
        lambda: score_algorithm("a", STEPS, STEPS, STEPS[:, -1], kappa=np.ones(3)),
        r"kappa must hold one condition number per prompt \(4\)",
    ),
    "score layers per row": (
        lambda: score_algorithms(STEPS, {"a": STEPS}, STEPS[:, -1], layers=[0, 1]),
        r"layers must list one layer index per row of layer_pred \(3\)",
    ),
    "score NaN": (lambda: score_algorithm("a", STEPS * np.nan, STEPS, STEPS[:, -1]), "layer_values contains NaN or inf"),
    "monotone_alignment cost": (lambda: monotone_alignment(np.ones(3)), "cost must be"),
    "agreement step counts": (
        lambda: algorithm_agreement({"a": STEPS, "b": STEPS[:, :2]}, {"a": [1], "b": [1]}),
        "step_preds must all be \\[B, T\\+1, m\\] with the same prompts B and steps T\\+1",
    ),
    "spectral_system K_query": (
        lambda: spectral_system("gd", torch.eye(3)[None], torch.ones(1, 3), 0.1, None),
        "spectral_system needs K_query",
    ),
    "solver_sensitivities y shape": (
        lambda: solver_sensitivities("cg", torch.eye(5).expand(3, 5, 5), torch.ones(3, 2, 5), 0.1, 3, y=torch.ones(3, 4)),
        r"y must be \[\.\.\., n=5\] broadcasting to the prompts \(3,\), got shape \(3, 4\)",
    ),
    "fit_layer_probes val_fraction": (
        lambda: fit_layer_probes(MODEL, TASK, val_fraction=1.0),
        "val_fraction must lie strictly between 0 and 1",
    ),
    "diagnose none applies": (
        lambda: diagnose(MODEL, TASK, algorithms="richardson_rowsum", kernel="linear", kernels=(), progress=False),
        "none of the algorithms .*'richardson_rowsum'.* applies to task set 'tasks'",
    ),
    "diagnose lam unknown sampler": (lambda: resolve_lam(_unknown_sampler_task(), None), "lam=None needs task.info from a known sampler"),
    "diagnose non-callable solver": (
        lambda: diagnose(MODEL, TASK, algorithms={"mine": "cg"}, progress=False),
        "algorithms entry 'mine' must map a name to a solver callable",
    ),
    "diagnose duplicate algorithms": (lambda: diagnose(MODEL, TASK, algorithms=("cg", "cg"), progress=False), "algorithms must be distinct"),
    "diagnose kernel_params": (
        lambda: diagnose(MODEL, TASK, kernel_params={"temperature": 1.0}, progress=False),
        r"kernel_params for 'gaussian' may only set \('bandwidth',\)",
    ),
    "plot unknown task set": (lambda: diagnose(MODEL, TASK, algorithms="cg", kernels=(), bootstrap=0, progress=False).plot("shifted"),
                              r"task_set must be one of \['tasks'\], got 'shifted'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_misuse_raises_a_one_line_value_error(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)

"""The construction studies report what they claim, on small settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mi_krr.construct.studies import conditioned_linear_task, cg_rate_study, relu_width_study, width_study


def test_conditioned_linear_task_has_the_requested_condition_number():
    task = conditioned_linear_task(batch_size=3, n_support=16, kappa=250.0, lam=1e-3, seed=4)
    K = (task.x_support @ task.x_support.mT).numpy()
    np.testing.assert_allclose(np.linalg.cond(K + 1e-3 * np.eye(16)), 250.0, rtol=1e-8)
    with pytest.raises(ValueError, match="lam"):
        conditioned_linear_task(batch_size=1, n_support=4, kappa=1e3, lam=0.1)


def test_cg_rate_study_stays_under_the_cg_bound_and_on_the_solver():
    study = cg_rate_study(kappas=(10.0, 100.0), n_support=32, n_steps=12, batch_size=4)
    for key in ("10.0", "100.0"):
        model, solver, bound = map(np.array, (study.a_norm_ratio[key], study.solver_a_norm_ratio[key], study.bound[key]))
        assert (model <= bound + 1e-12).all()
        np.testing.assert_allclose(model, solver, rtol=1e-7)
    assert study.a_norm_ratio["10.0"][-1] < study.a_norm_ratio["100.0"][-1]
    json.dumps(study.to_dict())
    assert study.plot().axes[0].get_yscale() == "log"


def test_width_study_model_error_is_the_feature_krr_error_and_falls_with_width():
    study = width_study(widths=(2, 8, 32), kernels=("linear",), dim=8, n_support=24, n_query=8, n_steps=24, batch_size=4)
    model, floor = np.array(study.model_error["linear"]), np.array(study.feature_krr_error["linear"])
    np.testing.assert_allclose(model, floor, rtol=1e-6, atol=1e-9)
    assert model[0] > model[1] > model[2]
    assert 0 < study.d_eff["linear"] <= 8
    json.dumps(study.to_dict())


def test_relu_width_study_error_falls_with_width():
    study = relu_width_study(widths=(16, 64, 256), n_steps=4, n_support=16, batch_size=2)
    for errors in study.error.values():
        assert errors[0] > errors[1] > errors[2] > 0
    assert len(study.plot().axes) == 1

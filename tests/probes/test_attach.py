"""`attach`: models are validated once (a missing hook is named) and the probes become methods."""

from __future__ import annotations

import pytest
import torch

import probes
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from probes import ProbedModel, attach
from prompts import random_task


def make_model(**overrides) -> ICLTransformer:
    settings = dict(n_dims=2, d_model=8, n_layers=2, n_heads=2, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(**settings)).eval()


def make_task(batch: int = 2, n: int = 5, m: int = 3, seed: int = 0) -> ICLTask:
    return random_task(batch, n, m, 2, seed)


class ModelNamingAMissingHook(ICLTransformer):
    def residual_hook_names(self) -> list[str]:
        return super().residual_hook_names()[:-1] + ["blocks.1.hook_resid_final"]


def test_attach_names_the_hook_a_model_lacks():
    torch.manual_seed(0)
    model = ModelNamingAMissingHook(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2))
    with pytest.raises(ValueError, match="blocks.1.hook_resid_final"):
        attach(model)


def test_attach_rejects_an_object_that_is_not_an_icl_model():
    with pytest.raises(ValueError, match="has no method 'encode'"):
        attach(torch.nn.Linear(2, 1))


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_probed_model_methods_run_on_the_attached_model(layout):
    model, task = make_model(layout=layout), make_task()
    probed = attach(model)
    assert isinstance(probed, ProbedModel) and probed.model is model
    lens = probed.layer_predictions(task)
    assert lens.shape == (2, 3, 3)
    torch.testing.assert_close(lens[:, -1], model.predict(task).detach())
    sensitivities = probed.label_sensitivities(task, layers=[2])
    assert sensitivities.shape == (2, 1, 3, 5)
    kernels = probed.attention_kernels(task)
    assert kernels.support.shape == (2, 2, 2, 5, 5) and kernels.query.shape == (2, 2, 2, 3, 5)
    alignment = probed.kernel_alignment(task, kernels=("exp",))
    assert alignment.tau.shape == (2, 2)


def test_attached_models_are_accepted_wherever_a_model_is():
    model, task = make_model(), make_task()
    probed = attach(model)
    assert attach(probed).model is model  # not wrapped twice
    torch.testing.assert_close(probes.layer_predictions(probed, task), probes.layer_predictions(model, task))
    torch.testing.assert_close(probes.label_sensitivities(probed, task, layers=[2]), probes.label_sensitivities(model, task, layers=[2]))
    assert torch.equal(probes.attention_kernels(probed, task).query, probes.attention_kernels(model, task).query)

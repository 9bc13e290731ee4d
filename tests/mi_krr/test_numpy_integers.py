"""NumPy integers (what indexing an array or `np.arange` gives) work wherever a count or seed is
taken, and are stored as Python ints: torch seeding and JSON configs refuse np.int64."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from mi_krr.feature_maps import PositiveRandomFeatures, RandomProjection
from mi_krr.models.config import ICLTransformerConfig
from mi_krr.tasks import LinearRegressionSampler, sample_spd_system
from mi_krr.train.config import TrainConfig


def test_samplers_take_numpy_integer_seeds_and_sizes():
    """A draw with np.int64 seed and sizes equals the int-argument draw; info and config are JSON."""
    sampler = LinearRegressionSampler(np.int64(3), rotation_seed=np.int64(2), condition_number=2.0)
    task = sampler.sample(np.int64(2), np.int64(4), np.int64(1), seed=np.int64(3), active_dim=np.int64(2))
    reference = LinearRegressionSampler(3, rotation_seed=2, condition_number=2.0).sample(2, 4, 1, seed=3, active_dim=2)
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(task, name), getattr(reference, name)), name
    assert json.loads(json.dumps(task.info)) == reference.info
    assert type(sampler.dim) is int and type(sampler.rotation_seed) is int


def test_spd_systems_take_numpy_integer_seeds_and_sizes():
    """sample_spd_system with np.int64 batch, n and seed equals the int-argument draw."""
    drawn = sample_spd_system(np.int64(2), np.int64(3), 5.0, seed=np.int64(4))
    reference = sample_spd_system(2, 3, 5.0, seed=4)
    assert torch.equal(drawn.matrix, reference.matrix) and torch.equal(drawn.rhs, reference.rhs)


def test_configs_and_feature_maps_store_numpy_integers_as_ints():
    """Train / model configs and feature maps given np.int64 fields hold ints and dump to JSON."""
    train = TrainConfig(steps=np.int64(1000), warmup_steps=np.int64(3), curriculum_steps=np.int64(5), seed=np.int64(2))
    model = ICLTransformerConfig(n_dims=np.int64(2), d_model=np.int64(16), n_layers=np.int64(2), n_heads=np.int64(2))
    for config in (train, model):
        fields = dataclasses.asdict(config)
        assert json.loads(json.dumps(fields)) == fields
        assert not any(isinstance(value, np.integer) for value in fields.values())
    for feature_map in (RandomProjection(np.int64(2), np.int64(4), seed=np.int64(1)), PositiveRandomFeatures(np.int64(2), np.int64(4), seed=np.int64(1))):
        assert (type(feature_map.d), type(feature_map.m), type(feature_map.seed)) == (int, int, int)

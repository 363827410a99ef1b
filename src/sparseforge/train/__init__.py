"""Sparse training: gradual pruning (GMP), static random sparsity, dynamic sparse training (SET, RigL), N:M (STE, SR-STE, S-STE).

A trainer attaches to a model and its optimizer, jaxpruner-style; call ``trainer.step()`` after
every ``optimizer.step()``. Configs are dataclasses with YAML recipes, like one-shot pruning.
See ``docs/training.md``.

Example:
    >>> import torch, torch.nn as nn
    >>> import sparseforge.train as sft
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> opt = torch.optim.Adam(net.parameters())
    >>> trainer = sft.RigL(net, opt, sparsity=0.5, schedule={"end_step": 100, "update_interval": 10})
    >>> {k: round(v, 2) for k, v in trainer.sparsities().items()}
    {'0': 0.5, '2': 0.5}
"""

from sparseforge.train.base import MaskUpdate, SparseLayer, SparseTrainer
from sparseforge.train.config import (
    GMPConfig,
    RigLConfig,
    SETConfig,
    SRSTEConfig,
    SSTEConfig,
    SRigLConfig,
    SparseMomentumConfig,
    STEConfig,
    SparseTrainConfig,
    StaticConfig,
    dump_train_recipe,
    load_train_recipe,
    parse_train_recipe,
)
from sparseforge.train.density import layer_sparsities
from sparseforge.train.nm import SRSTE, STE, FlipRate
from sparseforge.train.sste import SSTE
from sparseforge.train.methods import GMP, SET, TRAINERS, RigL, StaticSparse, from_config
from sparseforge.train.srigl import SRigL
from sparseforge.train.momentum import SparseMomentum
from sparseforge.train.iterative import IterativeResult, average_models, imp, sparse_model_soup, swamp
from sparseforge.train.schedules import Schedule, cosine_drop_fraction, cubic_sparsity
from sparseforge.train.sparse_compute import SparseCompute

__all__ = [
    "SparseTrainer", "SparseLayer", "MaskUpdate",
    "SparseTrainConfig", "StaticConfig", "GMPConfig", "SETConfig", "RigLConfig", "STEConfig", "SRSTEConfig",
    "parse_train_recipe", "load_train_recipe", "dump_train_recipe",
    "StaticSparse", "GMP", "SET", "RigL", "STE", "SRSTE", "FlipRate", "TRAINERS", "from_config", "from_recipe",
    "Schedule", "cubic_sparsity", "cosine_drop_fraction", "layer_sparsities",
    "SSTE", "SSTEConfig",
    "SRigL", "SRigLConfig", "SparseMomentum", "SparseMomentumConfig",
    "imp", "swamp", "sparse_model_soup", "average_models", "IterativeResult",
    "SparseCompute",
]

TRAINERS.update({"srigl": SRigL, "sparse_momentum": SparseMomentum})  # defined on top of methods.py's classes

TRAINERS["sste"] = SSTE  # N:M S-STE, defined on top of nm.py's STE


def from_recipe(model, optimizer, path) -> SparseTrainer:
    """The trainer described by the YAML training recipe at ``path``."""
    return from_config(model, optimizer, load_train_recipe(path))

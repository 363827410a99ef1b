"""The usage examples in the finetune and DSnoT docstrings run as written."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["sparseforge.finetune", "sparseforge.finetune.config", "sparseforge.finetune.losses",
                                  "sparseforge.finetune.keep_mask", "sparseforge.finetune.loop",
                                  "sparseforge.finetune.token_split_linear",
                                  "sparseforge.prune.methods.dsnot"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0

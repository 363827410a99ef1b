"""The usage examples in the activation modules' docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["sparseforge.activation", "sparseforge.activation.config", "sparseforge.activation.linear",
           "sparseforge.activation.calibrate", "sparseforge.activation.teal", "sparseforge.activation.cats",
           "sparseforge.activation.storage", "sparseforge.ops.sparse_input", "sparseforge.activation.plain",
           "sparseforge.activation.rsparse", "sparseforge.activation.relufy", "sparseforge.activation.column_linear",
           "sparseforge.ops.column_sparse", "sparseforge.formats.colbitmap", "sparseforge.activation.column_group"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

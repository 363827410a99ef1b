"""The table-driven int8 bindings (src/bindings/sparse_linear.cpp, def_i8): the three formats expose
the same arguments, run the same checks, and a format without an int8-activation mode refuses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparseforge.errors import ModelError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.kernels import native


def _weights():
    w = torch.randn(6, 16)
    keep = torch.rand(6, 16) < 0.5
    nm_keep = torch.zeros(6, 4, 4, dtype=torch.bool)
    nm_keep[:, :, :2] = True
    return {
        "csr_i8": (CSRWeight.from_dense(w, keep, values_dtype=torch.int8), ("row_ptr", "col", "values", "scales")),
        "bitmap_i8": (BitmapWeight.from_dense(w, keep, values_dtype=torch.int8), ("bitmap", "row_offsets", "values", "scales")),
        "nm_i8": (NMWeight.from_dense(w, "2:4", nm_keep.reshape(6, 16), values_dtype=torch.int8), ("values", "indices", "scales")),
    }


def _args(name, wt, fields):
    bufs = [getattr(wt, f).numpy() for f in fields]
    return bufs + ([wt.pattern.n, wt.pattern.m] if name == "nm_i8" else [])


@pytest.mark.parametrize("name", ["csr_i8", "bitmap_i8", "nm_i8"])
def test_every_format_has_the_same_entry_points_and_checks(name):
    wt, fields = _weights()[name]
    args = _args(name, wt, fields)
    x = torch.randn(3, 16)
    for sfx in ("", "_ref"):
        y = np.empty((3, 6), np.float32)
        getattr(native(), f"{name}_linear{sfx}")(x.numpy(), *args, None, y, act="float")
        torch.testing.assert_close(torch.from_numpy(y), x @ wt.to_dense().T, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="y must have one column per weight row|describe 6 rows"):
            getattr(native(), f"{name}_linear{sfx}")(x.numpy(), *args, None, np.empty((3, 5), np.float32))
        with pytest.raises(ValueError, match="act='int4' is not an activation mode"):
            getattr(native(), f"{name}_linear{sfx}")(x.numpy(), *args, None, y, act="int4")
    getattr(native(), f"{name}_check")(*args, 6, 16)
    with pytest.raises(ModelError, match=f"{name}_check"):
        getattr(native(), f"{name}_check")(*args, 7, 16)
    with pytest.raises(ValueError, match="algo"):
        getattr(native(), f"{name}_linear")(x.numpy(), *args, None, y, algo="fast")


def test_csr_has_no_int8_activation_mode():
    wt, fields = _weights()["csr_i8"]
    y = np.empty((2, 6), np.float32)
    for sfx in ("", "_ref"):
        with pytest.raises(ValueError, match=f"csr_i8_linear{sfx} has no int8-activation mode; use act='float'"):
            getattr(native(), f"csr_i8_linear{sfx}")(torch.randn(2, 16).numpy(), *_args("csr_i8", wt, fields), None, y,
                                                      act="int8")

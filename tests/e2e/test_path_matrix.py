"""The CPU half of the path matrix: every method x every format that can hold its scheme, quantized on the CPU,
loaded with lowbit.load and compared with an independent dequantization of the written tensors
(tests/path_matrix.py; the CUDA half runs in bench/path_matrix.py)."""

from __future__ import annotations

import pytest
import torch

from tests.path_matrix import METHODS, RUNS, make_model, run_cell


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("matrix") / "tiny")


@pytest.mark.parametrize("scheme,formats", RUNS, ids=["asym", "sym"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_into_every_format(model, tmp_path, method, scheme, formats):
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    cells = run_cell(model, tmp_path, method, scheme, formats, "cpu", x)
    assert [c.fmt for c in cells] == list(formats)
    for cell in cells:
        assert cell.err_vs_reference < 1e-4, (cell.fmt, cell.err_vs_reference)
        assert cell.weights_match_first_format, cell.fmt  # the same QuantResults in every format

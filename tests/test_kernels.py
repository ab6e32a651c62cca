"""The Linear kernel chosen per machine: oneDNN's packed matmul from the row count at which it measured faster."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from kvbench import kernels
from kvbench.bench.paths import linear_path
from kvbench.model import Linear, pack_from_rows

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def timings_from(table: dict[int, tuple[float, float]]):
    return lambda rows: table[rows]


def test_packing_starts_at_the_first_row_count_where_it_was_faster():
    # (x @ W seconds, packed seconds) per row count, as a machine might measure them
    table = {1: (3.3, 4.1), 2: (5.0, 4.9), 4: (7.4, 5.2), 8: (9.0, 6.0)}
    assert kernels.first_row_count_packed_wins(timings_from(table)) == 2
    table[1] = (4.7, 4.1)  # an AMD-like machine: packing wins at one row already
    assert kernels.first_row_count_packed_wins(timings_from(table)) == 1


def test_packing_never_faster_in_the_tried_counts_starts_past_them():
    table = {rows: (1.0, 2.0) for rows in kernels.ROW_COUNTS}
    assert kernels.first_row_count_packed_wins(timings_from(table)) == 2 * kernels.ROW_COUNTS[-1]


@needs_onednn
def test_fewer_rows_than_the_threshold_run_x_at_w_and_never_pack():
    torch.manual_seed(0)
    linear = Linear(32, 48, bias=True)
    torch.nn.init.normal_(linear.weight)
    linear.use_kernel("onednn")
    pack_from_rows(linear, 2)
    one = torch.randn(1, 32)
    assert torch.equal(linear(one), torch.addmm(linear.bias, one, linear.weight))
    assert linear._packed is None  # x @ W ran: the packed copy was never built
    two = torch.randn(2, 32)
    torch.testing.assert_close(linear(two), torch.addmm(linear.bias, two, linear.weight))
    assert linear._packed is not None  # two rows went through oneDNN's packed weight


@needs_onednn
def test_for_decoding_measures_once_and_says_so_in_the_code_path(monkeypatch):
    model = random_model(2)
    monkeypatch.setattr(kernels, "_measured", {})
    kernels.for_decoding(model, torch.device("cpu"), torch.float32)
    (key, rows), = kernels._measured.items()
    assert {(m.kernel, m.packed_from_rows) for m in model.modules() if isinstance(m, Linear)} == {("onednn", rows)}
    assert rows in (*kernels.ROW_COUNTS, 2 * kernels.ROW_COUNTS[-1])

    def measured_again(*_):
        raise AssertionError("the same weight shape was timed twice in one process")

    monkeypatch.setattr(kernels, "time_both", measured_again)
    kernels.for_decoding(random_model(2), torch.device("cpu"), torch.float32)
    pack_from_rows(model, 4)
    assert "below 4 rows x @ W" in linear_path(model)
    pack_from_rows(model, 1)
    assert "below" not in linear_path(model)


def test_other_dtypes_and_forced_kernels_pack_every_row():
    model = random_model(2)
    kernels.for_decoding(model.to(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    assert {(m.kernel, m.packed_from_rows) for m in model.modules() if isinstance(m, Linear)} == {("mv", 1)}
    pack_from_rows(model, 4)
    model.use_kernel("onednn")  # a kernel forced (ablate's variants) runs at every row count
    assert {m.packed_from_rows for m in model.modules() if isinstance(m, Linear)} == {1}

"""The Linear kernel chosen per machine: oneDNN's packed matmul from the row count at which it measured faster."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_model
from kvbench import kernels
from kvbench.bench.paths import linear_path
from kvbench.generate import generate
from kvbench.model import SEVERAL_POSITIONS_PACKED_ROWS, Linear, kernel_choices, pack_from_rows

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
@pytest.mark.parametrize("strategy", ["naive", "static"])
def test_long_passes_run_x_at_w_and_decode_steps_the_packed_kernel(monkeypatch, strategy):
    """oneDNN builds a primitive per new row count (1-3 ms per Linear) and keeps 1024: a long naive run, whose
    rows grow every step, would rebuild them all, so passes of several positions past
    SEVERAL_POSITIONS_PACKED_ROWS rows run x @ W; a decode step (one position per sequence, the same rows every
    step) and a short prompt run the packed kernel."""
    import kvbench.model as model_module

    model = random_model(2).use_kernel("onednn")  # packed from 1 row
    packed_rows = []
    real = model_module.onednn_matmul
    monkeypatch.setattr(model_module, "onednn_matmul", lambda x2d, *a: packed_rows.append(x2d.shape[0]) or real(x2d, *a))
    linears = sum(isinstance(m, Linear) for m in model.modules())
    for prompt_len, prompt_packed in ((30, False), (5, True)):  # 3 rows x 30 positions: 90 > 64 rows
        packed_rows.clear()
        prompt = torch.randint(0, 97, (3, prompt_len), generator=torch.Generator().manual_seed(0))
        generated = generate(model, prompt, 4, strategy, keep_logits=True)
        if strategy == "naive":  # each step a pass over the whole sequence; its LM head on the last position
            passes = [3 * (prompt_len + i) for i in range(4)]
            expected = [rows for rows in passes for _ in range(linears - 1)] * prompt_packed + [3] * 4
        else:  # the prompt (its LM head on the last position), then 3 decode steps of 3 rows
            expected = [3 * prompt_len] * (linears - 1) * prompt_packed + [3] + [3] * 3 * linears
        assert sorted(packed_rows) == sorted(expected)
        reference = generate(copy.deepcopy(model).use_kernel("matmul"), prompt, 4, strategy, keep_logits=True)
        torch.testing.assert_close(generated.logits, reference.logits, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_two_dimensional_input_past_the_cap_runs_x_at_w():
    """x (N, in) may be flattened positions (a plugin's, an API user's): past the cap it is not packed either."""
    linear = Linear(32, 48, bias=False)
    linear.use_kernel("onednn")
    assert linear.runs_packed(torch.randn(SEVERAL_POSITIONS_PACKED_ROWS, 32))
    assert not linear.runs_packed(torch.randn(SEVERAL_POSITIONS_PACKED_ROWS + 1, 32))
    assert linear.runs_packed(torch.randn(SEVERAL_POSITIONS_PACKED_ROWS + 1, 1, 32))  # a decode step's batch


@needs_onednn
def test_for_decoding_measures_once_per_shape_and_thread_count(monkeypatch):
    model = random_model(2)
    monkeypatch.setattr(kernels, "_measured", {})
    times = {1: (1.0, 2.0), 2: (1.0, 2.0), 4: (2.0, 1.0), 8: (2.0, 1.0)}  # packing wins from 4 rows
    calls = []
    monkeypatch.setattr(kernels, "time_both", lambda linear, rows: calls.append(rows) or times[rows])
    kernels.for_decoding(model, torch.device("cpu"), torch.float32)
    assert kernel_choices(model) == {("onednn", 4)} and calls == [1, 2, 4]
    kernels.for_decoding(random_model(3), torch.device("cpu"), torch.float32)
    assert calls == [1, 2, 4]  # the same weight shape, dtype and threads: not timed again
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        kernels.for_decoding(random_model(3), torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert calls == [1, 2, 4, 1, 2, 4]  # another thread count moves the crossing: timed again


@needs_onednn
def test_the_measured_row_count_decodes_as_every_row_packed_does():
    model = random_model(2)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    packed_everywhere = generate(copy.deepcopy(model).use_kernel("onednn"), prompt, 12, "static", keep_logits=True)
    switched = generate(pack_from_rows(model.use_kernel("onednn"), 4), prompt, 12, "static", keep_logits=True)
    assert kernel_choices(model) == {("onednn", 4)}
    assert torch.equal(switched.tokens, packed_everywhere.tokens)
    torch.testing.assert_close(switched.logits, packed_everywhere.logits, atol=1e-5, rtol=1e-5)


def test_the_code_path_says_where_linears_switch():
    model = random_model(2).use_kernel("onednn")
    assert "below" not in linear_path(model)
    pack_from_rows(model, 4)
    assert linear_path(model).startswith("oneDNN matmul on W packed once from 4 rows (x @ W below: measured "
                                         "faster here); x @ W, W (in, out) for prompts")
    pack_from_rows(model, 2 * kernels.ROW_COUNTS[-1])
    assert "oneDNN measured slower at 1-8 rows" in linear_path(model)


def test_a_forced_kernel_or_a_new_dtype_packs_every_row():
    model = pack_from_rows(random_model(2).use_kernel("onednn"), 4)
    model.use_kernel("onednn")  # a kernel forced (ablate's variants) runs at every row count
    assert kernel_choices(model) == {("onednn", 1)}
    pack_from_rows(model, 4)
    model.to(torch.float64)  # a row count measured for float32 does not hold for another dtype
    assert kernel_choices(model) == {("onednn", 1)}
    kernels.for_decoding(model.to(torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    assert kernel_choices(model) == {("mv", 1)}

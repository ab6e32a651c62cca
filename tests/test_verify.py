"""kv-evaluate and evaluate: they pass on correct models and fail on broken caches and tampered files."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvbench.verify as verify
from kvbench import strategies
from conftest import CONFIGS, random_model, verdicts
from kvbench.cache import StaticCache
from kvbench.cli import app
from kvbench.config import load_config
from kvbench.generate import generate
from kvbench.weights import load_cpu_model, read_weights

TOL = verify.Tolerance(1e-4, 1e-4)


def test_one_pass_naive_logits_equal_the_step_by_step_naive_loop(monkeypatch):
    monkeypatch.setattr(verify, "LM_HEAD_CHUNK", 7)  # several chunks, the last one partial
    model = random_model(8)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    loop = generate(model, prompt, 30, "naive", keep_logits=True)
    one_pass = torch.cat([c for _, c in verify.naive_logit_chunks(model, prompt, loop.tokens)], dim=1)
    torch.testing.assert_close(one_pass, loop.logits.double(), atol=1e-5, rtol=1e-5)


def test_kv_evaluate_passes_every_strategy():
    model = random_model(2)
    prompt = torch.randint(0, 97, (2, 4))
    checks = verify.kv_evaluate(model, prompt, 40, ["static", "dynamic", "naive"], TOL)
    assert [c.passed for c in checks] == [True, True, True]
    assert all(c.max_abs < 1e-5 for c in checks)


class OffByOneCache(StaticCache):
    """Writes each decoded token's K/V one slot too far: attention then sees a stale slot instead."""

    def update(self, layer, start_pos, k, v):
        shift = 1 if k.shape[2] == 1 and start_pos + 1 < self.max_len else 0
        super().update(layer, start_pos + shift, k, v)
        end = start_pos + k.shape[2]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


OFF_BY_ONE = dataclasses.replace(  # a strategy object: the library takes it as it is; the CLI once registered
    strategies.STATIC, name="off-by-one",
    cache=lambda s: OffByOneCache(s.n_layers, s.batch, s.n_heads, s.max_len + 1, s.head_dim, s.dtype, s.device))


def test_broken_cache_fails_kv_evaluate(runner, register_strategy):
    register_strategy(OFF_BY_ONE)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "30",
                                 "--strategies", "off-by-one,dynamic", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"off-by-one": "FAIL", "dynamic": "pass"}


def test_kv_evaluate_cli_passes_on_tiny(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "50",
                                 "--batch-size", "2", "--strategies", "static,dynamic,naive", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"static": "pass", "dynamic": "pass", "naive": "pass"}


def fake_naive(logits_rows):
    return torch.tensor([logits_rows], dtype=torch.float64)  # (1, N, V)


def test_divergence_within_tolerance_is_a_near_tie():
    naive = fake_naive([[0.0, 1.0, 0.0], [2.0, 2.00005, 0.0]])  # step 1: tokens 0 and 1 nearly tied
    divergence = verify.first_divergence(torch.tensor([[1, 0]]), naive, TOL)
    assert (divergence.step, divergence.chosen, divergence.naive_choice) == (1, 0, 1)
    assert divergence.near_tie and divergence.gap == pytest.approx(5e-5)


def test_divergence_beyond_tolerance_is_a_mismatch():
    naive = fake_naive([[0.0, 1.0, 0.0], [2.0, 2.5, 0.0]])
    divergence = verify.first_divergence(torch.tensor([[1, 0]]), naive, TOL)
    assert divergence.step == 1 and not divergence.near_tie


def test_exact_tie_is_no_divergence():
    naive = fake_naive([[1.0, 1.0, 0.0]])
    assert verify.first_divergence(torch.tensor([[1]]), naive, TOL) is None


def test_the_shipped_expected_file_says_which_model_wrote_it(runner):
    """So that comparing another config against it fails with a note naming both, as files kvbench writes do."""
    shipped = CONFIGS / "reference-expected.safetensors"
    assert verify.expected_origin(shipped) == verify.model_origin(load_config(CONFIGS / "reference.yaml"))
    result = runner.invoke(app, ["evaluate", "--config", "tiny", "--expected", str(shipped), "--device", "cpu"])
    assert result.exit_code == 1 and "was written for config reference" in result.output, result.output


def test_evaluate_passes_on_the_shipped_reference_model(runner):
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "reference.yaml"), "--expected",
                                 str(CONFIGS / "reference-expected.safetensors"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # the same run as result objects: all three comparisons (torch, NumPy reference, expected file) within tolerance
    loaded = load_config(CONFIGS / "reference.yaml")
    inputs, expected = verify.read_expected(CONFIGS / "reference-expected.safetensors", loaded.model)
    weights = read_weights(loaded)
    result, _ = verify.evaluate(load_cpu_model(loaded, weights), weights, inputs, TOL, expected)
    assert [c.name for c in result.comparisons] == ["torch vs NumPy reference", "torch vs expected",
                                                    "NumPy reference vs expected"]
    assert all(c.passed and c.worst_ratio <= 1 and c.argmax_agreement == 1 for c in result.comparisons)


def test_tampered_expected_logits_fail_evaluate(runner, tmp_path):
    tensors = load_file(CONFIGS / "reference-expected.safetensors")
    tensors["logits"][1, 7, 42] += 1e-3  # one logit of one position, a hair off
    save_file(tensors, str(tmp_path / "tampered.safetensors"))
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "reference.yaml"), "--expected",
                                 str(tmp_path / "tampered.safetensors"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_write_expected_round_trip(runner, tmp_path):
    config = str(CONFIGS / "tiny.yaml")
    written = runner.invoke(app, ["evaluate", "--config", config, "--prompt-len", "6", "--batch-size", "2",
                                  "--write-expected", str(tmp_path / "e.safetensors"), "--device", "cpu"])
    assert written.exit_code == 0, written.output
    tensors = load_file(tmp_path / "e.safetensors")
    assert tensors["input_ids"].dtype == torch.int64 and tuple(tensors["input_ids"].shape) == (2, 6)
    assert tensors["logits"].dtype == torch.float32 and tuple(tensors["logits"].shape) == (2, 6, 256)
    checked = runner.invoke(app, ["evaluate", "--config", config, "--expected", str(tmp_path / "e.safetensors")])
    assert checked.exit_code == 0, checked.output


def test_expected_file_for_another_vocab_is_refused(runner):
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "default.yaml"), "--expected",
                                 str(CONFIGS / "reference-expected.safetensors"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "vocab_size 50257" in result.output


def test_expected_file_without_logits_is_refused(runner, tmp_path):
    save_file({"input_ids": torch.zeros(1, 3, dtype=torch.int64)}, str(tmp_path / "e.safetensors"))
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--expected",
                                 str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2 and "'logits'" in result.output, result.output


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_passes_with_its_default_tolerance(runner, dtype):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "40",
                                 "--dtype", dtype, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "reference.yaml"), "--expected",
                                 str(CONFIGS / "reference-expected.safetensors"), "--dtype", dtype, "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_broken_cache_fails_in_bfloat16_too(runner, register_strategy):
    # bfloat16 resolves logits to ~1%: in tiny.yaml the off-by-one moves them by ~0.016, below that resolution,
    # but the stored K/V (the contents check) are off by far more than bfloat16's rounding.
    register_strategy(OFF_BY_ONE)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "12",
                                 "--strategies", "off-by-one", "--dtype", "bfloat16", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "K at position" in result.output


def test_unknown_dtype(runner):
    result = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--dtype", "float8"])
    assert result.exit_code == 2 and "--dtype 'float8' is not supported" in result.output, result.output


def test_compiled_decode_passes_kv_evaluate(runner):
    """--compile adds static+compile: the fixed-shape, torch.compile'd decode step, checked like the others."""
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "20",
                                 "--strategies", "static", "--compile", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"static": "pass", "static+compile": "pass"}
    assert "static+compile: its first steps compile the decode step" in result.stderr  # not a silent pause


def test_the_compiled_step_marks_the_static_caches_buffers_as_fixed_addresses():
    """A CUDA graph mutates only inputs torch.compile knows to have fixed addresses; the static cache's buffers,
    written in place by the compiled step, are marked so before it runs (unguarded: a new cache re-records the
    graph, never recompiles). Unmarked, torch.compile ran the step without a graph, saying why only in a log
    off by default (seen on CPU with TORCH_LOGS=cudagraph_static_inputs: 'Non-static input ... cache.k[0]')."""
    from kvbench.generate import CompiledDecode

    cache = StaticCache(2, 1, 4, 16, 8, torch.float32, "cpu")
    marks = lambda: [getattr(t, "_dynamo_static_input_type", None) for t in cache.k + cache.v]  # noqa: E731
    assert marks() == [None] * 4  # an eager run never pays torch._dynamo's import
    decode = CompiledDecode(torch.device("cpu"))
    decode.step = lambda *inputs: torch.zeros(1, 5)  # the compiled function itself is not what is checked here
    decode(None, torch.tensor([1]), cache, 0)
    assert marks() == ["unguarded"] * 4


def test_a_declined_cuda_graph_stops_the_run():
    """If inductor still declines the graph, the run stops rather than report a compiled step as a graph's."""
    from torch._dynamo.utils import counters

    from kvbench.errors import KVBenchError
    from kvbench.generate import cuda_graph_skips, require_cuda_graph

    before = cuda_graph_skips()
    require_cuda_graph(before)  # none declined since: nothing to say
    counters["inductor"]["cudagraph_skips"] += 1
    try:
        with pytest.raises(KVBenchError, match="ran the decode step without a CUDA graph.*TORCH_LOGS=perf_hints"):
            require_cuda_graph(before)
    finally:
        counters["inductor"]["cudagraph_skips"] -= 1


def test_fixed_shape_static_cache_equals_the_sliced_one():
    """The compiled path's cache mode (tensor positions, whole buffer, mask) gives the eager path's logits."""
    model = random_model(7)
    prompt = torch.randint(0, 97, (2, 5))
    eager = generate(model, prompt, 12, "static", keep_logits=True)
    cache = StaticCache(2, 2, 4, 40, 8, torch.float32, "cpu")  # larger than needed: masking must hide the rest
    with torch.inference_mode():
        logits = [model(prompt, cache, 0, last_only=True)[:, -1]]
        token = eager.tokens[:, 0]
        for i in range(1, 12):
            logits.append(model(token[:, None], cache, torch.tensor(5 + i - 1), last_only=True)[:, -1])
            token = eager.tokens[:, i]
    torch.testing.assert_close(torch.stack(logits, dim=1), eager.logits, atol=1e-5, rtol=1e-5)


def test_nan_logits_fail_evaluate_and_say_where():
    expected = torch.zeros(1, 3, 5)
    actual = expected.clone()
    actual[0, 1, 2] = float("nan")
    comparison = verify.compare_logits("torch vs expected", actual, expected, TOL)
    assert not comparison.passed
    assert comparison.nonfinite == "actual logits hold NaN/inf from row 0, position 1"
    assert not verify.compare_logits("x", expected, actual, TOL).passed


def test_tables_say_what_each_row_is_judged_by(runner):
    evaluated = runner.invoke(app, ["evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--prompt-len", "4",
                                    "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "judged by err/tol" in evaluated.output and "max rel and argmax: for information, not judged" in \
        evaluated.output
    header = next(line for line in evaluated.output.splitlines() if "comparison" in line).split()
    assert header.index("err/tol") + 1 == header.index("result")  # the criterion stands beside the verdict
    checked = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "20",
                                  "--strategies", "static,quantized", "--device", "cpu"])
    assert checked.exit_code == 0, checked.output
    rows = {line.split()[0]: line.split() for line in checked.output.splitlines()
            if line.strip().startswith(("static ", "quantized "))}
    assert rows["static"][1] == "tol" and rows["quantized"][1] == "KL"
    assert rows["quantized"][3] == "—"  # no Δ/tol beside an approximate strategy's verdict

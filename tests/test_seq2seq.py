"""The encoder-decoder: against the NumPy reference, each way of caching against naive, cross K/V once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvbench.verify as verify
from kvbench.cli import app
from kvbench.config import Seq2SeqConfig, load_config
from kvbench.generate import generate, generation_steps, new_cache
from kvbench.model import init_weights
from kvbench.reference import reference_seq2seq_logits
from kvbench.seq2seq import Seq2Seq

TOL = verify.Tolerance(1e-4, 1e-4)
BASE = dict(family="encoder-decoder", n_encoder_layers=2, n_decoder_layers=2, d_model=32, n_heads=4, d_ff=64,
            src_vocab_size=41, tgt_vocab_size=53, max_seq_len=64, positional="sinusoidal", norm="post",
            activation="relu", tie_embeddings=True, bias=True, seed=0)


def random_seq2seq(seed: int = 0, **overrides) -> Seq2Seq:
    model = Seq2Seq(Seq2SeqConfig(**{**BASE, **overrides}))
    init_weights(model, seed, every_tensor=True)
    return model.eval().requires_grad_(False)


def bound(model: Seq2Seq, batch: int = 2, src_len: int = 7, seed: int = 0):
    src = torch.randint(0, model.config.src_vocab_size, (batch, src_len), generator=torch.Generator().manual_seed(seed))
    return model.bind(src)


architectures = st.fixed_dictionaries({
    "n_encoder_layers": st.integers(1, 2), "n_decoder_layers": st.integers(1, 2),
    "positional": st.sampled_from(["learned", "sinusoidal"]), "norm": st.sampled_from(["pre", "post"]),
    "activation": st.sampled_from(["gelu", "relu"]), "tie_embeddings": st.booleans(), "bias": st.booleans(),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures, seed=st.integers(0, 2**16), src_len=st.integers(1, 9), tgt_len=st.integers(1, 9))
def test_encoder_decoder_matches_numpy_reference(arch, seed, src_len, tgt_len):
    model = random_seq2seq(seed, **arch)
    gen = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(0, 41, (2, src_len), generator=gen), torch.randint(0, 53, (2, tgt_len), generator=gen)
    with torch.inference_mode():
        logits = model(src, tgt).double().numpy()
    weights = {k: v.double().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(logits, reference_seq2seq_logits(weights, model.config, src.numpy(), tgt.numpy()),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["naive", "static", "static+self-only", "dynamic", "dynamic+self-only",
                                      "sliding", "sliding+self-only"])
def test_each_way_equals_naive(strategy):
    model = bound(random_seq2seq(3))
    prompt = torch.randint(0, 53, (2, 3))
    [check] = verify.kv_evaluate(model, prompt, 25, [strategy], TOL, window=6)
    assert check.passed and check.max_abs < 1e-5, check


def test_quantized_passes_its_thresholds():
    model = bound(random_seq2seq(3))
    [check] = verify.kv_evaluate(model, torch.randint(0, 53, (2, 3)), 25, ["quantized"], TOL)
    assert check.passed and not check.exact


def count_calls(monkeypatch, obj, name: str) -> dict:
    calls, real = {"n": 0}, getattr(obj, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("strategy, encoder_runs, projections", [
    ("static", 1, 1),  # the full cache: encoder once, cross K/V once
    ("static+self-only", 1, 12),  # cross K/V projected again at every one of the 12 steps
    ("naive", 12, 12),  # everything recomputed every step
])
def test_cross_attention_kv_is_computed_once_with_the_full_cache(monkeypatch, strategy, encoder_runs, projections):
    model = random_seq2seq(1)
    encodes = count_calls(monkeypatch, model, "encode")
    projects = count_calls(monkeypatch, model, "project_memory")
    generate(bound(model), torch.randint(0, 53, (2, 3)), 12, strategy)
    assert (encodes["n"], projects["n"]) == (encoder_runs, projections)


def test_cross_cache_is_counted_in_memory_and_reset_between_generations():
    model = bound(random_seq2seq(1), batch=1, src_len=7)
    cache = new_cache(model, "static", batch=1, max_len=20)
    list(generation_steps(model, torch.randint(0, 53, (1, 3)), 5, cache))
    cross = 2 * 2 * 1 * 7 * 32 * 4  # K and V, 2 decoder layers, 7 source tokens, d_model 32, float32
    assert cache.nbytes == cache.self_cache.nbytes + cross
    assert cache.expected_bytes(7) == cache.self_cache.expected_bytes(7) + cross
    list(generation_steps(model, torch.randint(0, 53, (1, 3)), 5, cache))
    assert cache.projections == 1  # reset with the cache: one projection per generation


def test_batch_rows_equal_batch_size_one():
    model = random_seq2seq(2)
    src = torch.randint(0, 41, (3, 6))
    prompt = torch.randint(0, 53, (3, 4))
    batched = generate(model.bind(src), prompt, 10, "static", keep_logits=True)
    for row in range(3):
        alone = generate(model.bind(src[row:row + 1]), prompt[row:row + 1], 10, "static", keep_logits=True)
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, needle", [
    ({"family": "transformer"}, "family: must be one of decoder, encoder-decoder"),
    ({"n_layers": 2}, "unknown key 'n_layers' for family encoder-decoder"),
    ({"n_encoder_layers": 0}, "n_encoder_layers"),
    ({"src_vocab_size": "many"}, "src_vocab_size"),
])
def test_config_errors_for_the_new_keys(runner, tmp_path, overrides, needle):
    import yaml

    path = tmp_path / "s2s.yaml"
    path.write_text(yaml.safe_dump({**BASE, **overrides}))
    result = runner.invoke(app, ["evaluate", "--config", str(path)])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_decoder_keys_missing_for_encoder_decoder(runner, tmp_path):
    import yaml

    data = {k: v for k, v in BASE.items() if k != "tgt_vocab_size"}
    (tmp_path / "s2s.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["evaluate", "--config", str(tmp_path / "s2s.yaml")])
    assert result.exit_code == 2 and "missing required key 'tgt_vocab_size'" in result.output, result.output


def test_shipped_seq2seq_config_is_the_papers_shape():
    config = load_config("configs/seq2seq.yaml").model
    assert (config.n_encoder_layers, config.n_decoder_layers, config.d_model, config.n_heads, config.d_ff) == (
        1, 1, 512, 8, 2048)
    assert (config.positional, config.norm) == ("sinusoidal", "post")


def test_cli_evaluate_writes_and_checks_src_ids(runner, tmp_path):
    written = runner.invoke(app, ["evaluate", "--config", "configs/seq2seq.yaml", "--src-len", "5", "--prompt-len",
                                  "4", "--write-expected", str(tmp_path / "e.safetensors"), "--device", "cpu"])
    assert written.exit_code == 0, written.output
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "e.safetensors")
    assert tuple(tensors["src_ids"].shape) == (1, 5) and tuple(tensors["logits"].shape) == (1, 4, 32000)
    checked = runner.invoke(app, ["evaluate", "--config", "configs/seq2seq.yaml", "--expected",
                                  str(tmp_path / "e.safetensors"), "--device", "cpu"])
    assert checked.exit_code == 0, checked.output
    tensors["src_ids"][0, 0] = (tensors["src_ids"][0, 0] + 1) % 32000  # another source: other logits
    save_file(tensors, str(tmp_path / "t.safetensors"))
    tampered = runner.invoke(app, ["evaluate", "--config", "configs/seq2seq.yaml", "--expected",
                                   str(tmp_path / "t.safetensors"), "--device", "cpu"])
    assert tampered.exit_code == 1, tampered.output


def test_cli_kv_evaluate_and_benchmark_run_the_three_ways(runner, tmp_path):
    result = runner.invoke(app, ["kv-evaluate", "--config", "configs/seq2seq.yaml", "--new-tokens", "8",
                                 "--src-len", "7", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for name in ("naive", "static+self-only", "dynamic+self-only"):
        assert name in result.output
    # the report says what each way caches, and the source length
    assert result.output.startswith("seq2seq: batch 1, source 7, prompt 16")
    assert "  static: self-attention K/V cached (static); encoder and cross-attention K/V computed once" in \
        result.output
    assert "  static+self-only: self-attention K/V cached (static); encoder once, cross-attention K/V " \
        "recomputed every step" in result.output
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--config", "configs/seq2seq.yaml", "--lengths", "3,5", "--repeats",
                                 "1", "--src-len", "6", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    runs = pd.read_csv(out / "results.csv")
    assert sorted(set(runs["strategy"])) == ["naive", "static", "static+self-only"]


def test_compile_is_refused_for_encoder_decoder(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", "configs/seq2seq.yaml", "--compile"])
    assert result.exit_code == 2 and "--compile supports kvbench's decoder-only models" in result.output, result.output

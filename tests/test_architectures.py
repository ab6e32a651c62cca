"""Modern decoders: RoPE (with Llama 3 scaling), grouped-query attention, RMSNorm, SwiGLU, Q/K/V biases.

Each feature against the NumPy reference; random Llama / Qwen2 / Mistral checkpoints written by transformers
reproduce transformers' logits and greedy tokens; every strategy against naive on a GQA + RoPE model; a
cache that stores keys rotated for the wrong position is caught; unsupported config.json options refused.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import random_model, verdicts, write_yaml
from kvbench import strategies
from kvbench.cache import StaticCache
from kvbench.cli import app
from kvbench.config import load_config
from kvbench.generate import generate, new_cache
from kvbench.reference import reference_logits
from kvbench.verify import EvalInputs, Tolerance, kv_evaluate, write_expected
from kvbench.weights import build_model

LLAMA_SHAPE = dict(positional="rope", norm_type="rmsnorm", mlp="gated", activation="silu", bias=False,
                   tie_embeddings=False, n_heads=4, n_kv_heads=2)
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

FEATURES = {
    "rope": dict(positional="rope"),
    "rope-theta-llama3-scaling": dict(positional="rope", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "grouped-query": dict(n_kv_heads=2),
    "multi-query": dict(n_kv_heads=1, positional="rope"),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "swiglu": dict(mlp="gated", activation="silu"),
    "head-dim-not-width-over-heads": dict(head_dim=12, positional="rope"),
    "qkv-bias-only": dict(bias=False, attention_bias=True),
    "llama-shape": LLAMA_SHAPE,
}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_feature_matches_the_numpy_reference(features):
    model = random_model(seed=1, **features)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    weights = {name: t.double().numpy() for name, t in model.state_dict().items()}
    expected = reference_logits(weights, model.config, ids.numpy())
    np.testing.assert_allclose(model(ids).double().numpy(), expected, atol=2e-5, rtol=1e-5)


def test_rope_keys_depend_on_position_and_scaling_changes_long_wavelengths_only():
    from kvbench.model import RotaryPositions, llama3_scaled

    plain = random_model(positional="rope").config
    scaled = random_model(positional="rope", rope_scaling=LLAMA3_SCALING).config
    base, stretched = RotaryPositions(plain).inv_freq, RotaryPositions(scaled).inv_freq
    assert torch.equal(base[0], stretched[0])  # the fastest pair is kept
    assert torch.allclose(stretched[-1], base[-1] / 8.0)  # the slowest is slowed by `factor`
    assert torch.equal(llama3_scaled(base, scaled.rope_scaling), stretched)


def test_static_cache_of_a_gqa_model_holds_only_the_kv_heads():
    model = random_model(**LLAMA_SHAPE)  # 4 query heads, 2 K/V heads, head_dim 8
    cache = new_cache(model, "static", batch=3, max_len=50)
    c = model.config
    assert cache.k[0].shape == (3, c.n_kv_heads, 50, c.head_dim)
    assert cache.nbytes == 2 * c.n_layers * c.n_kv_heads * c.head_dim * 50 * 3 * 4
    assert cache.nbytes * 2 == new_cache(random_model(**{**LLAMA_SHAPE, "n_kv_heads": 4}), "static", 3, 50).nbytes


@pytest.mark.parametrize("strategy", ["static", "dynamic", "sliding", "quantized", "static+compile"])
def test_every_strategy_matches_naive_on_a_gqa_rope_model_across_the_window_wrap(strategy):
    model = random_model(seed=4, **LLAMA_SHAPE)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    tol = Tolerance(atol=1e-4, rtol=1e-4)
    checks = kv_evaluate(model, prompt, 30, [strategy], tol, window=16)  # 7 + 30 tokens: the ring wraps twice
    assert all(check.passed for check in checks), checks


class MisrotatedCache(StaticCache):
    """Stores keys turned by one more position than theirs, as a cache that re-applies RoPE on write with an
    off-by-one position would."""

    rotary = None

    def update(self, layer, start_pos, k, v):
        n = k.shape[2]
        turned = self.rotary.rotation(start_pos + 1, n, k.device) if isinstance(start_pos, int) else None
        if turned is not None:  # rotating by angle(p + 1) after angle(p) is not the key of position p
            k = turned.apply(k)
        return super().update(layer, start_pos, k, v)


def test_a_cache_rotating_keys_at_the_wrong_position_is_caught(register_strategy, runner, tmp_path):
    path = write_yaml(tmp_path, **LLAMA_SHAPE)
    model = build_model(load_config(path))
    MisrotatedCache.rotary = model.positions
    register_strategy(dataclasses.replace(strategies.STATIC, name="misrotated",
                                          cache=lambda s: MisrotatedCache(s.n_layers, s.batch, s.n_heads, s.max_len,
                                                                          s.head_dim, s.dtype, s.device)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(path), "--strategies", "static,misrotated",
                                 "--new-tokens", "12", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"static": "pass", "misrotated": "FAIL"}, result.output


# --- transformers checkpoints ------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-6)


def save_random(directory, kind: str = "llama", **options):
    """A random tiny checkpoint of `kind` written by transformers' save_pretrained; its norm gains and biases
    randomised (they start at 1 and 0) so that a misread one shows."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**{**SMALL, **options})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_greedy(hf, ids, n):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


CHECKPOINTS = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-scaling": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, **LLAMA3_SCALING))),
    "qwen2-qkv-bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
}


@pytest.mark.parametrize("kind, options", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_checkpoint_reproduces_transformers_logits_and_greedy_tokens(tmp_path, kind, options):
    hf = save_random(tmp_path, kind, **options)
    model = build_model(load_config(tmp_path))
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        hf_tokens = hf_greedy(hf, ids, 20)
    assert torch.equal(generate(model, ids, 20, "static").tokens, hf_tokens)


def to_transformers4_spelling(directory):
    """Rewrite a transformers 5 config.json (rope_parameters) as transformers 4 wrote it (rope_theta +
    rope_scaling), as checkpoints in the wild still are."""
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = None if params["rope_type"] == "default" else params
    path.write_text(json.dumps(hf))


@pytest.mark.parametrize("scaled", [False, True])
def test_transformers4_config_spelling_reads_the_same(tmp_path, scaled):
    rope = dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **LLAMA3_SCALING)) if scaled else {}
    hf = save_random(tmp_path, "llama", num_key_value_heads=2, **rope)
    spelled5 = load_config(tmp_path).model
    to_transformers4_spelling(tmp_path)
    assert load_config(tmp_path).model == spelled5
    ids = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(build_model(load_config(tmp_path))(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_caps_full_attention_and_sliding_attends_as_mistral(tmp_path):
    hf = save_random(tmp_path, "mistral", num_key_value_heads=2, sliding_window=8)
    loaded = load_config(tmp_path)
    assert loaded.model.max_seq_len == 8 and loaded.model.sliding_window == 8
    model = build_model(loaded)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = hf(ids).logits  # Mistral: every layer attends to the last 8 positions
        torch.testing.assert_close(model(ids, visibility=8), expected, atol=1e-4, rtol=1e-4)
        hf_tokens = hf_greedy(hf, ids[:, :5], 20)
    assert torch.equal(generate(model, ids[:, :5], 20, "sliding").tokens, hf_tokens)


def test_evaluate_against_transformers_logits_and_kv_evaluate_through_the_cli(runner, tmp_path):
    directory = tmp_path / "ckpt"
    hf = save_random(directory, "qwen2", num_key_value_heads=2)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        write_expected(tmp_path / "hf.safetensors", EvalInputs(ids), hf(ids).logits)
    result = runner.invoke(app, ["evaluate", "--config", str(directory), "--expected",
                                 str(tmp_path / "hf.safetensors"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["kv-evaluate", "--config", str(directory), "--new-tokens", "24", "--device", "cpu",
                                 "--strategies", "static,dynamic,sliding,quantized", "--window", "16"])
    assert result.exit_code == 0, result.output
    assert set(verdicts(result.output).values()) == {"pass"}, result.output


def test_tampered_transformers_logits_fail_evaluate(runner, tmp_path):
    directory = tmp_path / "ckpt"
    hf = save_random(directory, "llama", num_key_value_heads=2)
    ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = hf(ids).logits
    logits[0, 3, 7] += 1e-2  # one logit of one position, far past float32's tolerance
    write_expected(tmp_path / "hf.safetensors", EvalInputs(ids), logits)
    result = runner.invoke(app, ["evaluate", "--config", str(directory), "--expected",
                                 str(tmp_path / "hf.safetensors"), "--device", "cpu"])
    assert result.exit_code == 1, result.output


UNSUPPORTED = {
    "yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
             "rope_type"),
    "softcap": ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    "qwen2-some-layers-sliding": ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    "llama-attention-bias": ("llama", {"attention_bias": True}, "attention_bias"),
    "partial-rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "unknown-architecture": ("llama", {"model_type": "gemma2"}, "model_type"),
}


@pytest.mark.parametrize("kind, edit, key", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_config_json_option_is_one_line_naming_the_key(runner, tmp_path, kind, edit, key):
    save_random(tmp_path, kind, num_key_value_heads=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    result = runner.invoke(app, ["evaluate", "--config", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert key in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_attention_maps_are_the_models_own_under_gqa_and_rope():
    from kvbench.visualize import ProbabilityProbe, attention_maps

    model = random_model(seed=2, **LLAMA_SHAPE)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    maps = attention_maps(model, ids)
    assert len(maps) == 2 and maps[0].shape == (4, 9, 9)  # every query head, not only the K/V heads
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, 9))
    assert torch.all(maps[0].triu(1) == 0)  # causal
    # the probe's attention, which the maps come from, gives the model's own logits
    torch.testing.assert_close(model(ids, ProbabilityProbe(4)), model(ids), atol=1e-5, rtol=1e-5)

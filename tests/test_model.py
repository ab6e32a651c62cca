"""The torch decoder against the independent NumPy float64 reference, over many small architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model
from kvbench.cache import StaticCache
from kvbench.reference import reference_logits

architectures = st.fixed_dictionaries({
    "n_layers": st.integers(1, 3),
    "n_heads": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([4, 8]),
    "d_ff": st.sampled_from([8, 24]),
    "vocab_size": st.integers(5, 40),
    "positional": st.sampled_from(["learned", "sinusoidal"]),
    "norm": st.sampled_from(["pre", "post"]),
    "activation": st.sampled_from(["gelu", "gelu_exact", "relu"]),
    "tie_embeddings": st.booleans(),
    "bias": st.booleans(),
})


def build(arch: dict, seed: int):
    arch = dict(arch)
    arch["d_model"] = arch["n_heads"] * arch.pop("head_dim")
    return random_model(seed, **arch, max_seq_len=64)


def numpy_logits(model, ids: torch.Tensor) -> np.ndarray:
    weights = {k: v.double().numpy() for k, v in model.state_dict().items()}
    return reference_logits(weights, model.config, ids.numpy())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures, seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 12))
def test_torch_matches_numpy_reference(arch, seed, batch, length):
    model = build(arch, seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        logits = model(ids).double().numpy()
    np.testing.assert_allclose(logits, numpy_logits(model, ids), atol=1e-5, rtol=1e-4)


def test_reference_catches_a_changed_weight():
    """The comparison above can fail: one LayerNorm gain nudged breaks agreement."""
    model = random_model(3)
    ids = torch.arange(10)[None, :]
    reference = numpy_logits(model, ids)
    model.blocks[1].ln2.weight[0] += 0.5
    with torch.inference_mode():
        logits = model(ids).double().numpy()
    assert np.abs(logits - reference).max() > 1e-4


def test_last_only_gives_the_last_position():
    model = random_model(1)
    ids = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:], atol=1e-6, rtol=1e-5)


def test_chunked_prefill_matches_one_pass():
    """Feeding the prompt in pieces at a start position (explicit causal mask) equals one causal pass."""
    model = random_model(2)
    ids = torch.randint(0, 97, (2, 12))
    cache = StaticCache(2, 2, 4, 12, 8, torch.float32, "cpu")
    with torch.inference_mode():
        first = model(ids[:, :5], cache, start_pos=0)
        rest = model(ids[:, 5:], cache, start_pos=5)
        full = model(ids)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_learned_positions_stop_at_max_seq_len():
    model = random_model(0, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_sinusoidal_positions_run_past_max_seq_len():
    model = random_model(0, positional="sinusoidal", max_seq_len=8)
    ids = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        logits = model(ids).double().numpy()
    np.testing.assert_allclose(logits, numpy_logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["mv", "linear", "matmul", "onednn"])
@pytest.mark.parametrize("tie", [True, False])
def test_every_linear_kernel_gives_the_same_logits(kernel, tie):
    model = random_model(6, tie_embeddings=tie)
    ids = torch.randint(0, 97, (2, 7))
    with torch.inference_mode():
        expected = model(ids)
        single_row = model(ids[:1, :1])
        model.use_kernel(kernel)
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids[:1, :1]), single_row, atol=1e-5, rtol=1e-5)  # the mv path
    assert model.lm_head.kernel == kernel


def test_onednn_packed_weights_follow_copies_and_dtype_changes():
    """The packed copy of W is not a parameter: a deep copy packs its own, and .to(dtype) packs again (a stale
    pack would keep computing with the old weights)."""
    import copy

    model = random_model(7).use_kernel("onednn")
    ids = torch.randint(0, 97, (2, 5))
    with torch.inference_mode():
        expected = model(ids)
        torch.testing.assert_close(copy.deepcopy(model)(ids), expected, atol=0, rtol=0)
        as_bf16 = model.to(torch.bfloat16)(ids)
        plain = random_model(7).use_kernel("linear").to(torch.bfloat16)(ids)
    assert as_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(as_bf16.float(), plain.float(), atol=2e-2, rtol=2e-2)

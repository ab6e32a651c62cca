"""Shared fixtures: tiny configs written to temporary files, models built from them, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvbench import strategies
from kvbench.config import LoadedConfig, ModelConfig
from kvbench.model import Decoder, init_weights

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

TINY = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=97, max_seq_len=128, positional="learned",
            norm="pre", activation="gelu", tie_embeddings=True, bias=True, layer_norm_eps=1e-5, seed=0)


def write_yaml(directory: Path, name: str = "model.yaml", **overrides) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def random_model(seed: int = 0, **overrides) -> Decoder:
    """A tiny float32 CPU model whose every tensor is random (biases and LayerNorm gains included)."""
    model = Decoder(ModelConfig(**{**TINY, **overrides}))
    init_weights(model, seed, every_tensor=True)
    return model.eval().requires_grad_(False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def register_strategy():
    """Register strategies for one test, as a plugin would (kvbench.strategies.register), then remove them."""
    added = []

    def register(strategy: strategies.Strategy) -> strategies.Strategy:
        added.append(strategies.register(strategy).name)
        return strategy

    yield register
    for name in added:
        strategies.unregister(name)


def verdicts(output: str) -> dict[str, str]:
    """kv-evaluate's table as {strategy: 'pass' | 'FAIL'}, read from its rows (strategy first, verdict last)."""
    rows = (line.split() for line in output.splitlines())
    return {cells[0]: cells[-1] for cells in rows if len(cells) > 2 and cells[-1] in ("pass", "FAIL")}


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    return write_yaml(tmp_path)


def loaded(path: Path, config: ModelConfig) -> LoadedConfig:
    return LoadedConfig(name=path.stem, source=path, model=config)


# small decoder architectures for property tests (d_model = 8 x n_heads)
small_models = st.fixed_dictionaries({
    "n_layers": st.integers(1, 3),
    "n_heads": st.sampled_from([1, 2, 4]),
    "positional": st.sampled_from(["learned", "sinusoidal"]),
    "norm": st.sampled_from(["pre", "post"]),
    "tie_embeddings": st.booleans(),
    "bias": st.booleans(),
})


@pytest.fixture(autouse=True, scope="session")
def room_for_every_shape():
    """torch.compile keeps one graph per shape on the decode step's code object, up to a limit of 8; the suite
    builds more shapes in one process than a run of kvbench does. A higher limit keeps every graph, so a shape
    seen twice compiles once (resetting the compiler after each test would recompile each time)."""
    import torch

    before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 256
    yield
    torch._dynamo.config.recompile_limit = before

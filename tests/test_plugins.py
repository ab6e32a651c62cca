"""Cache plugins, the public API, the conformance suite and transformers' caches: each claim of the README's
"Your own cache" section, each test failing if its claim broke."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import sys
import unittest

import pytest
import torch

import kvbench
from kvbench import hf_caches, plugins, testing
from kvbench import strategies as registry
from kvbench.cache import StaticCache
from kvbench.cli import app
from kvbench.precision import QUANTIZED_THRESHOLDS, Thresholds

from conftest import REPO, verdicts, write_yaml

SINK = str(REPO / "examples" / "sink_cache.py")
sys.path.insert(0, str(REPO / "examples"))
from sink_cache import SinkCache, SinkCacheOffByOne  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_registry():
    """Plugins register globally: every test starts and ends with the built-ins only."""
    before, loaded, sources = dict(registry.REGISTRY), dict(plugins.LOADED), dict(plugins.SOURCES)
    yield
    registry.REGISTRY.clear(), registry.REGISTRY.update(before)
    plugins.LOADED.clear(), plugins.LOADED.update(loaded)
    plugins.SOURCES.clear(), plugins.SOURCES.update(sources)


def kv_evaluate(runner, *args):
    return runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--new-tokens", "60", "--window", "16", *args])


# --- the example plugin ----------------------------------------------------------------------------------------

def test_sink_plugin_passes_and_its_off_by_one_fails(runner):
    result = kv_evaluate(runner, "--strategies", f"static,{SINK}:SinkCache")
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"static": "pass", "sink": "pass"}
    # ragged = False: the footer says which generation sink skipped, and static (which ran it) says nothing
    said = " ".join(result.output.split())
    assert "sink: not run on ragged batch" in said and "static: not run" not in said
    result = kv_evaluate(runner, "--strategies", f"{SINK}:SinkCacheOffByOne")
    assert result.exit_code == 1, result.output
    assert "sink-off-by-one" in result.output and "holds 19 positions" in result.output


def test_sink_baseline_is_its_own_visibility_rule():
    """Against full attention (no visibility declared) the same exact cache fails: the rule is what kv-evaluate used."""
    model = kvbench.load_model("tiny")
    sink = kvbench.strategy(SinkCache)
    as_full = dataclasses.replace(sink, name="sink-as-full", visibility=None, windowed=False)
    own, full = kvbench.kv_evaluate(model, [sink, as_full], new_tokens=40, window=8)
    assert own.passed, own.failures
    assert not full.passed


def test_sink_cache_memory_is_bounded():
    model = kvbench.load_model("tiny")
    cache = kvbench.strategy(SinkCache).new_cache(kvbench.CacheShape.of(model.config, 1, 100, torch.float32,
                                                                         torch.device("cpu"), window=16))
    assert cache.nbytes == cache.expected_bytes(10_000) == cache.expected_bytes(20)


# --- declarations: exact, thresholds --------------------------------------------------------------------------

class RoundedCache(StaticCache):
    """A static cache storing K/V rounded to bfloat16: approximate."""

    name = "rounded"
    exact = False

    def __init__(self, shape):
        super().__init__(shape.n_layers, shape.batch, shape.n_heads, shape.max_len, shape.head_dim, shape.dtype,
                         shape.device)

    def update(self, layer, start_pos, k, v):
        return super().update(layer, start_pos, k.bfloat16().float(), v.bfloat16().float())

    def storage_bound(self, exact):
        return exact.abs() / 128  # bfloat16 keeps 8 significant bits


def test_approximate_plugin_is_judged_by_thresholds():
    model = kvbench.load_model("tiny")
    approx = kvbench.register_strategy(RoundedCache)
    strict = type("StrictRounded", (RoundedCache,), {"name": "strict", "thresholds": Thresholds(1e-30, 1.0, 1e-30, 0)})
    exact_one = type("ExactRounded", (RoundedCache,), {"name": "claims-exact", "exact": True})
    checks = kvbench.kv_evaluate(model, [approx, strict, exact_one], new_tokens=40)
    verdict = {c.strategy: c for c in checks}
    assert verdict["rounded"].passed and not verdict["rounded"].exact, verdict["rounded"].failures
    assert not verdict["strict"].passed and "KL" in " ".join(verdict["strict"].failures)
    assert not verdict["claims-exact"].passed  # rounding is beyond the exact tolerance


def test_thresholds_may_tighten_but_not_loosen():
    tight = type("Tight", (RoundedCache,), {"name": "tight", "thresholds": Thresholds(1e-4, 0.99, 1e-3, 1)})
    assert kvbench.register_strategy(tight).thresholds_for(torch.float32) == Thresholds(1e-4, 0.99, 1e-3, 1)
    limit = QUANTIZED_THRESHOLDS["float32"]
    loose = type("Loose", (RoundedCache,), {"name": "loose", "thresholds": dataclasses.replace(limit, max_step_kl=1.0)})
    with pytest.raises(kvbench.KVBenchError, match="loosen kvbench's float32 limits .max_step_kl 1 > 0.02"):
        kvbench.register_strategy(loose)


# --- errors: one line naming the spec, exit 2 ------------------------------------------------------------------

BAD_PLUGIN = '''
import torch
from kvbench import KVCache
from kvbench.cache import StaticCache

class Raises(KVCache):
    def __init__(self, shape):
        raise RuntimeError("no GPU here")
    update = mask = reset = expected_bytes = lambda *a: None
    nbytes = 0

class Incomplete(KVCache):
    def __init__(self, shape):
        pass

class WrongShapes(KVCache):
    def __init__(self, shape):
        self.inner = StaticCache(shape.n_layers, shape.batch, shape.n_heads, shape.max_len, shape.head_dim,
                                 shape.dtype, shape.device)
    def update(self, layer, start_pos, k, v):
        k_all, v_all = self.inner.update(layer, start_pos, k, v)
        return k_all[:, :, :, :-1], v_all  # drops a feature of every key
    def mask(self, start_pos, n_new):
        return self.inner.mask(start_pos, n_new)
    def reset(self):
        pass
    nbytes = 0
    def expected_bytes(self, tokens):
        return 0

NOT_A_CLASS = 3
'''


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing.py:X", "no file {dir}/missing.py"),
    ("no_such_module_kvb:X", "no module named 'no_such_module_kvb'"),
    ("{dir}/bad.py:Absent", "has no class 'Absent'"),
    ("{dir}/bad.py:NOT_A_CLASS", "is not a subclass of kvbench.KVCache"),
    ("json:JSONDecoder", "'JSONDecoder' is not a subclass of kvbench.KVCache"),
    ("{dir}/bad.py:Incomplete", "Incomplete does not implement expected_bytes, mask, nbytes, reset, update"),
    ("{dir}/bad.py:Raises", r"Raises\(shape\) raised RuntimeError: no GPU here"),
    ("{dir}/bad.py:WrongShapes", "a probe forward .* raised RuntimeError"),
    ("{dir}/syntax.py:X", "importing .*syntax.py raised SyntaxError"),
])
def test_bad_plugin_is_one_line_exit_2(runner, tmp_path, spec, message):
    (tmp_path / "bad.py").write_text(BAD_PLUGIN)
    (tmp_path / "syntax.py").write_text("def (:\n")
    spec, message = spec.format(dir=tmp_path), message.format(dir=tmp_path)
    result = kv_evaluate(runner, "--strategies", f"static,{spec}")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --strategies {spec}: "), result.output
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("command", ["kv-evaluate", "benchmark", "generate", "visualize"])
def test_help_says_importing_a_plugin_runs_its_code(runner, command):
    result = runner.invoke(app, [command, "--help"], terminal_width=400)
    assert "path/to/file.py:ClassName" in result.output and "that runs its code" in result.output


# --- where plugins come from -----------------------------------------------------------------------------------

def test_entry_point_group_registers_by_name(runner, monkeypatch):
    point = importlib.metadata.EntryPoint(name="sink-installed", value="sink_cache:SinkCache",
                                          group=plugins.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == plugins.ENTRY_POINT_GROUP else real(**kw))
    result = kv_evaluate(runner, "--strategies", "static,sink-installed")
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"static": "pass", "sink-installed": "pass"}


def test_results_directory_never_imports_a_plugin(runner, tmp_path):
    marker = tmp_path / "imported"
    plugin = tmp_path / "noisy.py"
    plugin.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                      f"import sys; sys.path.insert(0, {str(REPO / 'examples')!r})\n"
                      "from sink_cache import SinkCache as Base\n\nclass Noisy(Base):\n    name = 'noisy'\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--config", "tiny", "--strategies", f"naive,{plugin}:Noisy",
                                 "--lengths", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                 "--window", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "meta.json").read_text())["plugins"] == {"noisy": f"{plugin}:Noisy"}
    marker.unlink()
    registry.unregister("noisy"), plugins.LOADED.clear()  # a new process: nothing loaded
    result = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert result.exit_code == 2 and f"--strategies {plugin}:Noisy" in result.output, result.output
    assert runner.invoke(app, ["plot", str(out)]).exit_code == 0
    assert not marker.exists()  # neither resume nor plot imported it
    result = runner.invoke(app, ["benchmark", "--resume", str(out), "--strategies", f"{plugin}:Noisy"])
    assert result.exit_code == 0, result.output  # typed again, it loads and the run completes


def test_a_plugin_file_imports_the_modules_beside_it(runner, tmp_path):
    """As `python file.py` would: the plugin's folder is importable, so a plugin may live in several files."""
    (tmp_path / "storage.py").write_text("from kvbench.cache import StaticCache as Base\n")
    (tmp_path / "mine.py").write_text(
        "import kvbench\nfrom storage import Base\n\n"
        "class Mine(Base):\n    name = 'mine'\n\n"
        "    def __init__(self, shape):\n"
        "        super().__init__(shape.n_layers, shape.batch, shape.n_heads, shape.max_len, shape.head_dim,\n"
        "                         shape.dtype, shape.device)\n")
    result = kv_evaluate(runner, "--strategies", f"{tmp_path / 'mine.py'}:Mine")
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"mine": "pass"}


def test_contents_of_another_shape_is_a_failure_that_says_what_it_must_return(runner, register_strategy):
    class TwoTuple(StaticCache):
        def contents(self, layer, length):
            return super().contents(layer, length)[1:]  # (K, V): the positions left out

    register_strategy(registry.Strategy("two-tuple", "contents without positions", lambda s: TwoTuple(
        s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device)))
    result = kv_evaluate(runner, "--strategies", "two-tuple")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "contents() must return (positions (S,), K (B, H, S, hd), V (B, H, S, hd))" in " ".join(result.output.split())


# --- the conformance suite -------------------------------------------------------------------------------------

# transformers' caches as kvbench checks them need a recent transformers (tests/test_hf_engine.py: an older one is refused)
recent = pytest.mark.skipif(not hf_caches.available() or not hf_caches.recent_enough(),
                            reason="transformers missing or older than hf_caches.MIN_TRANSFORMERS")


@pytest.mark.parametrize("strategy", ["static", "dynamic", "sliding", "quantized", "paged",
                                      pytest.param("hf-dynamic", marks=recent), pytest.param("hf-static", marks=recent),
                                      SinkCache])
def test_conformance_suite_passes_every_cache(strategy):
    skipped = [case.split(":")[0] for case in testing.check_all(strategy)]
    # SinkCache declares ragged = False (a left-padded row's sinks would sit in other columns) and has no crop
    assert skipped == (["check_ragged_batch", "check_rollback"] if strategy is SinkCache else [])


@pytest.mark.parametrize("check", [testing.check_prefill_then_decode, testing.check_bounded_wrap,
                                   testing.check_batch_rows])
def test_conformance_suite_catches_a_broken_cache(check):
    with pytest.raises(AssertionError, match="sink-off-by-one: .*"):
        check(SinkCacheOffByOne)


def test_conformance_suite_catches_a_row_mixup():
    from kvbench.cache import StaticCache

    class RowZero(StaticCache):
        def update(self, layer, start_pos, k, v):
            return super().update(layer, start_pos, k[:1].expand_as(k), v[:1].expand_as(v))

    broken = registry.Strategy("row-zero", "row 0 everywhere", lambda s: RowZero(
        s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device))
    testing.check_prefill_then_decode(broken)  # one row: nothing to mix up
    with pytest.raises(AssertionError, match="row-zero: 3 rows"):
        testing.check_batch_rows(broken)


def test_unsupported_cases_are_skipped_not_failed():
    with pytest.raises(unittest.SkipTest, match="ragged = False"):
        testing.check_ragged_batch(SinkCache)
    with pytest.raises(unittest.SkipTest, match="no crop"):
        testing.check_rollback(SinkCache)


# --- transformers' caches and the API ----------------------------------------------------------------------------

@recent
def test_transformers_caches_verified_beside_built_ins(runner, tmp_path):
    llama_like = write_yaml(tmp_path, positional="rope", n_kv_heads=2, norm_type="rmsnorm", mlp="gated",
                            activation="silu", bias=False)  # grouped-query attention, rotary positions
    result = runner.invoke(app, ["kv-evaluate", "--config", str(llama_like), "--new-tokens", "40", "--rollback", "2",
                                 "--strategies", "static,hf-dynamic,hf-static"])
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"static": "pass", "hf-dynamic": "pass", "hf-static": "pass"}


@recent
def test_transformers_static_cache_is_its_class():
    from transformers.cache_utils import StaticLayer

    model = kvbench.load_model("tiny")
    cache = kvbench.strategy("hf-static").new_cache(kvbench.CacheShape.of(model.config, 1, 30, torch.float32,
                                                                          torch.device("cpu")))
    assert all(type(layer) is StaticLayer for layer in cache.layers)


def test_readme_python_api_example_runs(monkeypatch, tmp_path, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(REPO)  # the example names examples/sink_cache.py relative to the repository
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "mine" in printed and "naive" in printed  # the benchmark's summary, the plugin under its own name

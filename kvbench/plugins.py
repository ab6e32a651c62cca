"""Cache plugins: a user's KVCache class, loaded from `module.path:ClassName`, `path/to/file.py:ClassName` or
an installed package's `kvbench.strategies` entry point, and registered as a strategy beside the built-ins.

Importing a plugin runs its code. kvbench does so only for a spec typed on the command line (or passed to
the Python API) and for entry points of packages the user installed; a name read from a config, a sweep spec
or a results directory is looked up among the registered strategies and never imported.

A plugin class subclasses kvbench.KVCache, is constructed from one kvbench.CacheShape, and may declare:

    name = "mine"                  # the strategy's name in tables, CSVs and plots (default: the class name)
    summary = "one line"           # default: the first line of the class docstring
    exact = True                   # False: judged like `quantized`, by KL / top-1 thresholds
    thresholds = Thresholds(...)   # approximate only: tighter than kvbench's (a dict by dtype name, or one)
    ragged = True                  # False: it cannot serve left-padded batches; kv-evaluate skips that check
    bounded = False                # True: memory bounded by --window (may run past max_seq_len, as sliding)
    def visibility(query_pos, key_pos, window) -> bool (T, S)   # a staticmethod: attention other than causal
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from kvbench import strategies as registry
from kvbench.cache import KVCache
from kvbench.errors import KVBenchError
from kvbench.precision import DTYPES, QUANTIZED_THRESHOLDS, Thresholds
from kvbench.strategies import CacheShape, Strategy

ENTRY_POINT_GROUP = "kvbench.strategies"
LOADED: dict[str, Strategy] = {}  # spec -> the strategy it registered (a spec is imported once per process)
SOURCES: dict[str, str] = {}  # strategy name -> the spec or entry point it came from (recorded in meta.json)


def is_spec(text: str) -> bool:
    """A plugin spec names a class after a colon; a strategy name never has one."""
    return ":" in text


def load(spec: str, option: str = "--strategies") -> Strategy:
    """Import the class a spec names, check it, register it as a strategy and return that strategy.
    Every failure is one KVBenchError naming the spec (exit 2)."""
    if spec in LOADED:
        return LOADED[spec]
    where, _, class_name = spec.rpartition(":")
    if not where or not class_name:
        raise KVBenchError(f"{option} {spec!r}: a plugin is module.path:ClassName or path/to/file.py:ClassName")
    module = _import_file(where, spec, option) if _is_path(where) else _import_module(where, spec, option)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise KVBenchError(f"{option} {spec}: {where} has no class {class_name!r}")
    strategy = strategy_of(cls, f"{option} {spec}")
    register_loaded(strategy, spec, f"{option} {spec}")
    LOADED[spec] = strategy
    return strategy


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_file(where: str, spec: str, option: str):
    path = Path(where).expanduser()
    if not path.is_file():
        raise KVBenchError(f"{option} {spec}: no file {path}")
    name = f"kvbench_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"  # unique: two files may share a stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up by name
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # as `python file.py` does: the plugin may import the modules beside it
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  (the plugin's own code failed: say so in one line)
        del sys.modules[name]
        raise KVBenchError(f"{option} {spec}: importing {path} raised {type(exc).__name__}: {exc}") from None
    return module


def _import_module(where: str, spec: str, option: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):  # the module itself (or a parent package) is missing
            raise KVBenchError(f"{option} {spec}: no module named {exc.name!r} (is it installed, or on "
                               "PYTHONPATH?)") from None
        raise KVBenchError(f"{option} {spec}: importing {where} raised ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise KVBenchError(f"{option} {spec}: importing {where} raised {type(exc).__name__}: {exc}") from None


def strategy_of(cls, origin: str) -> Strategy:
    """The Strategy of a plugin class, its declarations checked (`origin` names it in errors)."""
    if not (inspect.isclass(cls) and issubclass(cls, KVCache)):
        raise KVBenchError(f"{origin}: {getattr(cls, '__name__', cls)!r} is not a subclass of kvbench.KVCache")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise KVBenchError(f"{origin}: {cls.__name__} does not implement {', '.join(missing)} (kvbench.KVCache)")
    exact = getattr(cls, "exact", True)
    if not isinstance(exact, bool):
        raise KVBenchError(f"{origin}: {cls.__name__}.exact must be True or False, not {exact!r}")
    visibility = getattr(cls, "visibility", None)
    if visibility is not None and not callable(visibility):
        raise KVBenchError(f"{origin}: {cls.__name__}.visibility must be a function (query_pos, key_pos, window)")
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    strategy = Strategy(
        name=str(cls.__dict__.get("name", cls.__name__)), summary=getattr(cls, "summary", doc[0] if doc else ""),
        cache=_factory(cls, origin), exact=exact, windowed=bool(getattr(cls, "bounded", False)),
        visibility=visibility, thresholds=_thresholds(cls, exact, origin), ragged=bool(getattr(cls, "ragged", True)),
        families=frozenset({"decoder"}))
    probe(strategy, origin)
    return strategy


def _factory(cls, origin: str):
    def new(shape: CacheShape) -> KVCache:
        try:
            return cls(shape)
        except Exception as exc:  # noqa: BLE001  (the plugin's constructor: one line, not a traceback)
            raise KVBenchError(f"{origin}: {cls.__name__}(shape) raised {type(exc).__name__}: {exc}") from None
    new.plugin_class = cls  # so that registering the same class again finds its strategy
    return new


def _thresholds(cls, exact: bool, origin: str) -> dict[str, Thresholds] | None:
    """A plugin's own thresholds by dtype name, each at least as strict as kvbench's in that dtype."""
    own = getattr(cls, "thresholds", None)
    if own is None:
        return None
    if exact:
        raise KVBenchError(f"{origin}: {cls.__name__} declares thresholds but exact = True; set exact = False")
    by_dtype = own if isinstance(own, dict) else dict.fromkeys(DTYPES, own)
    for dtype, mine in by_dtype.items():
        limit = QUANTIZED_THRESHOLDS.get(dtype)
        if limit is None or not isinstance(mine, Thresholds):
            raise KVBenchError(f"{origin}: {cls.__name__}.thresholds must be a kvbench.Thresholds or a dict of them "
                               f"by dtype ({', '.join(DTYPES)})")
        looser = looser_fields(mine, limit)
        if looser:
            raise KVBenchError(f"{origin}: {cls.__name__}.thresholds loosen kvbench's {dtype} limits ({', '.join(looser)}); "
                               "a plugin may only tighten them")
    return by_dtype


def looser_fields(mine: Thresholds, limit: Thresholds) -> list[str]:
    """Which of `mine` let through more than `limit` does, as 'field value > limit'."""
    found = [f"max_mean_kl {mine.max_mean_kl:g} > {limit.max_mean_kl:g}"] if mine.max_mean_kl > limit.max_mean_kl else []
    if mine.min_top1 < limit.min_top1:
        found.append(f"min_top1 {mine.min_top1:g} < {limit.min_top1:g}")
    if mine.max_step_kl > limit.max_step_kl:
        found.append(f"max_step_kl {mine.max_step_kl:g} > {limit.max_step_kl:g}")
    if mine.max_streak > limit.max_streak:
        found.append(f"max_streak {mine.max_streak} > {limit.max_streak}")
    return found


PROBE = CacheShape(n_layers=2, batch=2, n_heads=2, head_dim=8, max_len=8, dtype=torch.float32,
                   device=torch.device("cpu"), window=4)


def probe(strategy: Strategy, origin: str) -> None:
    """Construct the cache on a tiny shape and run a 3-token prefill and one decode step through it, so that a
    constructor that raises, or an update or attend returning wrong shapes, is a one-line error before any run."""
    cache = strategy.new_cache(PROBE)
    B, H, hd = PROBE.batch, PROBE.n_heads, PROBE.head_dim
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for start, n_new in ((0, 3), (3, 1)):
                cache.begin(start, n_new)
                mask = cache.mask(start, n_new)
                for layer in range(PROBE.n_layers):
                    q, k, v = (torch.randn(B, H, n_new, hd, generator=generator) for _ in range(3))
                    out = cache.attend(layer, start, q, k, v, mask)
                    if tuple(out.shape) != (B, H, n_new, hd):
                        raise ValueError(f"attend returned shape {tuple(out.shape)} for queries {(B, H, n_new, hd)}")
                cache.end()
    except Exception as exc:  # noqa: BLE001
        raise KVBenchError(f"{origin}: a probe forward (batch {B}, {H} heads, head_dim {hd}) through "
                           f"{strategy.name} raised {type(exc).__name__}: {exc}") from None


def register_loaded(strategy: Strategy, source: str, origin: str) -> None:
    if strategy.name in registry.REGISTRY:
        raise KVBenchError(f"{origin}: a strategy named {strategy.name!r} is already registered; give the class "
                           "another `name`")
    registry.register(strategy)
    SOURCES[strategy.name] = source


# --- installed packages: the kvbench.strategies entry point group -------------------------------------------------

def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed strategies by name (the entry point's name), without importing any of them."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_installed(name: str, option: str = "--strategies") -> Strategy | None:
    """The strategy an installed package provides under `name` (imported and registered now), or None."""
    if name in registry.REGISTRY:
        return registry.REGISTRY[name]
    ep = entry_points().get(name)
    if ep is None:
        return None
    origin = f"{option} {name} (entry point {ep.value})"
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001
        raise KVBenchError(f"{origin}: importing it raised {type(exc).__name__}: {exc}") from None
    strategy = strategy_of(cls, origin)
    if strategy.name != name:  # the entry point's name is what users type and what results record
        strategy = dataclasses.replace(strategy, name=name)
    register_loaded(strategy, name, origin)  # typed by its name again
    return strategy


def strategy_names(text: str, option: str = "--strategies") -> list[str]:
    """Comma-separated strategies with plugins loaded: each spec is imported and registered, and becomes its
    strategy's name; an unregistered plain name is looked up among installed entry points."""
    names = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if is_spec(item):
            names.append(load(item, option).name)
        else:
            load_installed(item, option)
            names.append(item)
    return names

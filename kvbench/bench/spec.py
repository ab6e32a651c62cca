"""A sweep spec: benchmark options shared by every point, a matrix of options to cross, combinations to skip.

The spec is read with the configs' own YAML loader (safe, duplicate keys refused) and validated as strictly
as a config: unknown keys and wrong types are errors naming the key. A point is one `kvbench benchmark`
invocation; this module turns the spec into points and points into command-line arguments, and never runs
anything.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvbench.config import _read_yaml, error_to_report, load_config, shipped_config
from kvbench.errors import KVBenchError
from kvbench.precision import DTYPES
from kvbench.strategies import names as strategy_names

DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]


class PointOptions(BaseModel):
    """The benchmark options a spec may set, top-level or in the matrix; None leaves benchmark's default.

    Names are benchmark's options with '_' for '-'; each becomes `--name value` on the point's command line.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    strategies: list[str] | None = Field(default=None, min_length=1)
    lengths: list[int] | None = Field(default=None, min_length=1)
    repeats: int | None = Field(default=None, gt=0)
    warmup: int | None = Field(default=None, ge=0)
    prompt_len: int | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, gt=0)
    dtype: DtypeName | None = None
    device: str | None = None
    seed: int | None = Field(default=None, ge=0)
    compile: bool | None = None
    window: int | None = Field(default=None, gt=0)
    src_len: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _known_values(self) -> PointOptions:
        known = strategy_names()
        for name in self.strategies or []:
            if name not in known:
                raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(known)}")
        if any(n <= 0 for n in self.lengths or []):
            raise ValueError(f"lengths must be positive integers (got {self.lengths})")
        return self


OPTION_KEYS = tuple(PointOptions.model_fields)
MatrixValue = str | int | bool | list[str] | list[int]


class SweepSpec(PointOptions):
    """The whole file: `configs` (crossed with the matrix), shared options, `matrix`, `exclude`."""

    configs: list[str] = Field(min_length=1)
    matrix: dict[str, list[MatrixValue]] = Field(default_factory=dict)
    exclude: list[dict[str, MatrixValue]] = Field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One benchmark invocation: its id (a directory name), the config, and the options set for it."""

    id: str
    config: str  # a shipped config's name, or an absolute path
    options: dict[str, Any]  # option -> value, only those the spec sets
    axes: dict[str, Any]  # the values that vary across points: config and the matrix keys

    def benchmark_args(self) -> list[str]:
        """`kvbench benchmark` arguments for this point, without --out."""
        args = ["--config", self.config]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args += [flag] if value else []
            elif isinstance(value, list):
                args += [flag, ",".join(map(str, value))]
            else:
                args += [flag, str(value)]
        return args


# --- reading and validating -------------------------------------------------------------------------------------

def _describe(error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as 'key: what is wrong (got value)'."""
    key = prefix + ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1])
        close = difflib.get_close_matches(name, [*OPTION_KEYS, "configs", "matrix", "exclude"], n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: configs, matrix, exclude, {', '.join(OPTION_KEYS)}"
        return f"unknown key '{key}'; {hint}"
    if error["type"] == "missing":
        return f"missing required key '{key}' (a list of config names or paths)"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})" if error["loc"] else message


def validate_spec(data: Any, origin: str) -> SweepSpec:
    if not isinstance(data, dict):
        raise KVBenchError(f"{origin}: expected a mapping of sweep keys (configs, matrix, options), "
                           f"got {type(data).__name__}")
    try:
        spec = SweepSpec(**data)
    except ValidationError as exc:
        raise KVBenchError(f"{origin}: {_describe(error_to_report(exc.errors()))}") from None
    except TypeError as exc:  # non-string keys
        raise KVBenchError(f"{origin}: invalid key ({exc})") from None
    _check_matrix(spec, origin)
    return spec


def _check_matrix(spec: SweepSpec, origin: str) -> None:
    """Matrix keys are options not also set at the top level, each value valid for its option; exclude
    entries name matrix keys (or config) and values that occur, so that a typo never silently skips nothing."""
    given = spec.model_fields_set
    for key, values in spec.matrix.items():
        if key not in OPTION_KEYS:
            close = difflib.get_close_matches(key, OPTION_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(OPTION_KEYS)}"
            raise KVBenchError(f"{origin}: matrix.{key} is not a benchmark option; {hint}")
        if key in given:
            raise KVBenchError(f"{origin}: {key} is set both at the top level and in matrix; keep one")
        if not values:
            raise KVBenchError(f"{origin}: matrix.{key} is empty; give at least one value")
        for i, value in enumerate(values):
            try:
                PointOptions(**{key: value})
            except ValidationError as exc:
                raise KVBenchError(f"{origin}: {_describe(error_to_report(exc.errors()), f'matrix.{key}[{i}] ')}") from None
    axes = {"config": spec.configs, **spec.matrix}
    for i, combination in enumerate(spec.exclude):
        for key, value in combination.items():
            if key not in axes:
                raise KVBenchError(f"{origin}: exclude[{i}].{key} is not an axis; exclude names config or a "
                                   f"matrix key ({', '.join(axes)})")
            if value not in axes[key]:
                raise KVBenchError(f"{origin}: exclude[{i}].{key}: {value!r} is not among its values "
                                   f"{axes[key]}; it would skip nothing")


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a spec file; every config it names is loaded (validated) too. Never runs code."""
    if not path.is_file():
        raise KVBenchError(f"sweep spec {path} not found; give a YAML file (see examples/sweep.yaml)")
    spec = validate_spec(_read_yaml(path, example="examples/sweep.yaml"), str(path))
    for i, config in enumerate(spec.configs):
        try:
            load_config(resolve_config(config, path.parent))
        except KVBenchError as exc:
            raise KVBenchError(f"{path}: configs[{i}]: {exc}") from None
    return spec


def resolve_config(text: str, base: Path) -> str:
    """A shipped config's bare name stays a name (it resolves on any machine with kvbench); any other entry
    is a path relative to the spec file's directory, made absolute."""
    if shipped_config(text) is not None and not text.endswith(".yaml"):
        return text
    path = Path(text)
    resolved = path if path.is_absolute() else (base / path).resolve()
    if not resolved.exists() and not path.exists() and path.name == text and not path.suffix:
        return text  # a mistyped shipped name: said as typed in the error, not as a path beside the spec
    return str(resolved)


# --- points -----------------------------------------------------------------------------------------------------

def _slug(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    text = Path(text).stem if "/" in text or text.endswith(".yaml") else text
    return re.sub(r"[^A-Za-z0-9.,+=_-]+", "_", text)


def _excluded(axes: dict[str, Any], exclude: list[dict[str, Any]]) -> bool:
    return any(all(axes.get(key) == value for key, value in rule.items()) for rule in exclude)


def expand(spec: SweepSpec, base: Path) -> list[Point]:
    """Configs x matrix, in the spec's order, minus excluded combinations. Ids are stable for a spec, so
    that a resumed sweep finds its points' directories again."""
    shared = {key: getattr(spec, key) for key in OPTION_KEYS if key in spec.model_fields_set}
    keys = list(spec.matrix)
    points = []
    for config in spec.configs:
        for values in itertools.product(*(spec.matrix[key] for key in keys)):
            axes = {"config": config, **dict(zip(keys, values, strict=True))}
            if _excluded(axes, spec.exclude):
                continue
            label = "-".join([_slug(config), *(f"{key}={_slug(value)}" for key, value in zip(keys, values))])
            point_id = f"{len(points):03d}-{label}"
            options = {**shared, **dict(zip(keys, values, strict=True))}
            points.append(Point(point_id, resolve_config(config, base), options, axes))
    if not points:
        raise KVBenchError("the spec's exclude skips every point; nothing to run")
    return points

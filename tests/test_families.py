"""The family table is the one place that knows a family: cli/ and bench/ ask it, never test a family's name."""

import ast
from pathlib import Path

import pytest

import kvbench
from kvbench.config import load_config
from kvbench.families import FAMILIES, family_of, reads_source

PACKAGE = Path(kvbench.__file__).parent
FAMILY_NAMES = set(FAMILIES)
CONFIG_CLASSES = {"ModelConfig", "Seq2SeqConfig", "TransformersConfig", "Decoder", "Seq2Seq"}


def family_tests(path: Path) -> list[str]:
    """Places in a module that compare something with a family's name or check a config's or model's class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [c.value for c in sides if isinstance(c, ast.Constant)]
            found += [f"{path.name}:{node.lineno} compares with {n!r}" for n in names if n in FAMILY_NAMES]
            found += [f"{path.name}:{node.lineno} compares a family" for c in sides
                      if isinstance(c, ast.Attribute) and c.attr == "family"]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            classes = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            found += [f"{path.name}:{node.lineno} isinstance {c}" for c in sorted(classes & CONFIG_CLASSES)]
    return found


@pytest.mark.parametrize("folder", ["cli", "bench"])
def test_cli_and_bench_never_dispatch_on_a_family(folder):
    modules = sorted((PACKAGE / folder).glob("*.py"))
    assert modules
    found = [hit for module in modules for hit in family_tests(module)]
    assert found == []


def test_the_scan_finds_a_family_test(tmp_path):
    """The scan above would see the dispatch it forbids."""
    module = tmp_path / "m.py"
    module.write_text("if config.family == 'encoder-decoder' or isinstance(config, (Seq2SeqConfig, int)):\n"
                      "    pass\n")
    assert len(family_tests(module)) == 3  # the name, the family compared, the class


def test_each_shipped_config_finds_its_family():
    assert family_of(load_config("default").model).name == "decoder"
    seq2seq = load_config("seq2seq").model
    assert family_of(seq2seq).name == "encoder-decoder" and reads_source(seq2seq)
    assert not reads_source(load_config("llama").model)


def test_family_defaults_are_strategies_it_runs():
    from kvbench.strategies import get

    for family in FAMILIES.values():
        for text in filter(None, (family.check_strategies, family.bench_strategies)):
            for name in text.split(","):
                assert family.name in get(name, family.name).families

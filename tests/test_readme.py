"""The README tells a new user the truth, in the order they read it."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_cpu_build_of_torch_comes_before_any_install():
    """An unpinned torch pulls the multi-GB CUDA build: the first command a user copies must avoid it."""
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[0].startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert readme.index("download.pytorch.org/whl/cpu") < readme.index("pip install -e .")


def test_every_shipped_config_the_readme_names_exists():
    from kvbench.config import shipped_names

    readme = (REPO / "README.md").read_text()
    listed = re.search(r"the name of a shipped config \((.*?)\)", readme, re.S).group(1)
    assert sorted(re.findall(r"`([a-z0-9-]+)`", listed)) == shipped_names()

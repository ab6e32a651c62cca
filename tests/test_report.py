"""kvbench report (HTML parsed, Markdown), the significance test with hand-computed p-values, --format output."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from kvbench.bench.significance import compare_samples
from kvbench.cli import app
from kvbench.report import bound_of

REPO = Path(__file__).resolve().parent.parent
RUN_A, RUN_B = REPO / "results" / "20261123-043050-default-cpu", REPO / "results" / "20261123-045135-default-cpu"


class Parts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.links, self.cells = [], 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.cells.append(data)


def parse(path: Path) -> Parts:
    parts = Parts()
    parts.feed(path.read_text())
    return parts


def test_report_of_one_run_is_one_file_with_every_plot_inline(runner, tmp_path):
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(RUN_A), "--out", str(out)])
    assert result.exit_code == 0, result.output
    parts = parse(out)
    assert len(parts.images) == len(list(RUN_A.glob("*.png"))) >= 4
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in parts.images)
    assert parts.links == []  # nothing fetched from anywhere: viewable offline
    assert parts.tables >= 2  # environment and summary
    text = " ".join(parts.cells)
    meta = json.loads((RUN_A / "meta.json").read_text())
    assert meta["device_name"] in text and meta["torch_version"] in text
    assert "×floor" in text and "bound" in text


def test_report_compares_runs_with_ratios_and_p_values(runner, tmp_path):
    out = tmp_path / "r.md"
    result = runner.invoke(app, ["report", str(RUN_A), str(RUN_B), "--format", "md", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## Comparison against the first run" in text and "| total B/A |" in text.replace(" p |", " |")
    a, b = (pd.read_csv(d / "summary.csv").set_index(["strategy", "new_tokens"]) for d in (RUN_A, RUN_B))
    ratio = b["total_s_median"] / a["total_s_median"]
    first = ratio.dropna().index[0]
    assert f"| {first[0]} | {first[1]} | {ratio[first]:.3f}" in text  # the ratio of the two runs' medians
    assert "plot: `" in text and "|---|" in text


def test_report_refuses_a_directory_that_is_no_run(runner, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a results directory" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("fmt, name", [("md", "r.html"), ("html", "r.md")])
def test_report_refuses_an_out_name_of_the_other_format(runner, tmp_path, fmt, name):
    result = runner.invoke(app, ["report", str(RUN_A), "--format", fmt, "--out", str(tmp_path / name)])
    assert result.exit_code == 2 and f"--format {fmt} writes {fmt}" in result.output, result.output
    assert not (tmp_path / name).exists()


def test_report_without_format_writes_what_the_out_name_says(runner, tmp_path):
    result = runner.invoke(app, ["report", str(RUN_A), "--out", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.md").read_text().startswith("# kvbench report")


def test_markdown_cells_keep_whole_numbers_whole():
    from kvbench.report import shown

    assert [shown(v) for v in (811008.0, 2.111e8, 0.0439319, float("nan"), None, "x")] == \
        ["811008", "211100000", "0.04393", "—", "—", "x"]


def test_report_shows_unset_settings_as_a_dash_not_nan(runner, tmp_path):
    out = tmp_path / "r.md"
    assert runner.invoke(app, ["report", str(RUN_A), "--format", "md", "--out", str(out)]).exit_code == 0
    settings = [line for line in out.read_text().splitlines() if line.startswith("| settings.")]
    assert settings and not any(line.endswith("| nan |") or line.endswith("| None |") for line in settings)


@pytest.mark.parametrize("a, b, p", [
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], 2 / 20),  # fully separated 3 vs 3: 2 of C(6,3) = 20 splits as extreme
    ([1.0, 1.1, 0.9, 1.05], [2.0, 2.1, 1.9, 3.0], 2 / 70),  # 4 vs 4: 2 of 70
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1.0),
])
def test_rank_test_p_values_by_hand(a, b, p):
    verdict = compare_samples(a, b, use_scipy=False)
    assert verdict.p_value == pytest.approx(p) and verdict.significant == (p < 0.05)


def test_too_few_repeats_are_never_marked():
    assert compare_samples([1.0], [5.0]).method == "too few repeats"
    assert not compare_samples([1.0, float("nan")], [5.0, 6.0]).significant


def test_permutation_test_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    # no ties: with ties scipy's exact distribution (which assumes none) and the permutation test, which ranks
    # ties as equal, differ (0.151 against 0.103 when both sets hold a 1.0)
    a, b = [1.0, 1.3, 0.9, 1.2, 1.1], [1.25, 1.5, 1.4, 1.35, 1.05]
    expected = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue
    assert compare_samples(a, b, use_scipy=False).p_value == pytest.approx(expected)


def test_bound_is_memory_when_reading_takes_longer_than_arithmetic():
    summary = pd.DataFrame({"floor_ms": [2.0, 0.5], "gflops_per_token": [0.1, 0.1]})
    # at 100 GFLOP/s, 0.1 GFLOP takes 1 ms: the 2 ms read bounds the first point, arithmetic the second
    assert list(bound_of(summary, {"machine_limits": {"matmul_gflops": 100.0}})) == ["memory", "compute"]


@pytest.mark.parametrize("fmt", ["csv", "json", "md"])
def test_compare_writes_data_alone_on_stdout(fmt):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compare", str(RUN_A), str(RUN_B), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert "A: default on" in result.stderr and "A: default" not in result.stdout
    if fmt == "csv":
        table = pd.read_csv(io.StringIO(result.stdout))
    elif fmt == "json":
        table = pd.DataFrame(json.loads(result.stdout))
    else:
        assert result.stdout.startswith("| strategy | batch_size | new_tokens |")
        return
    assert {"total_ratio", "total_p", "total_significant", "per_token_significant"} <= set(table.columns)
    assert len(table) == len(pd.read_csv(RUN_A / "summary.csv"))


def test_compare_table_explains_its_mark(runner):
    result = runner.invoke(app, ["compare", str(RUN_A), str(RUN_B)])
    assert result.exit_code == 0, result.output
    assert "* differs beyond noise (Mann-Whitney U" in result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


@pytest.mark.slow
def test_benchmark_format_csv_is_its_summary(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["benchmark", "-c", "tiny", "--lengths", "3", "--repeats", "1", "--warmup",
                                      "0", "--device", "cpu", "--out", str(tmp_path / "b"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(io.StringIO(result.stdout)).equals(pd.read_csv(tmp_path / "b" / "summary.csv"))
    assert "writing to" in result.stderr


def test_report_of_a_sweep(runner, tmp_path):
    """A sweep directory: its record, merged summary, plots across points, then each point."""
    sweep = tmp_path / "sweep"
    point = sweep / "points" / "000-default"
    point.mkdir(parents=True)
    for f in RUN_A.iterdir():
        (point / f.name).write_bytes(f.read_bytes())
    summary = pd.read_csv(RUN_A / "summary.csv")
    summary.insert(0, "point", "000-default")
    summary.insert(1, "config", "default")
    summary["kv_waste"], summary["skipped"] = 0.0, ""  # results of newer runs, not settings of the point
    summary.to_csv(sweep / "summary.csv", index=False)
    (sweep / "points_per_token.png").write_bytes((RUN_A / "latency.png").read_bytes())
    (sweep / "sweep.json").write_text(json.dumps({"runner": "local", "status": "complete", "points": {
        "000-default": {"status": "complete", "axes": {"config": "default"}}}}))
    result = runner.invoke(app, ["report", str(sweep)])
    assert result.exit_code == 0, result.output
    parts = parse(sweep / "report.html")
    assert len(parts.images) == 1 + len(list(RUN_A.glob("*.png")))
    assert "Point 000-default" in parts.cells
    assert {"point", "config"} <= set(parts.cells) and not {"kv_waste", "skipped"} & set(parts.cells)


@pytest.mark.parametrize("runs_csv", [None, "header only"])
def test_a_run_with_no_finished_runs_is_refused_as_plot_refuses_it(runner, tmp_path, runs_csv):
    """It once wrote a 0.5 MB report of an environment table and 'no finished runs', with exit 0."""
    (tmp_path / "meta.json").write_bytes((RUN_A / "meta.json").read_bytes())
    if runs_csv:
        (tmp_path / "results.csv").write_text((RUN_A / "results.csv").read_text().splitlines()[0] + "\n")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds no finished runs; nothing to report" in result.output, result.output
    assert not (tmp_path / "report.html").exists()

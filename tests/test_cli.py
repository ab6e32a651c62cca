"""The CLI through typer's CliRunner: options, defaults and the one error path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, write_yaml
from kvbench.cli import app

TINY = str(CONFIGS / "tiny.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["evaluate", "kv-evaluate"])
def test_cuda_without_cuda_is_a_clear_error(runner, command):
    result = runner.invoke(app, [command, "--config", TINY, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: CUDA is not available" in result.output and "--device cpu" in result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--strategies", "static,pagd"], "unknown strategy 'pagd'"),
        (["--strategies", ","], "--strategies is empty"),
        (["--new-tokens", "0"], "--new-tokens must be a positive integer"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["--new-tokens", "1300"], "do not fit max_seq_len 1280"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_kv_evaluate_bad_options(runner, args, needle):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_default_config_passes_kv_evaluate_briefly(runner):
    result = runner.invoke(app, ["kv-evaluate", "--new-tokens", "12", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "default" in result.output


def test_default_config_passes_evaluate(runner):
    result = runner.invoke(app, ["evaluate", "--prompt-len", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_init_weights_refuses_to_overwrite(runner, tmp_path):
    target = tmp_path / "w.safetensors"
    assert runner.invoke(app, ["init-weights", str(target), "--config", TINY]).exit_code == 0
    again = runner.invoke(app, ["init-weights", str(target), "--config", TINY])
    assert again.exit_code == 2 and "--force" in again.output


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "kvbench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "kv-evaluate" in result.stdout


# --- help reads as a user expects -------------------------------------------------------------------------------

def help_of(runner, command: str) -> str:
    result = runner.invoke(app, [command, "--help"], prog_name="kvbench", terminal_width=200, max_content_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def option_line(help_text: str, option: str) -> str:
    """The option's entry in the help, its wrapped lines joined."""
    lines = help_text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " ") or f", {option} " in line)
    end = next((i for i in range(first + 1, len(lines)) if lines[i].lstrip().startswith("-") or not lines[i].strip()),
               len(lines))
    return " ".join(line.strip() for line in lines[first:end])


@pytest.mark.parametrize("command, defaults", [
    ("benchmark", {"--config": "default", "--lengths": "10,50,100,500,1000", "--strategies": "(naive,static;",
                   "--repeats": "3", "--warmup": "1", "--prompt-len": "16", "--batch-size": "1",
                   "--threads": "(torch's own choice)", "--dtype": "float32", "--seed": "0",
                   "--window": "(the config's sliding_window, else 256)", "--src-len": "16",
                   "--out": "(results/<date-time>-<config>-<device>)"}),
    ("evaluate", {"--atol": "(by dtype: float32 0.0001", "--rtol": "(by dtype: float32 0.0001", "--dtype": "float32",
                  "--batch-size": "1", "--prompt-len": "16", "--src-len": "16", "--seed": "0", "--device": "auto"}),
    ("kv-evaluate", {"--new-tokens": "1000", "--strategies": "(static,dynamic;", "--atol": "(by dtype:",
                     "--window": "(the config's", "--temperature": "0.0", "--top-k": "(every token)"}),
    ("train", {"--corpus": "(Python's standard library)", "--max-bytes": "4000000", "--steps": "2000",
               "--batch-size": "32", "--seq-len": "256", "--lr": "0.003", "--save-every": "250",
               "--out": "(the config's weights file)"}),
])
def test_help_shows_every_default(runner, command, defaults):
    text = help_of(runner, command)
    for option, default in defaults.items():
        assert f"[default: {default}" in option_line(text, option), (option, option_line(text, option))


def test_help_shows_flags_without_a_value_and_arguments_by_name(runner):
    bench = help_of(runner, "benchmark")
    assert "<bool>" not in bench and option_line(bench, "--compile").split()[0] == "--compile"
    assert "Usage: kvbench plot [OPTIONS] RESULTS_DIR" in help_of(runner, "plot")
    assert "Usage: kvbench compare [OPTIONS] DIR_A DIR_B" in help_of(runner, "compare")
    assert "{" not in help_of(runner, "init-weights")


def test_version(runner):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith(f"kvbench {version('kvbench')} (torch ")


# --- options are named as typed; output paths refused or created up front ------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["generate", "--strategy", "statik", "--prompt", "x"], "--strategy: unknown strategy 'statik'"),
    (["generate", "--strategy", "naive,static", "--prompt", "x"], "--strategy takes one strategy"),
    (["ablate", "--variants", "x"], "--variants: unknown choice 'x'"),
    (["visualize", "--strategies", "x", "--prompt", "x", "--out", "unused"], "--strategies: unknown strategy 'x'"),
    (["kv-evaluate", "--strategies", "mine.py"], "(a plugin is named FILE.py:ClassName or module.path:ClassName)"),
    (["generate", "--prompt-ids", "1,2,999"], "--prompt-ids: id 999 is outside the vocabulary; each id must be in "
                                              "0..255"),
    (["generate", "--prompt-ids", " "], "give at least one id"),
])
def test_errors_name_the_option_typed(runner, args, needle):
    result = runner.invoke(app, [*args, "--config", TINY])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output


def test_output_files_get_their_parent_directories_or_one_clear_line(runner, tmp_path):
    weights = tmp_path / "new" / "deeper" / "w.safetensors"
    assert runner.invoke(app, ["init-weights", str(weights), "--config", TINY]).exit_code == 0
    expected = tmp_path / "more" / "e.safetensors"
    wrote = runner.invoke(app, ["evaluate", "--config", TINY, "--prompt-len", "4", "--device", "cpu",
                                "--write-expected", str(expected)])
    assert wrote.exit_code == 0 and expected.is_file(), wrote.output
    (tmp_path / "plain").write_text("a file")
    for args in (["init-weights", str(tmp_path / "plain" / "w.safetensors")],
                 ["evaluate", "--write-expected", str(tmp_path / "plain" / "e.safetensors")]):
        result = runner.invoke(app, [*args, "--config", TINY, "--device", "cpu"] if args[0] == "evaluate" else
                               [*args, "--config", TINY])
        assert result.exit_code == 2 and "is a file, not a directory" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_write_expected_never_overwrites_without_force(runner, tmp_path):
    precious = tmp_path / "weights.safetensors"
    assert runner.invoke(app, ["init-weights", str(precious), "--config", TINY]).exit_code == 0
    before = precious.read_bytes()
    args = ["evaluate", "--config", TINY, "--prompt-len", "4", "--device", "cpu", "--write-expected", str(precious)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--force" in refused.output and precious.read_bytes() == before
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0 and precious.read_bytes() != before


def test_written_files_have_the_usual_permissions(runner, tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    weights, expected = tmp_path / "w.safetensors", tmp_path / "e.safetensors"
    assert runner.invoke(app, ["init-weights", str(weights), "--config", TINY]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "--config", TINY, "--prompt-len", "4", "--device", "cpu",
                               "--write-expected", str(expected)]).exit_code == 0
    for path in (weights, expected):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, oct(path.stat().st_mode)


def test_piped_tables_keep_their_cells_whole():
    """Without a terminal rich assumes 80 columns and cuts cells to '…': a CI log would lose the numbers. A
    comparison against another model's expected file makes the table wider than 80 (err/tol in thousands)."""
    command = [sys.executable, "-m", "kvbench", "evaluate", "--config", "tiny", "--device", "cpu", "--expected",
               "configs/reference-expected.safetensors"]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert piped.returncode == 1, piped.stderr
    assert "argmax" in piped.stdout and "…" not in piped.stdout, piped.stdout
    narrow = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**env, "COLUMNS": "80"})
    assert "…" in narrow.stdout  # the table is wider than 80: what the piped run would have cut


def test_a_reader_that_goes_away_ends_kvbench_as_sigpipe_would():
    """`kvbench ... | head`: a closed pipe ends the command quietly with 141 (128 + SIGPIPE), not rich's 1,
    which kvbench uses for a failed verification."""
    process = subprocess.Popen([sys.executable, "-m", "kvbench", "--version"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()  # no reader: the first write fails
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


def test_a_closed_pipe_under_format_csv_exits_as_sigpipe_too(tmp_path):
    """--format csv|json|md writes the frame itself, not through rich: the same 141."""
    runs = REPO / "results" / "20261123-043050-default-cpu"
    process = subprocess.Popen([sys.executable, "-m", "kvbench", "compare", str(runs), str(runs), "--format", "csv"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()
    assert process.wait(timeout=120) == 141


def test_ctrl_c_while_kvbench_starts_is_one_line_not_a_traceback():
    """SIGINT while torch and the commands load (the first ~2 s): 'interrupted', exit 130."""
    import signal

    child = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "kvbench", "evaluate", "--config", "tiny"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in child.stderr:  # -X importtime: one line per module imported
            if line.rstrip().endswith("torch._C"):  # torch is loading: about 900 more modules to go
                break
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest, rest


def test_kv_evaluate_fills_the_last_position_as_generate_does(runner, tmp_path):
    """A generation feeds prompt + new - 1 tokens (the last one is never fed back): kv-evaluate refused one
    token short of the config's end, where generate ran."""
    config = str(write_yaml(tmp_path, max_seq_len=24))
    common = ["--config", config, "--prompt-len", "8", "--device", "cpu"]
    fits = runner.invoke(app, ["kv-evaluate", *common, "--new-tokens", "17", "--strategies", "static,dynamic,paged"])
    assert fits.exit_code == 0, fits.output
    assert runner.invoke(app, ["generate", *common[:2], "--prompt-ids", ",".join(["1"] * 8), "--max-new-tokens",
                               "17", "--device", "cpu"]).exit_code == 0
    refused = runner.invoke(app, ["kv-evaluate", *common, "--new-tokens", "18"])
    assert refused.exit_code == 2 and "--prompt-len + --new-tokens - 1" in refused.output, refused.output

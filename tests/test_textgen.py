"""generate, train and visualize: text out, loss down, pictures written."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import CONFIGS, write_yaml
from kvbench.cli import app
from kvbench.tokenizer import ByteTokenizer

TINY = str(CONFIGS / "tiny.yaml")


def generated_text(result) -> str:
    return result.stdout.rstrip("\n")  # stdout holds only the streamed text; the summary goes to stderr


def test_generate_streams_text_and_a_summary(runner):
    result = runner.invoke(app, ["generate", "--config", TINY, "--prompt", "def f(x):", "--max-new-tokens", "20",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "20 tokens in" in result.output and "tokens/s" in result.output and "prefill" in result.output
    assert "static cache" in result.output and "MiB" in result.output
    assert result.stdout.startswith("def f(x):")  # the prompt, then its continuation


def test_naive_and_cached_generate_the_same_greedy_text(runner):
    texts = {}
    for strategy in ("naive", "static", "dynamic", "sliding"):
        result = runner.invoke(app, ["generate", "--config", TINY, "--prompt", "import os\n", "--max-new-tokens",
                                     "40", "--strategy", strategy, "--window", "512", "--token-times",
                                     "--device", "cpu"])
        assert result.exit_code == 0, result.output
        texts[strategy] = [line.split("ms", 1)[1] for line in result.output.splitlines() if " ms  " in line]
    assert len(texts["naive"]) == 40
    assert texts["static"] == texts["naive"] == texts["dynamic"] == texts["sliding"]


def test_generate_without_a_tokenizer_takes_and_gives_ids(runner, tmp_path):
    config = str(write_yaml(tmp_path))  # vocabulary 97: no tokenizer
    refused = runner.invoke(app, ["generate", "--config", config, "--prompt", "hello"])
    assert refused.exit_code == 2 and "--prompt-ids" in refused.output, refused.output
    result = runner.invoke(app, ["generate", "--config", config, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ids = generated_text(result).split()
    assert ids[:3] == ["1", "2", "3"]  # the prompt's ids, echoed
    assert len(ids) == 3 + 5 and all(0 <= int(i) < 97 for i in ids)


@pytest.mark.parametrize("strategy", ["static", "paged", "naive"])
def test_generate_rows_is_each_row_as_if_alone(runner, tmp_path, strategy):
    """--prompt-ids rows separated by ';' run as one left-padded batch; each row's greedy continuation is the
    one that row gets alone, whatever the other rows' lengths."""
    config = str(write_yaml(tmp_path))  # vocabulary 97: ids in and out
    rows = ["1,2,3", "4,5,6,7,8,9,10", "11"]

    def continuation(prompt_ids: str) -> dict[str, list[str]]:
        result = runner.invoke(app, ["generate", "--config", config, "--prompt-ids", prompt_ids, "--strategy",
                                     strategy, "--max-new-tokens", "6", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return {line.split(":")[0]: line.split("->")[1].split() for line in result.output.splitlines()
                if line.startswith("row ")}

    batch = continuation(";".join(rows))
    assert list(batch) == ["row 0 (3 prompt tokens)", "row 1 (7 prompt tokens)", "row 2 (1 prompt tokens)"]
    for row, ids in enumerate(rows):
        alone = continuation(f"{ids};{ids}")  # a batch of the row twice: no padding at all
        assert list(batch.values())[row] == list(alone.values())[0], (row, batch, alone)
        assert len(list(batch.values())[row]) == 6


def test_generate_rows_refuse_interactive(runner, tmp_path):
    result = runner.invoke(app, ["generate", "--config", str(write_yaml(tmp_path)), "--prompt-ids", "1,2;3",
                                 "--interactive"])
    assert result.exit_code == 2 and "--interactive takes one prompt at a time" in result.output, result.output


def test_generate_uses_a_checkpoints_tokenizer_json(runner, tmp_path):
    transformers = __import__("pytest").importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[UNK]", "the", "cache", "is", "exact", "fast", "and"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=7,
                                                         n_positions=32)).save_pretrained(tmp_path)
    result = runner.invoke(app, ["generate", "--config", str(tmp_path), "--prompt", "the cache is",
                                 "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tokenizer: tokenizer.json (7 tokens)" in result.output


def test_interactive_resets_the_cache_between_prompts(runner):
    result = runner.invoke(app, ["generate", "--config", TINY, "--interactive", "--max-new-tokens", "12",
                                 "--device", "cpu"], input="print(\nprint(\n\n")
    assert result.exit_code == 0, result.output
    answers = [line for line in result.output.splitlines() if line.startswith("prompt> ") and len(line) > 8]
    assert len(answers) == 2 and answers[0] == answers[1]  # same prompt, fresh cache: same text


def test_ctrl_c_stops_the_answer_not_the_session(runner, monkeypatch):
    import kvbench.textgen as textgen

    real, calls = textgen.generation_steps, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        for i, step in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 3:
                raise KeyboardInterrupt  # as Ctrl-C during the first answer
            yield step

    monkeypatch.setattr(textgen, "generation_steps", interrupted_once)
    result = runner.invoke(app, ["generate", "--config", TINY, "--interactive", "--max-new-tokens", "12",
                                 "--device", "cpu"], input="print(\nprint(\n\n")
    assert result.exit_code == 0, result.output
    assert "stopped; next prompt" in result.stderr
    assert "3 tokens in" in result.stderr and "12 tokens in" in result.stderr  # the stopped answer, then the next


@pytest.mark.slow
def test_interactive_prompt_has_line_editing():
    """In a terminal, the left arrow moves the cursor: 'abc', left, 'X' is the 4-byte prompt 'abXc'."""
    import os
    import pty
    import re
    import select
    import subprocess
    import sys
    import time

    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "kvbench", "generate", "--config", TINY, "--interactive",
                              "--max-new-tokens", "2", "--device", "cpu"], stdin=terminal, stdout=terminal,
                             stderr=terminal, env={**os.environ, "TERM": "xterm"}, close_fds=True)
    os.close(terminal)
    seen, typed = b"", False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if select.select([controller], [], [], 0.1)[0]:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
            if not typed and b"prompt> " in seen:
                os.write(controller, b"abc\x1b[DX\r")
                typed = True
            if typed and re.search(rb"for \d+ prompt tokens", seen) and seen.count(b"prompt> ") >= 2:
                os.write(controller, b"\x04")  # Ctrl-D at the next prompt ends the session
                break
        child.wait(timeout=30)
    finally:
        child.kill()
        os.close(controller)
    assert child.returncode == 0, seen
    assert re.search(rb"for 4 prompt tokens", seen), seen


def test_generate_refuses_too_long_a_generation(runner):
    result = runner.invoke(app, ["generate", "--config", TINY, "--prompt", "x", "--max-new-tokens", "5000"])
    assert result.exit_code == 2 and "max_seq_len 1280" in result.output, result.output


def test_byte_tokenizer_streams_multibyte_characters():
    tokenizer = ByteTokenizer()
    feed = tokenizer.decoder()
    pieces = [feed(b) for b in "é→x".encode()]
    assert "".join(pieces) == "é→x" and pieces[0] == ""  # é's first byte completes nothing yet


def test_train_lowers_the_loss_and_saves(runner, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    out = tmp_path / "not" / "yet" / "w.safetensors"  # parent directories are created
    config = write_yaml(tmp_path, vocab_size=256, max_seq_len=64)
    result = runner.invoke(app, ["train", "--config", str(config), "--corpus", str(corpus), "--steps", "40",
                                 "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    before, after = result.output.split("held-out loss ")[1].split(" nats")[0].split(" -> ")
    assert float(after) < float(before) - 1.0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["trained_by"] == "kvbench train" and f.metadata()["steps"] == "40"
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # as any new file (safetensors alone writes 0600)
    again = runner.invoke(app, ["train", "--config", str(config), "--corpus", str(corpus), "--seq-len", "32",
                                "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def interrupted_training(runner, tmp_path, monkeypatch, fake_train):
    """Run `kvbench train` with its training loop replaced by `fake_train` (which raises KeyboardInterrupt)."""
    import kvbench.train

    monkeypatch.setattr(kvbench.train, "train", fake_train)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc " * 1000)
    out = tmp_path / "w.safetensors"
    result = runner.invoke(app, ["train", "--config", str(write_yaml(tmp_path, vocab_size=256)), "--corpus",
                                 str(corpus), "--seq-len", "16", "--out", str(out)])
    return result, out


def test_interrupted_training_keeps_its_weights(runner, tmp_path, monkeypatch):
    def interrupted(model, corpus, settings, on_step):
        on_step(0, 5.0, 1e-3)
        raise KeyboardInterrupt

    result, out = interrupted_training(runner, tmp_path, monkeypatch, interrupted)
    assert result.exit_code == 130 and out.exists(), result.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["interrupted"] == "true"


def umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def no_training(monkeypatch):
    import kvbench.train

    def forbidden(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(kvbench.train, "train", forbidden)
    monkeypatch.setattr(kvbench.train, "read_corpus", forbidden)


def diverging_training(runner, tmp_path, save_every: int):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    out = tmp_path / "w.safetensors"
    config = write_yaml(tmp_path, vocab_size=256, max_seq_len=32)
    result = runner.invoke(app, ["train", "--config", str(config), "--corpus", str(corpus), "--steps", "20",
                                 "--batch-size", "2", "--seq-len", "16", "--lr", "1e12", "--save-every",
                                 str(save_every), "--out", str(out)])
    return result, out


def test_training_that_diverges_stops_and_saves_no_nan(runner, tmp_path):
    result, out = diverging_training(runner, tmp_path, save_every=1)
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.output and "lower --lr" in result.output
    assert "Traceback" not in result.output
    if out.exists():  # the periodic saves before it diverged hold finite weights; nothing after
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(out).values())


def test_training_that_diverges_before_any_save_writes_nothing(runner, tmp_path):
    result, out = diverging_training(runner, tmp_path, save_every=1000)
    assert result.exit_code == 2 and not out.exists(), result.output


def test_interrupted_training_does_not_save_nan_weights(runner, tmp_path, monkeypatch):
    def interrupted_mid_update(model, corpus, settings, on_step):
        model.ln_f.weight.data[0] = float("nan")  # Ctrl-C landed inside a diverging optimizer step
        raise KeyboardInterrupt

    result, out = interrupted_training(runner, tmp_path, monkeypatch, interrupted_mid_update)
    assert result.exit_code == 130 and not out.exists(), result.output
    assert "not saved" in result.output and "ln_f.weight" in result.output


def test_train_refuses_a_non_byte_vocabulary_before_reading_the_corpus(runner, tmp_path, monkeypatch):
    no_training(monkeypatch)
    result = runner.invoke(app, ["train", "--config", str(write_yaml(tmp_path)), "--out", str(tmp_path / "w.st")])
    assert result.exit_code == 2 and "vocab_size must be 256 (got 97); give --config demo" in result.output, \
        result.output


def test_train_checks_it_can_write_before_it_trains(runner, tmp_path, monkeypatch):
    no_training(monkeypatch)
    (tmp_path / "plain").write_text("a file")
    result = runner.invoke(app, ["train", "--config", str(write_yaml(tmp_path, vocab_size=256)), "--seq-len", "16",
                                 "--out", str(tmp_path / "plain" / "w.safetensors")])
    assert result.exit_code == 2 and "is a file, not a directory" in result.output, result.output


def test_visualize_out_naming_a_file_is_one_line(runner, tmp_path):
    target = tmp_path / "picture.png"
    target.write_text("not a directory")
    result = runner.invoke(app, ["visualize", "--config", TINY, "--prompt", "x", "--out", str(target)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip() == f"error: --out {target} is a file; give a directory (it is created)"


def test_visualize_writes_its_pictures(runner, tmp_path):
    result = runner.invoke(app, ["visualize", "--config", TINY, "--prompt", "for i in range(3):", "--out",
                                 str(tmp_path), "--new-tokens", "30", "--window", "20"])
    assert result.exit_code == 0, result.output
    for name in ("attention.png", "cache_growth.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    import pandas as pd

    growth = pd.read_csv(tmp_path / "cache_growth.csv")
    sliding = growth[growth["strategy"] == "sliding"]
    assert sliding["filled"].max() == 20 * 2 * 2 * 64 * 4  # capped at the window: 20 tokens of K and V
    dynamic = growth[growth["strategy"] == "dynamic"]
    assert dynamic["allocated"].is_monotonic_increasing and dynamic["allocated"].iloc[-1] > sliding["allocated"].max()
    again = ["visualize", "--config", TINY, "--prompt", "x", "--out", str(tmp_path), "--new-tokens", "3"]
    before = (tmp_path / "attention.png").read_bytes()
    refused = runner.invoke(app, again)  # the pictures of the first run are not lost to a second
    assert refused.exit_code == 2, refused.output
    assert f"--out {tmp_path / 'attention.png'} exists; pass --force to overwrite it" in refused.output
    assert (tmp_path / "attention.png").read_bytes() == before
    assert runner.invoke(app, [*again, "--force"]).exit_code == 0
    assert (tmp_path / "attention.png").read_bytes() != before


def test_attention_maps_are_causal_distributions():
    from kvbench.config import load_config
    from kvbench.visualize import attention_maps
    from kvbench.weights import build_model

    model = build_model(load_config(TINY))
    maps = attention_maps(model, torch.tensor([list(b"hello world")]))
    assert len(maps) == 2 and maps[0].shape == (4, 11, 11)
    for layer in maps:
        torch.testing.assert_close(layer.sum(-1), torch.ones(4, 11))
        assert (layer.triu(1) == 0).all()  # nothing attends to the future


def test_shipped_demo_model_passes_kv_evaluate(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "demo.yaml"), "--new-tokens", "200",
                                 "--strategies", "static,dynamic,sliding,quantized", "--window", "64",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_shipped_demo_model_writes_python(runner):
    result = runner.invoke(app, ["generate", "--config", str(CONFIGS / "demo.yaml"), "--prompt", "def ",
                                 "--max-new-tokens", "120", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = generated_text(result)
    assert "self" in text and "(" in text, text  # trained on the standard library: it writes methods

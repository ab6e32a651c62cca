"""Rows that stop at different steps, and what each cache allocates against what its tokens need."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from conftest import CONFIGS, random_model, verdicts, write_yaml
from kvbench import strategies
from kvbench.cache import PagedCache
from kvbench.cli import app
from kvbench.generate import RowStops, cache_tokens, generate, left_pad, new_cache

TINY = str(CONFIGS / "tiny.yaml")


def rows(*lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("strategy", ["static", "dynamic", "sliding", "quantized", "paged"])
def test_each_row_stops_at_its_own_step_and_is_what_it_is_alone(strategy):
    model = random_model(3, positional="rope", n_kv_heads=2)
    prompts = rows(5, 17, 11)
    ids, pads = left_pad(prompts)
    window = 8 if strategy == "sliding" else None
    batch = generate(model, ids, 30, strategy, keep_logits=True, window=window, pads=pads,
                     stops=RowStops((30, 4, 19)))
    assert batch.lengths == [30, 4, 19] and batch.tokens.shape == (3, 30)
    for r, prompt in enumerate(prompts):
        n = batch.lengths[r]
        alone = generate(model, prompt[None], n, "naive", keep_logits=True, visibility=window)
        torch.testing.assert_close(batch.logits[r, :n], alone.logits[0], atol=2e-4, rtol=1e-4)
        if strategy != "quantized":  # int8 may flip a near-tie; its logits are held to the tolerance above
            assert torch.equal(batch.tokens[r, :n], alone.tokens[0])


@pytest.mark.parametrize("strategy", ["static", "paged"])
def test_a_row_does_not_depend_on_when_the_other_rows_stop(strategy):
    model = random_model(2)
    ids, pads = left_pad(rows(9, 20))
    outputs = [generate(model, ids, 40, strategy, keep_logits=True, pads=pads, stops=RowStops((stop, 40))).logits[1]
               for stop in (2, 17, 40)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)


def test_generation_ends_when_the_last_row_stops():
    model = random_model(2)
    batch = generate(model, torch.stack(rows(6, 6)), 50, "static", stops=RowStops((3, 7)))
    assert batch.tokens.shape == (2, 7) and batch.lengths == [3, 7]


def test_a_row_stops_after_it_emits_the_eos_id():
    model = random_model(2)
    ids = torch.stack(rows(6, 6, seed=3))
    free = generate(model, ids, 12, "static")
    eos = int(free.tokens[0, 4])  # row 0 emits it at its 5th token (or earlier, if it repeats)
    first = free.tokens[0].tolist().index(eos) + 1
    stopped = generate(model, ids, 12, "paged", stops=RowStops(eos_id=eos))
    assert stopped.lengths[0] == first
    assert torch.equal(stopped.tokens[:, :first], free.tokens[:, :first])


def test_a_finished_row_returns_its_blocks_and_the_next_block_taken_is_one_of_them():
    model = random_model(2)
    ids, pads = left_pad(rows(5, 12))
    cache = new_cache(model, "paged", batch=2, max_len=12 + 40)
    released = []
    release = cache.release
    cache.release = lambda row: (released.append((row, list(cache.tables[row]))), release(row))
    generate(model, ids, 40, "paged", cache=cache, pads=pads, stops=RowStops((3, 40)))
    (row, blocks), = [(r, b) for r, b in released if b]  # reset() releases empty rows first; then row 0 alone,
    # when its 3rd token was chosen (row 1 ends the generation: it keeps its blocks until the next reset)
    assert row == 0 and blocks and cache.tables[0] == []
    # row 1 grows from 12 to 51 tokens (4 blocks): past its first block it takes row 0's freed one first
    assert cache.tables[1][1] == blocks[0] and len(cache.tables[1]) == 4
    assert cache.k[0].shape[0] == 4  # the pool grew for row 1's last two blocks only, not for a third row's worth


def test_memory_figures_by_hand_for_static_and_paged():
    """Default-like tiny model: 2 layers x 4 heads x 8 dims x float32: a token takes 2 x 2 x 4 x 8 x 4 = 512 B."""
    model = random_model(0)
    prompts, stops = rows(5, 17, 40), RowStops((30, 12, 20))
    ids, pads = left_pad(prompts)
    held = [cache_tokens(5, 30), cache_tokens(17, 12), cache_tokens(40, 20)]  # 34, 28, 59 tokens
    live = 512 * (34 + 28 + 59)
    static = new_cache(model, "static", 3, cache_tokens(40, 30))  # every row: 40 + 30 - 1 = 69 slots
    generate(model, ids, 30, "static", cache=static, pads=pads, stops=stops)
    use = static.memory_use(held)
    assert (use.allocated, use.live) == (3 * 69 * 512, live)
    assert use.waste == pytest.approx(1 - 121 / 207)
    paged = new_cache(model, "paged", 3, cache_tokens(40, 30))
    generate(model, ids, 30, "paged", cache=paged, pads=pads, stops=stops)
    use = paged.memory_use(held)
    blocks = 3 + 2 + 4  # 34, 28 and 59 tokens in whole 16-token blocks
    assert (use.allocated, use.live) == (blocks * 16 * 512, live)
    assert use.waste == pytest.approx(1 - 121 / 144)


class ReleasesTheNextRow(PagedCache):
    """An off-by-one in release(): the row after the finished one loses its blocks and stops storing."""

    def release(self, row):
        super().release((row + 1) % self.batch)


def test_kv_evaluate_checks_rows_that_stop_and_catches_a_wrong_release(register_strategy, runner,
                                                                                    tmp_path):
    register_strategy(dataclasses.replace(
        strategies.PAGED, name="wrong-release",
        cache=lambda s: ReleasesTheNextRow(s.n_layers, s.batch, s.n_heads, s.head_dim, s.dtype, s.device, 16,
                                                 s.batch)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--prompt-lens", "5,17,40",
                                 "--new-tokens-per-row", "60,12,50", "--strategies", "static,dynamic,paged,wrong-release",
                                 "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"static": "pass", "dynamic": "pass", "paged": "pass", "wrong-release": "FAIL"}, \
        result.output
    assert "rows stopping after 60/12/50 tokens" in result.output


def test_kv_evaluate_with_an_eos_id(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, "--batch-size", "3", "--new-tokens", "30",
                                 "--eos-id", "7", "--strategies", "naive,paged", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "rows stopping at EOS id 7" in result.output


@pytest.mark.parametrize("args, needle", [
    (["kv-evaluate", "--prompt-lens", "5,17", "--new-tokens-per-row", "3,4,5"], "--new-tokens-per-row: 3 values"),
    (["kv-evaluate", "--prompt-lens", "5,17", "--batch-size", "2"], "drop --batch-size"),
    (["kv-evaluate", "--new-tokens-per-row", "5,17", "--new-tokens", "9"], "drop --new-tokens"),
    (["kv-evaluate", "--new-tokens-per-row", "5,-1"], "--new-tokens-per-row: '5,-1' must be positive integers"),
    (["kv-evaluate", "--eos-id", "100000"], "--eos-id 100000 is not a token id"),
    (["benchmark", "--prompt-lens", "5,17", "--batch-size", "2"], "drop --batch-size"),
    (["benchmark", "--new-tokens-per-row", "5,17", "--lengths", "9"], "drop --lengths"),
    (["benchmark", "--prompt-lens", "5,x"], "--prompt-lens: '5,x' must be positive integers"),
    (["evaluate", "--prompt-lens", "5,17", "--batch-size", "2"], "drop --batch-size"),
])
def test_bad_row_options_are_one_line(runner, tmp_path, args, needle):
    result = runner.invoke(app, [*args, "--config", TINY, "--device", "cpu"]
                           + (["--out", str(tmp_path / "x")] if args[0] == "benchmark" else []))
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_evaluate_prompt_lens_checks_each_row_against_the_reference_alone(runner):
    result = runner.invoke(app, ["evaluate", "--config", TINY, "--prompt-lens", "3,9", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "row 0 (3 tokens)" in result.output and "row 1 (9 tokens)" in result.output


def test_benchmark_on_a_ragged_batch_reports_allocated_live_and_waste(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--prompt-lens", "5,17,40", "--new-tokens-per-row",
                                 "8,3,6", "--strategies", "naive,static,paged", "--repeats", "1", "--warmup", "0",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "results.csv").set_index("strategy")
    token = 2 * 2 * 4 * 16 * 4  # tiny: 2 layers x 4 heads x 16 dims, float32, K and V
    held = [5 + 7, 17 + 2, 40 + 5]  # 12, 19, 45 tokens
    assert runs.loc["static", "kv_allocated_bytes"] == 3 * (40 + 8 - 1) * token
    assert runs.loc["paged", "kv_allocated_bytes"] == (1 + 2 + 3) * 16 * token
    assert (runs.loc[["static", "paged"], "kv_live_bytes"] == sum(held) * token).all()
    assert runs.loc["paged", "kv_waste"] == pytest.approx(1 - 76 / 96)
    assert runs.loc["naive", "kv_allocated_bytes"] == 0 and pd.isna(runs.loc["naive", "kv_waste"])
    assert runs.loc["static", "tokens_per_s"] == pytest.approx((8 + 3 + 6) / runs.loc["static", "total_s"])
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert summary.loc["paged", "kv_waste"] == pytest.approx(1 - 76 / 96)
    assert "kv_waste" in (out / "columns.md").read_text()
    assert "waste" in result.output and "20.8%" in result.output  # paged's waste in the memory table

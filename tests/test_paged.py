"""The paged cache: blocks from a shared pool, taken on demand, returned when a sequence finishes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_model, verdicts, write_yaml
from kvbench import strategies
from kvbench.cache import PagedCache
from kvbench.cli import app
from kvbench.generate import generate, left_pad, new_cache


def rows(*lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("prompt_len", [15, 16, 17])  # the last token of a block, the first of the next, one past
def test_paged_matches_naive_across_block_boundaries(prompt_len):
    model = random_model(2, positional="rope", n_kv_heads=2)
    ids = torch.stack(rows(prompt_len, prompt_len))  # (2, P)
    naive = generate(model, ids, 20, "naive", keep_logits=True)  # decoding crosses 32 as well
    paged = generate(model, ids, 20, "paged", keep_logits=True)
    torch.testing.assert_close(paged.logits, naive.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(paged.tokens, naive.tokens)


def test_memory_follows_each_sequence_in_whole_blocks():
    model = random_model(0)  # 2 layers, 4 heads of 8, float32: a 16-token block of K and V is 8 KiB
    prompts = rows(5, 17, 40)
    ids, pads = left_pad(prompts)
    cache = new_cache(model, "paged", batch=3, max_len=40 + 10)
    generate(model, ids, 10, "paged", cache=cache, pads=pads)
    block = 2 * 2 * 16 * 4 * 8 * 4  # K and V x layers x tokens x heads x head_dim x bytes
    assert cache.block_bytes == block
    # each row holds its prompt + 9 fed-back tokens, padding none: 14, 26, 49 tokens -> 1 + 2 + 4 blocks
    assert cache.held_bytes == 7 * block
    static = new_cache(model, "static", batch=3, max_len=49)
    assert static.nbytes == 3 * 49 * block // 16  # every row sized for the longest


def test_a_finished_sequence_returns_its_blocks_and_the_next_takes_them():
    cache = PagedCache(n_layers=1, batch=2, n_heads=1, head_dim=4, dtype=torch.float32, device="cpu",
                       block_size=4, blocks=4)
    cache.begin(0, 8)  # both rows take 2 blocks: the pool of 4 is used up
    assert not cache.free and cache.tables == [[0, 1], [2, 3]]
    cache.release(0)
    assert sorted(cache.free) == [0, 1] and cache.held_bytes == 2 * cache.block_bytes
    cache.begin(8, 4)  # row 1 grows by a block: one of row 0's, no new allocation; row 0 takes none
    assert cache.k[0].shape[0] == 4 and cache.tables[0] == [] and cache.tables[1][:2] == [2, 3]
    assert cache.tables[1][2] in (0, 1) and len(cache.free) == 1
    cache.begin(12, 8)  # row 1 needs 2 more: one free, then the pool doubles
    assert cache.k[0].shape[0] == 8 and len(cache.tables[1]) == 5


class WrongTableCache(PagedCache):
    """Reads a sequence's second block where its first should be: a wrong block-table entry."""

    def _table_tensor(self):
        table = super()._table_tensor().clone()  # the cache's own is shared by every layer of the pass
        if table.shape[1] > 1:
            table[:, 0] = table[:, 1]
        return table


def test_kv_evaluate_catches_a_wrong_block_table_entry(register_strategy, runner, tmp_path):
    register_strategy(dataclasses.replace(
        strategies.PAGED, name="wrong-table",
        cache=lambda s: WrongTableCache(s.n_layers, s.batch, s.n_heads, s.head_dim, s.dtype, s.device, 16, s.batch)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies",
                                 "paged,wrong-table", "--new-tokens", "24", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"paged": "pass", "wrong-table": "FAIL"}, result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_paged_decode_step_never_makes_the_host_wait_for_the_gpu():
    """Block tables and write slots are worked out on the host and sent in one non-blocking copy: a step that
    synchronised (torch.tensor(list, device=cuda), nonzero(), .tolist() of the pads) would raise here."""
    cache = PagedCache(2, 3, 4, 8, torch.float32, "cuda", block_size=4)
    pads = torch.tensor([0, 2, 5], device="cuda")
    k = torch.randn(3, 4, 6, 8, device="cuda")  # (B, H, T, hd): a ragged prefill, read back once
    cache.begin(0, 6, pads), cache.update(0, 0, k, k), cache.update(1, 0, k, k), cache.end()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pos in range(6, 14):  # decode steps, across block boundaries (new blocks taken)
            new = torch.randn(3, 4, 1, 8, device="cuda")
            cache.begin(pos, 1, pads)
            for layer in range(2):
                cache.update(layer, pos, new, new)
            cache.mask(pos, 1), cache.end()
    finally:
        torch.cuda.set_sync_debug_mode("default")

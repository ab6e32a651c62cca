"""What a decode step must read and compute, against hand-counted values."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from kvbench.bench import floor
from kvbench.config import Seq2SeqConfig
from kvbench.seq2seq import Seq2Seq


def test_weight_bytes_by_hand():
    # TINY in conftest: 2 layers, d 32, d_ff 64, vocab 97, 128 learned positions, tied, with biases
    model = random_model(0)
    d, f, v = 32, 64, 97
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)  # qkv, proj, mlp, 2 LNs
    lm_head_and_final_norm = d * v + 2 * d
    one_position_row = d
    assert floor.weight_bytes_per_step(model, batch=1) == 4 * (2 * per_layer + lm_head_and_final_norm
                                                               + one_position_row)


def test_untied_embedding_reads_one_row_per_sequence():
    tied, untied = random_model(0), random_model(0, tie_embeddings=False)
    assert floor.weight_bytes_per_step(untied, 3) - floor.weight_bytes_per_step(tied, 3) == 4 * 3 * 32


def test_kv_bytes_and_flops_by_hand():
    model = random_model(0)
    assert floor.kv_bytes_read(model, 10, batch=2) == 2 * 2 * 32 * 10 * 2 * 4  # K,V x layers x d x tokens x B x 4
    matrices = 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32)
    assert floor.matmul_weights(model) == matrices
    assert floor.cached_step_flops(model, 10, 1) == 2 * matrices + 2 * 32 * 97 + 4 * 2 * 32 * 10
    # naive at 10 tokens: the blocks run 10 rows, attention over 10*11/2 query-key pairs, LM head once
    assert floor.naive_step_flops(model, 10, 1) == 2 * matrices * 10 + 4 * 2 * 32 * 55 + 2 * 32 * 97


def test_every_probe_is_recorded_and_the_floor_takes_the_best():
    limits = floor.measure_limits(torch.device("cpu"), step_bytes=1000, dtype=torch.float32, batches=[1, 4],
                                  repeats=2)
    kernels = {p["kernel"] for p in limits.bandwidth}
    expected = {"sum", "copy", "x @ W, W (in, out)", "F.linear, W (out, in)", "torch.mv, W (out, in)"}
    if torch.backends.mkldnn.is_available():
        expected.add("oneDNN matmul, W packed")  # the kernel kvbench's float32 CPU decode runs
    assert kernels == expected
    assert all(p["buffer_bytes"] >= floor.BANDWIDTH_MIN_BYTES and p["gbs"] > 0 for p in limits.bandwidth)
    assert limits.best_gbs(1000) == max(p["gbs"] for p in limits.bandwidth)
    assert set(limits.matmul_by_rows) == {1, 4} and min(limits.matmul_by_rows.values()) > 0
    assert limits.matmul_gflops > 0


def limits_by_hand() -> floor.MachineLimits:
    probes = [{"buffer_bytes": 100 * 2**20, "kernel": "sum", "gbs": 20.0},
              {"buffer_bytes": 100 * 2**20, "kernel": "x @ W, W (in, out)", "gbs": 40.0},
              {"buffer_bytes": 1000 * 2**20, "kernel": "sum", "gbs": 10.0}]
    return floor.MachineLimits(probes, {1: 50.0, 16: 400.0}, 500.0)


def test_floor_is_the_slower_of_reading_and_computing():
    limits = limits_by_hand()
    # 80 MB near the 100 MiB probes (best 40 GB/s): 2 ms; 0.02 GFLOP at batch 1 (50 GFLOP/s): 0.4 ms
    assert limits.floor(80e6, 0.02e9, 1) == (pytest.approx(2.0), "memory")
    # the same bytes at batch 16 with 1.6 GFLOP at 400 GFLOP/s: 4 ms, compute-bound
    assert limits.floor(80e6, 1.6e9, 16) == (pytest.approx(4.0), "compute")
    # 900 MB is nearest the 1000 MiB probe: 10 GB/s there, whatever the smaller buffer read at
    assert limits.floor(900e6, 0.0, 1) == (pytest.approx(90.0), "memory")


def test_limits_survive_meta_json_and_old_directories():
    import json

    limits = limits_by_hand()
    again = floor.MachineLimits.from_dict(json.loads(json.dumps(limits.to_dict())))  # int keys become strings
    assert again.floor(80e6, 1.6e9, 16) == limits.floor(80e6, 1.6e9, 16)
    old = floor.MachineLimits.from_dict({"bandwidth_bytes": 2**27, "bandwidth_gbs": {"sum": 30.0,
                                         "matrix_vector": 33.0}, "best_bandwidth_gbs": 33.0, "matmul_gflops": 300})
    assert old.floor(33e6, 1e12, 1) == (pytest.approx(1.0), "memory")  # bytes only, as those runs' floor was


def test_gqa_reads_only_the_kv_heads():
    model = random_model(0, n_kv_heads=2)  # 4 query heads share 2 K/V heads of 8 features
    assert floor.kv_bytes_read(model, 10, batch=1) == 2 * 2 * 2 * 8 * 10 * 4
    assert floor.attention_flops(model.config, 10) == 2 * 2 * 2 * 4 * 8 * 10  # every query head still attends


def test_encoder_decoder_step_reads_the_decoder_and_the_cached_source_only():
    """The encoder runs once per generation and the cross-attention K/V projection's output is cached: a
    decode step reads neither, but reads the cached K/V of every source position."""
    config = Seq2SeqConfig(family="encoder-decoder", n_encoder_layers=2, n_decoder_layers=1, d_model=16, n_heads=2,
                           d_ff=32, src_vocab_size=11, tgt_vocab_size=13, max_seq_len=20)
    model = Seq2Seq(config).bind(torch.zeros(3, 5, dtype=torch.long))  # batch 3, source 5
    d, f, v = 16, 32, 13
    norms = 3 * 2 * d  # three LayerNorms (gain and bias) per decoder block
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * d + d) + (d * d + d) + (d * f + f) + (f * d + d) + norms
    #        self qkv            self proj       cross q         cross proj      mlp fc          mlp proj
    head_and_norm, position_row, cached_cross_kv = d * v + 2 * d, d, 2 * 1 * 5 * d * 3
    assert floor.weight_bytes_per_step(model, 3) == 4 * (block + head_and_norm + position_row + cached_cross_kv)
    assert floor.matmul_weights(model) == d * 3 * d + d * d + d * d + d * d + d * f + f * d


def test_probes_keep_the_fastest_call_not_the_median(monkeypatch):
    """A probe is the machine's limit: one disturbed call among fast ones must not lower it (a median of
    five once halved the batch-16 throughput probe, and the step ran "below" its floor)."""
    import torch

    from kvbench.bench import floor

    monkeypatch.setattr(floor, "wall_times", lambda fn, device, repeats: [0.004, 0.001, 0.004, 0.004, 0.002])
    assert floor._best_time(lambda: None, torch.device("cpu"), 5) == 0.001
    probe = floor.measure_bandwidth(torch.device("cpu"), 4 * 768 * 1000, 5)[0]  # at least BANDWIDTH_MIN_BYTES
    assert probe["gbs"] == round(probe["buffer_bytes"] / 0.001 / 1e9, 2)


def test_gpu_probes_time_blocks_of_calls_over_buffers_past_l2():
    """On a GPU one probe call lasts about as long as the launch and sync around it: a timing is a block of
    calls filling GPU_BLOCK_SECONDS, and a buffer is four L2 caches at least (50 MB on H100), read from HBM."""
    assert floor.block_calls(40e-6) == 50  # a 210 MB read at ~5 TB/s: 50 calls fill 2 ms
    assert floor.block_calls(0.02) == 1  # a long call is timed alone
    assert floor.block_calls(1e-7) == floor.GPU_BLOCK_MAX_CALLS
    assert floor.gpu_probe_bytes(50 * 2**20) == 200 * 2**20
    assert floor.gpu_probe_bytes(0) == floor.BANDWIDTH_MIN_BYTES  # L2 size unknown to this torch
    assert floor.min_probe_bytes(torch.device("cpu")) == floor.BANDWIDTH_MIN_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_floor_is_hbm_and_the_chips_peak():
    """H100/H200: HBM at 3.35/4.8 TB/s; reads served by L2 would show far more. Every batch's arithmetic
    limit is the dense peak, so a batch-1 decode step of the default model is memory-bound."""
    device = torch.device("cuda")
    limits = floor.measure_limits(device, step_bytes=210e6, dtype=torch.float32, batches=[1, 64], repeats=3)
    assert 1000 < limits.best_bandwidth_gbs < 6000, limits.bandwidth
    assert limits.matmul_by_rows == {1: limits.matmul_gflops, 64: limits.matmul_gflops}
    assert limits.floor(210e6, 1.05e8, 1)[1] == "memory"

"""What every column of a results directory's CSVs means: written beside them as columns.md."""

from __future__ import annotations

from pathlib import Path

RUNS = {  # results.csv: one row per timed run
    "config": "config name (the YAML file's stem, or the checkpoint directory's name)",
    "strategy": "cache strategy: naive (no cache), static, dynamic, sliding, quantized, static+compile; an "
                "encoder-decoder's +self-only caches self-attention only",
    "device": "cpu or cuda",
    "device_name": "CPU model or GPU name",
    "dtype": "float32, bfloat16 or float16",
    "threads": "torch's CPU threads during the run",
    "batch_size": "sequences generated at once (--batch-size: a sweep axis; or the number of --prompt-lens / "
                  "--new-tokens-per-row)",
    "prompt_len": "prompt tokens per sequence (random ids, seeded); with --prompt-lens the longest row's (each "
                  "row's length is in meta.json's settings)",
    "new_tokens": "tokens generated per sequence: the sweep point's length; with --new-tokens-per-row the "
                  "largest (the run ends when its last row stops)",
    "repeat": "0-based repeat index of this point (repeats are interleaved across strategies)",
    "total_s": "seconds for the whole generation: prefill_s + decode_s",
    "prefill_s": "seconds of the prompt's forward pass, which yields the first new token",
    "decode_s": "seconds of the new_tokens - 1 decode steps together",
    "per_token_ms": "1000 x decode_s / (new_tokens - 1): milliseconds per decode step (empty for 1 token)",
    "tokens_per_s": "tokens generated (every row's own, up to its stop) / total_s",
    "kv_cache_bytes": "bytes the cache had allocated at the end of the run (0 for naive)",
    "kv_cache_formula_bytes": "bytes the README's formula gives for the tokens held at the end",
    "kv_allocated_bytes": "bytes the cache set aside for the batch's sequences, as the cache reports it: static "
                          "and quantized preallocate batch x the longest row; dynamic grows every row to the "
                          "widest (left padding included); sliding its ring per row; paged the whole 16-token "
                          "blocks each sequence held at its largest (the pool, kv_cache_bytes, may hold free "
                          "blocks besides). 0 for naive; empty for a plugin that does not say",
    "kv_live_bytes": "bytes holding the sequences' own tokens: per row, its prompt (no padding) plus the new "
                     "tokens fed back up to its own stop (sliding: at most its window) x the bytes a token takes",
    "kv_waste": "(kv_allocated_bytes - kv_live_bytes) / kv_allocated_bytes: the share of the cache's allocation "
                "holding nothing of use (empty for naive)",
    "peak_mem_bytes": "CPU: the process's peak resident set size during the run (weights, cache, activations, "
                      "interpreter); CUDA: torch.cuda.max_memory_allocated during the run",
    "mem_growth_bytes": "peak_mem_bytes minus the same measure at the run's start: what the run itself added "
                        "(CPU: resident memory; CUDA: allocated tensors)",
    "weight_bytes": "bytes of weights (and an encoder-decoder's cached source K/V) one decode step reads",
    "kv_bytes": "bytes of full-precision K/V one decode step attends, averaged over the run's steps",
    "floor_ms": "milliseconds a decode step needs at least: max(bytes it must read (weight_bytes + kv_bytes) / "
                "the best read bandwidth probed in the same run, its FLOPs / matmul throughput measured with rows "
                "= batch size in the run's dtype); the same for every strategy at a point",
    "bound": "which term of floor_ms is larger: memory or compute",
    "bandwidth_gbs": "those bytes / the measured per-token time, in GB/s",
    "gflops_per_token": "arithmetic of one decode step (naive: of recomputing the sequence), GFLOP",
    "achieved_gflops": "gflops_per_token / the measured per-token time, GFLOP/s",
    "finished_at": "local time the run finished",
}

STEPS = {  # steps.csv: one row per decode step of each timed run
    "strategy": "as in results.csv",
    "batch_size": "as in results.csv",
    "new_tokens": "as in results.csv",
    "repeat": "as in results.csv",
    "step": "decode step, 1 .. new_tokens - 1 (the prefill is not a step)",
    "position": "position of the token this step feeds: prompt_len + step - 1",
    "step_ms": "milliseconds of this decode step",
}

SUMMARY = {  # summary.csv: one row per strategy, batch and length, over the repeats
    "strategy": "as in results.csv",
    "batch_size": "as in results.csv",
    "new_tokens": "as in results.csv",
    "repeats": "timed runs recorded for this point (0 for a skipped point)",
    "total_s_median": "median of total_s",
    "total_s_iqr": "interquartile range of total_s",
    "prefill_s_median": "median of prefill_s",
    "per_token_ms_median": "median of per_token_ms",
    "per_token_ms_iqr": "interquartile range of per_token_ms",
    "tokens_per_s_median": "median of tokens_per_s",
    "kv_cache_bytes": "largest kv_cache_bytes over the repeats",
    "kv_cache_formula_bytes": "largest kv_cache_formula_bytes over the repeats",
    "kv_allocated_bytes": "largest kv_allocated_bytes over the repeats (the same in each)",
    "kv_live_bytes": "largest kv_live_bytes over the repeats (the same in each)",
    "kv_waste": "(kv_allocated_bytes - kv_live_bytes) / kv_allocated_bytes of this table's columns",
    "peak_mem_bytes_median": "median of peak_mem_bytes",
    "mem_growth_bytes_median": "median of mem_growth_bytes",
    "weight_bytes": "median of weight_bytes",
    "kv_bytes": "median of kv_bytes",
    "floor_ms": "median of floor_ms",
    "bound": "as in results.csv",
    "bandwidth_gbs_median": "median of bandwidth_gbs",
    "gflops_per_token": "median of gflops_per_token",
    "achieved_gflops_median": "median of achieved_gflops",
    "per_token_over_floor": "per_token_ms_median / floor_ms: 1.0 is as fast as memory allows",
    "kv_over_weights": "kv_bytes / weight_bytes: below 1 the weights dominate a step's reads, above 1 the cache",
    "speedup_vs_naive": "naive's total_s_median at this batch and length / this strategy's; empty where naive "
                        "was not measured",
    "noisy": "True when an IQR exceeds 10% of its median: too noisy to trust the point alone",
    "skipped": "empty for a measured point; for a point not run, why (naive past --naive-max): its numbers are "
               "empty",
}

FILES = {"results.csv": RUNS, "steps.csv": STEPS, "summary.csv": SUMMARY}


def columns_markdown() -> str:
    parts = ["# Columns of this results directory\n",
             "Written by kvbench. meta.json holds what ran (settings, config, machine, versions, command lines).\n"]
    for name, columns in FILES.items():
        parts.append(f"\n## {name}\n\n| column | meaning |\n|---|---|\n")
        parts += [f"| `{column}` | {meaning} |\n" for column, meaning in columns.items()]
    return "".join(parts)


def write_columns_doc(path: Path) -> None:
    path.write_text(columns_markdown())

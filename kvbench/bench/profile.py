"""One decode step broken down by operation: each projection, attention, norms, activation, the LM head, and
the rest (embedding, residual adds, interpreter and launch overhead), with time, bytes, FLOPs and achieved rates.

How it is measured, so that the parts add up to the step:
1. the step alone (no hooks), median over `steps` steps: what a benchmark's ms per decode step measures;
2. the same steps with forward hooks on every Linear, norm, attention and MLP module, each hook taking the
   time (device synchronised): a module's own time is its time minus its hooked children's (attention's own
   time is the kernel over the cache, an MLP's is its activation);
3. "rest" = the step's time (1) minus the operations' medians (2). Hooks cost a few microseconds each, which
   the operations absorb; so "rest" is, if anything, understated.
Bytes are what each operation must read (weights, the K/V as the cache stores them); FLOPs are counted from the
shapes each call saw (elementwise operations: an estimate of ~8 per element).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from kvbench.bench.paths import attention_path
from kvbench.bench.timing import synchronize, wall_times
from kvbench.cache import KVCache
from kvbench.generate import decode_one, naive_step, new_cache, prefill
from kvbench.model import IN_OUT, RMSNorm, Linear
from kvbench.strategies import get

ELEMENTWISE_FLOPS = 8  # per element, for norms and activations: an estimate, they are never the bound

COLUMNS = ["operation", "calls", "time_ms", "share", "bytes", "flops", "gb_per_s", "gflop_per_s"]


@dataclass
class Op:
    """One kind of operation over a step: every layer's call added up."""

    name: str
    calls: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    times: list[float] = field(default_factory=list)  # seconds per step


def _kind(module: nn.Module) -> str | None:
    """What a hooked module is: a Linear, a norm, an attention or an MLP (by role, so that an encoder-decoder's
    cross-attention and a gated MLP are recognised alike); None for modules not timed on their own."""
    if isinstance(module, Linear):
        return "linear"
    if isinstance(module, (nn.LayerNorm, RMSNorm)):
        return "norm"
    name = type(module).__name__
    if "Attention" in name:
        return "attention"
    if "MLP" in name:
        return "activation"
    return None


def _op_name(qualified: str, kind: str) -> str:
    """blocks.3.attn.qkv -> attn.qkv: every layer's call of one projection is one row."""
    if kind == "linear":
        parts = [p for p in qualified.split(".") if not p.isdigit() and p != "blocks"]
        return ".".join(parts[-2:])
    return {"norm": "norms", "attention": "attention", "activation": "activation (MLP)"}[kind]


class Recorder:
    """Forward hooks that time every operation of a step, exclusive of hooked children."""

    def __init__(self, model: nn.Module, cache: KVCache | None, device: torch.device):
        self.device, self.cache, self.n_layers = device, cache, model.config.n_layers
        self.counting = False
        self.ops: dict[str, Op] = {}
        self.stack: list[list] = []  # [name, start, children's time]
        self.step: dict[str, float] = {}
        self.handles = []
        for qualified, module in model.named_modules():
            kind = _kind(module)
            if kind is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._leave(_op_name(qualified, kind), kind)))

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _enter(self, module, args):
        self.stack.append([None, self._now(), 0.0])

    def _leave(self, name: str, kind: str):
        def hook(module, args, output):
            end = self._now()
            _, start, children = self.stack.pop()
            total = end - start
            if self.stack:
                self.stack[-1][2] += total
            self.step[name] = self.step.get(name, 0.0) + total - children
            self._count(name, kind, module, args, output)
        return hook

    def _count(self, name: str, kind: str, module, args, output) -> None:
        op = self.ops.setdefault(name, Op(name))
        if not self.counting:
            return
        op.calls += 1
        x = args[0]
        if kind == "linear":
            d_in, d_out = module.weight.shape if module.kernel in IN_OUT else module.weight.shape[::-1]
            rows = x.numel() // d_in
            op.flops += 2 * rows * d_in * d_out
            op.bytes += sum(p.numel() * p.element_size() for p in module.parameters())
        elif kind == "norm":
            op.flops += ELEMENTWISE_FLOPS * x.numel()
            op.bytes += sum(p.numel() * p.element_size() for p in module.parameters())
        elif kind == "activation":  # over the fc output: rows x its features (gate and up for a gated MLP)
            rows, d_in = x.numel() // x.shape[-1], x.shape[-1]
            op.flops += ELEMENTWISE_FLOPS * rows * (module.fc.weight.numel() // d_in)
        elif kind == "attention":
            self._count_attention(op, module, x, args)

    def _count_attention(self, op: Op, module, x: torch.Tensor, args) -> None:
        step = args[1] if len(args) > 1 else None
        B, T = x.shape[0], x.shape[1]
        start = int(getattr(step, "start_pos", 0)) if step is not None else 0
        heads, head_dim = module.n_heads, module.head_dim
        if self.cache is None:  # naive: causal over the sequence itself
            pairs = T * (T + 1) / 2
            op.bytes += 2 * B * getattr(module, "n_kv_heads", heads) * T * head_dim * x.element_size()
        else:
            pairs = T * (start + T)
            op.bytes += self.kv_bytes_per_layer(start + T)
        op.flops += 2 * 2 * B * heads * head_dim * pairs

    def kv_bytes_per_layer(self, visible: int) -> float:
        """K and V as the cache stores them (int8 + scales for quantized; a window's worth for sliding)."""
        return self.cache.expected_bytes(visible) / self.n_layers

    def begin_step(self, counting: bool) -> None:
        self.step, self.counting = {}, counting

    def end_step(self) -> None:
        for name, seconds in self.step.items():
            self.ops[name].times.append(seconds)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Profile:
    table: pd.DataFrame  # COLUMNS, one row per operation, then "rest", then "step"
    step_ms: float
    attention: str  # the attention code path
    settings: dict


def _step_runner(model, strategy: str, batch: int, context: int, steps: int, seed: int):
    """(cache, step, restart): step() runs a cached decode step at position context, context+1, ...;
    restart() refills the cache with the `context`-token prompt, so that every pass sees the same positions.
    For naive, step() recomputes `context` tokens, the same every time."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = model.device
    if not get(strategy).cached:
        ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
        return None, lambda: naive_step(model, ids), lambda: None
    cache = new_cache(model, strategy, batch, context + steps + 1)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    token = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    state = {"pos": context}

    def restart():
        cache.reset()
        prefill(model, prompt, cache)
        state["pos"] = context

    def step():
        decode_one(model, token, cache, state["pos"])
        state["pos"] += 1

    restart()
    return cache, step, restart


@torch.inference_mode()
def profile_step(model, strategy: str, batch: int, context: int, steps: int = 20, seed: int = 0) -> Profile:
    """One decode step of `strategy` at `context` visible tokens, by operation (see the module's docstring)."""
    device = model.device
    cache, step, restart = _step_runner(model, strategy, batch, context, steps + 1, seed)
    for _ in range(3):
        step()  # one-off costs (a compiled kernel's first call, allocator warm-up) stay out
    restart()
    times = wall_times(step, device, steps)
    recorder = Recorder(model, cache, device)
    restart()  # the hooked pass sees the same positions as the timed one
    try:
        for i in range(steps + 1):
            recorder.begin_step(counting=i == 0)  # the first hooked step counts bytes and FLOPs once
            step()
            recorder.end_step()
    finally:
        recorder.remove()
    step_s = statistics.median(times)
    inner = getattr(cache, "self_cache", cache)
    path = attention_path(inner, model.config, batch, context, model.dtype, device)
    return Profile(_table(recorder.ops, step_s, steps), 1000 * step_s, path,
                   dict(strategy=strategy, batch=batch, context=context, steps=steps, dtype=str(model.dtype),
                        device=str(device)))


def _table(ops: dict[str, Op], step_s: float, steps: int) -> pd.DataFrame:
    rows = []
    for op in ops.values():
        seconds = statistics.median(op.times[1:] or op.times)  # the counting step had its own overhead
        rows.append(dict(operation=op.name, calls=op.calls, time_ms=1000 * seconds, bytes=op.bytes, flops=op.flops))
    table = pd.DataFrame(rows, columns=["operation", "calls", "time_ms", "bytes", "flops"])
    rest = 1000 * step_s - table["time_ms"].sum()
    table = pd.concat([table, pd.DataFrame([
        dict(operation="rest (embedding, adds, overhead)", calls=float("nan"), time_ms=rest,
             bytes=float("nan"), flops=float("nan")),
        dict(operation="step (measured without hooks)", calls=float("nan"), time_ms=1000 * step_s,
             bytes=table["bytes"].sum(), flops=table["flops"].sum())])], ignore_index=True)
    table["share"] = table["time_ms"] / (1000 * step_s)
    table["gb_per_s"] = table["bytes"] / table["time_ms"] / 1e6
    table["gflop_per_s"] = table["flops"] / table["time_ms"] / 1e6
    return table[COLUMNS]

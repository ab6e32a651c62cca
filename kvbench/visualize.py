"""See the cache at work: attention maps of a prompt, and each strategy's cache size over decode steps."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kvbench.cache import KVCache  # noqa: E402
from kvbench.generate import generation_steps, new_cache  # noqa: E402
from kvbench.model import Decoder  # noqa: E402
from kvbench.bench.plots import color_of  # noqa: E402

MAX_LABELS = 48  # more tick labels than this are unreadable: label every n-th token instead


class ProbabilityProbe(KVCache):
    """Not a cache: it attends explicitly, softmax(q k^T / sqrt(head_dim)) under the pass's mask, and keeps
    each layer's probabilities. It sees the queries and keys exactly as attention does (after RoPE, with
    grouped-query heads laid out as Attention lays them), so the maps are the model's own."""

    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self.maps: list[torch.Tensor] = []

    def attend(self, layer, start_pos, q, k, v, mask):
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (1, Hkv, g*T, T)
        if isinstance(mask, str):  # "causal"
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (1, Hkv, g*T, T)
        T = k.shape[2]
        self.maps.append(probs[0].reshape(self.n_heads, T, T).cpu())  # (Hq, T, T): group rows back to heads
        return (probs @ v.float()).to(q.dtype)  # (1, Hkv, g*T, hd)

    def update(self, layer, start_pos, k, v):
        raise NotImplementedError  # attend() does not store

    def mask(self, start_pos, n_new):
        return "causal"

    def reset(self):
        self.maps.clear()

    nbytes = 0

    def expected_bytes(self, tokens):
        return 0


@torch.inference_mode()
def attention_maps(model: Decoder, ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every layer, (H, T, T) each (H query heads), for one sequence ids (1, T).

    The torch model uses a fused attention kernel that never materialises the probabilities, so they are
    recomputed by a probe standing in for the cache: the same queries and keys the kernel gets."""
    probe = ProbabilityProbe(model.config.n_heads)
    model(ids, probe, start_pos=0)
    return probe.maps


MAX_COLUMNS = 6  # heads per figure row: more would shrink each panel below readability


def panel_grid(n_layers: int, n_heads: int) -> tuple[int, int, int]:
    """(rows, columns, rows per layer): each layer's heads fill whole rows of at most MAX_COLUMNS panels."""
    columns = min(n_heads, MAX_COLUMNS)
    per_layer = math.ceil(n_heads / columns)
    return n_layers * per_layer, columns, per_layer


def attention_figure(maps: list[torch.Tensor], labels: list[str], title: str):
    n_layers, n_heads = len(maps), maps[0].shape[0]
    rows, columns, per_layer = panel_grid(n_layers, n_heads)
    size = 2.4 if len(labels) <= 24 else 3.2
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns + 1.2, size * rows + 1.0), squeeze=False,
                             layout="constrained")
    step = max(1, math.ceil(len(labels) / MAX_LABELS))
    ticks = list(range(0, len(labels), step))
    image = None
    for layer, heads in enumerate(maps):
        for head in range(n_heads):
            row, column = layer * per_layer + head // columns, head % columns
            ax = axes[row][column]
            image = ax.imshow(heads[head].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer} · head {head}", fontsize=8)
            # token labels on the outer axes only: the first column, and the last row of panels
            ax.set_xticks(ticks, [labels[i] for i in ticks] if row == rows - 1 else [], fontsize=6, rotation=90)
            ax.set_yticks(ticks, [labels[i] for i in ticks] if column == 0 else [], fontsize=6)
    for layer in range(n_layers):  # a layer's last row may have empty places
        for place in range(n_heads, per_layer * columns):
            axes[layer * per_layer + place // columns][place % columns].set_axis_off()
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4 / rows), label="attention weight (each row sums to 1)")
    fig.supxlabel("key (attended) token")
    fig.supylabel("query token")
    fig.suptitle(title, fontsize=10)
    return fig


def cache_growth(model: Decoder, prompt: torch.Tensor, new_tokens: int, strategies: list[str],
                 window: int | None) -> pd.DataFrame:
    """Bytes each strategy's cache has allocated, and holds by its formula, after the prefill and every step."""
    rows = []
    for strategy in strategies:
        cache = new_cache(model, strategy, prompt.shape[0], prompt.shape[1] + new_tokens - 1, window)
        for step in generation_steps(model, prompt, new_tokens, cache):
            held = prompt.shape[1] + step.index  # the prefill stores the prompt; each decode step one token more
            rows.append(dict(strategy=strategy, step=step.index, position=held,
                             allocated=cache.nbytes if cache is not None else 0,
                             filled=cache.expected_bytes(held) if cache is not None else 0))
    return pd.DataFrame(rows)


def cache_growth_figure(growth: pd.DataFrame, title: str):
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    for strategy, points in growth.groupby("strategy", sort=False):
        color = color_of(strategy)
        ax.plot(points["position"], points["allocated"] / 2**10, label=f"{strategy}: allocated", color=color, lw=1.5)
        ax.plot(points["position"], points["filled"] / 2**10, label=f"{strategy}: holding", color=color, lw=1,
                ls="--")
    ax.set_xlabel("tokens in the sequence (prompt + generated)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # token counts: no 12.5
    ax.set_ylabel("KV cache held (KiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8, frameon=False)  # off the data
    return fig

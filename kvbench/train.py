"""Train a small byte-level decoder (AdamW, next-byte cross-entropy), so that generation shows real text.

The corpus is read as raw UTF-8 bytes: the model's 256 token ids are the byte values. Batches are random
windows of seq_len + 1 bytes. Every 50th block of 16 KiB is held out to report a validation loss: blocks
spread over the whole corpus, so the held-out text is as varied as the training text.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvbench.config import ModelConfig, check_seed
from kvbench.errors import KVBenchError
from kvbench.model import Decoder

EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}


def stdlib_dir() -> Path:
    """Python's own standard library: on every machine that runs kvbench, offline, under the PSF licence."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(paths: list[Path]) -> list[Path]:
    """Files to read, in a fixed order: each file given, and the *.py files under each directory given."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(path).parts))
        else:
            raise KVBenchError(f"--corpus {path}: no such file or directory")
    return files


def read_corpus(paths: list[Path], max_bytes: int) -> bytes:
    chunks, total = [], 0
    for path in corpus_files(paths):
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)
    if len(corpus) < 1024:
        raise KVBenchError(f"the corpus holds {len(corpus)} bytes; give at least 1 KiB of text with --corpus")
    return corpus


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr x this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_batches: int = 8

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise KVBenchError(f"--lr must be a finite number above 0 (got {self.lr:g})")
        check_seed("--seed", self.seed)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # training loss per step
    val_before: float = math.nan  # held-out loss at initialisation
    val_after: float = math.nan


HELD_OUT_BLOCK, HELD_OUT_EVERY = 16 * 1024, 50


def split_corpus(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): every 50th 16 KiB block held out (at least one block, however small the corpus)."""
    blocks = list(torch.split(data, HELD_OUT_BLOCK))
    held = set(range(HELD_OUT_EVERY // 2, len(blocks), HELD_OUT_EVERY)) or {len(blocks) - 1}
    train = [b for i, b in enumerate(blocks) if i not in held]
    if not train:  # a corpus of a single block: split it in two
        half = len(data) // 2
        return data[:half], data[half:]
    return torch.cat(train), torch.cat([blocks[i] for i in sorted(held)])


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def random_windows(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()  # (B, L+1)
    return windows[:, :-1], windows[:, 1:]  # inputs and next-byte targets, (B, L) each


def next_token_loss(model: Decoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, L, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # mean nats per byte


@torch.no_grad()
def validation_loss(model: Decoder, data: torch.Tensor, s: TrainSettings) -> float:
    gen = torch.Generator().manual_seed(s.seed + 1)  # the same held-out windows every time
    losses = [next_token_loss(model, *random_windows(data, s.batch_size, s.seq_len, gen)).item()
              for _ in range(s.eval_batches)]
    return sum(losses) / len(losses)


def optimizer_for(model: Decoder, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorms or position rows)."""
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and name != "pos_emb"]
    others = [p for name, p in model.named_parameters() if not (p.dim() == 2 and name != "pos_emb")]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                              {"params": others, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def check_trainable(config: ModelConfig, seq_len: int) -> None:
    """What train can refuse from the config alone: checked before the corpus is read."""
    if config.vocab_size != 256:
        raise KVBenchError(f"train makes byte-level models: vocab_size must be 256 (got {config.vocab_size}); "
                           "give --config demo, or a config of yours with vocab_size: 256")
    if seq_len > config.max_seq_len:
        raise KVBenchError(f"--seq-len {seq_len} exceeds max_seq_len {config.max_seq_len}")


def require_finite(model: Decoder, step: int, loss: float, lr: float) -> None:
    """Stop at the first step whose loss or updated weights are NaN/inf: training cannot recover from them,
    and saving them would give a file that loads fine and computes nothing but NaN."""
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if math.isfinite(loss) and broken is None:
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"tensor '{broken}' holds NaN/inf"
    raise KVBenchError(f"training diverged at step {step + 1}: {what} (learning rate {lr:.1e}); lower --lr "
                       "(nothing from this step on is saved)")


def train(model: Decoder, corpus: bytes, s: TrainSettings,
          on_step: Callable[[int, float, float], None] = lambda step, loss, lr: None) -> TrainLog:
    """Train in place; on_step(step, loss, lr) after every step. KeyboardInterrupt leaves the model as trained."""
    check_trainable(model.config, s.seq_len)
    train_data, val_data = split_corpus(torch.frombuffer(bytearray(corpus), dtype=torch.uint8))
    if len(val_data) <= s.seq_len + 1:
        raise KVBenchError(f"the corpus is too small for --seq-len {s.seq_len}: give more text or a shorter length")
    gen = torch.Generator().manual_seed(s.seed)
    optimizer = optimizer_for(model, s)
    log = TrainLog(val_before=validation_loss(model.eval(), val_data, s))
    model.train()
    for step in range(s.steps):
        lr = learning_rate(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = next_token_loss(model, *random_windows(train_data, s.batch_size, s.seq_len, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.losses.append(loss.item())
        require_finite(model, step, log.losses[-1], lr)  # before on_step, which may save the weights
        on_step(step, log.losses[-1], lr)
    log.val_after = validation_loss(model.eval(), val_data, s)
    return log

"""kvbench: prove a transformer's KV cache exact, and measure what it buys."""

__version__ = "0.1.0"

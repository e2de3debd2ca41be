"""dfq: data-free quantization engine (pure PyTorch; no web, queue or database imports)."""

__version__ = "0.1.0"

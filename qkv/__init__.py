"""qkv — the attention mechanism of transformers: run it, trust it, see it."""

from .errors import QkvError
from .nn.attention import attention, attention_rows

__version__ = "0.1.0"

__all__ = ["attention", "attention_rows", "QkvError", "__version__"]

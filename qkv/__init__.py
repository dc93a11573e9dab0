"""qkv — the attention mechanism of transformers: run it, trust it, see it.

Public API:
    qkv.attention, qkv.attention_rows   the attention core (qkv.nn has the modules)
    qkv.load                            a model + tokenizer + chat template (embedded name, GGUF, HF dir)
    qkv.generate                        stream text from a loaded model
    qkv.embed                           sentence embeddings from a loaded encoder (minilm)
    qkv.capture                         exact attention rows and faithfulness measures of a text (one forward)
    qkv.capture_generation              attention of every generated token at the step that produced it
    qkv.AttentionRecord                 what capture returns and every renderer reads
"""

from .embed import embed
from .errors import QkvError
from .explain.capture import capture, capture_generation
from .explain.record import AttentionRecord
from .generate import generate  # the functions replace the same-named submodules as attributes of qkv
from .load import load
from .nn.attention import attention, attention_rows

__version__ = "0.1.0"

__all__ = ["attention", "attention_rows", "load", "generate", "embed", "capture", "capture_generation",
           "AttentionRecord", "QkvError", "__version__"]


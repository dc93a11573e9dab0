"""qkv — the attention mechanism of transformers: run it, trust it, see it.

Public API:
    qkv.attention, qkv.attention_rows   the attention core (qkv.nn has the modules)
    qkv.load                            a model + tokenizer + chat template (embedded name, GGUF, HF dir)
    qkv.generate                        stream text from a loaded model
"""

from .errors import QkvError
from .generate import generate  # the function: it replaces the subpackage as the attribute qkv.generate
from .nn.attention import attention, attention_rows

__version__ = "0.1.0"

__all__ = ["attention", "attention_rows", "load", "generate", "QkvError", "__version__"]


def __getattr__(name):
    # load pulls in tokenizers, jinja2 and safetensors: import it on first use, not with `import qkv`
    if name == "load":
        from .load import load

        return load
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")

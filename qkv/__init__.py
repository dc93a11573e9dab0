"""qkv — the attention mechanism of transformers: run it, trust it, see it.

Public API:
    qkv.attention, qkv.attention_rows   the attention core (qkv.nn has the modules)
    qkv.load                            a model + tokenizer + chat template (embedded name, GGUF, HF dir)
    qkv.generate                        stream text from a loaded model
    qkv.embed                           sentence embeddings from a loaded encoder (minilm)
    qkv.capture                         exact attention rows and faithfulness measures of a text (one forward)
    qkv.capture_generation              attention of every generated token at the step that produced it
    qkv.AttentionRecord                 what capture returns and every renderer reads

The names are imported on first use (PEP 562), so ``import qkv`` costs no import of torch: the ``qkv``
command pauses Python's garbage collector before torch's import and the model's load (a third of a second
of collections over objects that all live on; qkv.cli.main), which it can only do if importing the package
does not already import them. ``qkv.generate`` and ``qkv.embed`` are the functions, as before, although
submodules of the same names exist (``qkv.generate.loop``, ``qkv.embed``): importing those never replaces
the functions here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see: the names as they resolve at run time
    from .embed import embed
    from .errors import QkvError
    from .explain.capture import capture, capture_generation
    from .explain.record import AttentionRecord
    from .generate import generate
    from .load import load
    from .nn.attention import attention, attention_rows

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "attention": ".nn.attention", "attention_rows": ".nn.attention", "load": ".load", "generate": ".generate",
    "embed": ".embed", "capture": ".explain.capture", "capture_generation": ".explain.capture",
    "AttentionRecord": ".explain.record", "QkvError": ".errors",
}

__all__ = [*_PUBLIC, "__version__"]


class _Package(types.ModuleType):
    """The qkv module's type: public names resolved on first use, submodules imported on first use."""

    def __getattr__(self, name: str):  # only for names not (yet) in the module's dict
        if name in _PUBLIC:
            value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        elif name.isidentifier() and not name.startswith("__") and _is_submodule(name):
            value = importlib.import_module(f".{name}", __name__)  # `import qkv; qkv.nn...`, as when all was eager
        else:  # what hasattr() probes expect: AttributeError, never an import error
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        # the import system sets each imported submodule as an attribute of its package: for qkv.generate and
        # qkv.embed (also modules' names) that would put a module where the public function belongs
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_PUBLIC))


def _is_submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{__name__}.{name}") is not None
    except (ImportError, ValueError):
        return False


sys.modules[__name__].__class__ = _Package

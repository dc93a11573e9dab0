"""Text in and out of a model: the tokenizer (on the `tokenizers` library) and chat templates
(Jinja2, sandboxed).

    from qkv.text import Tokenizer, ChatTemplate
    tok = Tokenizer.from_gguf_metadata(metadata, field_types, source="model.gguf")
    template = ChatTemplate(tok.chat_template, bos_token=..., eos_token=...)
    ids = template.encode(tok, [{"role": "user", "content": "Hi"}])

The two classes are imported on first use, so importing one module does not pull in the other's
dependency (jinja2 or tokenizers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkv.text.chat import ChatTemplate
    from qkv.text.tokenizer import Tokenizer, TokenStream

__all__ = ["ChatTemplate", "Tokenizer", "TokenStream"]


def __getattr__(name: str) -> Any:
    if name == "ChatTemplate":
        from qkv.text.chat import ChatTemplate

        return ChatTemplate
    if name in ("Tokenizer", "TokenStream"):
        from qkv.text import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'qkv.text' has no attribute {name!r}")

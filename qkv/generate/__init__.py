"""Generation: sampling as pure functions, the prefill/decode loop, and text streaming."""

from .loop import Piece, generate_ids, generate_ids_batch
from .sampling import SamplingOptions, sample
from .text import generate, prompt_ids

__all__ = ["Piece", "SamplingOptions", "generate", "generate_ids", "generate_ids_batch", "prompt_ids", "sample"]

"""Seeing attention: the by-hand trace, exact capture from real models, and the renderers."""

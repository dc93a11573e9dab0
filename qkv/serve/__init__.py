"""qkv serve: the live attention explorer — a thin ASGI app over the public API (routes, per-text state)."""

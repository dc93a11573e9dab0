"""``python -m qkv.daemon PATH IDLE_S``: the daemon itself, as ``qkv daemon start`` runs it (detached)."""

import sys

from .server import serve_main

sys.exit(serve_main(sys.argv[1], float(sys.argv[2])))

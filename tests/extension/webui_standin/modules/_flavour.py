"""Which host this stand-in plays: "a1111" (1.10), "reforge" (A1111-style, its own load_model) or "forge"."""
import os

FLAVOUR = os.environ.get("STANDIN_FLAVOUR", "a1111")
FORGE = FLAVOUR == "forge"

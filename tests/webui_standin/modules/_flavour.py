"""Which host this stand-in plays: "a1111" (also reForge's loading path) or "forge" (gradio 4 line)."""
import os

FLAVOUR = os.environ.get("STANDIN_FLAVOUR", "a1111")
FORGE = FLAVOUR == "forge"

"""adl: side tasks on a frozen transformer's hidden states (layer-mixing heads)."""

__version__ = "0.1.0"

# The PyPI distribution's name: `adl` on PyPI is an unrelated project, so the package installs as
# adalayers (the method's name) while the command and the import stay `adl`. Every install hint uses these.
DIST = "adalayers"
UPGRADE = f"pip install -U {DIST}"


def __getattr__(name: str):
    """``adl.attach`` imported on first use: ``import adl`` stays light (no torch, no transformers)."""
    if name == "attach":
        from adl.serve.attach import attach

        return attach
    raise AttributeError(f"module 'adl' has no attribute {name!r}")

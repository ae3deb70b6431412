"""adl: side tasks on a frozen transformer's hidden states (layer-mixing heads)."""

__version__ = "0.1.0"

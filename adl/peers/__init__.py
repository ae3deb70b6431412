"""Peers: methods that change the backbone's computation, trained on a cache's exact examples
for a cost/quality comparison with adl's heads (``adl finetune``, ``adl compare``).

Nothing in adl imports this package except adl/cli.py.
"""

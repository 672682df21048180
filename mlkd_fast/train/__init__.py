"""The distillation training loop (``python -m mlkd_fast.train`` / ``mlkd-train``).

- :mod:`.data`: datasets (the embedded scikit-learn digits default).
- :mod:`.models`: networks that return ``(logits, pooled features)``.
- :mod:`.loop`: one epoch of training / evaluation, loss construction.
- :mod:`.__main__`: the command line.
"""

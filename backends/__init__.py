"""Reference model-manager backends: the legacy MMA and the new MMS, one process each.

They share a model registry (``config/models.toml``), loaders that turn a model file into
something that generates text, and a VRAM ledger; each service speaks its own wire dialect
(see ``/work/shared/protocol.md``) so the shim has two real peers to translate between.
"""

"""Byte data pipeline: sources -> uint8 shards (train.bin / val.bin + meta.json) -> batches.

Documents are separated by DOC_SEP (0x00): every document in a shard is preceded by it, so the model
sees where a document starts, and generation stops when the model emits it. Kept import-light: the
heavy parts live in submodules (sources, shards, loader)."""
DOC_SEP = 0
DOC_SEP_BYTES = bytes([DOC_SEP])

__all__ = ["DOC_SEP", "DOC_SEP_BYTES"]

"""Data: the synthetic shapes set (shapes.py), the JSONL readers, the collator and the
Lightning datamodule (datamodule.py)."""

"""The model room: the tiny Qwen2.5-VL and local checkpoints (qwen_vl.py), the offline tokenizer
and processor (processing.py), the cached tiny base (base.py), save_pretrained (checkpoint.py)."""

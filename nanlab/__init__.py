"""nanlab: map where fine-tuning Qwen2.5-VL turns to NaN, and which mitigations prevent it."""

import os

# Everything runs offline: no hub is ever reached at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

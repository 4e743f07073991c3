"""The synthetic "shapes" set: one coloured shape on a plain background, with a question
about it (shape, colour, place) or a caption (what the tiny base is pretrained on).

Every distinct sample is a key; the splits are disjoint slices of one seeded shuffle of
the keys, so a seed and the split sizes give back the same test split anywhere (the probe).
"""

from __future__ import annotations

import itertools
import random

from PIL import Image, ImageDraw

from nanlab.config.specs import TASKS, DataSpec

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
SIZES = {"small": 0.12, "large": 0.2}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128)}
QUESTIONS = {
    "shape": ("What shape is this?", "Which shape is in the image?"),
    "colour": ("What colour is the shape?", "What color is it?"),
    "position": ("Where is the shape?", "Where is it in the image?"),
    "caption": ("Describe the image.", "Caption this image."),
}
# Every distinct sample: splits are disjoint slices of one seeded shuffle of these keys.
assert tuple(QUESTIONS) == TASKS, "specs.TASKS lists the question kinds"
SHAPE_KEYS = list(itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS, QUESTIONS))
FINE_TUNING_TASKS = ("shape", "colour", "position")  # the tiny base learned "caption"


def draw_shape(
    shape: str,
    colour: str,
    size: str,
    position: str,
    background: str,
    image_size: int,
    rng: random.Random,
) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    fx, fy = POSITIONS[position]
    jitter = image_size * 0.04  # a couple of pixels, so equal keys are not equal pictures
    x = fx * image_size + rng.uniform(-jitter, jitter)
    y = fy * image_size + rng.uniform(-jitter, jitter)
    r = SIZES[size] * image_size
    fill = COLOURS[colour]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image


def shapes_sample(key: tuple, seed: int, image_size: int, sample_id: str) -> dict:
    shape, colour, size, position, background, kind = key
    # Seeded by the key, not the index: the same key always gives the same sample.
    rng = random.Random(f"{seed}-{'-'.join(key)}")
    image = draw_shape(shape, colour, size, position, background, image_size, rng)
    question = rng.choice(QUESTIONS[kind])
    where = "the centre" if position == "centre" else f"the {position}"
    answer = {
        "shape": shape,
        "colour": colour,
        "position": position,
        "caption": f"A {size} {colour} {shape} in {where}.",
    }[kind]
    return {
        "id": sample_id,
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def shapes_splits(spec: DataSpec, seed: int) -> dict[str, list[dict]]:
    sizes = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
    total = sum(sizes.values())
    tasks = set(spec.tasks or FINE_TUNING_TASKS)
    keys = [k for k in SHAPE_KEYS if k[-1] in tasks]
    if total > len(keys):
        raise ValueError(
            f"data.num_train+num_val+num_test={total}: shapes has only "
            f"{len(keys)} distinct samples for tasks {sorted(tasks)}"
        )
    random.Random(seed).shuffle(keys)
    splits, start = {}, 0
    for split, n in sizes.items():
        splits[split] = [
            shapes_sample(k, seed, spec.image_size, f"shapes/{split}/{i}")
            for i, k in enumerate(keys[start : start + n])
        ]
        start += n
    return splits

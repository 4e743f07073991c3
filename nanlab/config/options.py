"""One registry per axis: every option of precision, softmax, stress, guard, data and model,
what it does, and where its code is. The allowed names, the command-line check
(`compose.validate_cli`), the specs' `check()` and the dispatch in the torch modules all read
these tables, so an option is added in one place (its entry here, its YAML under conf/, its
function) and nowhere is a name compared by hand.

No torch here: an option's code is a "module:attribute" string imported on first use, so a
typo on the command line is refused before torch loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    name: str
    what: str  # one line, as the README's option tables say it
    # role -> "module:attribute": what the option does to each part of a run. Roles per axis:
    #   softmax: attention (a factory spec -> attention function)
    #   precision: plugin (spec, device, half_gemm -> (plugin, callbacks))
    #   stress: model (calibrated on one batch), batch (a per-step transform), lr (a multiplier)
    #   guard: build (model -> (callbacks, counter))
    #   data: dataset (spec, seed -> train, val, test)
    impl: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()  # facts the dispatch needs, e.g. "boolean_mask"

    def does(self, role: str) -> bool:
        return role in self.impl

    def resolve(self, role: str):
        """The code behind a role, imported now (torch and transformers load here)."""
        module, attr = self.impl[role].split(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """The options of one axis, in the order the README lists them."""

    def __init__(self, key: str, *options: Option):
        self.key = key
        self._options = {o.name: o for o in options}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._options)

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def __iter__(self) -> Iterator[Option]:
        return iter(self._options.values())

    def __getitem__(self, name: str) -> Option:
        self.check(name)
        return self._options[name]

    def having(self, role: str) -> tuple[str, ...]:
        return tuple(o.name for o in self if o.does(role))

    def check(self, name, key: str | None = None) -> None:
        """One line naming the key and the allowed values."""
        if name not in self._options:
            raise ValueError(
                f"{key or self.key}={name}: unknown option; allowed: "
                f"{', '.join(sorted(self.names))}"
            )


ATTENTION = "nanlab.numerics.attention"
PRECISION_MOD = "nanlab.numerics.precision"
STRESS_MOD = "nanlab.numerics.stress"
GUARD_MOD = "nanlab.numerics.guards"
DATA_MOD = "nanlab.data.datamodule"

SOFTMAX = Registry(
    "softmax",
    Option(
        "sdpa",
        "transformers' default (torch's scaled_dot_product_attention)",
        {"attention": f"{ATTENTION}:sdpa_variant"},
        frozenset({"boolean_mask"}),
    ),
    Option(
        "eager",
        "transformers' eager attention: fp32-upcast torch.softmax",
        {"attention": f"{ATTENTION}:eager_variant"},
    ),
    Option(
        "naive",
        "exp / sum in the compute dtype, no max subtraction",
        {"attention": f"{ATTENTION}:naive_variant"},
    ),
    Option(
        "stable",
        "max-subtracted softmax in the compute dtype",
        {"attention": f"{ATTENTION}:stable_variant"},
    ),
    Option(
        "safe",
        "max-subtracted, fp32, fully masked rows give 0",
        {"attention": f"{ATTENTION}:safe_variant"},
    ),
    Option(
        "softcap",
        "cap * tanh(logits / cap) before the softmax (Gemma 2; softmax.cap)",
        {"attention": f"{ATTENTION}:softcap_variant"},
        frozenset({"uses_cap"}),
    ),
    Option(
        "zeroed",
        "eager with NaN rows patched to 0 after the softmax",
        {"attention": f"{ATTENTION}:zeroed_variant"},
    ),
    Option(
        "fp32_qk",
        "q.k, the mask and the softmax in fp32 (transformers PR 33317)",
        {"attention": f"{ATTENTION}:fp32_qk_variant"},
    ),
    Option(
        "flash",
        "transformers' flash_attention_2 kernel (GPU, flash-attn), unobserved",
        flags=frozenset({"kernel"}),
    ),
)

PRECISION = Registry(
    "precision",
    Option("fp32", "fp32 weights and compute", {"plugin": f"{PRECISION_MOD}:fp32_plugin"}),
    Option("bf16", "fp32 weights, bf16 autocast", {"plugin": f"{PRECISION_MOD}:bf16_plugin"}),
    Option(
        "bf16_true", "bf16 weights and compute", {"plugin": f"{PRECISION_MOD}:bf16_true_plugin"}
    ),
    Option(
        "fp16",
        "fp16 autocast with a loss scaler (really fp16 on CPU too)",
        {"plugin": f"{PRECISION_MOD}:fp16_plugin"},
    ),
    Option(
        "progressive",
        "fp32 for precision.switch_step steps, then bf16 autocast",
        {"plugin": f"{PRECISION_MOD}:progressive_plugin"},
    ),
)

# Each mechanism's study (paragraph, cause, baseline, predictions) is data in
# conf/stress/<name>.yaml; here is what it does to the run.
STRESS = Registry(
    "stress",
    Option("none", "no planted mechanism"),
    Option(
        "logit_growth",
        "q/k scaled to a largest attention logit of stress.target_logit",
        {"model": f"{STRESS_MOD}:grow_logits"},
    ),
    Option(
        "fp16_overflow",
        "massive activations on stress.token in the first decoder MLP",
        {"model": f"{STRESS_MOD}:plant_massive_activations"},
    ),
    Option("masked_rows", "the mask as summed float-min planes (stress.mask)"),
    Option("empty_targets", "batches with no supervised token (data.max_length)"),
    Option(
        "grad_poison",
        "one sample left-padded every stress.every batches",
        {"batch": f"{STRESS_MOD}:poison_padding"},
    ),
    Option(
        "lr_spike",
        "the lr times stress.factor for stress.length steps from stress.at",
        {"lr": f"{STRESS_MOD}:spike_lr"},
    ),
    Option("pixel_range", "raw 16-bit pixels into the vision tower (data.pixel_max)"),
    Option("serving_masked_rows", "nothing in training: judged on the test-time pass"),
)

GUARD = Registry(
    "guard",
    Option("none", "no guard"),
    Option(
        "skip_step",
        "skip steps with a non-finite gradient",
        {"build": f"{GUARD_MOD}:skip_step_guard"},
    ),
    Option(
        "clamp",
        "clamp half-precision hidden states of both towers (as vLLM)",
        {"build": f"{GUARD_MOD}:clamp_guard"},
    ),
)

DATA = Registry(
    "data",
    Option(
        "shapes",
        "synthetic image QA about one shape per image",
        {"dataset": f"{DATA_MOD}:shapes_dataset"},
    ),
    Option(
        "jsonl",
        "Qwen-VL, LLaMA-Factory and ms-swift JSON/JSONL (data.train_file)",
        {"dataset": f"{DATA_MOD}:jsonl_dataset"},
    ),
)

MODEL = Registry(
    "model",
    Option("tiny", "a tiny Qwen2.5-VL, from the project's tiny base or random init"),
    Option(
        "qwen2_5_vl_3b",
        "Qwen2.5-VL-3B from a local checkpoint (model.path)",
        flags=frozenset({"needs_path"}),
    ),
    Option(
        "qwen2_5_vl_7b",
        "Qwen2.5-VL-7B from a local checkpoint (model.path)",
        flags=frozenset({"needs_path"}),
    ),
    Option("qwen2_5_vl_3b_arch", "the 3B architecture with random init (GPU)"),
)

# The config groups whose options are these registries (conf/<key>/<name>.yaml each).
REGISTRIES = {r.key: r for r in (SOFTMAX, PRECISION, STRESS, GUARD, DATA, MODEL)}

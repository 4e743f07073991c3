"""The LightningModule: loss on supervised tokens, AdamW, warmup + cosine schedule.

Mitigations as switches (`optim.*` in conf/config.yaml):
- `optim.z_loss`: PaLM's auxiliary z-loss (Chowdhery et al. 2022): z_loss x mean(log Z^2) of
  the output logits over the supervised positions, which keeps log Z near 0.
- `optim.name=stable_adamw`: AdamW with update clipping (Wortsman et al. 2023, "Stable and
  low-precision training for large-scale vision-language models"; AdaFactor's clipping):
  each tensor's step is divided by max(1, sqrt(mean(g^2 / v_hat))).
- `optim.eps`, `optim.betas`: AdamW's epsilon and betas (beta2 0.95 and eps 1e-6 are common
  fine-tuning settings against loss spikes).
- `optim.impl`: torch AdamW's fused kernel (the default) or foreach (`build_optimizer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from nanlab.config.specs import OPTIMIZERS, OptimSpec  # noqa: F401  (this module's spec)
from nanlab.loss import supervised_loss  # the objective (nanlab/loss.py)
from nanlab.model.qwen_vl import is_vision_param

log = logging.getLogger(__name__)


class StableAdamW(torch.optim.Optimizer):
    """AdamW with update clipping (Wortsman et al. 2023; AdaFactor, Shazeer & Stern 2018):
    each tensor's step lr * m_hat / (sqrt(v_hat) + eps) is divided by
    max(1, RMS), RMS = sqrt(mean(g^2 / max(v_hat, eps^2))), so a gradient far larger than
    the second-moment estimate remembers (v is stale at beta2 0.999) cannot take a step of
    many lr. Where RMS <= 1 it is AdamW exactly (decoupled weight decay, bias correction).
    At step 1, v_hat = g^2, so RMS = 1: the first update is never clipped. Written with
    torch._foreach ops like torch's foreach AdamW (a per-tensor loop is several times
    slower on CPU here)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        )
        self.last_rms: list[float] = []  # per tensor, the last step's RMS (for tests)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_rms = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
            m = [st["exp_avg"] for st in states]
            v = [st["exp_avg_sq"] for st in states]
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            steps = [st["step"] for st in states]
            c1 = [1 - beta1**t for t in steps]
            c2 = [1 - beta2**t for t in steps]
            v_hat = torch._foreach_div(v, c2)
            # RMS of g^2 / v_hat per tensor (v_hat floored at eps^2, as Wortsman et al.)
            ratio = torch._foreach_div(
                torch._foreach_mul(grads, grads), torch._foreach_clamp_min(v_hat, eps * eps)
            )
            sums = torch.stack(torch._foreach_norm(ratio, 1))  # entries are >= 0: the sum
            rms = torch.sqrt(
                sums.float() / torch.tensor([p.numel() for p in params], device=sums.device)
            )
            # step size per tensor: lr / max(1, RMS) / c1 (a NaN gradient gives a NaN RMS
            # and a NaN step: the clipping hides nothing)
            scale = rms.clamp_min(1.0).tolist()  # one sync for all tensors
            self.last_rms += rms.tolist()
            if wd:
                torch._foreach_mul_(params, [1 - lr * wd / s for s in scale])
            denom = torch._foreach_sqrt(v_hat)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_mul_(update, [-lr / c / s for c, s in zip(c1, scale)])
            torch._foreach_add_(params, update)
        return loss


class NanLabModule(L.LightningModule):
    def __init__(
        self,
        model,
        optim: OptimSpec,
        lr_multiplier: Callable[[int], float] | None = None,
        batch_transform: Callable[[dict, int], dict] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optim = optim
        # stress=lr_spike multiplies the schedule for a few steps
        self.lr_multiplier = lr_multiplier or (lambda step: 1.0)
        # stress=grad_poison pads one sample on the left every few steps
        self.batch_transform = batch_transform

    def transform(self, batch: dict, step: int | None = None) -> dict:
        if self.batch_transform is None:
            return batch
        if step is None:
            step = self.trainer.global_step if self._trainer is not None else 0
        return self.batch_transform(batch, step)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.transform(batch)

    def compute_loss(self, batch: dict, parts: dict | None = None) -> torch.Tensor:
        """The training objective: cross-entropy (+ the z-loss term when optim.z_loss > 0;
        the record's losses are this objective)."""
        return supervised_loss(self.model, batch, self.optim.z_loss, parts)

    # The monitor's total gradient norm of this step, handed over where it is exactly what
    # clip_grad_norm_ computes (fp32 gradients, one device): clipping scales by it instead
    # of a second pass over every gradient (~5 ms of a 0.19 s tiny step) - the same bits.
    grad_norm_seen: tuple | None = None  # (the gradients it was computed over, the norm)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        seen, self.grad_norm_seen = self.grad_norm_seen, None
        if seen is not None and gradient_clip_val and gradient_clip_algorithm == "norm":
            grads, total = seen
            params = [p for g in optimizer.param_groups for p in g["params"]]
            now = [p.grad for p in params if p.grad is not None]
            if len(now) == len(grads) and all(a is b for a, b in zip(now, grads)):
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total)
                return
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is None and getattr(
            optimizer, "_step_supports_amp_scaling", False
        ):
            # Lightning's autocast plugin refuses to clip for any fused optimizer (one that
            # could unscale inside its step), bf16 too; with no loss scaler there is nothing
            # to unscale: the base plugin's clip, the call bf16 makes with foreach
            from lightning.pytorch.plugins.precision import Precision
            from lightning.pytorch.utilities import GradClipAlgorithmType

            Precision.clip_gradients(
                plugin,
                optimizer,
                gradient_clip_val or 0.0,
                GradClipAlgorithmType(gradient_clip_algorithm or "norm"),
            )
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def training_step(self, batch, batch_idx):
        parts = {} if self.optim.z_loss else None
        loss = self.compute_loss(batch, parts)
        n = batch["labels"].shape[0]
        if self._trainer is not None and not (
            self.trainer.loggers or self.trainer.progress_bar_callback
        ):
            return loss  # log() costs ~1 ms a call; with no logger and no bar it shows nowhere
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if parts:
            self.log("train/ce", parts["ce"], batch_size=n)
            self.log("train/log_z", parts["log_z"], batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        vision_lr = self.optim.vision_lr
        groups = [
            {
                "params": [p for n, p in named if vision_lr is None or not is_vision_param(n)],
                "lr": self.optim.lr,
            }
        ]
        if vision_lr is not None:
            groups.append({"params": [p for n, p in named if is_vision_param(n)], "lr": vision_lr})
        groups = [g for g in groups if g["params"]]
        plugin = getattr(self._trainer, "precision_plugin", None)
        optimizer = build_optimizer(
            self.optim, groups, scaled=getattr(plugin, "scaler", None) is not None
        )
        cosine = get_cosine_schedule_with_warmup(
            optimizer, self.optim.warmup_steps, self.optim.max_steps
        )
        # Compose the cosine schedule with the stress multiplier (1 unless lr_spike).
        base = cosine.lr_lambdas[0]
        cosine.lr_lambdas = [lambda s: base(s) * self.lr_multiplier(s)] * len(groups)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def build_optimizer(optim: OptimSpec, groups, scaled: bool = False) -> torch.optim.Optimizer:
    """AdamW (torch's) or StableAdamW, with optim.eps and optim.betas.

    torch's AdamW runs its fused kernel (optim.impl=fused, the default; `make bench` on the
    2-core CPU: 1.27x the foreach step, the same loss to 6 digits; transformers.Trainer's
    default; not timed on a GPU here) or the foreach one. Fused
    cannot run where a loss scaler unscales the gradients (precision=fp16, `scaled`): a fused
    step unscales inside the kernel, so Lightning's clip and the monitor would see scaled
    gradients and Lightning refuses to clip; nor on a device or dtype its kernel lacks. There
    it falls back to foreach and says why in the run's log."""
    optim.check()
    kw: dict[str, Any] = {
        "weight_decay": optim.weight_decay,
        "eps": float(optim.eps),
        "betas": tuple(float(b) for b in optim.betas),
    }
    if optim.name == "stable_adamw":  # the project's own class: foreach ops, no fused kernel
        return StableAdamW(groups, lr=optim.lr, **kw)
    if optim.impl == "fused":
        if scaled:
            log.info(
                "optim.impl=fused -> foreach: fp16's loss scaler unscales the gradients "
                "before clipping and the monitor, which a fused step would do inside"
            )
        else:
            try:
                return torch.optim.AdamW(groups, lr=optim.lr, fused=True, **kw)
            except RuntimeError as e:  # a device or dtype without the fused kernel
                log.info("optim.impl=fused -> foreach: %s", str(e).splitlines()[0])
    # foreach: the CPU default is a per-tensor loop, several times slower here
    return torch.optim.AdamW(groups, lr=optim.lr, foreach=True, **kw)

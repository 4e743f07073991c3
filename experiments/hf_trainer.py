"""One cell of the map trained by a real `transformers.Trainer`, watched by
`NanMonitorCallback` (nanlab/integrations/hf.py):

    python -m experiments.hf_trainer stress=masked_rows precision=bf16 softmax=eager \\
        data.padding_side=left lr_x=1 output_dir=D

writes D/record.json (`trainer: transformers`) and D/history.csv and exits 0 on a failure, as
`src.train` does. Equal to nanlab's own runner (`nanlab.run.runner.run(spec, dir)`) by
construction wherever it can be:
- the model, mechanism and precision plugin from the project's build path
  (nanlab/run/build.py), so the stress is planted the same way;
- the same batches in the same order: the datamodule's dataset, collator and sampler
  (EpochSampler), and the stress's per-step batch transform (grad_poison) applied with the
  Trainer's step as each step takes its batches, so the monitor keeps the batch as trained;
- the same loss (NanLabModule.compute_loss) and the same optimizer and schedule
  (NanLabModule.configure_optimizers, passed to Trainer as `optimizers=`); clip =
  optim.clip as Trainer's max_grad_norm;
- the precision: the project's plugin runs the forward (its autocast) and backward (its
  fp32-accumulate half GEMMs on CPUs without native ones) inside Trainer's training_step;
  Trainer's own bf16/fp16 arguments stay off, or the two autocasts would differ from
  src.train's. fp16 has no loss scaler here (Trainer's is accelerate's, not Lightning's):
  a cell whose fp16 gradients overflow would differ; fp16_overflow's forward overflows at
  step 0, before any scaler matters.
Not equal by construction: Trainer clips before callbacks see the gradients, so with
clip > 0 the non-finite gradient fraction is measured after clipping (see hf.py).
"""

from __future__ import annotations

import sys
from pathlib import Path


def train(
    overrides: list[str],
    out_dir,
    callbacks=(),
    report_to: str = "none",
    verbose: bool = True,
    monitor: bool = True,
):
    """Train the cell of `overrides` with transformers.Trainer; returns (record, callback)
    ((None, None) with `monitor` off: the same Trainer without the callback, for
    experiments/bench_hf.py)."""
    import lightning as L
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from nanlab.config.compose import compose_spec
    from nanlab.data.datamodule import NanDataModule
    from nanlab.diagnosis.locate import backward_context
    from nanlab.integrations.hf import NanMonitorCallback
    from nanlab.numerics import stress
    from nanlab.run.build import build_parts, pick_device
    from nanlab.run.module import NanLabModule
    from nanlab.run.runner import base_record

    spec = compose_spec(*overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(spec.seed, workers=True, verbose=False)
    device = pick_device(spec.trainer.accelerator)
    if device == "cpu" and spec.trainer.cpu_threads:
        torch.set_num_threads(spec.trainer.cpu_threads)
    made: dict = {}

    def first_batch(parts):  # as the runner: a weight-level mechanism calibrates on it
        data = made["data"] = NanDataModule(spec.data, parts.processor, spec.batch_size, spec.seed)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        return parts.batch_transform(batch, 0) if parts.batch_transform else batch

    parts = build_parts(
        spec.model,
        spec.data,
        spec.softmax,
        spec.stress,
        spec.precision,
        spec.seed,
        device,
        first_batch,
    )
    data = made.get("data") or NanDataModule(spec.data, parts.processor, spec.batch_size, spec.seed)
    data.setup("fit")
    module = NanLabModule(
        parts.model, spec.optim, stress.lr_multiplier(spec.stress), parts.batch_transform
    )
    model = parts.model.to(device)
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    plugin = parts.plugin

    def compute_loss(batch):
        with plugin.train_step_context():
            return module.compute_loss(plugin.convert_input(batch))

    class CellTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return data.train_dataloader().sampler  # the datamodule's order (EpochSampler)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            # the stress's per-step transform (grad_poison), with the step that trains the
            # batch: the dataloader prefetches a batch ahead, so not in the collator
            batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
            if parts.batch_transform is not None:
                batches = [parts.batch_transform(b, self.state.global_step) for b in batches]
            return batches, n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return compute_loss(inputs)  # a per-batch mean, as src.train's

        def training_step(self, *args, **kwargs):
            with backward_context(plugin):  # the plugin's backward, as Lightning runs it
                return super().training_step(*args, **kwargs)

    record = base_record(spec, out_dir)
    record.half_gemm = parts.half_gemm
    use_monitor = monitor
    monitor = NanMonitorCallback(
        out_dir=out_dir,
        record=record,
        spec=spec.monitor,
        on_failure="skip_step" if spec.guard.name == "skip_step" else "stop",
        plugin=plugin,
        compute_loss=compute_loss,
        verbose=verbose,
    )
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=spec.optim.max_steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.optim.lr,
        max_grad_norm=spec.optim.clip,
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=device == "cpu",
        report_to=report_to,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )
    trainer = CellTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=data.collate,
        optimizers=(optimizer, scheduler),
        callbacks=[monitor, *callbacks] if use_monitor else list(callbacks),
    )
    trainer.model_accepts_loss_kwargs = False  # compute_loss's mean is per batch
    if not verbose:
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    if not use_monitor:
        return None, None
    if monitor.judge.failing_batch is not None:
        torch.save(dict(monitor.judge.failing_batch.items()), out_dir / "failing_batch.pt")
    return monitor.final, monitor


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), None)
    if out is None:
        print("usage: python -m experiments.hf_trainer <overrides> output_dir=DIR", file=sys.stderr)
        return 2
    overrides = [a for a in argv if not a.startswith("output_dir=")]
    rec, _ = train(overrides, out)
    return 0 if rec.status != "error" else 1


if __name__ == "__main__":
    raise SystemExit(main())


# A real framework on top of Trainer (LLaMA-Factory's SFT entry, its own environment, a
# planted masked_rows failure): experiments/hf_framework.py, `make hf-example`.

"""Shared fixtures. The real processor takes ~10 s to load, so it is built once per session."""

import pytest

import nanlab  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
from nanlab.model.processing import ProcessorSpec, load_processor


@pytest.fixture(scope="session")
def processor():
    return load_processor(ProcessorSpec())


@pytest.fixture(scope="module")
def batch(processor):
    """The first training batch of the fast test settings (tests/helpers.FAST)."""
    from helpers import spec
    from nanlab.data.datamodule import NanDataModule

    s = spec()
    dm = NanDataModule(s.data, processor, 4, 0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))

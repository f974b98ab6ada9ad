"""Shared test set-up.

On a machine without CUDA the Triton kernels are exercised in Triton's interpreter: TRITON_INTERPRET=1
must be set before triton is imported, and stay set while kernels run. With it set, `impl="auto"`
routes CPU tensors to the Triton kernels (as in DESIGN.md); tests that start subprocesses (DeepSpeed
launches) should drop it from the child's environment unless they mean to interpret kernels there.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A clo_fast cache dir shared by the tests that need the built demo model (test_model, test_train), so the
    demo model (~45 s of single-threaded pretraining) is built once for them instead of once per module."""
    return tmp_path_factory.mktemp("clo_fast_cache")

"""The one device and precision resolution (mambamim.runtime.device)."""

from __future__ import annotations

import pytest
import torch

from mambamim.runtime.device import autocast_context, cudnn_benchmark, resolve_amp, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_resolve_amp_and_autocast():
    cpu = torch.device("cpu")
    assert resolve_amp(cpu, "auto") == "none" and resolve_amp(torch.device("cuda"), "auto") == "bf16"
    with pytest.raises(ValueError):
        resolve_amp(cpu, "fp16")
    with pytest.raises(ValueError):
        resolve_amp(cpu, "fp8")
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "none"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_the_engine_and_inference_share_it():
    from mambamim import inference
    from mambamim.engine import distributed

    assert distributed.resolve_device is resolve_device is inference.resolve_device
    assert distributed.autocast_context is autocast_context


def test_run_device_follows_the_module_unless_told():
    from torch import nn

    from mambamim.runtime.device import run_device

    assert run_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert run_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    assert run_device(nn.Linear(2, 2), "cpu") == torch.device("cpu")


def test_cudnn_benchmark_is_on_for_cuda_only_and_restored():
    before = torch.backends.cudnn.benchmark
    try:
        for start in (False, True):
            torch.backends.cudnn.benchmark = start
            with cudnn_benchmark(torch.device("cuda")):
                assert torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.benchmark is start
            with cudnn_benchmark(torch.device("cpu")):
                assert torch.backends.cudnn.benchmark is start
            try:
                with cudnn_benchmark(torch.device("cuda")):
                    raise RuntimeError("inside")
            except RuntimeError:
                pass
            assert torch.backends.cudnn.benchmark is start
    finally:
        torch.backends.cudnn.benchmark = before

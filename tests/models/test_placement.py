"""Device and dtype: defaults, names, and one-line refusals before any model is read."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.models.placement import resolve_device, resolve_dtype

NO_CUDA = not torch.cuda.is_available()


def test_defaults_follow_the_machine():
    device = resolve_device(None)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp32", torch.float32), ("float32", torch.float32),
                                         (torch.bfloat16, torch.bfloat16), ("torch.float32", torch.float32)])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) == dtype


@pytest.mark.parametrize("dtype, message", [("int8", "unsupported dtype"), ("float64", "unsupported dtype"),
                                            ("fp16", "float16 needs a CUDA device")])
def test_bad_dtypes_are_refused(dtype, message):
    with pytest.raises(KVPError, match=message):
        resolve_dtype(dtype, torch.device("cpu"))


@pytest.mark.parametrize("device", ["tpu", "banana", "mps"])
def test_bad_devices_are_refused(device):
    with pytest.raises(KVPError, match="device"):
        resolve_device(device)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_a_cuda_request_without_cuda_is_one_line_before_loading(capsys):
    with pytest.raises(KVPError, match="CUDA is not available"):
        resolve_device("cuda")
    assert main(["models", "--load", "smollm2-135m", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use --device cpu" in err


def test_an_unknown_dtype_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["models", "--load", "smollm2-135m", "--dtype", "int4"])
    assert exc.value.code == 2


@pytest.mark.model
def test_bf16_on_cpu_halves_the_cache(smollm):
    from kvpolicy.compression.engine import prefill
    from kvpolicy.models import load_model

    half = load_model("smollm2-135m", device="cpu", dtype="bf16")
    assert half.model.dtype == torch.bfloat16 and half.info == smollm.info  # same fingerprint: same model
    ids = smollm.encode("The quick brown fox jumps over the lazy dog. " * 8)
    assert 2 * prefill(half, ids)[0].nbytes() == prefill(smollm, ids)[0].nbytes()

"""Devices, mixed precision and random-number state: the decisions that differ between CPUs and GPUs.

Each decision is a function of plain values (a compute capability, a device index), so that the CPU-only test
suite checks the choices every GPU would make.
"""
from __future__ import annotations

import torch

from utils import SatError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise SatError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SatError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def amp_dtype_for(device_type: str, capability: tuple[int, int] | None = None, cpu_bf16: bool = False) -> torch.dtype:
    """The autocast dtype: bf16 where the hardware computes it natively, else fp16 on CUDA.

    torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs too, where bf16 is emulated and slow, so the choice
    goes by compute capability: bf16 from 8.0 (A100, RTX 30xx, H100), fp16 with loss scaling below (V100, T4).
    On a CPU, only with native bf16 (AVX512-BF16 or AMX).
    """
    if device_type == "cuda":
        return torch.bfloat16 if capability is not None and capability >= (8, 0) else torch.float16
    if not cpu_bf16:
        raise SatError("--amp: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); run without --amp")
    return torch.bfloat16


def autocast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return amp_dtype_for("cuda", torch.cuda.get_device_capability(device))
    return amp_dtype_for(device.type, cpu_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def restore_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Load a saved loss-scaler state where it applies: a run saved in bf16 or fp32 (empty state) resumed in fp16
    starts a fresh scale, and a scale saved in fp16 is dropped when resuming in bf16 or fp32."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def rng_state(device: torch.device) -> dict:
    """The CPU generator's state and, when training on a GPU, that GPU's: what dropout and sampling draw from."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def cuda_state_to_restore(saved: torch.Tensor | list[torch.Tensor], index: int) -> torch.Tensor:
    """The saved CUDA generator state for this process's GPU. Checkpoints hold the state of the GPU that trained
    (older ones a list, one per visible GPU); a run continued on a machine with fewer or more GPUs takes the
    state of the same index where there is one, else the first."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        raise SatError("the checkpoint's CUDA random state is an empty list")
    return saved[index] if index < len(saved) else saved[0]


def restore_rng(saved: dict, device: torch.device) -> None:
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda" and "cuda" in saved:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda_state_to_restore(saved["cuda"], index), device)

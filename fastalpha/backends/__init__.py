"""The implementations of the fused-op contract (see fastalpha.dispatch): one module per backend.

Helpers shared by the backend modules live here, so that each module states only what is
particular to it.
"""
from __future__ import annotations


def every_negative_set(negatives: str, has_queue: bool) -> tuple[bool, str]:
    """`supports` of a backend that computes "all", "cross" and "none", with or without a queue."""
    return True, ""


def on_device_type(device, device_type: str, name: str, status) -> tuple[bool, str]:
    """`device_status` of a backend that runs on one device type: its `status()` there, else why not."""
    if device.type != device_type:
        return False, f"the {name} backend runs on {'CPU' if device_type == 'cpu' else 'CUDA'} tensors only, got {device.type} tensors"
    return status()

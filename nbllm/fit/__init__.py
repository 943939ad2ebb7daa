"""Machine fit: what this machine offers, what a model needs, which load options fit it, and why.

    from nbllm.fit import Machine, estimate, recommend
    machine = Machine.probe()                      # or Machine(gpus=[GPU("RTX 4060", 8 * GiB, (8, 9))], ...)
    print(estimate("org_model", {"load_in_4bit": True}, machine))
    print(recommend("org_model", machine))         # .options, .reasons, .estimate, .better

Nothing here reads weights: shapes come from config.json, safetensors headers and GGUF headers.
"""

from __future__ import annotations

from .doctor import DoctorReport, doctor
from .estimate import DeviceMemory, Estimate, estimate
from .failures import explain_failure, failure_error, failure_kind
from .machine import GPU, GiB, Machine
from .measure import measure_peak_memory, model_memory, reset_peak_memory
from .recommend import Recommendation, flags, gguf_like, recommend
from .settings import (
    SavedSettings,
    WhatWorked,
    forget_settings,
    record_success,
    save_settings,
    saved_settings,
    settings_name,
    settings_path,
    what_worked,
)
from .shape import Block, ModelShape, model_shape

__all__ = [
    "GPU", "Block", "DeviceMemory", "DoctorReport", "Estimate", "GiB", "Machine", "ModelShape", "Recommendation",
    "SavedSettings", "WhatWorked", "doctor", "estimate", "explain_failure", "failure_error", "failure_kind", "flags",
    "forget_settings", "gguf_like", "measure_peak_memory", "model_memory", "model_shape", "recommend", "record_success", "reset_peak_memory",
    "save_settings", "saved_settings", "settings_name", "settings_path", "what_worked",
]

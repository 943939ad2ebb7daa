"""What this machine offers a model: GPUs, RAM, disk in the models folder, and the libraries installed.

:meth:`Machine.probe` looks at the machine it runs on; a :class:`Machine` can also be written as data
(``Machine(gpus=[GPU("NVIDIA GeForce RTX 4060", 8 * GiB, (8, 9))], ram_bytes=62 * GiB)``), which is how
the recommendations are tested for machines that are not this one. torch is imported only if it is
installed, and only by :meth:`Machine.probe`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 2**30

PACKAGES: tuple[str, ...] = (
    "torch", "transformers", "accelerate", "bitsandbytes", "flash-attn", "llama-cpp-python", "gguf",
    "safetensors", "huggingface_hub", "ipywidgets",
)
"""The distributions whose versions the probe reports (and the recommendations consult)."""

PIP_INSTALL: dict[str, str] = {
    "torch": "pip install 'nbllm[transformers]'",
    "transformers": "pip install 'nbllm[transformers]'",
    "accelerate": "pip install 'nbllm[transformers]'",
    "bitsandbytes": "pip install bitsandbytes",
    "flash-attn": "pip install flash-attn --no-build-isolation",
    "llama-cpp-python": "pip install 'nbllm[llamacpp]'",
    "gguf": "pip install 'nbllm[llamacpp]'",
    "safetensors": "pip install 'nbllm[transformers]'",
    "huggingface_hub": "pip install huggingface_hub",
    "ipywidgets": "pip install 'nbllm[widgets]'",
}
"""The command that installs each package nbllm can use."""

LLAMA_CPP_CUDA_INSTALL = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python --force-reinstall --no-cache-dir'
"""Rebuilds llama-cpp-python with CUDA (the PyPI source build is CPU-only unless told otherwise)."""

AMPERE = (8, 0)
"""Compute capability of NVIDIA's Ampere generation: bfloat16 and flash-attention 2 need it."""


@dataclass(frozen=True)
class GPU:
    """One CUDA GPU: its name, its memory and its compute capability (major, minor)."""

    name: str
    memory_bytes: int
    capability: tuple[int, int] = (8, 0)
    free_bytes: int | None = None
    """Memory free when probed (other processes, or a model loaded in this one, use the rest)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "capability", tuple(int(c) for c in self.capability))

    @property
    def ampere_or_newer(self) -> bool:
        return self.capability >= AMPERE

    @property
    def label(self) -> str:
        return f"{self.name} ({self.memory_bytes / GiB:.1f} GiB, compute capability {self.capability[0]}.{self.capability[1]})"


@dataclass(frozen=True)
class Machine:
    """A machine as the recommendations see it. Every field has a default, so a simulated machine
    names only what matters: ``Machine(gpus=[GPU(...)], ram_bytes=62 * GiB)``.

    ``packages`` maps a distribution name to its version (``None``: not installed); a simulated
    machine that leaves it out is taken to have every library nbllm can use, with CUDA support where
    it has a GPU (see :meth:`has`).
    """

    gpus: tuple[GPU, ...] = ()
    ram_bytes: int = 16 * GiB
    ram_available_bytes: int | None = None
    cpu_count: int | None = None
    models_dir: str | None = None
    disk_free_bytes: int | None = None
    """Free space where the models folder is (disk offload and downloads go there)."""
    packages: Mapping[str, str | None] | None = None
    torch_cuda: str | None = None
    """The CUDA version torch was built with (``torch.version.cuda``); None for a CPU-only build."""
    why_no_gpu: str | None = None
    """Why no GPU is usable, in the user's words (None when there is one)."""
    driver: str | None = None
    """The NVIDIA driver version, when one is installed."""
    llama_cpp_gpu: bool | None = None
    """Whether llama-cpp-python was built with GPU offload (None: unknown or not installed)."""
    bitsandbytes_cuda: bool | None = None
    """Whether bitsandbytes has a CUDA library for this torch (None: unknown or not installed)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.packages is not None:
            object.__setattr__(self, "packages", dict(self.packages))

    # -- questions the recommendations ask ------------------------------------------------------
    def has(self, package: str) -> bool:
        """Whether ``package`` is installed (a simulated machine without ``packages`` has everything)."""
        if self.packages is None:
            return True
        return self.packages.get(package) is not None

    def version(self, package: str) -> str | None:
        return None if self.packages is None else self.packages.get(package)

    @property
    def gpu_memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.gpus)

    @property
    def all_ampere(self) -> bool:
        return bool(self.gpus) and all(g.ampere_or_newer for g in self.gpus)

    @property
    def llama_cpp_offloads(self) -> bool:
        """Whether llama.cpp can put layers on this machine's GPUs."""
        if not self.gpus:
            return False
        return self.llama_cpp_gpu if self.llama_cpp_gpu is not None else self.packages is None

    @property
    def bitsandbytes_on_gpu(self) -> bool:
        if not self.gpus:
            return False
        return self.bitsandbytes_cuda if self.bitsandbytes_cuda is not None else self.has("bitsandbytes")

    # -- data in and out -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): what :meth:`from_dict` reads back."""
        out = dataclasses.asdict(self)
        out["gpus"] = [{**dataclasses.asdict(g), "capability": list(g.capability)} for g in self.gpus]
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Machine:
        values = dict(data)
        values["gpus"] = [GPU(**g) if isinstance(g, Mapping) else g for g in values.get("gpus", ())]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def summary(self) -> str:
        """One line: the GPUs (or none) and the RAM."""
        gpus = " + ".join(g.label for g in self.gpus) if self.gpus else "no GPU"
        return f"{gpus}; {self.ram_bytes / GiB:.1f} GiB RAM"

    # -- what a person reads -------------------------------------------------------------------
    def findings(self) -> list[str]:
        """One line per finding: GPUs (or why none is usable), memory, disk, libraries, and fixes."""
        lines: list[str] = []
        if self.gpus:
            for i, g in enumerate(self.gpus):
                free = f", {g.free_bytes / GiB:.1f} GiB free" if g.free_bytes is not None else ""
                lines.append(f"GPU {i}: {g.label}{free}")
            cuda = f"torch built for CUDA {self.torch_cuda}" if self.torch_cuda else "torch's CUDA version unknown"
            lines.append(f"CUDA: {cuda}" + (f", NVIDIA driver {self.driver}" if self.driver else ""))
        else:
            lines.append(f"GPU: none usable — {self.why_no_gpu or 'no CUDA GPU was found'}")
        avail = f" ({self.ram_available_bytes / GiB:.1f} GiB available)" if self.ram_available_bytes else ""
        cores = f"; {self.cpu_count} CPU cores" if self.cpu_count else ""
        lines.append(f"RAM: {self.ram_bytes / GiB:.1f} GiB{avail}{cores}")
        if self.models_dir is not None:
            free = f"{self.disk_free_bytes / GiB:.1f} GiB free" if self.disk_free_bytes is not None else "free space unknown"
            lines.append(f"models folder: {self.models_dir} ({free})")
        if self.packages is not None:
            lines.append("libraries: " + ", ".join(self._package_label(p) for p in PACKAGES))
        lines.extend(self.fixes())
        lines.extend(self.notes)
        return lines

    def _package_label(self, package: str) -> str:
        version = self.version(package)
        if version is None:
            return f"{package} missing"
        extra = ""
        if package == "torch":
            extra = f" (CUDA {self.torch_cuda})" if self.torch_cuda else " (CPU only)"
        elif package == "llama-cpp-python" and self.llama_cpp_gpu is not None:
            extra = " (GPU offload)" if self.llama_cpp_gpu else " (CPU build)"
        elif package == "bitsandbytes" and self.bitsandbytes_cuda is not None:
            extra = " (CUDA)" if self.bitsandbytes_cuda else " (CPU only)"
        return f"{package} {version}{extra}"

    def fixes(self) -> list[str]:
        """What to install or change, one line each with the command."""
        out: list[str] = []
        if self.packages is None:
            return out
        for package in ("torch", "transformers", "accelerate"):
            if not self.has(package):
                out.append(f"fix: {package} is missing, so Transformers models cannot load: {PIP_INSTALL[package]}")
        if not self.has("llama-cpp-python"):
            out.append(f"fix: llama-cpp-python is missing, so GGUF files cannot load: {PIP_INSTALL['llama-cpp-python']}")
        if not self.has("bitsandbytes"):
            out.append(f"fix: bitsandbytes is missing, so --load-in-4bit/--load-in-8bit cannot work: {PIP_INSTALL['bitsandbytes']}")
        if self.gpus:
            if self.has("bitsandbytes") and self.bitsandbytes_cuda is False:
                out.append(
                    f"fix: bitsandbytes has no CUDA library for torch's CUDA {self.torch_cuda}: pip install -U bitsandbytes"
                )
            if self.has("llama-cpp-python") and self.llama_cpp_gpu is False:
                out.append(f"fix: llama-cpp-python was built without GPU support: {LLAMA_CPP_CUDA_INSTALL}")
            if self.all_ampere and not self.has("flash-attn"):
                out.append(f"fix: flash-attn is missing (flash-attention 2 runs on these GPUs): {PIP_INSTALL['flash-attn']}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.findings())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    # -- this machine --------------------------------------------------------------------------
    @classmethod
    def probe(cls, models_dir: str | Path | None = None) -> Machine:
        """This machine, as it is now. Never raises: what cannot be found out is left unknown."""
        from ..models import models_dir as current_models_dir

        packages = installed_packages()
        folder = Path(models_dir) if models_dir is not None else current_models_dir()
        gpus, torch_cuda, why, notes = _probe_torch(packages)
        driver = nvidia_driver_version()
        if not gpus:
            why = _why_no_gpu(packages, torch_cuda, driver, why)
        ram, available, cores = _probe_memory()
        return cls(
            gpus=tuple(gpus),
            ram_bytes=ram,
            ram_available_bytes=available,
            cpu_count=cores,
            models_dir=str(folder),
            disk_free_bytes=_disk_free(folder),
            packages=packages,
            torch_cuda=torch_cuda,
            why_no_gpu=why,
            driver=driver,
            llama_cpp_gpu=llama_cpp_gpu_support() if packages.get("llama-cpp-python") else None,
            bitsandbytes_cuda=bitsandbytes_cuda_support(torch_cuda) if packages.get("bitsandbytes") else None,
            notes=tuple(notes),
        )


def installed_packages(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Distribution name → installed version (None if absent), from package metadata: nothing is imported."""
    out: dict[str, str | None] = {}
    for name in names:
        version = None
        for candidate in (name, name.replace("-", "_"), name.replace("_", "-")):
            try:
                version = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        out[name] = version
    return out


def _probe_torch(packages: Mapping[str, str | None]) -> tuple[list[GPU], str | None, str | None, list[str]]:
    """(GPUs, torch's CUDA version, why no GPU, notes) from torch, imported only if installed."""
    if packages.get("torch") is None:
        return [], None, None, []
    try:
        import torch
    except Exception as exc:  # a broken install: say so, do not fail the probe
        return [], None, f"torch is installed but cannot be imported ({type(exc).__name__}: {exc})", []
    cuda = getattr(torch.version, "cuda", None)
    if not cuda:
        return [], None, None, []
    try:
        if not torch.cuda.is_available():
            return [], cuda, None, []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free: int | None = int(torch.cuda.mem_get_info(i)[0])
            except Exception:
                free = None
            gpus.append(GPU(props.name, int(props.total_memory), (props.major, props.minor), free))
        return gpus, cuda, None, []
    except Exception as exc:
        return [], cuda, f"CUDA is installed but failed to start ({type(exc).__name__}: {_first_line(exc)})", []


def _why_no_gpu(packages: Mapping[str, str | None], torch_cuda: str | None, driver: str | None, known: str | None) -> str:
    """The reason no GPU is usable, with what to do about it."""
    if known:
        return known
    if packages.get("torch") is None:
        base = "torch is not installed"
        return base + (f" (an NVIDIA driver {driver} is present: install a CUDA build of torch)" if driver else "")
    if not torch_cuda:
        version = packages.get("torch")
        if driver:
            return (f"torch {version} is a CPU-only build, but an NVIDIA driver ({driver}) is installed: install a "
                    "CUDA build of torch (the pip command for your CUDA version is on pytorch.org's install page)")
        return f"torch {version} is a CPU-only build (no CUDA), and no NVIDIA driver was found"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
    if not driver:
        return f"torch is built for CUDA {torch_cuda} but no NVIDIA driver was found: install the NVIDIA driver"
    return f"torch is built for CUDA {torch_cuda} and the NVIDIA driver {driver} is installed, but no CUDA device is visible"


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version, from /proc (Linux), or None when there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "present" if sys.platform != "linux" and shutil.which("nvidia-smi") else None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return "present"


def llama_cpp_gpu_support() -> bool | None:
    """Whether llama-cpp-python can offload layers to a GPU.

    A build with a GPU backend ships its library (``libggml-cuda``, ``-vulkan``, ``-metal``, ...) in
    ``llama_cpp/lib``; if the folder does not tell, llama.cpp itself is asked (importing it loads its
    shared library, a fraction of a second)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    names = [p.name for p in lib.iterdir()] if lib.is_dir() else []
    if any(n.startswith("libggml-") and any(b in n for b in ("cuda", "vulkan", "metal", "hip", "sycl")) for n in names):
        return True
    if any(n.startswith("libggml-cpu") for n in names):
        return False
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return None


def bitsandbytes_cuda_support(torch_cuda: str | None) -> bool | None:
    """Whether bitsandbytes ships a CUDA library it will load for torch's CUDA version (it is not
    imported: its import prints noise)."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return None
    if not torch_cuda:
        return False
    folder = Path(next(iter(spec.submodule_search_locations)))
    return bitsandbytes_library(torch_cuda, [p.name for p in folder.glob("libbitsandbytes_cuda*")]) is not None


def bitsandbytes_library(torch_cuda: str, names: Iterable[str]) -> str | None:
    """The CUDA library bitsandbytes loads for torch's CUDA version among the files it ships, as its
    ``cextension.get_cuda_bnb_library_path`` picks it (0.50): the same version, else the newest one not
    newer within the same major version, else the oldest newer one within it; none across majors.
    ``BNB_CUDA_VERSION`` names one version and disables the choice."""
    def version(tag: str) -> tuple[int, int]:
        return int(tag[:2]), int(tag[2:])  # "128" is 12.8, "130" 13.0: the major has two digits

    libraries = {}
    for name in names:
        match = re.match(r"libbitsandbytes_cuda(\d{3,})\.", name)
        if match:
            libraries[version(match.group(1))] = name
    override = os.environ.get("BNB_CUDA_VERSION")
    if override is not None:
        return libraries.get(version(override)) if override.isdigit() and len(override) >= 3 else None
    try:
        major, minor = (int(x) for x in torch_cuda.split(".")[:2])
    except ValueError:
        return None
    same_major = sorted(v for v in libraries if v[0] == major)
    older = [v for v in same_major if v <= (major, minor)]
    newer = [v for v in same_major if v > (major, minor)]
    chosen = older[-1] if older else newer[0] if newer else None
    return libraries[chosen] if chosen else None


def _probe_memory() -> tuple[int, int | None, int | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available), psutil.cpu_count(logical=True)
    except Exception:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 0, None, os.cpu_count()


def _disk_free(folder: Path) -> int | None:
    """Free bytes on the disk holding ``folder`` (or its nearest existing parent: it may not exist yet)."""
    path = folder.expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""What every benchmark shares: the machine's description, its memory bandwidth as measured here, the
bytes a model reads per token, clocks, and the results files under benchmarks/results/.

Decode is memory-bound: each new token reads every weight once (and the KV cache so far), so
``tokens/s × bytes read per token`` can not exceed the memory bandwidth. :func:`bandwidth` measures
that limit on this machine, the best of a large matrix-vector product and a streaming read (torch and
numpy); a benchmark that measures llama.cpp raises it to what llama.cpp's own decode reached when that
is higher, since a decode that reads those bytes proves the machine delivers them.

Import this before numpy or torch (it sets the BLAS thread count from ``--threads``): see
:func:`set_threads`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "In a notebook, a researcher loads a language model once and then asks it about"


def set_threads(threads: int) -> None:
    """Compute threads for torch, BLAS and OpenMP, before they are imported. 1 (the default of the
    benchmarks) makes process CPU time a faithful clock on a machine shared with other work."""
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def model_size(params: float) -> dict[str, Any]:
    """Size keywords of a built-in model: ``0`` is the smallest (the tiny default), else about ``params``."""
    from nbllm.testing import model_for_params

    return {} if params == 0 else model_for_params(int(params))


# -- clocks ----------------------------------------------------------------------------------------

Stamp = tuple[float, float]
"""(wall-clock seconds, process CPU seconds)."""


def now() -> Stamp:
    return time.perf_counter(), time.process_time()


def measures(start: Stamp, stamps: Sequence[Stamp]) -> dict[str, float]:
    """TTFT (from the call) and decode tokens/s, by wall clock and by process CPU time."""
    first, last = stamps[0], stamps[-1]
    n = len(stamps) - 1
    return {
        "ttft_wall": first[0] - start[0], "ttft_cpu": first[1] - start[1],
        "rate_wall": n / max(last[0] - first[0], 1e-9), "rate_cpu": n / max(last[1] - first[1], 1e-9),
    }


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def interleaved(methods: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Run every method once per round, the order rotating from round to round (no position bias)."""
    out: dict[str, list[Any]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            out[name].append(methods[name]())
    return out


# -- the machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The machine and software a result was measured on."""
    import psutil

    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "l3_cache": l3.read_text().strip() if l3.exists() else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "threads": threads,
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        **{dist: _version(dist) for dist in ("torch", "transformers", "llama-cpp-python", "numpy", "bitsandbytes",
                                             "flash-attn")},
        "nbllm_commit": _commit(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return {k: v for k, v in info.items() if v is not None}


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def cuda_or_exit(device: str) -> None:
    """``--device cuda`` without CUDA: one line, exit 0 (``make bench-gpu`` on a CPU machine)."""
    if device != "cuda":
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        print(f"{Path(sys.argv[0]).name}: skipped, no CUDA GPU here (torch sees none)")
        sys.exit(0)


# -- bandwidth -------------------------------------------------------------------------------------


def bandwidth(threads: int, device: str = "cpu", mib: int = 256, repeats: int = 12) -> dict[str, Any]:
    """Memory bandwidth in GB/s: the best of several ways of reading ``mib`` MiB, each the best of
    ``repeats``. On a CPU with one thread the clock is process CPU time (robust when the machine is
    shared), else wall-clock time. On CUDA: device memory, timed with CUDA events."""
    import numpy as np
    import torch

    n = mib * 2**20 // 4
    side = 8192
    rows = n // side
    if device == "cuda":
        w = torch.randn(rows, side, device="cuda")
        x = torch.randn(side, device="cuda")
        flat = w.view(-1)

        def cuda_time(fn: Callable[[], Any]) -> float:
            fn()
            best = float("inf")
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                best = min(best, a.elapsed_time(b) / 1000)
            return best

        out = {"torch.mv": n * 4 / cuda_time(lambda: torch.mv(w, x)) / 1e9,
               "torch.sum": n * 4 / cuda_time(lambda: flat.sum()) / 1e9}
        clock = "CUDA events"
    else:
        torch.set_num_threads(max(threads, 1) if threads else torch.get_num_threads())
        w = torch.randn(rows, side)
        x = torch.randn(side)
        flat = w.view(-1)
        wn, xn, flatn = w.numpy(), x.numpy(), flat.numpy()
        use_cpu = threads == 1
        tick = time.process_time if use_cpu else time.perf_counter
        ways: dict[str, Callable[[], Any]] = {
            "torch.mv": lambda: torch.mv(w, x), "numpy matvec": lambda: wn @ xn,
            "torch.sum": lambda: flat.sum(), "numpy sum": lambda: np.add.reduce(flatn),
        }
        best = dict.fromkeys(ways, float("inf"))
        for fn in ways.values():
            fn()
        for _ in range(repeats):  # interleaved: a busy moment of the machine hits all ways alike
            for name, fn in ways.items():
                t = tick()
                fn()
                best[name] = min(best[name], tick() - t)
        out = {name: n * 4 / s / 1e9 for name, s in best.items()}
        clock = "process CPU time" if use_cpu else "wall clock"
    top = max(out, key=lambda k: out[k])
    return {"gb_per_s": out[top], "by": top, "ways": {k: round(v, 1) for k, v in out.items()}, "clock": clock,
            "mib": mib}


# -- bytes read per token --------------------------------------------------------------------------


def transformers_bytes_per_token(model: Any, context: float) -> dict[str, float]:
    """Bytes a Transformers model reads for one new token at ``context`` tokens of KV cache: every
    weight (quantized ones as stored), one row of the input embedding (unless tied to the output),
    and the KV cache so far."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        params -= embedding.numel() * embedding.element_size() * (1 - 1 / embedding.shape[0])
    cfg = model.config.get_text_config()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    import torch

    cache_element = torch.finfo(model.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * cache_element * context
    return {"weights": params, "kv_cache": kv, "total": params + kv}


def gguf_bytes_per_token(path: Path, context: float, cache_element: int = 2) -> dict[str, float]:
    """The same for a GGUF file: its tensors as stored, one row of ``token_embd``, and llama.cpp's
    KV cache (f16 by default: 2 bytes an element)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    weights = 0.0
    for t in reader.tensors:
        n = float(t.n_bytes)
        if t.name == "token_embd.weight" and any(o.name == "output.weight" for o in reader.tensors):
            n /= int(t.shape[-1])  # one row of the embedding is read per token
        weights += n

    def field(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers, heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads
    head_dim = field(f"{arch}.embedding_length") // heads
    kv = 2 * layers * kv_heads * head_dim * cache_element * context
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def fraction(rate: float, bytes_per_token: float, limit_gb_s: float) -> float:
    return rate * bytes_per_token / 1e9 / limit_gb_s


# -- results ---------------------------------------------------------------------------------------


def save(name: str, machine: dict[str, Any], table: list[str], data: dict[str, Any], notes: Sequence[str] = ()) -> Path:
    """Write ``results/<name>.json`` (everything) and ``results/<name>.md`` (the machine in one line,
    the table and the notes: what the README quotes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, **data, "table": table, "notes": list(notes)}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    line = (f"Measured {machine['date'][:10]} on {machine.get('gpu') or machine['cpu']} "
            f"({machine['logical_cpus']} logical CPUs, {machine.get('l3_cache', '?')} L3, {machine['memory_gib']} GiB; "
            f"{machine['threads'] or 'default'} compute thread(s), load average {machine['load_average_at_start']} "
            f"at the start), torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
            f"llama-cpp-python {machine.get('llama-cpp-python')}, nbllm {machine.get('nbllm_commit')}.")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join([line, "", *table, *([""] if notes else []), *notes]) + "\n")
    print(f"\nsaved {md.relative_to(ROOT)} and {name}.json")
    return md


def rss() -> int:
    """The process's resident memory after freeing what was dropped (and handing freed heap pages back
    to the system, so a release shows)."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return int(psutil.Process().memory_info().rss)


def stamp_arrivals(loader: Any) -> list[Stamp]:
    """Stamp every token the engine receives from ``loader``: process CPU time as it arrives, and
    wall-clock time as the generation thread made it (nbllm may hand several over at once). Returns the
    list the stamps go to (clear it before each run)."""
    arrivals: list[Stamp] = []
    generate_tokens = loader.generate_tokens

    def stamped(*a: Any, **k: Any) -> Any:
        stream = generate_tokens(*a, **k)
        try:
            for token in stream:
                wall, cpu = now()
                arrivals.append((getattr(stream, "emitted_at", None) or wall, cpu))
                yield token
        finally:
            stream.close()

    loader.generate_tokens = stamped
    return arrivals

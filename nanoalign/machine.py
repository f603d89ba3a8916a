"""
What this machine is, and how fast it can go: its name (the GPU's, or the CPU's model, threads and
native bf16 flags), its matmul peak measured here, a card's nominal bf16 peak, a clock that waits
for the GPU, and the peak memory of a run. Figures differ between machines (other SIMD kernels
round differently), so every reported figure names its machine.
"""

import os
import platform
import statistics
import sys
import time

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets); the first name found wins.
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
                       ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 4090", 165),
                       ("RTX 3090", 71), ("A10", 125)]
# The CPU flags of native bf16 matmuls; without them bf16 is emulated, often far slower than fp32
NATIVE_BF16 = [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")]


def machine_name(device: str = "") -> str:
    """The GPU's name, or the CPU's model, threads and native bf16 flags ("AMD EPYC" names
    several CPU generations; whether bf16 can be fast here depends on the flags)."""
    if device.startswith("cuda") or (not device and torch.cuda.is_available()):
        return torch.cuda.get_device_name(device or 0)
    name, flags = f"{platform.machine()} CPU", []
    if os.path.exists("/proc/cpuinfo"):
        lines = open("/proc/cpuinfo").read().splitlines()
        models = [s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")]
        name = models[0] if models else name
        flags = next((s.split(":", 1)[1].split() for s in lines if s.startswith("flags")), [])
    native = [label for flag, label in NATIVE_BF16 if flag in flags]
    return f"{name}, {torch.get_num_threads()} threads" + (f" ({', '.join(native)})" if native
                                                            else "")


def clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA calls return before their kernels finish
    return time.perf_counter()


def matmul_gflops(n: int, dtype=torch.float32, device="cpu", repeats=5, calls=0, stat=max):
    """GFLOP/s of n x n matmuls: `stat` over `repeats` samples of `calls` matmuls (0: enough to
    last ~0.1 s, so that timer resolution and launch overhead do not count)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = clock(device)
    a @ b
    calls = calls or max(1, int(0.1 / max(clock(device) - t, 1e-6)))
    rates = []
    for _ in range(repeats):
        t = clock(device)
        for _ in range(calls):
            a @ b
        rates.append(2 * n ** 3 * calls / (clock(device) - t) / 1e9)
    return stat(rates)


def probe() -> float:
    """The fixed machine-speed probe: 7 samples of 10 fp32 512x512 matmuls, the median."""
    return matmul_gflops(512, repeats=7, calls=10, stat=statistics.median)


def peaks(device: str, cpu_n: int = 1024) -> dict:
    """The fp32 and bf16 matmul peaks measured here (GFLOP/s) and, for a known card, its nominal
    bf16 peak (TFLOP/s): MFU's denominator on a GPU."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else cpu_n
    # CPU bf16 is often emulated (~50x slower): half the size there
    out = {"fp32_gflops": matmul_gflops(n, torch.float32, device),
           "bf16_gflops": matmul_gflops(n if cuda else n // 2, torch.bfloat16, device)}
    if cuda:
        name = torch.cuda.get_device_name(device)
        out["nominal_bf16_tflops"] = next((v for k, v in NOMINAL_BF16_TFLOPS if k in name), None)
    return out


def peak_memory_mb(device: str) -> float:
    """CUDA: the most allocated since the last reset. CPU: the process's peak RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # POSIX only; ru_maxrss is in kB on Linux, in bytes on macOS
    kb = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb

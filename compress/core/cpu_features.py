"""The instruction-set features of this CPU that change what an INT8 file computes or how fast.

Read once per process from ``/proc/cpuinfo`` (Linux) or ``sysctl`` (macOS). Recorded with every
benchmark result (latency depends on them) and used to decide whether ONNX Runtime's u8s8
kernels saturate here (x86 without VNNI: see :mod:`compress.quantization.int8_kernels`).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import asdict, dataclass

# The flags worth recording, by the names Linux gives them.
X86_FLAGS = (
    "sse4_1",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
)
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
# macOS sysctl names -> the Linux flag names above
_MACOS_ARM = {
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
}


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU can do for integer and low-precision kernels.

    ``flags`` are the recorded flags present (Linux names); ``known`` is False where the flags
    could not be read (Windows, containers hiding /proc): then nothing is claimed.
    """

    arch: str
    flags: tuple[str, ...]
    known: bool

    @property
    def x86(self) -> bool:
        return self.arch.lower() in _X86_MACHINES

    @property
    def vnni(self) -> bool:
        return any(flag in self.flags for flag in VNNI_FLAGS)

    @property
    def saturates_u8s8(self) -> bool:
        """ONNX Runtime's u8s8 kernels add product pairs in saturating 16-bit lanes here."""
        return self.known and self.x86 and not self.vnni

    def summary(self) -> str:
        if not self.known:
            return f"{self.arch}, flags unknown"
        if self.x86:
            simd = (
                "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else "SSE"
            )
            return f"{self.arch}, {simd}, {'VNNI' if self.vnni else 'no VNNI'}"
        return f"{self.arch}, {'dot-product' if 'asimddp' in self.flags else 'no dot-product'}"

    def to_dict(self) -> dict:
        return asdict(self) | {"vnni": self.vnni, "saturates_u8s8": self.saturates_u8s8}


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (cached)."""
    arch = platform.machine() or "unknown"
    flags = (
        _linux_flags()
        if platform.system() == "Linux"
        else _macos_flags()
        if platform.system() == "Darwin"
        else None
    )
    if flags is None:
        return CpuFeatures(arch, (), known=False)
    wanted = X86_FLAGS if arch.lower() in _X86_MACHINES else ARM_FLAGS
    return CpuFeatures(arch, tuple(f for f in wanted if f in flags), known=True)


def _linux_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def _macos_flags() -> set[str] | None:
    try:
        out = subprocess.run(
            ["sysctl", "-a"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    flags = set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"):
            flags |= {f.lower().replace(".", "_") for f in value.split()}
        elif _MACOS_ARM.get(key) and value == "1":
            flags.add(_MACOS_ARM[key])
    if "avx512vnni" in flags:
        flags.add("avx512_vnni")
    if platform.machine() == "arm64":
        flags.add("asimd")  # every Apple Silicon core has NEON
    return flags

"""Testing helpers: a SIMULATED NVML device for tests, demos and users' CI.

See ``docs/simulated-nvml.md``. Everything these helpers produce is simulated.
"""

from lightning_sustain.testing.profiles import PowerProfile, benchmark_profiles
from lightning_sustain.testing.simulated_nvml import (
    SimulatedDeviceSpec,
    SimulatedNVML,
    SimulatedNVMLError,
    build_library,
)

__all__ = [
    "PowerProfile",
    "benchmark_profiles",
    "SimulatedDeviceSpec",
    "SimulatedNVML",
    "SimulatedNVMLError",
    "build_library",
]

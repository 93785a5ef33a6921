"""``import bdm_runtime``, then ``import bdm_runtime.sampler`` (numpy), timed; and whether torch came in."""
import sys
import time

from .common import report

t = time.perf_counter()
import bdm_runtime  # noqa: E402,F401  (timed)

d = time.perf_counter() - t
t = time.perf_counter()
import bdm_runtime.sampler  # noqa: E402,F401  (timed)

d2 = time.perf_counter() - t
report(import_runtime_s=d, import_runtime_sampler_s=d2, torch_in_sys_modules="torch" in sys.modules)

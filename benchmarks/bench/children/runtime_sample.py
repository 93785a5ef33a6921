"""Cold start and peak memory of the runtime: ``import bdm_runtime``, load, first image, then a batch.

Arguments: ``path`` (step graph), ``steps``, ``eta``, ``batch``.
"""
import sys
import time

from .common import arguments, peak_rss_mib, report

a = arguments()
t0 = time.perf_counter()
import bdm_runtime  # noqa: E402  (timed)

t1 = time.perf_counter()
torch_at_import = "torch" in sys.modules
s = bdm_runtime.load(a["path"], backend="ort", providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
s.sample(1, seed=0, steps=a["steps"], eta=a["eta"])
t3 = time.perf_counter()
s.sample(a["batch"], seed=0, steps=1, eta=a["eta"])
report(import_runtime_s=t1 - t0, load_s=t2 - t1, first_image_s=t3 - t1,
       torch_in_sys_modules=torch_at_import or "torch" in sys.modules, peak_rss_mib=peak_rss_mib())

"""The floor: peak memory of a Python process that has imported numpy and nothing else."""
import numpy  # noqa: F401  (what is measured)

from .common import peak_rss_mib, report

report(peak_rss_mib=peak_rss_mib())

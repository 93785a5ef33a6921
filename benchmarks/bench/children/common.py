"""What every child shares: its arguments, its peak memory, its one line of output."""
import json
import sys


def arguments():
    """The JSON object given as the first command-line argument."""
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


def peak_rss_mib():
    """Peak resident memory (VmHWM of /proc/self/status), MiB.

    Not ``ru_maxrss``: that would carry the benchmark process's own peak over fork + exec (Linux
    keeps the larger of the old and new address space's high-water mark).
    """
    with open("/proc/self/status", encoding="utf-8") as f:
        return max(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def report(**values):
    """Print ``values`` as the child's one JSON line (the last line of its stdout)."""
    print(json.dumps(values))

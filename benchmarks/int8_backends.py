"""FD-FMNIST of one exported INT8 graph per backend (issue 20, item 4), against FP32 on the same seeds.

    bdm-export --ckpt models/fmnist32/model.pt --out-dir /tmp/s8 --int8
    python -m benchmarks.int8_backends /tmp/s8 --out benchmarks/results/int8_backends_fmnist32.json

The model's default sampler (from the graph), seeds 1-3 x 1,000 images, one thread: ONNX Runtime on ``bdm.onnx``
(FP32) and on ``bdm_int8.onnx``, and OpenVINO on ``bdm_int8.onnx`` (its Q/DQ convolutions in i8, the rest of the
network at ``--precision auto``, the update in FP32). Where the folder has ``bdm_int8_fp16.onnx`` (``--int8 --fp16``,
TensorRT 10/11's graph), ONNX Runtime runs it too: its numerics (INT8 convolutions, FP16 elsewhere in the network)
measured on the CPU, since no TensorRT runs here. ``--only`` picks runs by name.
"""
import os
import json
import time

import click
import numpy as np

from bdm_runtime.errors import BdmError, run_cli


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results JSON.")
@click.option("--seeds", default="1,2,3", show_default=True)
@click.option("--n", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--only", default=None, help="Comma-separated run names [every run the folder's graphs allow].")
def cli(folder, out, seeds, n, only):
    import bdm_runtime
    from bdm_runtime.images import to_uint8

    from . import metrics
    from .bench.machine import machine_info
    from .study.common import write_json

    ref = metrics.reference_stats()
    runs = [("ort-fp32", "bdm.onnx", {}), ("ort-int8", "bdm_int8.onnx", {}),
            ("openvino-int8-auto", "bdm_int8.onnx", dict(backend="openvino")),
            ("ort-int8-fp16", "bdm_int8_fp16.onnx", {})]
    runs = [r for r in runs if os.path.isfile(os.path.join(folder, r[1]))]
    if only is not None:
        chosen = [k.strip() for k in only.split(",") if k.strip()]
        if not chosen or any(k not in [r[0] for r in runs] for k in chosen):
            raise BdmError(f"--only {only!r}: choose from {', '.join(r[0] for r in runs)}")
        runs = [r for r in runs if r[0] in chosen]
    res = dict(machine=machine_info(), n=n, folder=folder, backends={})
    for name, graph, kw in runs:
        with bdm_runtime.load(f"{folder}/{graph}", batch=250, threads=1, **kw) as s:
            fds, secs = [], []
            for seed in (int(k) for k in seeds.split(",")):
                t = time.perf_counter()
                x = np.concatenate([s.sample(min(250, n - f), seed=seed, first_index=f) for f in range(0, n, 250)])
                secs.append(time.perf_counter() - t)
                fds.append(metrics.evaluate(to_uint8(x), ref)["fd"])
            res["backends"][name] = dict(provider=s.provider, fd=fds, mean_fd=float(np.mean(fds)), seconds=secs)
            click.echo(f"{name}: FD {', '.join(f'{v:.3f}' for v in fds)} (mean {np.mean(fds):.3f}; {s.provider})")
    write_json(out, res)
    click.echo(json.dumps({k: round(v["mean_fd"], 3) for k, v in res["backends"].items()}))


def main(args=None):
    run_cli(cli, args, prog_name="python -m benchmarks.int8_backends")


if __name__ == "__main__":
    main()

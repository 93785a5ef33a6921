"""OpenVINO backend: the step graph as a network part in the chosen precision and an FP32 update.

Why two parts: under a bf16/fp16 ``INFERENCE_PRECISION_HINT`` OpenVINO's CPU plugin runs every
MatMul in that type, the DCT products of the update (B1) included, and ignores the
``disable_fp16_compression`` marker; an eps-model's update divides by ``alpha`` (B8, 1e-3 and
below), so its error would be amplified. The graph is therefore cut at the network's output (the
last tensor of the exporter's ``/model/`` scope, ``bdm_runtime.backends.ov_split``) into two
``ov.Model``s: the network, compiled at the requested precision, and the update (everything after
the network's output), compiled at f32. At ``fp32`` the whole graph is compiled at f32 as one model.

The latent and B11's state stay in host buffers that swap roles every step (the CPU is OpenVINO's
device memory); ``x0`` is read once, after the last step. Compiled models go to OpenVINO's own
cache (``CACHE_DIR``), so a second load of the same graph skips the compilation.
"""
import os

import numpy as np

from .. import format as fmt
from ..errors import BdmError
from ..limits import DEFAULT_BATCH
from . import HostTimes, ov_split

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OV_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
CACHE_ENV = "BDM_OPENVINO_CACHE"


def import_openvino():
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BdmError("OpenVINO is not installed: pip install openvino (or pip install 'bdm[openvino]'), "
                       "or use --backend ort")
    return openvino


def default_cache_dir():
    """Where compiled models are cached: ``$BDM_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/bdm/openvino``
    (``~/.cache/bdm/openvino``): per user, outside the model's folder (which may be read-only)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bdm", "openvino")


def capabilities(core, device):
    """The device's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``BF16``, ``FP16``), empty if it has none."""
    try:
        return set(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        return set()


def native_precisions(core, device):
    """The reduced precisions ``device`` runs natively, fastest first (fp32 always runs)."""
    caps = capabilities(core, device)
    found = [p for p in ("bf16", "fp16") if _CAPABILITY[p] in caps]
    if device.upper().startswith("CPU"):  # on the CPU bf16 (AMX / AVX512-BF16) outruns fp16 (see docs/openvino.md)
        return found
    return sorted(found, key=lambda p: p != "fp16")  # GPUs and NPUs: fp16 is their native type


def resolve_precision(core, device, precision):
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device``; a type the device lacks is refused.

    ``auto``: the fastest type the device runs natively (``native_precisions``), FP32 where it
    has no BF16/FP16 units.
    """
    if precision not in PRECISIONS:
        raise BdmError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_precisions(core, device)
    if precision == "auto":
        return native[0] if native else "fp32"
    if precision != "fp32" and precision not in native:
        raise BdmError(f"OpenVINO's {device} does not run {precision} natively (its capabilities: "
                       f"{', '.join(sorted(capabilities(core, device))) or 'none'}): use --precision fp32 or auto")
    return precision


def compile_config(config, threads, cache_dir, precision, precise=False):
    """The ``compile_model`` config: the user's ``config`` over ours, the precision hint always ours.

    ``precise`` (the update, on a device that has the property): ``SNIPPETS_MODE`` ``DISABLE``. The CPU
    plugin's snippets fuse elementwise chains with static shapes, and in the update's schedule
    (B3, B4: tan, log, sigmoid) that cost accuracy: measured on a tiny eps-UNet, 1.4e-3 max error
    against PyTorch FP32 with them, 2.2e-4 without (ONNX Runtime: 2.0e-4); the update is cheap.
    """
    config = dict(config or {})
    if "INFERENCE_PRECISION_HINT" in config:
        raise BdmError("give the precision as precision= (--precision), not as INFERENCE_PRECISION_HINT in "
                       "config: the update must stay FP32")
    if threads and "INFERENCE_NUM_THREADS" in config:
        raise BdmError("give threads or INFERENCE_NUM_THREADS in config, not both")
    out = {"PERFORMANCE_HINT": "LATENCY"}  # one stream: the steps run one after another
    if threads:
        out["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir:
        out["CACHE_DIR"] = os.fspath(cache_dir)
    if precise:
        out["SNIPPETS_MODE"] = "DISABLE"
    out.update(config)
    out["INFERENCE_PRECISION_HINT"] = OV_TYPES[precision]
    return out


_KNOWN = set(fmt.INPUTS_V1 + fmt.STATE_INPUTS + fmt.OPTIONAL_INPUTS + fmt.OUTPUTS_V1 + (fmt.U_X, ov_split.NET_OUT))


def port_name(port):
    """The bdm name of an input or output port (OpenVINO may merge a Cast's tensor name into a graph input's)."""
    names = port.get_names()
    known = sorted(n for n in names if n in _KNOWN)
    return known[0] if known else port.get_any_name()


def static(model, b, net_out=None):
    """A copy of ``model`` with batch ``b`` in every per-image input (``net_out``: ``NET_OUT``'s shape)."""
    shapes = {}
    for port in model.inputs:
        name = port_name(port)
        if name == ov_split.NET_OUT:
            shapes[name] = net_out
        elif name in fmt.PER_IMAGE:
            shapes[name] = [b] + [d.get_length() for d in list(port.get_partial_shape())[1:]]
    copy = model.clone()
    copy.reshape(shapes)
    return copy


def ran_precision(compiled, kinds=("Convolution", "FullyConnected", "MatMul")):
    """The precision the compiled model's matrix layers really run in (read from its runtime model)."""
    counts = {}
    for layer, precision in ov_split.runtime_precisions(compiled):
        if layer in kinds:
            counts[precision] = counts.get(precision, 0) + 1
    if not counts:
        return None
    best = max(counts, key=counts.get)
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(best, best)


class OpenVinoBackend(HostTimes):
    """Runs a bdm step graph (``.onnx``) with OpenVINO on ``device`` (``"CPU"``, ``"GPU"``, ``"NPU"``, ``"AUTO"``).

    ``precision``: the network's type (``auto``, ``fp32``, ``bf16``, ``fp16``); the update is FP32
    always. ``config``: OpenVINO properties for ``compile_model`` (as ``core.compile_model(model,
    device, config)`` takes them; ``INFERENCE_PRECISION_HINT`` is ``precision``'s). ``core``: the
    caller's ``openvino.Core``. ``cache_dir``: OpenVINO's compiled-model cache (``None``: the
    per-user default, ``False``/``""``: no cache). ``threads``: ``INFERENCE_NUM_THREADS``.
    """

    name = "openvino"

    def __init__(self, path, info, device="CPU", precision="auto", config=None, core=None, cache_dir=None,
                 threads=None, batch=None):
        ov = import_openvino()
        core = ov.Core() if core is None else core
        device = device or "CPU"
        self._check_device(core, device)
        self.precision = resolve_precision(core, device, precision or "auto")
        if batch is not None:
            batch = int(batch)
        if cache_dir is None and not (config and "CACHE_DIR" in config):
            cache_dir = default_cache_dir()
        try:
            model = core.read_model(path)
        except Exception as e:
            raise BdmError(f"{path}: OpenVINO cannot read it: {str(e).splitlines()[0]}")
        names = set(port_name(p) for p in model.inputs)
        missing = [n for n in fmt.inputs(info.format_version) if n not in names]
        if missing:
            raise BdmError(f"{path}: not a bdm step graph: inputs {missing} missing")
        self.inputs = names
        self.stateful = fmt.U_X_PREV in names
        self._shape = tuple(info.image_shape)
        precise = device.upper().startswith("CPU")
        net, update = ov_split.split(model, path)
        self._parts = [(net, compile_config(config, threads, cache_dir, self.precision)),
                       (update, compile_config(config, threads, cache_dir, "fp32", precise))]
        self._core, self.ov_device, self._path = core, device, path
        self._live, self._buffers, self._bufs = {}, {}, None
        self._select(batch or DEFAULT_BATCH)  # compiled now: the usual chunk, and the checks below
        ran = ran_precision(self._compiled[0])
        # an INT8 graph's (bdm_export.int8) Q/DQ convolutions run in i8; its float layers take the hint
        int8 = info.precision in fmt.INT8_PRECISIONS and ran == "i8"
        if self.precision != "fp32" and ran is not None and ran != self.precision and not int8:
            raise BdmError(f"OpenVINO's {device} ran the network in {ran}, not {self.precision}: it has no "
                           f"{self.precision} kernels on this machine (fp16 on a CPU needs AMX-FP16); "
                           "use --precision auto or fp32")
        self.network_precision = ran or self.precision
        self.provider = (f"OpenVINO {ov.__version__.split('-')[0]} {device}: network {self.network_precision}, "
                         "update fp32")
        self.device = "cpu"   # host buffers: OpenVINO copies to and from its device
        self.max_batch = None  # any chunk size (each compiled once, with static shapes)

    def _select(self, b):
        """Compiled parts and requests for chunks of ``b`` images, compiled with a static batch of ``b``.

        Static shapes: OpenVINO's CPU plugin ran the network 1.5-1.7x faster than with a dynamic
        batch (docs/openvino.md); the compiled-model cache makes a size seen before cheap to compile.
        """
        if b not in self._live:
            if len(self._live) > 1:  # at most two sizes live: the full chunk and the last one
                self._live.pop(next(iter(self._live)))
            compiled, net_out = [], None
            for model, cfg in self._parts:
                compiled.append(self._compile(self._core, static(model, b, net_out), self.ov_device, cfg, self._path))
                net_out = compiled[-1].output(0).get_partial_shape()  # the update's NET_OUT input
            feeds = [[port_name(p) for p in c.inputs if port_name(p) != ov_split.NET_OUT] for c in compiled]
            self._live[b] = (compiled, [c.create_infer_request() for c in compiled], feeds)
        self._compiled, self._requests, self._feeds = self._live[b]

    @staticmethod
    def _check_device(core, device):
        known = list(core.available_devices)
        base = device.split(":")[0].split(".")[0].upper()
        if base not in ("AUTO", "HETERO", "MULTI", "BATCH") and not any(d.upper().startswith(base) for d in known):
            raise BdmError(f"OpenVINO has no device {device!r} here (available: {', '.join(known) or 'none'})")

    @staticmethod
    def _compile(core, model, device, config, path):
        try:
            try:
                return core.compile_model(model, device, config)
            except RuntimeError:
                if "SNIPPETS_MODE" not in config:  # an OpenVINO without the property: compile without it
                    raise
                return core.compile_model(model, device, {k: v for k, v in config.items() if k != "SNIPPETS_MODE"})
        except Exception as e:
            raise BdmError(f"{path}: OpenVINO cannot compile it for {device}: {str(e).splitlines()[0]}")

    @property
    def compiled_models(self):
        """The compiled parts ``[network, update]`` of the current chunk size (for inspection)."""
        return list(self._compiled)

    # -- buffers --------------------------------------------------------------------------------
    def prepare(self, b):
        """Compiled parts and host buffers for chunks of ``b`` images (kept for the next chunk of the same size)."""
        self._select(b)
        if b not in self._buffers:
            if len(self._buffers) > 1:
                self._buffers.pop(next(iter(self._buffers)))
            img = (b,) + self._shape
            bufs = {"z0": np.empty(img, np.float32), "z1": np.empty(img, np.float32),
                    fmt.NOISE: np.empty(img, np.float32), fmt.T: np.empty((b,), np.float32),
                    fmt.S: np.empty((b,), np.float32), fmt.ETA: np.empty((1,), np.float32),
                    fmt.LABEL: np.empty((b,), np.int64), fmt.GUIDANCE: np.empty((1,), np.float32)}
            if self.stateful:
                bufs.update({"u0": np.empty(img, np.float32), "u1": np.empty(img, np.float32),
                             fmt.T_PREV: np.empty((b,), np.float32)})
            self._buffers[b] = bufs
        self._bufs, self._b = self._buffers[b], b

    def upload(self, name, array):
        """Copy a host array into input ``name``'s buffer."""
        key = {fmt.Z: "z0", fmt.U_X_PREV: "u0"}.get(name, name)
        np.copyto(self._bufs[key], np.asarray(array).reshape(self._bufs[key].shape))

    # -- the loop's primitives ------------------------------------------------------------------
    # set_times, select: HostTimes's
    def _feed(self, names, parity):
        bufs = self._bufs
        state = {fmt.Z: "z%d" % parity, fmt.U_X_PREV: "u%d" % parity}
        return {n: bufs[state.get(n, n)] for n in names}

    def step(self, parity, out=None):
        """One step reading state ``parity`` and writing the other (network, then the FP32 update)."""
        requests = self._requests
        if len(requests) == 2:
            requests[0].infer(self._feed(self._feeds[0], parity), share_inputs=True)
            requests[1].set_tensor(ov_split.NET_OUT, requests[0].get_output_tensor(0))
        last = requests[-1]
        last.infer(self._feed(self._feeds[-1], parity), share_inputs=True)
        np.copyto(self._bufs["z%d" % (1 - parity)], last.get_tensor(fmt.Z_NEXT).data)
        if self.stateful:
            np.copyto(self._bufs["u%d" % (1 - parity)], last.get_tensor(fmt.U_X).data)

    def synchronize(self):
        """Nothing to wait for: ``infer`` returns when the step is done."""

    def download(self, out):
        """The last step's ``x0`` into the host array ``out``."""
        out[...] = self._requests[-1].get_tensor(fmt.X0).data

    def close(self):
        """Drop the compiled models, requests and buffers."""
        self._buffers, self._live = {}, {}
        self._bufs = None
        self._requests, self._compiled, self._parts = [], [], []

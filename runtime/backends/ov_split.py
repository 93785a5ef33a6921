"""Cut an OpenVINO model of a bdm step graph into the network and the update (no ``onnx`` package needed).

Where the network ends: ``bdm-export`` traces the step graph with the network as the step module's
``model`` attribute, so the exporter names every tensor the network computes ``/model/...``
(graphs of every bdm version carry these names). The network's output is the last such tensor in
topological order: every network tensor is an ancestor of the output, so the output is the only
one with no network tensor after it. The update is everything that reads it (B8/B14 read the output,
B10/B11 step, the B12 guidance combination).

The network part is the output's ancestors (inputs ``z``, ``t``, ``label``, and what the step
computes for the network, e.g. the doubled batch of B12); the update part is the whole graph with
that tensor replaced by a new input ``NET_OUT``. Both are clones, so the caller's model is untouched.
"""
from ..errors import BdmError

NET_OUT = "bdm_net_out"
NETWORK_SCOPE = "/model/"


def _in_network(output):
    return any(n.startswith(NETWORK_SCOPE) for n in output.get_names())


def network_output(model):
    """The output port of the network inside ``model`` (the last ``/model/`` tensor), or ``None``."""
    last = None
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":  # weights and constants the optimizer may share with the update
            continue
        for out in op.outputs():
            if _in_network(out):
                last = out
    return last


def ancestors(outputs):
    """Every node that ``outputs`` depend on (keyed by the node's unique name), with theirs."""
    seen, stack = {}, [o.get_node() for o in outputs]
    while stack:
        node = stack.pop()
        key = node.get_name()
        if key in seen:
            continue
        seen[key] = node
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return seen


def _parameters(model, nodes):
    """``model``'s parameters among ``nodes``, in the model's order."""
    return [p for p in model.get_parameters() if p.get_name() in nodes]


def split(model, path):
    """``(network, update)``: two ``ov.Model``s; the network's one output feeds the update's input ``NET_OUT``."""
    import openvino as ov
    import openvino.opset13 as ops

    net_copy, update_copy = model.clone(), model.clone()
    out = network_output(net_copy)
    if out is None:
        raise BdmError(f"{path}: no network found in the graph (no '{NETWORK_SCOPE}' tensors): re-export it "
                       "with bdm-export, or use --precision fp32")
    result = ops.result(out)
    result.set_friendly_name(NET_OUT + "_result")
    network = ov.Model([result], _parameters(net_copy, ancestors([out])), "bdm_network")

    cut = network_output(update_copy)
    param = ops.parameter(cut.get_partial_shape(), cut.get_element_type(), name=NET_OUT)
    param.output(0).set_names({NET_OUT})
    for target in list(cut.get_target_inputs()):
        target.replace_source_output(param.output(0))
    results = update_copy.get_results()
    needed = ancestors([r.output(0) for r in results])
    if any(_in_network(o) for node in needed.values() if node.get_type_name() != "Constant" for o in node.outputs()):
        raise BdmError(f"{path}: the update reads the network at more than its output: cannot run the network "
                       "in reduced precision; use --precision fp32")
    update = ov.Model(results, _parameters(update_copy, needed) + [param], "bdm_update")
    return network, update


def runtime_precisions(compiled):
    """``[(layer type, runtime precision)]`` of every executed node of a compiled model, read from
    OpenVINO's own runtime model (``rt_info`` ``layerType``, ``runtimePrecision``)."""
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].value) if "layerType" in info else op.get_type_name()
        precision = str(info["runtimePrecision"].value) if "runtimePrecision" in info else ""
        rows.append((layer, precision))
    return rows

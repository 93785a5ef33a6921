"""The step graph: one whole sampler step (network + B10/B11 update, B12 guidance) as an ``nn.Module``.

It only wires ``bdm_train.sampling`` together (one source of truth): the schedule (B3, B4), the
DCTs (B1) and the update (``sampling.step``: DDIM-eta B10, and in format 2 the multistep B11)
are the very functions the torch sampler runs, computed inside the graph from the scalar times.
Its forward takes the inputs of ``bdm_runtime.format`` in their order and returns its outputs.
"""
import torch
from torch import nn

from bdm_train.sampling import conditioned, guided, step
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError


class StepGraph(nn.Module):
    """``(z, t, s, eta, noise[, t_prev, u_x_prev][, label[, guidance]]) -> (z_next, x0[, u_x])``.

    ``format_version`` 2 (the default) carries B11's state (``t_prev``, ``u_x_prev`` in, ``u_x``
    out), so one graph serves every solver; 1 is the DDIM-only graph of earlier releases.
    ``num_classes > 0`` adds the ``label`` input; ``guided=True`` (conditional models only) adds
    ``guidance`` (``w`` of B12) and doubles the batch inside the graph (conditional + null branch).
    """

    def __init__(self, model, process, num_classes=0, guided=False, clip_denoised=True,
                 format_version=fmt.FORMAT_VERSION):
        super().__init__()
        if guided and num_classes <= 0:
            raise BdmError("guidance needs a conditional model (num_classes > 0)")
        if format_version not in fmt.SUPPORTED_VERSIONS:
            raise BdmError(f"format_version must be one of {fmt.SUPPORTED_VERSIONS}, got {format_version!r}")
        self.model = model
        self.process = process
        self.num_classes = int(num_classes)
        self.guided = bool(guided)
        self.clip_denoised = bool(clip_denoised)
        self.format_version = int(format_version)

    @property
    def input_names(self):
        """Graph input names in forward order (``bdm_runtime.format``)."""
        return fmt.inputs(self.format_version, self.num_classes, self.guided)

    @property
    def output_names(self):
        return fmt.outputs(self.format_version)

    def forward(self, *args):
        a = dict(zip(self.input_names, args))
        label = a.get(fmt.LABEL)
        if self.guided:
            eps_model = guided(self.model, label, a[fmt.GUIDANCE], self.num_classes)   # B12
        else:
            eps_model = conditioned(self.model, label)
        z_next, x0, u_x = step(eps_model, self.process, a[fmt.Z], a[fmt.T], a[fmt.S], a[fmt.ETA], a[fmt.NOISE],
                               a.get(fmt.T_PREV), a.get(fmt.U_X_PREV), self.clip_denoised,
                               spec=self.model)   # B8 / B14 read the model's output; B10, B11 step
        return (z_next, x0, u_x) if self.format_version >= 2 else (z_next, x0)

    def example_inputs(self, channels, batch=2, seed=0):
        """Realistic example inputs (a latent at ``t = 0.5``, adjacent ``s``, history at ``t_prev``), in input order."""
        g = torch.Generator().manual_seed(seed)
        h, w = self.process.image_size
        shape = (batch, channels, h, w)
        values = {
            fmt.Z: torch.randn(shape, generator=g),
            fmt.T: torch.full((batch,), 0.5),
            fmt.S: torch.full((batch,), 0.48),
            fmt.ETA: torch.ones(1),
            fmt.NOISE: torch.randn(shape, generator=g),
            fmt.T_PREV: torch.full((batch,), 0.52),
            fmt.U_X_PREV: torch.randn(shape, generator=g),
            fmt.LABEL: torch.randint(0, self.num_classes + 1, (batch,), generator=g),
            fmt.GUIDANCE: torch.full((1,), 1.5),
        }
        return tuple(values[n] for n in self.input_names)

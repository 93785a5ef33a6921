"""The step graph: one whole sampler step (network + B10 update, B12 guidance) as an ``nn.Module``.

It only wires ``bdm_train.sampling`` together (one source of truth): the schedule (B3, B4), the
DCTs (B1) and the DDIM-eta update (B10) are the very functions the torch sampler runs, computed
inside the graph from the scalar times ``t`` and ``s``. Its forward takes the inputs of
``bdm_runtime.format`` in their order and returns ``(z_next, x0)``.
"""
import torch
from torch import nn

from bdm_train.sampling import conditioned, ddim_step, guided
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError


class StepGraph(nn.Module):
    """``(z, t, s, eta, noise[, label[, guidance]]) -> (z_next, x0)``, one step of B10.

    ``num_classes > 0`` adds the ``label`` input; ``guided=True`` (conditional models only) adds
    ``guidance`` (``w`` of B12) and doubles the batch inside the graph (conditional + null branch).
    """

    def __init__(self, model, process, num_classes=0, guided=False, clip_denoised=True):
        super().__init__()
        if guided and num_classes <= 0:
            raise BdmError("guidance needs a conditional model (num_classes > 0)")
        self.model = model
        self.process = process
        self.num_classes = int(num_classes)
        self.guided = bool(guided)
        self.clip_denoised = bool(clip_denoised)

    @property
    def input_names(self):
        """Graph input names in forward order (``bdm_runtime.format``)."""
        names = list(fmt.INPUTS)
        if self.num_classes > 0:
            names.append(fmt.LABEL)
        if self.guided:
            names.append(fmt.GUIDANCE)
        return names

    @property
    def output_names(self):
        return list(fmt.OUTPUTS)

    def forward(self, z, t, s, eta, noise, label=None, guidance=None):
        if self.guided:
            eps_model = guided(self.model, label, guidance, self.num_classes)   # B12
        else:
            eps_model = conditioned(self.model, label if self.num_classes > 0 else None)
        # B8 / B14: the model's parameterisation (and its data statistics, as constants) is read
        # by the same function as in the torch sampler; the graph's interface does not change.
        return ddim_step(eps_model, self.process, z, t, s, eta, noise, self.clip_denoised, spec=self.model)  # B10

    def example_inputs(self, channels, batch=2, seed=0):
        """Realistic example inputs (a latent at ``t = 0.5``, adjacent ``s``), as a tuple in input order."""
        g = torch.Generator().manual_seed(seed)
        h, w = self.process.image_size
        z = torch.randn(batch, channels, h, w, generator=g)
        t = torch.full((batch,), 0.5)
        s = torch.full((batch,), 0.48)
        eta = torch.ones(1)
        noise = torch.randn(batch, channels, h, w, generator=g)
        out = [z, t, s, eta, noise]
        if self.num_classes > 0:
            out.append(torch.randint(0, self.num_classes + 1, (batch,), generator=g))
        if self.guided:
            out.append(torch.full((1,), 1.5))
        return tuple(out)

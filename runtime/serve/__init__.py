"""Serving a bdm step graph on Triton Inference Server: ``bdm-serve`` (PyTriton) and a model repository.

One request row is one image, drawn from its own ``(seed, index)`` of the noise protocol
(``bdm_runtime.noise``), so Triton's dynamic batcher may merge rows of any requests into one
batch and each image still equals ``bdm-run``'s. ``requests`` parses and runs a batch (numpy
only: shared by the PyTriton server and the Python-backend model of a written repository),
``server`` binds it with PyTriton, ``repository`` writes a repository for a standalone server.
"""

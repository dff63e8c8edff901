"""Scale-out on NVIDIA Triton Inference Server: a bundle -> a Triton model repository.

Torch-free, like the runtime: the repository is written on (or for) the serving machine from a
verified bundle. ``repository`` writes it, ``config`` renders and checks each ``config.pbtxt``,
``python_models`` is the logic of the two Python-backend models (the BLS pipeline and the
self-contained one).
"""

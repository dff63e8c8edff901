"""o2n-edge: few-shot visual anomaly detection by anomaly personalization (One-to-Normal).

The offline stage (this package, needs the ``build`` extra) personalizes and distils a diffusion
model on a few good images and exports it; ``o2n_edge.runtime`` runs the exported bundle without
torch on a line-side device.
"""

__version__ = "0.1.0"

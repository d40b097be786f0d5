"""fedir: federated learning for interventional-radiology AI.

The shared kernel: what both sides of the trust boundary need (the task, the data
readers, the records that cross the boundary). Nothing here imports from the client,
server, strategies or simulations packages.
"""

__version__ = "0.1.0"

"""manytask: train many-task models from sharded streams, across processes, resumably."""

__version__ = "0.1.0"

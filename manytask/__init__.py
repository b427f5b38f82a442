"""manytask: train many-task models from sharded streams, across processes, resumably."""

__version__ = "0.1.0"


def load(path, run_dir=None):  # noqa: ANN001, ANN201 - typed in manytask.api (imported lazily)
    """`manytask.load(RUN_DIR or checkpoint)` -> `manytask.api.LoadedModel` (see there)."""
    from manytask.api import load as _load

    return _load(path, run_dir)

"""The refusal a model package raises: a checkpoint or config that is not the model it describes."""
from edge_common.errors import EdgeError


class ModelConfigError(EdgeError, ValueError):
    """config.json, the tensor list or a side file does not describe a supported model; the message names the fix."""

"""The one exception type the library raises for bad input.

Every message names the file, tensor, parameter or value at fault, so the CLI and the app can
show it to a user as it is, without a traceback.
"""


class FusionError(ValueError):
    """Bad input to a merge: an unknown method, a parameter out of range, incompatible or
    unreadable checkpoints. Raised before anything is written, or after a partial output has
    been removed."""

"""Neuron-Fusion Studio's fusion library: Locate-then-Merge and baseline model merging.

The maths lives in ``methods`` (pure tensor functions) and ``neurons`` (neuron location), the
method registry in ``registry``, checkpoint I/O in ``checkpoint`` and ``writer``, and the
streaming merge that ties them together in ``merge``. ``python -m fusion`` is the CLI.
"""

__version__ = "0.1.0"

"""Neuron-Fusion Studio's app logic: everything ``app.py`` does that is not Gradio wiring.

The ``fusion`` library knows nothing of the app; this package holds what a shared server needs
on top of it, kept apart from ``app.py`` so that it can be tested without a browser or a server:

- ``settings``: how the app runs (flags and ``NF_*`` environment variables);
- ``chat``: checks on what a visitor sends, prompt budgets, and answer streams;
- ``state``: loading a preset, the fused pair, the app's status;
- ``behaviour``: the Behaviour tab's probe runs (base, original and fused, with progress);
- ``view``: what the page shows (titles, badges, progress lines, method controls, examples,
  the recipe card).

Every problem a visitor can cause raises ``StudioError`` with a message fit to show as it is.
"""


class StudioError(Exception):
    """A problem the user can fix (or must be told about); the message is shown as it is."""

"""The pocket pair: a tiny Vicuna/LLaVA pair trained offline on a synthetic world (``world``, ``train``)."""

"""Training: one engine (``engine.py``) and the setup of each model (``classifier.py``, ``detector.py``)."""

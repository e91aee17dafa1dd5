"""The transformers backends: one adapter per family over the shared stopped scoring pass in `shared.py`."""

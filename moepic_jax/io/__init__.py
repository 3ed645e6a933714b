"""Weights in and out: Hugging Face safetensors (`hf.py`, one name table), orbax checkpoints (`checkpoint.py`),
and `load()` (`loading.py`)."""

"""Running a model: engines (`engine.py`: resident, offloading), compiled-step caching (`compiled.py`), and the
factory that calibrates, plans and builds an engine (`factory.py`)."""

import os

# Tests never talk to a real cluster by accident and keep torch to the 2 cores CI has.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("OMP_NUM_THREADS", "1")

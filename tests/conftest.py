import os

# Tests never talk to a real cluster by accident and keep torch to the 2 cores CI has.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it on import)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it is chosen when a
# kernel is decorated, so the variable is set before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

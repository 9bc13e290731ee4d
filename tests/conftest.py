"""Suite-wide settings: one torch thread (the suite's tensors are small, where a second OpenMP
thread costs more in synchronisation than it gains) and a display-free matplotlib."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402  (after the backend is chosen)

torch.set_num_threads(1)

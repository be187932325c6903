"""What the sweep's fork server imports once, so that every case forked from it starts with
torch, Lightning, torchmetrics and the zoo already loaded (zoo.sweep.run_forked). Importing
only: no torch op runs here, so no OpenMP thread pool and no CUDA context exist for a forked
child to inherit half-made (a forked GNU OpenMP pool hangs)."""

import lightning  # noqa: F401
import torch  # noqa: F401
import torchmetrics  # noqa: F401

import zoo  # noqa: F401
import zoo.findings  # noqa: F401
import zoo.measure  # noqa: F401
import zoo.model  # noqa: F401
import zoo.sweep  # noqa: F401
import zoo.train  # noqa: F401

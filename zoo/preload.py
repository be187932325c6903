"""What the sweep's fork server imports once, so that every case forked from it starts with
torch, Lightning, torchmetrics and the zoo already loaded (zoo.sweep.run_forked). Importing
only: no torch op runs here, so no OpenMP thread pool and no CUDA context exist for a forked
child to inherit half-made (a forked GNU OpenMP pool hangs).

Every class the registry names is imported too, so a forked case runs the code of the sweep's
start throughout: a module first imported at case time would come from the checkout as edited
since, next to preloaded modules of the old code (a base class without a method its newer
subclass relies on failed nine cases that way), and the rows record that start's revision
(zoo.measure.code_revision)."""

import lightning  # noqa: F401
import torch  # noqa: F401
import torchmetrics  # noqa: F401

import zoo  # noqa: F401
import zoo.findings  # noqa: F401
import zoo.measure  # noqa: F401
import zoo.model  # noqa: F401
import zoo.sweep  # noqa: F401
import zoo.train  # noqa: F401
from zoo.measure import code_revision
from zoo.registry import KINDS, default_registry

for _kind in KINDS:
    for _entry in default_registry().entries(_kind):
        if _entry.class_path:
            _entry.cls  # noqa: B018 (imports its module)
code_revision()

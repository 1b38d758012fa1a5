"""Transition: the names modules not yet moved still import from here; the rest of the project imports
`flcore.run_data`, `flcore.server_data`, `flcore.run_model`, `flcore.arrays` and `flcore.seeding` directly.
Removed once `server_app.app`, `server_app.preflight` and the distillation strategies import from those.
"""

from flcore.arrays import load_record, to_record
from flcore.run_data import Prepared, batches, prepare
from flcore.run_model import model_from, new_model
from flcore.server_data import ServerData, align_set, client_classes, server_data

__all__ = [
    "Prepared",
    "ServerData",
    "align_set",
    "batches",
    "client_classes",
    "load_record",
    "model_from",
    "new_model",
    "prepare",
    "server_data",
    "to_record",
]

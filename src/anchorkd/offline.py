"""Offline-by-default networking policy.

Runs on local checkpoints and data must never touch the network or wait on a hub retry. The hub
libraries read these variables when they are first imported, so ``configure_network`` runs before
transformers / ms-swift are imported (the CLI calls it first thing).
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def network_allowed() -> bool:
    return os.environ.get("ANCHORKD_ALLOW_NETWORK", "0").lower() in {"1", "true", "yes"}


def configure_network() -> bool:
    """Set the hub libraries offline unless ``ANCHORKD_ALLOW_NETWORK=1``. Returns whether offline.

    Also makes idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``, unless set):
    with spinning, two processes sharing a few CPU cores (a dataloader beside the trainer, a test run
    beside a benchmark) slowed small matrix products about tenfold here. Read when torch loads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if network_allowed():
        return False
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    # Silence telemetry pings of the libraries we load.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return True

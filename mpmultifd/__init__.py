"""mpmultifd: live migration of shared-memory regions over parallel channel worker processes.

A :class:`Source` walks the dirty pages of a :class:`GuestRAM` and hands
batches to channel worker processes through lock-free rings; each worker
sends a header plus IOVs that point straight into the shared RAM. A
:class:`Destination` receives them straight into its own shared memory.
"""

import logging

from .config import MigrationConfig
from .destination import Destination
from .errors import (
    AuthenticationError,
    ChannelBroken,
    ChannelClosed,
    ChannelError,
    CommitUnknown,
    ConfigError,
    ConvergenceError,
    LocalProtocolError,
    MigrationCancelled,
    MigrationError,
    ProtocolError,
    RemoteProtocolError,
    SaveFileError,
    TrackingUnavailable,
    UntrustedSegmentError,
    VerificationError,
    WorkerDied,
)
from .pool import WorkerPool
from .ram import BlockInfo, GuestRAM
from .source import Source
from .stats import DirtyRateEstimate, MigrationResult
from .tracking import DirtyTracker

__version__ = "0.1.0"

# the agent's logging configuration decides where records go; without one, nothing is printed
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "GuestRAM",
    "BlockInfo",
    "Source",
    "Destination",
    "WorkerPool",
    "MigrationConfig",
    "MigrationResult",
    "DirtyRateEstimate",
    "DirtyTracker",
    "MigrationError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ChannelError",
    "ChannelClosed",
    "ChannelBroken",
    "WorkerDied",
    "AuthenticationError",
    "VerificationError",
    "CommitUnknown",
    "MigrationCancelled",
    "ConvergenceError",
    "TrackingUnavailable",
    "SaveFileError",
    "UntrustedSegmentError",
]

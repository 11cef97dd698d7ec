"""Errors a user can act on, each with the process exit code the CLI returns for it.

Exit codes (documented in README.md):
  0  success
  1  a batch finished but some files failed (see the summary table)
  2  command-line usage error (unknown option, missing argument)
  3  bad input file (missing, unreadable, corrupt, wrong shape, NaN/Inf, empty...)
  4  output problem (exists without --overwrite, folder not writable, disk full)
  5  bad model or checkpoint (missing, corrupt, unsafe, incompatible)
  6  resource problem (volume too large for the device, device unavailable)
  7  quality control refused an input (--strict-qc)
  8  training stopped (repeated non-finite losses)
  130 interrupted (Ctrl-C / SIGTERM); no half-written file is left behind (train keeps a
      checkpoint, demo and demo-data what they finished)
"""


class MedflowError(Exception):
    """Base class: a one-line message meant for the user, and an exit code."""

    exit_code = 1


class InputError(MedflowError):
    """An input file is missing, unreadable or not a usable volume."""

    exit_code = 3


class OutputError(MedflowError):
    """An output cannot be written safely."""

    exit_code = 4


class ModelError(MedflowError):
    """A preset, model folder or checkpoint is missing, corrupt, unsafe or incompatible."""

    exit_code = 5


class ResourceError(MedflowError):
    """The device cannot hold or run the requested work."""

    exit_code = 6


class QCError(MedflowError):
    """An input failed the likelihood quality check under --strict-qc."""

    exit_code = 7


class TrainingError(MedflowError):
    """Training cannot continue (e.g. repeated non-finite losses)."""

    exit_code = 8

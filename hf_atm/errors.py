"""Errors that hf_atm raises for bad input. The CLI turns them into one clear line and exit code 2."""


class HfAtmError(Exception):
    """Base class: a problem with the user's input, named precisely in the message."""


class MergeConfigError(HfAtmError, ValueError):
    """An option of a merge is invalid (unknown method, density out of range, wrong number of weights...)."""


class CheckpointError(HfAtmError):
    """A checkpoint cannot be read or does not match the others (missing/corrupt file, tensor mismatch, NaN)."""


class OutputExistsError(HfAtmError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class OutputBusyError(HfAtmError):
    """Another merge is writing the same output folder right now (it holds the folder's lock)."""


class DiskFullError(HfAtmError):
    """The output does not fit on its device: too little free space up front, or the device filled mid-write."""


class TaskDataError(HfAtmError, ValueError):
    """A task's data is unusable (no examples, missing label column, missing Debian package...)."""


class HubError(HfAtmError):
    """The Hub (or the local mirror / cache) refused or failed a request; the message carries its reason."""

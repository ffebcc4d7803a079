"""Errors a user can fix, as opposed to bugs we must fix.

An :class:`InputError` is shown as one line (``error: ...``) with no
traceback; its message must name what is wrong and which file or series,
and must not contain patient data (names, IDs, accession numbers).
"""


class InputError(Exception):
    """Input that cannot be processed; the message is shown to the user as is."""


class ModelError(Exception):
    """A model folder that is missing, malformed or does not fit the runtime."""


class ServiceUnavailable(Exception):
    """A server the node relies on for one step (a remote inference server) cannot serve now: the
    job is given back without counting an attempt and runs again once it answers."""

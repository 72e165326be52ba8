"""Errors that a user can act on.

Every ``QConvertError`` message names the thing that is wrong and what to do about it.
The CLI prints it on one line (the traceback only with ``--debug``); library callers
can catch it.  ``assert`` stays for internal invariants only.
"""


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line message, or its type's name when it has no text."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


class QConvertError(Exception):
    """A problem with the user's input or environment, worded as "what is wrong; what to do"."""


class NoKernel(QConvertError):
    """A quantized layer the CUDA kernels cannot run on this GPU (its architecture, a shape, a group
    size): the OUT runs on the CPU only.  Where the GPU was only the default, eval and generate run on
    the CPU instead (qconvert.evaluate.load_where_asked)."""


class RotationUnsupported(QConvertError):
    """The model cannot be rotated (its architecture, a tensor or a size qconvert has no rotation
    for): an explicit ``--rotate`` stops with it; a scheme's default rotation is skipped instead."""


class OnlineUnsupported(RotationUnsupported):
    """The model can be rotated offline but has no online transform before ``down_proj`` (a mixture
    of experts, an intermediate size with no Hadamard order): a scheme's default ``hadamard+online``
    keeps the offline rotation then."""

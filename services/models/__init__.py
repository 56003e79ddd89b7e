"""Model lifecycle tools: the portable model file and the ``streamrec models`` command.

:mod:`services.models.export` writes a version of a model to a safetensors file
that carries its headers and checksums, and publishes such a file into a
parameter store again (docs/decisions.md §19); :mod:`services.models.command`
is ``streamrec models list|show|pin|unpin|rollback|export|import``, a thin shell
over these functions and the :class:`~services.paramstore.ParamStore` methods.
"""

from __future__ import annotations

from services.models.export import (
    FORMAT,
    FORMAT_VERSION,
    ModelFile,
    ModelFileError,
    describe_parts,
    encode_model_file,
    export_model,
    export_model_file,
    import_model,
    import_model_file,
    publish_model_file,
    read_model_file,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFile",
    "ModelFileError",
    "describe_parts",
    "encode_model_file",
    "export_model",
    "export_model_file",
    "import_model",
    "import_model_file",
    "publish_model_file",
    "read_model_file",
]

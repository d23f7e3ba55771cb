"""The model catalog: names and versions, where files come from, and checked local paths.

A name such as ``smollm2-135m-instruct`` or ``smollm2-135m-instruct:q4_1`` goes to
:func:`resolve`, which returns a :class:`ModelSpec` whose ``path`` is a local file that
matches its recorded sha256::

    from llmlab import registry
    spec = registry.resolve("smollm2-135m-instruct")
    spec.path, spec.ref, spec.ram_bytes
    registry.pull("qwen2.5-0.5b-instruct")      # download with progress, resume, checksum
    registry.add("my.gguf", name="mine")         # register your own GGUF
    registry.recommend().reason                  # the best chat model for this machine

The built-in catalog is ``llmlab/models.yaml``; entries a user adds persist in
``$LLMLAB_HOME/models.yaml`` and are merged over it. The command line over all of this
is ``python part5/model_registry.py``.

Everything is importable from here; the code lives in short modules:

- ``spec``: :class:`ModelSpec`, :class:`Source` and the errors (all :class:`RegistryError`)
- ``catalogs``: reading and merging the catalogs, :func:`find`, saving user entries,
  :func:`path_instead_of_name` (a file path given where a name goes)
- ``files``: local paths, :func:`status`, checksums, :func:`verify`, :func:`resolve`
- ``downloads``: Hugging Face URLs, :func:`download` with resume, :func:`pull`
- ``gguf_info``: :func:`read_gguf_info`, a fast reader of GGUF headers
- ``user_models``: :func:`add`, :func:`register_remote`, :func:`remove`
- ``memory``: :func:`estimate_ram` and :func:`recommend`
- ``kernels``: which weight formats the installed llama.cpp multiplies in batches here
- ``batch_format``: which file of a model batch jobs and the server run (imported on its
  own: ``from llmlab.registry import batch_format``)
"""

from llmlab import hardware
from llmlab.registry.catalogs import (
    BUILTIN_CATALOG,
    builtin_refs,
    catalog,
    default_spec,
    find,
    path_instead_of_name,
    save_user_entry,
)
from llmlab.registry.catalogs import _read_catalog as _read_catalog  # used by the tests
from llmlab.registry.downloads import download, hf_download_url, pull
from llmlab.registry.files import (
    checksum_file,
    describe,
    local_path,
    missing_hint,
    package_dir,
    resolve,
    sha256_file,
    status,
    verify,
)
from llmlab.registry.gguf_info import GGUFInfo, read_gguf_info
from llmlab.registry.gguf_info import (  # used by quantize.py, notebook 08, tests
    _header_reader_class as _header_reader_class,
)
from llmlab.registry.memory import (
    DEFAULT_N_CTX,
    N_UBATCH,
    RUNTIME_BYTES,
    Recommendation,
    estimate_ram,
    recommend,
    spec_ram_estimate,
)
from llmlab.registry.spec import (
    CLI,
    ChecksumError,
    DownloadError,
    MiB,
    ModelNotAvailableError,
    ModelSpec,
    RegistryError,
    Source,
    UnknownModelError,
)
from llmlab.registry.user_models import EMBEDDING_ARCHITECTURES, add, register_remote, remove
from llmlab.settings import Settings, get_settings

__all__ = [
    "BUILTIN_CATALOG",
    "CLI",
    "DEFAULT_N_CTX",
    "EMBEDDING_ARCHITECTURES",
    "N_UBATCH",
    "RUNTIME_BYTES",
    "ChecksumError",
    "DownloadError",
    "GGUFInfo",
    "MiB",
    "ModelNotAvailableError",
    "ModelSpec",
    "Recommendation",
    "RegistryError",
    "Settings",
    "Source",
    "UnknownModelError",
    "add",
    "builtin_refs",
    "catalog",
    "checksum_file",
    "default_spec",
    "describe",
    "download",
    "estimate_ram",
    "find",
    "get_settings",
    "hardware",
    "hf_download_url",
    "local_path",
    "missing_hint",
    "package_dir",
    "path_instead_of_name",
    "pull",
    "read_gguf_info",
    "recommend",
    "register_remote",
    "remove",
    "resolve",
    "save_user_entry",
    "sha256_file",
    "spec_ram_estimate",
    "status",
    "verify",
]

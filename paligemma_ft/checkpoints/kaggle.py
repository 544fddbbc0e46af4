"""Released PaliGemma checkpoints on Kaggle: the table of handles, a preflight, and downloads through kagglehub.

A handle is `owner/model/framework/variation[/version]`, e.g. `google/paligemma-2/jax/paligemma2-3b-pt-224/1`.
kagglehub keeps what it downloads under `$KAGGLEHUB_CACHE` (default `~/.cache/kagglehub`), laid out as

    models/<owner>/<model>/<framework>/<variation>/<version>/<file>                 the files
    models/<owner>/<model>/<framework>/<variation>/<version>.complete              marker: whole bundle
    models/<owner>/<model>/<framework>/<variation>/.complete/<version>/<file>.complete   marker: one file

and answers from that cache without the network only for a **versioned** handle: for an unversioned one it
asks Kaggle for the current version first, and fails offline. So the table below records versions, and an
unversioned handle is resolved once (online) and the version logged, for the user to pin.

`preflight` runs before any compute and says what is wrong in words (no credentials and every way to give them,
not enough disk, ...); `download` maps kagglehub's HTTP and connection errors to `KaggleError` subclasses whose
messages say what to do (a 403 names the model page where the licence is accepted). Credential values are never
formatted into a message or a log line: only where they come from.

kagglehub is imported inside the functions that need it (it costs ~0.8 s), so reading the table is free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from paligemma_ft.errors import UserError

_LOG = logging.getLogger(__name__)

KAGGLE_WEB = "https://www.kaggle.com"
API_TOKEN_PAGE = f"{KAGGLE_WEB}/settings/api"
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")  # Looked for inside a downloaded bundle.
TOKENIZER_URL = "https://storage.googleapis.com/big_vision/paligemma_tokenizer.model"  # gs://big_vision/...
SPEC_PREFIX = "kaggle:"


# ------------------------------------------------------------------------------------------------- errors


class KaggleError(UserError):
    """A Kaggle checkpoint cannot be had; the message says why and what to do."""


class HandleError(KaggleError, ValueError):
    """A malformed handle or `kaggle:` spec."""


class CredentialsError(KaggleError):
    """No Kaggle credentials were found (or a credentials file is malformed)."""


class BadCredentialsError(CredentialsError):
    """Kaggle rejected the credentials (HTTP 401)."""


class LicenceError(KaggleError):
    """Kaggle refused the download (HTTP 403): the model's licence was not accepted by this account."""


class NotFoundOnKaggleError(KaggleError):
    """Kaggle has no such handle or file (HTTP 404)."""


class OfflineError(KaggleError):
    """Kaggle cannot be reached and what was asked for is not in the cache."""


class DiskSpaceError(KaggleError):
    """Not enough free disk for the file."""


# ------------------------------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class KaggleHandle:
    """A parsed Kaggle model handle; `version` is None for an unversioned handle."""

    owner: str
    model: str
    framework: str
    variation: str
    version: int | None = None

    @property
    def unversioned(self) -> str:
        return f"{self.owner}/{self.model}/{self.framework}/{self.variation}"

    @property
    def page_url(self) -> str:
        """The model page, where its licence is accepted."""
        return f"{KAGGLE_WEB}/models/{self.owner}/{self.model}"

    def with_version(self, version: int) -> KaggleHandle:
        return dataclasses.replace(self, version=version)

    def __str__(self) -> str:
        return self.unversioned if self.version is None else f"{self.unversioned}/{self.version}"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One released checkpoint file.

    Attributes:
      handle: versioned handle, e.g. `google/paligemma-2/jax/paligemma2-3b-pt-224/1`.
      file: file name inside the bundle, e.g. `paligemma2-3b-pt-224.b16.npz`.
      preset: the `paligemma_ft.model.presets` name of the architecture, e.g. `pg2_3b_224`.
      resolution: image side in pixels (224, 448 or 896).
      dtype: numpy name of the stored parameter dtype (`float32`, `float16`, `bfloat16`).
      num_params: total parameter count (big_vision reference 3.3).
      size_bytes: approximate file size, `num_params` x bytes per parameter (the zip overhead is negligible).
      page_url: the model page, where the licence is accepted.
      default: the file `download` fetches when the handle is given without a file.
    """

    handle: str
    file: str
    preset: str
    resolution: int
    dtype: str
    num_params: int
    size_bytes: int
    page_url: str
    default: bool = False


RESOLUTIONS = (224, 448, 896)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_PARAMS = {  # Total parameters at 224 / 448 / 896 px: only img/pos_embedding grows with the resolution.
    "pg1_3b": (2_923_335_408, 2_924_220_144, 2_927_759_088),
    "pg2_3b": (3_032_094_960, 3_032_979_696, 3_036_518_640),
    "pg2_10b": (9_662_409_456, 9_663_294_192, 9_666_833_136),
    "pg2_28b": (27_650_192_112, 27_651_076_848, 27_654_615_792),
}
# PaliGemma 1 ships each checkpoint in three dtypes; bf16 is the default (half of f32, the dtype PaliGemma 2
# ships in). The big_vision colab used the .f16 file because T4 GPUs have no bf16.
_PG1_FILES = ((".bf16.npz", "bfloat16"), (".f16.npz", "float16"), (".npz", "float32"))


def _build_table() -> dict[str, ModelInfo]:
    table = {}

    def add(handle: str, file: str, preset: str, res: int, dtype: str, params: int, default: bool) -> None:
        owner, model = handle.split("/")[:2]
        table[file] = ModelInfo(
            handle,
            file,
            preset,
            res,
            dtype,
            params,
            params * _BYTES[dtype],
            f"{KAGGLE_WEB}/models/{owner}/{model}",
            default,
        )

    for i, res in enumerate(RESOLUTIONS):
        name = f"paligemma-3b-pt-{res}"
        for j, (suffix, dtype) in enumerate(_PG1_FILES):
            add(
                f"google/paligemma/jax/{name}/1",
                name + suffix,
                f"pg1_3b_{res}",
                res,
                dtype,
                _PARAMS["pg1_3b"][i],
                j == 0,
            )
        for size in ("3b", "10b", "28b"):
            name = f"paligemma2-{size}-pt-{res}"
            add(
                f"google/paligemma-2/jax/{name}/1",
                f"{name}.b16.npz",
                f"pg2_{size}_{res}",
                res,
                "bfloat16",
                _PARAMS[f"pg2_{size}"][i],
                True,
            )
    return table


RELEASED: dict[str, ModelInfo] = _build_table()  # File name -> released checkpoint.


def known_files(handle: str | KaggleHandle) -> list[ModelInfo]:
    """The table's files for a handle (any version given is ignored), default file first."""
    h = parse_handle(handle) if isinstance(handle, str) else handle
    found = [m for m in RELEASED.values() if m.handle.rsplit("/", 1)[0] == h.unversioned]
    return sorted(found, key=lambda m: not m.default)


def format_table() -> str:
    """The table as aligned text lines: handle, file, preset, dtype, size."""
    return "\n".join(
        f"  {m.handle:<45} {m.file:<30} {m.preset:<12} {m.dtype:<9} {_gb(m.size_bytes)}" for m in RELEASED.values()
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def parse_handle(handle: str) -> KaggleHandle:
    """Parses `owner/model/framework/variation[/version]`.

    Raises:
      HandleError: wrong number of parts, an empty part, or a version that is not a positive integer.
    """
    parts = handle.strip().strip("/").split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise HandleError(
            f"Kaggle handle {handle!r} is not owner/model/framework/variation[/version], e.g. "
            "google/paligemma-2/jax/paligemma2-3b-pt-224/1"
        )
    version = None
    if len(parts) == 5:
        if not parts[4].isdigit() or int(parts[4]) < 1:
            raise HandleError(f"Kaggle handle {handle!r}: the version {parts[4]!r} is not a positive integer.")
        version = int(parts[4])
    owner, model, framework, variation = parts[:4]
    return KaggleHandle(owner, model, framework, variation, version)


# ------------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """kagglehub's cache folder: `$KAGGLEHUB_CACHE` when set (even if empty, as kagglehub), else ~/.cache/kagglehub."""
    if "KAGGLEHUB_CACHE" in os.environ:
        return Path(os.environ["KAGGLEHUB_CACHE"])
    return Path.home() / ".cache" / "kagglehub"


def expected_path(h: KaggleHandle, file: str | None) -> Path:
    """Where kagglehub puts a versioned handle's bundle directory (file None) or one file of it."""
    vdir = cache_root() / "models" / h.owner / h.model / h.framework / h.variation / str(h.version)
    return vdir / file if file else vdir


def cached_path(h: KaggleHandle, file: str | None) -> Path | None:
    """The cached file (or bundle directory when `file` is None) of a versioned handle, or None.

    A file counts as cached when it exists and either its own marker or the whole bundle's marker does, so a
    file inside a fully downloaded bundle is found too (kagglehub itself would download it again).
    """
    if h.version is None:
        raise ValueError(f"cached_path needs a versioned handle, got {h}")
    variation_dir = expected_path(h, None).parent
    bundle_done = (variation_dir / f"{h.version}.complete").exists()
    target = expected_path(h, file)
    if file is None:
        return target if bundle_done and target.is_dir() else None
    file_done = (variation_dir / ".complete" / str(h.version) / f"{file}.complete").exists()
    return target if (bundle_done or file_done) and target.is_file() else None


def _any_cached(h: KaggleHandle) -> bool:
    return any(cached_path(h, f) for f in [None, *(m.file for m in known_files(h))])


# ------------------------------------------------------------------------------------------------- credentials


def _ways_to_authenticate() -> str:
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR", "~/.kaggle")
    return (
        "Give Kaggle credentials in one of these ways (kagglehub checks them in this order):\n"
        "  1. in Python: `import kagglehub; kagglehub.login()` (asks for an API token; lasts for the process)\n"
        "  2. an API token in the environment (`export KAGGLE_API_TOKEN=<token>`) or saved in ~/.kaggle/access_token\n"
        "  3. a legacy API key pair (`export KAGGLE_USERNAME=<user>` and `export KAGGLE_KEY=<key>`)\n"
        '  4. a kaggle.json file {"username": ..., "key": ...} at $KAGGLE_CONFIG_DIR/kaggle.json or '
        f"~/.kaggle/kaggle.json (here: {Path(config_dir).expanduser() / 'kaggle.json'})\n"
        "  5. in Colab: KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY) as Colab secrets\n"
        f"Create a token at {API_TOKEN_PAGE}."
    )


def credential_source() -> str | None:
    """Where kagglehub will take credentials from, in its order, or None. Never the values themselves."""
    import kagglehub.config as kconfig

    if getattr(kconfig, "_kaggle_credentials", None):
        return "kagglehub.login() / set_kaggle_credentials() in this process"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "the KAGGLE_API_TOKEN environment variable"
    for name in ("~/.kaggle/access_token", "~/.kaggle/access_token.txt"):
        path = Path(name).expanduser()
        if path.is_file() and path.read_text().strip():
            return str(path)
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "the KAGGLE_USERNAME and KAGGLE_KEY environment variables"
    json_file = Path(os.environ.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser() / "kaggle.json"
    if json_file.exists():
        return str(json_file)
    try:  # kagglehub's own lookup decides; this only names the source (e.g. Colab secrets, a notebook token).
        return "kagglehub's configuration (e.g. Colab secrets)" if kconfig.get_kaggle_credentials() else None
    except ValueError:
        return None


def _check_credentials(what: str) -> str:
    """Returns the credential source, or raises CredentialsError listing every way to give credentials."""
    import kagglehub.config as kconfig

    try:  # kagglehub's own lookup is the authority on whether a download will be authenticated.
        found = kconfig.get_kaggle_credentials()
    except ValueError as e:  # A malformed kaggle.json; kagglehub's message names the file, not its content.
        raise CredentialsError(f"{e}.\n{_ways_to_authenticate()}") from None
    if not found:
        raise CredentialsError(
            f"No Kaggle credentials found, and {what} is not in the kagglehub cache "
            f"({cache_root()}).\n{_ways_to_authenticate()}"
        )
    return credential_source() or "kagglehub's configuration"


def _in_kaggle_notebook() -> bool:
    """True where kagglehub serves models from the notebook's /kaggle/input mount (no credentials, no disk)."""
    return (
        "KAGGLE_KERNEL_RUN_TYPE" in os.environ
        and "KAGGLE_DATA_PROXY_URL" in os.environ  # As kagglesdk.
        and os.environ.get("DISABLE_KAGGLE_CACHE", "").lower() not in ("true", "1", "t")
    )


# ------------------------------------------------------------------------------------------------- HTTP


def _describe(h: KaggleHandle, file: str | None) -> str:
    return f"file {file!r} of {h}" if file else f"model {h}"


def _server_message(error: Exception) -> str:
    response = getattr(error, "response", None)
    try:
        message = str(response.json().get("message", "")) if response is not None else ""
    except Exception:  # Not JSON: the status line says enough.
        message = ""
    return f": {message[:300]}" if message else ""


def _http_error(h: KaggleHandle, file: str | None, status: int | None, server: str) -> KaggleError:
    what = _describe(h, file)
    if status == 401:
        return BadCredentialsError(
            f"Kaggle rejected the credentials from {credential_source() or 'kagglehub'} (HTTP 401{server}) while "
            f"fetching {what}. Check them, or create a new API token at {API_TOKEN_PAGE}.\n"
            f"{_ways_to_authenticate()}"
        )
    if status == 403:
        return LicenceError(
            f"Kaggle refused {what} (HTTP 403{server}). The Kaggle account behind your credentials "
            f"({credential_source() or 'none found'}) has not accepted this model's licence: open {h.page_url}, "
            "sign in with that account, accept the licence on the page, then run again."
        )
    if status == 404:
        infos = known_files(h)
        if infos:
            listing = (
                f"Known files of {infos[0].handle}: "
                + ", ".join(f"{m.file} ({m.dtype}, {_gb(m.size_bytes)})" for m in infos)
                + "."
            )
        else:
            listing = f"{h.unversioned} is not in paligemma_ft's table; the known handles and files are:\n"
            listing += format_table()
        return NotFoundOnKaggleError(f"Kaggle has no {what} (HTTP 404{server}). {listing}")
    return KaggleError(f"Kaggle answered HTTP {status}{server} for {what}. Try again later.")


@contextlib.contextmanager
def _kaggle_errors(h: KaggleHandle, file: str | None, target: Path | None) -> Iterator[None]:
    """Turns kagglehub/requests exceptions into KaggleError subclasses with messages that say what to do."""
    import requests
    from kagglehub import exceptions as kexc

    try:
        yield
    except requests.HTTPError as e:  # kagglehub's KaggleApiHTTPError is one.
        status = e.response.status_code if e.response is not None else None
        raise _http_error(h, file, status, _server_message(e)) from e
    except (requests.ConnectionError, requests.Timeout) as e:
        where = (
            f"the file is not in the cache at {target}"
            if target is not None
            else "an unversioned handle's current version can only be looked up online"
        )
        raise OfflineError(
            f"Cannot reach Kaggle ({type(e).__name__}) to fetch {_describe(h, file)}, and {where}. "
            "Connect to the network and run again, or use a versioned handle whose files are "
            "already in the kagglehub cache."
        ) from e
    except kexc.UnauthenticatedError as e:
        raise CredentialsError(f"Kaggle needs credentials for {_describe(h, file)}.\n{_ways_to_authenticate()}") from e
    except kexc.DataCorruptionError as e:
        raise KaggleError(
            f"The download of {_describe(h, file)} was corrupted (checksum mismatch) and was deleted; run again."
        ) from e
    except ValueError as e:  # e.g. a framework kagglehub does not know ("'jaxx' is not a valid ModelFramework").
        raise HandleError(f"kagglehub cannot fetch {_describe(h, file)}: {e}") from e
    except OSError as e:  # Last: requests' exceptions are OSErrors too. A full disk or an unwritable cache.
        raise KaggleError(f"Cannot write {_describe(h, file)} to {target or cache_root()}: {e}") from e


# ------------------------------------------------------------------------------------------------- versions


_RESOLVED: dict[str, int] = {}  # Unversioned handle -> version found online, so it is asked once a process.


def _fetch_current_version(h: KaggleHandle) -> int:
    """Asks Kaggle for the current version of an unversioned handle, the way kagglehub does."""
    from kagglehub import http_resolver
    from kagglehub.clients import build_kaggle_client
    from kagglehub.handle import parse_model_handle

    with build_kaggle_client() as client:  # kagglehub's own lookup (private), so both agree on the version.
        return int(http_resolver._get_current_version(client, parse_model_handle(str(h))))


def resolve_version(handle: str | KaggleHandle) -> KaggleHandle:
    """Returns the handle with a version: as given, or resolved once online and logged for the user to pin.

    Offline, an unversioned handle from the table falls back to the table's version when that version is in
    the cache; otherwise OfflineError says to use a versioned handle.
    """
    h = parse_handle(handle) if isinstance(handle, str) else handle
    if h.version is not None:
        return h
    if h.unversioned in _RESOLVED:
        return h.with_version(_RESOLVED[h.unversioned])
    infos = known_files(h)
    recorded = int(infos[0].handle.rsplit("/", 1)[1]) if infos else None
    try:
        with _kaggle_errors(h, None, None):
            version = _fetch_current_version(h)
    except OfflineError:
        # Inside a Kaggle notebook kagglehub serves a versioned handle from the notebook's mount.
        if recorded is not None and (_any_cached(h.with_version(recorded)) or _in_kaggle_notebook()):
            _LOG.warning(
                "Kaggle is unreachable: using version %d of %s (recorded in paligemma_ft's table and "
                "in the cache). Write %s/%d to say so.",
                recorded,
                h,
                h,
                recorded,
            )
            return h.with_version(recorded)
        raise
    _RESOLVED[h.unversioned] = version
    _LOG.warning(
        "Resolved %s to version %d. Write %s/%d in configs: a versioned handle is reproducible and is "
        "served from the kagglehub cache offline.",
        h,
        version,
        h,
        version,
    )
    if recorded is not None and version != recorded:
        _LOG.warning(
            "paligemma_ft's table records version %d of %s; Kaggle now serves version %d.", recorded, h, version
        )
    return h.with_version(version)


# ------------------------------------------------------------------------------------------------- preflight


@dataclasses.dataclass(frozen=True)
class PreflightResult:
    """What `preflight` found. `cached` set means no network is needed.

    Attributes:
      handle: the versioned handle.
      file: the file to fetch (None: the whole bundle, for a handle outside the table given without a file).
      info: the table's entry for the file, or None for a file or handle the table does not know.
      cached: the cached file (or bundle directory), or None.
      target: where kagglehub will put it.
      size_bytes: the table's approximate size, or None when unknown.
      free_bytes: free bytes where it will go, or None when not checked.
      credentials: where credentials come from (never their values), or None when not needed.
      notes: what the preflight skipped and why.
    """

    handle: KaggleHandle
    file: str | None
    info: ModelInfo | None
    cached: Path | None
    target: Path
    size_bytes: int | None = None
    free_bytes: int | None = None
    credentials: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def needs_download(self) -> bool:
        return self.cached is None


def _pick_file(h: KaggleHandle, file: str | None) -> tuple[str | None, ModelInfo | None]:
    infos = known_files(h)
    if not infos:
        _LOG.warning(
            "%s is not in paligemma_ft's table of released PaliGemma checkpoints: it is fetched as "
            "given, and its size (hence free disk) cannot be checked beforehand.",
            h,
        )
        return file, None
    if file is None:
        return infos[0].file, infos[0]
    match = [m for m in infos if m.file == file]
    if not match:
        _LOG.warning(
            "%r is not among the known files of %s (%s); trying it anyway.",
            file,
            h.unversioned,
            ", ".join(m.file for m in infos),
        )
    return file, match[0] if match else None


def _free_bytes(where: Path) -> int:
    while not where.exists() and where != where.parent:  # The cache folder may not exist yet.
        where = where.parent
    return shutil.disk_usage(where).free


def preflight(
    handle: str | KaggleHandle, file: str | None = None, *, dest_dir: str | os.PathLike | None = None
) -> PreflightResult:
    """Checks, before any compute, that a checkpoint is cached or can be downloaded.

    Order: the kagglehub cache (a hit needs nothing else, offline included); inside a Kaggle notebook kagglehub
    mounts models itself, so nothing more is checked; then credentials; then free disk for the table's size.

    Args:
      handle: `owner/model/framework/variation[/version]`; an unversioned one is resolved online once.
      file: a file of the bundle; default: the table's default file (the whole bundle for unknown handles).
      dest_dir: where the disk check looks (default: the kagglehub cache folder).

    Raises:
      HandleError, CredentialsError, DiskSpaceError, OfflineError (resolving an unversioned handle offline).
    """
    h = resolve_version(handle)
    file, info = _pick_file(h, file)
    target = expected_path(h, file)
    found = cached_path(h, file)
    if found is not None:
        return PreflightResult(h, file, info, found, target, notes=("in the kagglehub cache",))
    if _in_kaggle_notebook():
        return PreflightResult(h, file, info, None, target, notes=("Kaggle notebook: kagglehub mounts the model",))
    what = _describe(h, file)
    source = _check_credentials(what)
    if info is None:
        return PreflightResult(
            h, file, None, None, target, credentials=source, notes=("size unknown: free disk not checked",)
        )
    partial = target.stat().st_size if target.is_file() else 0  # kagglehub resumes a partial download.
    need = max(info.size_bytes - partial, 0)
    where = Path(dest_dir) if dest_dir is not None else cache_root()
    free = _free_bytes(where)
    if free < need:
        raise DiskSpaceError(
            f"Not enough free disk for {what}: it needs about {_gb(need)} ({need} bytes) and "
            f"{where} has {_gb(free)} ({free} bytes) free. Free some space, or set "
            "KAGGLEHUB_CACHE to a folder on a larger disk."
        )
    return PreflightResult(h, file, info, None, target, info.size_bytes, free, source)


# ------------------------------------------------------------------------------------------------- download


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[None]:
    """kagglehub draws its own tqdm bar per file; to hide it, its module-level `tqdm` is swapped for a while."""
    if enabled:
        yield
        return
    from kagglehub import clients

    original = clients.tqdm
    clients.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        clients.tqdm = original


def download(handle: str | KaggleHandle, file: str | None = None, *, progress: bool = True) -> Path:
    """Returns the local path of a checkpoint file (or bundle directory), downloading it when not cached.

    Runs `preflight` first; a cached versioned handle never touches the network.

    Raises:
      KaggleError subclasses: HandleError, CredentialsError, BadCredentialsError (401), LicenceError (403),
      NotFoundOnKaggleError (404), OfflineError, DiskSpaceError.
    """
    pre = preflight(handle, file)
    if pre.cached is not None:
        _LOG.info("Using %s from the kagglehub cache: %s", _describe(pre.handle, pre.file), pre.cached)
        return pre.cached
    import kagglehub

    with _kaggle_errors(pre.handle, pre.file, pre.target), _progress_bar(progress):
        return Path(kagglehub.model_download(str(pre.handle), path=pre.file))


def resolve_model_init(spec: str) -> Path:
    """Resolves `kaggle:<handle>[:<file>[:<subtree>]]` (a config's `model_init`) to a local `.npz` path.

    The file defaults to the table's; a trailing `:img` / `:llm` selector is kept on the returned path for
    `checkpoint.load_params`. Example: `kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1`.
    """
    if not spec.startswith(SPEC_PREFIX):
        raise HandleError(
            f"model_init {spec!r} does not start with {SPEC_PREFIX!r}; expected "
            "kaggle:<owner>/<model>/<framework>/<variation>/<version>[:<file>]"
        )
    handle, _, rest = spec[len(SPEC_PREFIX) :].partition(":")
    file, _, subtree = rest.partition(":")
    path = download(handle, file or None)
    if path.is_dir():  # A handle outside the table, given without a file: take its only .npz.
        npz = sorted(path.rglob("*.npz"))
        if len(npz) != 1:
            raise HandleError(
                f"model_init {spec!r}: the bundle {path} holds {len(npz)} .npz files "
                f"({', '.join(p.name for p in npz) or 'none'}); name one as {spec}:<file>."
            )
        path = npz[0]
    return Path(f"{path}:{subtree}") if subtree else path


def find_tokenizer(bundle_dir: str | os.PathLike) -> Path | None:
    """A SentencePiece tokenizer inside a downloaded bundle (a file path means its directory), or None."""
    root = Path(bundle_dir)
    root = root.parent if root.is_file() else root
    if not root.is_dir():
        return None
    for name in TOKENIZER_NAMES:  # The bundle's top level first, then sub-folders.
        if (root / name).is_file():
            return root / name
    for name in TOKENIZER_NAMES:
        found = sorted(p for p in root.rglob(name) if p.is_file())
        if found:
            return found[0]
    return None


def download_command(handle: str, file: str | None) -> int:
    """`paligemma-ft download HANDLE [--file NAME]`: prints the local path (exit 0) or the error (exit 2)."""
    try:
        path = download(handle, file)
    except KaggleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0

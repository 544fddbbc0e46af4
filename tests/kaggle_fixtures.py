"""A fake kagglehub cache for the Kaggle, CLI and user-error tests: handles and kagglehub's two cache layouts.

The cache itself (fresh per test, no credentials, no network) is conftest's `isolated` fixture.
"""

PG2 = "google/paligemma-2/jax/paligemma2-3b-pt-224"
PG2_FILE = "paligemma2-3b-pt-224.b16.npz"
PG1 = "google/paligemma/jax/paligemma-3b-pt-224"


def put_file(cache, handle, file, data=b"npz bytes"):
    """kagglehub's single-file layout: the file plus `.complete/<version>/<file>.complete`."""
    *parts, version = handle.split("/")
    variation = cache.joinpath("models", *parts)
    (variation / version).mkdir(parents=True, exist_ok=True)
    (variation / version / file).write_bytes(data)
    (variation / ".complete" / version).mkdir(parents=True, exist_ok=True)
    (variation / ".complete" / version / f"{file}.complete").touch()
    return variation / version / file


def put_bundle(cache, handle, files):
    """kagglehub's whole-model layout: the files plus the `<version>.complete` marker beside the folder."""
    *parts, version = handle.split("/")
    variation = cache.joinpath("models", *parts)
    (variation / version).mkdir(parents=True, exist_ok=True)
    for file in files:
        (variation / version / file).write_bytes(b"x")
    (variation / f"{version}.complete").touch()
    return variation / version

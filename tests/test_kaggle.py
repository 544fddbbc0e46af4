"""Kaggle checkpoints: the table, a fake kagglehub cache served offline, and every error path at the HTTP layer.

No test reaches the network: sockets are blocked (any attempt is recorded and fails), and the HTTP answers are
fake `requests.Response`s returned from `requests.Session.send`, the call kagglehub's client makes.
"""

import io
import json
import logging
import shutil
from collections import namedtuple

import pytest
import requests
from kaggle_fixtures import PG1, PG2, PG2_FILE, put_bundle, put_file

from paligemma_ft.checkpoints import kaggle
from paligemma_ft.model import presets

# Every test here runs on a fresh kagglehub cache, without credentials or network (conftest's `isolated`).
pytestmark = pytest.mark.usefixtures("isolated")

SECRET = "s3cr3t-KEY-0123456789abcdef"  # A credential value that must never appear in any output.
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)


@pytest.fixture
def roomy_disk(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**14, 0, 10**14))


def answer(monkeypatch, status=200, body=None, content=b"", headers=None):
    """Makes every HTTP request kagglehub sends get this response (or raise it, for an exception)."""
    urls = []

    def send(self, request, **kwargs):
        urls.append(request.url)
        if isinstance(status, Exception):
            raise status
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        if body is not None:
            response.headers["Content-Type"] = "application/json"
            content_ = json.dumps(body).encode()
        else:
            response.headers["Content-Type"] = "application/octet-stream"
            response.headers["Content-Length"] = str(len(content))
            content_ = content
        response.headers.update(headers or {})
        response.raw = io.BytesIO(content_)
        return response

    monkeypatch.setattr(requests.Session, "send", send)
    return urls


def assert_no_secret(*texts):
    for text in texts:
        assert SECRET not in text


# ------------------------------------------------------------------------------------------------- table


def test_table_lists_every_release_with_sizes_and_presets():
    assert len(kaggle.RELEASED) == 9 + 9  # PG1: 3 resolutions x 3 dtypes; PG2: 3 sizes x 3 resolutions.
    for info in kaggle.RELEASED.values():
        assert info.preset in presets.PRESETS
        assert info.handle.endswith("/1") and info.file.startswith(info.handle.split("/")[3])
        assert info.resolution == int(info.preset.rsplit("_", 1)[1])
        assert info.page_url in (
            "https://www.kaggle.com/models/google/paligemma",
            "https://www.kaggle.com/models/google/paligemma-2",
        )
    gb = {f: kaggle.RELEASED[f].size_bytes / 1e9 for f in kaggle.RELEASED}
    assert gb["paligemma-3b-pt-224.npz"] == pytest.approx(11.7, abs=0.05)
    assert gb["paligemma-3b-pt-224.f16.npz"] == gb["paligemma-3b-pt-224.bf16.npz"] == pytest.approx(5.85, abs=0.05)
    assert gb["paligemma2-10b-pt-448.b16.npz"] == pytest.approx(19.3, abs=0.05)
    assert gb["paligemma2-28b-pt-896.b16.npz"] == pytest.approx(55.3, abs=0.05)
    assert kaggle.RELEASED[PG2_FILE].dtype == "bfloat16" and kaggle.RELEASED[PG2_FILE].preset == "pg2_3b_224"
    pg1 = kaggle.known_files(PG1 + "/1")
    assert [m.file for m in pg1][0] == "paligemma-3b-pt-224.bf16.npz"  # The default comes first.
    assert sorted(m.dtype for m in pg1) == ["bfloat16", "float16", "float32"]
    assert [m.file for m in kaggle.known_files(PG2)] == [PG2_FILE]
    assert kaggle.known_files("someone/other/jax/thing") == []


def test_parse_handle():
    h = kaggle.parse_handle(PG2 + "/1")
    assert (h.owner, h.model, h.framework, h.variation, h.version) == (
        "google",
        "paligemma-2",
        "jax",
        "paligemma2-3b-pt-224",
        1,
    )
    assert str(h) == PG2 + "/1" and h.unversioned == PG2
    assert h.page_url == "https://www.kaggle.com/models/google/paligemma-2"
    assert kaggle.parse_handle(PG2).version is None
    for bad in ("google/paligemma-2/jax", PG2 + "/latest", PG2 + "/0", "google//jax/x/1", PG2 + "/1/extra"):
        with pytest.raises(kaggle.HandleError, match="Kaggle handle"):
            kaggle.parse_handle(bad)


# ------------------------------------------------------------------------------------------------- cache


def test_download_command_prints_cached_path_offline(isolated, capsys):
    path = put_file(isolated, PG2 + "/1", PG2_FILE)
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(path) and err == ""
    assert kaggle.download_command(PG2 + "/1", None) == 0  # The table's default file.
    assert capsys.readouterr().out.strip() == str(path)


def test_fake_cache_layout_is_kagglehubs_own(isolated):
    """kagglehub itself serves both hand-made layouts offline, so they are laid out exactly as it lays them."""
    import kagglehub

    file_path = put_file(isolated, PG2 + "/1", PG2_FILE)
    assert kagglehub.model_download(PG2 + "/1", path=PG2_FILE) == str(file_path)
    bundle = put_bundle(isolated, PG1 + "/1", ["paligemma-3b-pt-224.f16.npz", "paligemma-3b-pt-224.bf16.npz"])
    assert kagglehub.model_download(PG1 + "/1") == str(bundle)


def test_whole_bundle_serves_its_files(isolated):
    bundle = put_bundle(isolated, PG1 + "/1", ["paligemma-3b-pt-224.f16.npz", "paligemma-3b-pt-224.bf16.npz"])
    assert kaggle.download(PG1 + "/1", "paligemma-3b-pt-224.f16.npz") == bundle / "paligemma-3b-pt-224.f16.npz"
    assert kaggle.download(PG1 + "/1") == bundle / "paligemma-3b-pt-224.bf16.npz"
    pre = kaggle.preflight(PG1 + "/1")
    assert not pre.needs_download and pre.credentials is None and pre.info.preset == "pg1_3b_224"


def test_file_without_marker_is_not_cached(isolated, capsys):
    """An interrupted download (file, no `.complete` marker) must not be used."""
    path = put_file(isolated, PG2 + "/1", PG2_FILE)
    (isolated / "models/google/paligemma-2/jax/paligemma2-3b-pt-224/.complete/1" / f"{PG2_FILE}.complete").unlink()
    assert kaggle.cached_path(kaggle.parse_handle(PG2 + "/1"), PG2_FILE) is None
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2  # Not cached, and no credentials.
    assert path.exists()


# ------------------------------------------------------------------------------------------------- preflight


def test_missing_credentials_lists_every_way(capsys):
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "No Kaggle credentials found" in err and PG2_FILE in err
    for way in (
        "kagglehub.login()",
        "KAGGLE_API_TOKEN",
        "~/.kaggle/access_token",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "$KAGGLE_CONFIG_DIR/kaggle.json",
        "~/.kaggle/kaggle.json",
        "Colab secrets",
        "https://www.kaggle.com/settings/api",
    ):
        assert way in err, way


def test_malformed_kaggle_json_names_the_file_not_its_content(isolated, tmp_path, capsys):
    config = tmp_path / "kaggle_config"
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"key": SECRET}))  # No "username".
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    err = capsys.readouterr().err
    assert str(config / "kaggle.json") in err and "username" in err
    assert_no_secret(err)


def test_every_credential_source_is_found_and_never_printed(tmp_path, monkeypatch, roomy_disk):
    import kagglehub.config

    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    assert kaggle.preflight(PG2 + "/1").credentials == "the KAGGLE_API_TOKEN environment variable"
    monkeypatch.delenv("KAGGLE_API_TOKEN")
    token = tmp_path / "home/.kaggle/access_token"
    token.parent.mkdir(parents=True)
    token.write_text(SECRET)
    assert kaggle.preflight(PG2 + "/1").credentials == str(token)
    token.unlink()
    (tmp_path / "kaggle_config").mkdir()
    (tmp_path / "kaggle_config/kaggle.json").write_text(json.dumps({"username": "alice", "key": SECRET}))
    assert kaggle.preflight(PG2 + "/1").credentials == str(tmp_path / "kaggle_config/kaggle.json")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in kaggle.preflight(PG2 + "/1").credentials
    kagglehub.config.set_kaggle_api_token(SECRET)
    pre = kaggle.preflight(PG2 + "/1")
    assert "kagglehub.login()" in pre.credentials and pre.needs_download and pre.size_bytes > 5e9
    assert_no_secret(repr(pre))


def test_not_enough_disk(credentials, monkeypatch, capsys):
    free = 2 * 10**9
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))
    need = kaggle.RELEASED[PG2_FILE].size_bytes
    with pytest.raises(kaggle.DiskSpaceError) as e:
        kaggle.preflight(PG2 + "/1", PG2_FILE)
    assert str(need) in str(e.value) and str(free) in str(e.value) and "KAGGLEHUB_CACHE" in str(e.value)
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    err = capsys.readouterr().err
    assert "Not enough free disk" in err and "6.1 GB" in err and "2.0 GB" in err
    assert_no_secret(err)


def test_kaggle_notebook_needs_no_credentials_or_disk(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("KAGGLE_DATA_PROXY_URL", "http://proxy.invalid")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1, 1, 0))
    pre = kaggle.preflight(PG2 + "/1")
    assert pre.needs_download and pre.credentials is None and "Kaggle notebook" in pre.notes[0]


# ------------------------------------------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize(
    "status, body, error, phrases",
    [
        (
            401,
            {"code": 401, "message": "Unauthenticated"},
            kaggle.BadCredentialsError,
            [
                "HTTP 401",
                "rejected the credentials",
                "KAGGLE_USERNAME and KAGGLE_KEY environment variables",
                "https://www.kaggle.com/settings/api",
                "kagglehub.login()",
            ],
        ),
        (
            403,
            {"code": 403, "message": "User has not consented to this model's license"},
            kaggle.LicenceError,
            [
                "HTTP 403",
                "User has not consented",
                "https://www.kaggle.com/models/google/paligemma-2",
                "accept the licence",
            ],
        ),
        (
            404,
            {"code": 404, "message": "Not found"},
            kaggle.NotFoundOnKaggleError,
            ["HTTP 404", "Known files of google/paligemma-2/jax/paligemma2-3b-pt-224/1", PG2_FILE],
        ),
        (500, None, kaggle.KaggleError, ["HTTP 500", "Try again later"]),
    ],
)
def test_http_errors_have_their_own_messages(
    status, body, error, phrases, credentials, roomy_disk, monkeypatch, capsys, caplog
):
    urls = answer(monkeypatch, status, body)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(error) as e:
            kaggle.download(PG2 + "/1", PG2_FILE)
        assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    assert urls and all("DownloadModelInstanceVersion" in u for u in urls)
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in str(e.value) and phrase in err, phrase
    assert_no_secret(str(e.value), out, err, caplog.text)


def test_404_for_an_unknown_handle_lists_the_table(credentials, monkeypatch, capsys, caplog):
    answer(monkeypatch, 404, {"code": 404, "message": "Not found"})
    with caplog.at_level(logging.WARNING):
        assert kaggle.download_command("someone/other/jax/thing/2", "w.npz") == 2
    assert "not in paligemma_ft's table" in caplog.text
    err = capsys.readouterr().err
    for info in kaggle.RELEASED.values():
        assert info.handle in err and info.file in err


def test_no_network_and_not_cached(credentials, roomy_disk, monkeypatch, capsys):
    answer(monkeypatch, requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'"))
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    err = capsys.readouterr().err
    target = kaggle.expected_path(kaggle.parse_handle(PG2 + "/1"), PG2_FILE)
    assert "Cannot reach Kaggle" in err and f"not in the cache at {target}" in err
    assert_no_secret(err)


# ------------------------------------------------------------------------------------------------- download


@pytest.mark.parametrize("progress", [True, False])
def test_download_fills_the_cache_then_works_offline(progress, isolated, credentials, roomy_disk, monkeypatch, capfd):
    payload = b"pretend this is an npz" * 1000
    urls = answer(monkeypatch, 200, content=payload)
    path = kaggle.download(PG2 + "/1", PG2_FILE, progress=progress)
    assert len(urls) == 1 and "DownloadModelInstanceVersion" in urls[0]
    variation = isolated / "models/google/paligemma-2/jax/paligemma2-3b-pt-224"
    assert path == variation / "1" / PG2_FILE and path.read_bytes() == payload
    assert (variation / ".complete/1" / f"{PG2_FILE}.complete").exists()
    err = capfd.readouterr().err
    assert ("21.5k/21.5k" in err) == progress  # kagglehub's own tqdm bar, shown unless progress=False.
    answer(monkeypatch, requests.exceptions.ConnectionError("offline"))
    assert kaggle.download(PG2 + "/1", PG2_FILE) == path


def test_unversioned_handle_is_resolved_once_and_logged(isolated, monkeypatch, caplog):
    path = put_file(isolated, PG2 + "/1", PG2_FILE)
    urls = answer(monkeypatch, 200, {"versionNumber": 1, "slug": "paligemma2-3b-pt-224"})
    with caplog.at_level(logging.WARNING):
        assert kaggle.download(PG2, PG2_FILE) == path
        assert kaggle.download(PG2) == path
    assert len(urls) == 1 and "GetModelInstance" in urls[0]  # Asked once, then remembered.
    assert f"Write {PG2}/1 in configs" in caplog.text


def test_unversioned_handle_offline(isolated, monkeypatch, caplog):
    answer(monkeypatch, requests.exceptions.ConnectionError("offline"))
    with pytest.raises(kaggle.OfflineError, match="current version can only be looked up online"):
        kaggle.download(PG2, PG2_FILE)
    path = put_file(isolated, PG2 + "/1", PG2_FILE)  # The table's version is cached: use it, and say so.
    with caplog.at_level(logging.WARNING):
        assert kaggle.download(PG2) == path
    assert "Kaggle is unreachable: using version 1" in caplog.text


def test_unknown_handle_still_works_with_a_warning(isolated, caplog):
    path = put_file(isolated, "someone/other/jax/thing/2", "weights.npz")
    with caplog.at_level(logging.WARNING):
        assert kaggle.download("someone/other/jax/thing/2", "weights.npz") == path
    assert "not in paligemma_ft's table" in caplog.text


# ---------------------------------------------------------------------------------------- model_init, tokenizer


def test_resolve_model_init(isolated):
    path = put_file(isolated, PG2 + "/1", PG2_FILE)
    assert kaggle.resolve_model_init(f"kaggle:{PG2}/1") == path
    assert kaggle.resolve_model_init(f"kaggle:{PG2}/1:{PG2_FILE}") == path
    assert str(kaggle.resolve_model_init(f"kaggle:{PG2}/1:{PG2_FILE}:img")) == f"{path}:img"
    bundle = put_bundle(isolated, "someone/other/jax/thing/3", ["only.npz", "README.md"])
    assert kaggle.resolve_model_init("kaggle:someone/other/jax/thing/3") == bundle / "only.npz"
    put_bundle(isolated, "someone/other/jax/thing/4", ["a.npz", "b.npz"])
    with pytest.raises(kaggle.HandleError, match="a.npz, b.npz"):
        kaggle.resolve_model_init("kaggle:someone/other/jax/thing/4")
    with pytest.raises(kaggle.HandleError, match="does not start with 'kaggle:'"):
        kaggle.resolve_model_init(f"{PG2}/1")


def test_tokenizer_from_config_or_bundle(isolated, tmp_path):
    from paligemma_ft.checkpoints import loading

    bundle = put_bundle(isolated, PG1 + "/1", ["paligemma-3b-pt-224.bf16.npz"])
    checkpoint = loading.Checkpoint(f"kaggle:{PG1}/1", "kaggle", str(bundle / "paligemma-3b-pt-224.bf16.npz"))
    assert kaggle.find_tokenizer(bundle) is None
    with pytest.raises(loading.TokenizerNotFoundError) as e:
        loading.resolve_tokenizer(None, checkpoint, 257_152)
    message = str(e.value)
    assert "set config.tokenizer" in message and str(bundle) in message
    assert "paligemma_tokenizer.model" in message and kaggle.TOKENIZER_URL in message
    (bundle / "sub").mkdir()
    (bundle / "sub/tokenizer.model").write_bytes(b"spm")
    assert kaggle.find_tokenizer(checkpoint.file) == bundle / "sub/tokenizer.model"
    (bundle / "paligemma_tokenizer.model").write_bytes(b"spm")
    assert kaggle.find_tokenizer(bundle) == bundle / "paligemma_tokenizer.model"
    assert loading.resolve_tokenizer(None, checkpoint, 257_152) == str(bundle / "paligemma_tokenizer.model")
    assert loading.resolve_tokenizer("/my/tok.model", checkpoint, 257_152) == "/my/tok.model"
    assert kaggle.find_tokenizer(tmp_path / "missing") is None


def test_other_failures_are_messages_not_tracebacks(isolated, tmp_path, credentials, roomy_disk, monkeypatch, capsys):
    answer(monkeypatch, 200, content=b"x")
    assert kaggle.download_command("someone/other/jaxx/thing/1", "w.npz") == 2  # A framework Kaggle lacks.
    assert "'jaxx' is not a valid ModelFramework" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(blocker))  # The cache folder cannot be created.
    assert kaggle.download_command(PG2 + "/1", PG2_FILE) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot write") and str(blocker) in err and "Traceback" not in err


def test_docs_list_the_whole_table():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "kaggle.md").read_text()
    for info in kaggle.RELEASED.values():
        row = next(line for line in doc.splitlines() if f"`{info.handle.split('/', 1)[1]}`" in line)
        assert f"`{info.file}`" in row and f"`{info.preset}`" in row and f"{info.size_bytes / 1e9:.1f}" in row
        assert (f"**`{info.file}`**" in row) == info.default
    pages = {info.page_url for info in kaggle.RELEASED.values()}
    for url in [f"<{page}>" for page in pages] + [kaggle.TOKENIZER_URL]:
        assert url in doc

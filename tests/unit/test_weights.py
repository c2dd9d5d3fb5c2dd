"""g3dr weights: registry facts, verify (ok / missing / mismatch, full hash and prefix), lock files, the hash
cache, fetch from a loopback HTTP server (resume, mismatch, network failure), and the job entry points
refusing to start. Every weight file here is a few random bytes; no real weights are used."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import yaml

from g3dr.launchers.main import main
from g3dr.config import load_config
from g3dr.errors import WeightsError
from g3dr.weights import (check_requirements, file_sha256, load_lock, load_registry, requirements_for,
                          verify_for)
from g3dr.weights.fetch import fetch_target, targets_for_entry
from g3dr.weights.registry import parse_registry

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("G3DR_CACHE_DIR", str(tmp_path / "hash-cache"))
    monkeypatch.delenv("G3DR_WEIGHTS_REGISTRY", raising=False)
    monkeypatch.delenv("G3DR_WEIGHTS_LOCK", raising=False)


# --------------------------------------------------------------------------------------------------
# A loopback HTTP server with Range support, and a tiny registry pointing at it
# --------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.cut_once:  # a dropped connection: half the body, then close
            srv.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut_once, srv.ranges = {}, [], set(), True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


FILES = {
    "/clip.pt": b"tiny clip weights " * 50,
    "/vgg-abc.pth": b"tiny vgg weights " * 40,
    "/inception.pt": b"tiny inception " * 30,
    "/depth/config.json": b'{"model_type": "depth_anything"}',
    "/depth/preprocessor_config.json": b"{}",
    "/depth/model.safetensors": b"tiny depth weights " * 20,
}


def _registry(tmp_path: Path, base: str = "http://127.0.0.1:9", clip_sha: str | None = None) -> Path:
    data = {"version": 1, "weights": [
        {"name": "tiny-clip", "config_key": "loss.clip_weights", "default_path": "w/clip.pt",
         "urls": [f"{base}/clip.pt"], "sha256": clip_sha or _sha(FILES["/clip.pt"]), "hash_source": "test"},
        {"name": "tiny-clip-other", "config_key": "loss.clip_weights", "default_path": "w/other.bin",
         "urls": [f"{base}/other.bin"], "sha256": None},
        {"name": "tiny-vgg", "config_key": "loss.vgg_weights", "default_path": "w/vgg-abc.pth",
         "urls": [f"{base}/vgg-abc.pth"], "sha256_prefix": _sha(FILES["/vgg-abc.pth"])[:8]},
        {"name": "tiny-inception", "config_key": "eval.inception_weights", "default_path": "w/inception.pt",
         "urls": [f"{base}/inception.pt"], "sha256": None},
        {"name": "tiny-depth", "config_key": "prep.depth_model", "default_path": "w/depth",
         "files": [{"path": p, "urls": [f"{base}/depth/{p}"], "sha256": None}
                   for p in ("config.json", "preprocessor_config.json", "model.safetensors")]},
    ]}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _put(folder: Path) -> dict[str, Path]:
    """The tiny files at the paths the config below names."""
    out = {}
    for url_path, data in FILES.items():
        p = folder / url_path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[url_path] = p
    return out


def _overrides(folder: Path, *extra: str) -> list[str]:
    return ["loss.critics=pretrained", f"loss.clip_weights={folder / 'clip.pt'}",
            f"loss.vgg_weights={folder / 'vgg-abc.pth'}", f"eval.inception_weights={folder / 'inception.pt'}",
            "eval.metrics=[fid, nfs]", *extra]


# --------------------------------------------------------------------------------------------------
# The built-in registry: its hashes are the ones the libraries' own tables state
# --------------------------------------------------------------------------------------------------


def test_builtin_registry_hashes_are_the_libraries_own():
    import open_clip
    from torch.hub import HASH_REGEX
    from torchvision.models import VGG16_Weights

    reg = load_registry()
    clip = reg.get("clip-vit-b-16-openai")
    url = open_clip.get_pretrained_cfg("ViT-B-16-quickgelu", "openai")["url"]
    assert clip.files[0].urls == (url,) and clip.files[0].sha256 == url.split("/")[-2]
    vgg = reg.get("vgg16-torchvision")
    tv_url = VGG16_Weights.IMAGENET1K_V1.url
    assert vgg.files[0].urls == (tv_url,)
    assert vgg.files[0].sha256_prefix == HASH_REGEX.search(tv_url.rsplit("/", 1)[1]).group(1)
    # The defaults of the config name the files whose hashes are known.
    cfg = load_config(None)
    assert reg.match("loss.clip_weights", cfg.loss.clip_weights).name == "clip-vit-b-16-openai"
    assert reg.match("loss.vgg_weights", cfg.loss.vgg_weights).name == "vgg16-torchvision"
    assert reg.match("eval.inception_weights", cfg.eval.inception_weights).name == "inception-2015-12-05"
    paper = load_config(REPO / "configs" / "imagenet128.yaml")
    assert (paper.loss.clip_weights, paper.loss.vgg_weights) == (cfg.loss.clip_weights, cfg.loss.vgg_weights)
    # Every config key the jobs check has an entry, and no hash is invented for files without one.
    keys = {e.config_key for e in reg.entries}
    assert keys == {"loss.clip_weights", "loss.vgg_weights", "eval.inception_weights", "prep.depth_model",
                    "loss.perceptual_weights"}
    # LPIPS's channel weights: the hash is that of the file the installed lpips wheel ships (the critic checks it).
    import importlib.util

    lpips_dir = Path(importlib.util.find_spec("lpips").submodule_search_locations[0])
    lpips_entry, shipped = reg.get("lpips-vgg-v0.1").files[0], (lpips_dir / "weights/v0.1/vgg.pth").read_bytes()
    assert (lpips_entry.sha256, lpips_entry.size) == (_sha(shipped), len(shipped))
    assert lpips_entry.urls[0].endswith("/lpips/weights/v0.1/vgg.pth")
    for name in ("inception-2015-12-05", "clip-vit-b-16-openai-hf", "vgg16-timm-hf", "depth-anything-v2-small"):
        assert reg.get(name).hash_kind() == "none"


def test_registry_errors_name_the_entry(tmp_path):
    base = {"name": "x", "config_key": "loss.clip_weights", "default_path": "a.pt", "urls": ["http://h/a.pt"]}
    with pytest.raises(WeightsError, match=r"entry 'x'.*sha256 must be 64 hex"):
        parse_registry({"weights": [dict(base, sha256="abc")]}, "r.yaml")
    with pytest.raises(WeightsError, match=r"not both"):
        parse_registry({"weights": [dict(base, sha256="a" * 64, sha256_prefix="aaaaaaaa")]}, "r.yaml")
    with pytest.raises(WeightsError, match=r"used twice"):
        parse_registry({"weights": [base, base]}, "r.yaml")
    with pytest.raises(WeightsError, match=r"at least one URL"):
        parse_registry({"weights": [dict(base, urls=[])]}, "r.yaml")
    with pytest.raises(WeightsError, match="no weight named 'nope'"):
        load_registry().get("nope")


def test_list_from_a_neutral_cwd(tmp_path):
    """The registry ships inside the package: `g3dr weights list` works from any directory."""
    env = {k: v for k, v in os.environ.items() if k != "G3DR_WEIGHTS_REGISTRY"}
    out = subprocess.run([sys.executable, "-m", "g3dr.launchers.main", "weights", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clip-vit-b-16-openai" in out.stdout and "prefix 397923af" in out.stdout


def test_registry_is_package_data():
    """setuptools installs registry.yaml with the package (not only the editable checkout)."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "registry.yaml" in pyproject["tool"]["setuptools"]["package-data"]["g3dr.weights"]


# --------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------


def test_requirements_follow_the_config():
    cfg = load_config(TINY, ["eval.metrics=[nfs, da]"])  # random critics, no FID/IS
    assert requirements_for(cfg, "all") == []
    cfg = load_config(TINY, ["loss.critics=pretrained", "eval.metrics=[is]"])
    assert [r.key for r in requirements_for(cfg, "train")] == ["loss.clip_weights", "loss.vgg_weights"]
    assert [r.key for r in requirements_for(cfg, "eval")] == ["eval.inception_weights"]
    assert [r.key for r in requirements_for(cfg, "prep", depth_model="d")] == ["prep.depth_model"]
    assert len(requirements_for(cfg, "all", depth_model="d")) == 4
    assert requirements_for(load_config(TINY, ["eval.metrics=[nfs, da]"]), "eval") == []


def test_verify_ok_with_full_hash_prefix_and_unpinned(tmp_path):
    files = _put(tmp_path / "w")
    reg = load_registry(_registry(tmp_path))
    cfg = load_config(TINY, _overrides(tmp_path / "w"))
    checks = verify_for(cfg, "all", registry=reg, depth_model=str(tmp_path / "w" / "depth"), progress=False)
    by_key = {c.key: c for c in checks}
    assert by_key["loss.clip_weights"].status == "ok" and by_key["loss.clip_weights"].verified_by == "registry"
    assert by_key["loss.clip_weights"].sha256 == _sha(files["/clip.pt"].read_bytes())
    assert by_key["loss.vgg_weights"].verified_by == "registry prefix"
    assert by_key["eval.inception_weights"].status == "unpinned"
    assert {k for k in by_key if k.startswith("prep.")} == {
        "prep.depth_model/config.json", "prep.depth_model/preprocessor_config.json",
        "prep.depth_model/model.safetensors"}
    # strict: files without a full published hash or a lock pin fail
    with pytest.raises(WeightsError) as err:
        verify_for(cfg, "all", registry=reg, strict=True, progress=False)
    msg = str(err.value)
    assert "loss.vgg_weights" in msg and "eval.inception_weights" in msg and "loss.clip_weights=" not in msg


def test_verify_missing_names_key_file_and_command(tmp_path):
    reg = load_registry(_registry(tmp_path))
    cfg = load_config(TINY, _overrides(tmp_path / "w"))
    with pytest.raises(WeightsError) as err:
        verify_for(cfg, "train", registry=reg, progress=False)
    msg = str(err.value)
    clip, vgg = tmp_path / "w" / "clip.pt", tmp_path / "w" / "vgg-abc.pth"
    assert f"loss.clip_weights={clip}: missing" in msg and f"loss.vgg_weights={vgg}: missing" in msg
    assert f"`g3dr weights fetch tiny-clip --dest {clip}`" in msg
    assert f"`g3dr weights fetch tiny-vgg --dest {vgg}`" in msg
    with pytest.raises(WeightsError, match=r"prep\.depth_model=\S*nodir: missing: no depth model at .*"
                                           r"g3dr weights fetch tiny-depth --dest \S*nodir"):
        verify_for(None, "prep", registry=reg, depth_model=str(tmp_path / "nodir"), progress=False)
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "config.json").write_text("{}")
    with pytest.raises(WeightsError) as err:
        verify_for(None, "prep", registry=reg, depth_model=str(tmp_path / "depth"), progress=False)
    assert "prep.depth_model/preprocessor_config.json" in str(err.value)
    assert "prep.depth_model/model.safetensors" in str(err.value) and "/config.json" not in str(err.value)


def test_verify_mismatch_full_hash_and_prefix(tmp_path):
    files = _put(tmp_path / "w")
    reg = load_registry(_registry(tmp_path))
    cfg = load_config(TINY, _overrides(tmp_path / "w"))
    files["/clip.pt"].write_bytes(b"X" + FILES["/clip.pt"][1:])  # same size, one byte differs
    with pytest.raises(WeightsError) as err:
        verify_for(cfg, "train", registry=reg, progress=False)
    msg = str(err.value)
    assert "loss.clip_weights" in msg and "mismatch" in msg and _sha(FILES["/clip.pt"]) in msg
    assert "re-download it with `g3dr weights fetch tiny-clip" in msg and "loss.vgg_weights" not in msg
    files["/clip.pt"].write_bytes(FILES["/clip.pt"])
    files["/vgg-abc.pth"].write_bytes(FILES["/vgg-abc.pth"] + b"!")
    with pytest.raises(WeightsError, match=r"loss\.vgg_weights=.*mismatch.*\(prefix\)"):
        verify_for(cfg, "train", registry=reg, progress=False)
    # A file under a name no entry has, with a registered hash, is still recognised by its hash...
    other = tmp_path / "renamed.bin"
    other.write_bytes(FILES["/clip.pt"])
    checks = check_requirements(requirements_for(load_config(TINY, _overrides(tmp_path / "w", f"loss.clip_weights={other}")),
                                                 "train")[:1], reg)
    assert checks[0].status == "ok" and checks[0].entry.name == "tiny-clip"
    # ...and any other content under that name is only "unpinned" (nothing says what it should be).
    other.write_bytes(b"something else")
    checks = check_requirements(requirements_for(load_config(TINY, _overrides(tmp_path / "w", f"loss.clip_weights={other}")),
                                                 "train")[:1], reg)
    assert checks[0].status == "unpinned"


def test_lock_round_trip_and_cli(tmp_path, capsys):
    files = _put(tmp_path / "w")
    registry = _registry(tmp_path)
    lock = tmp_path / "weights.lock"
    args = ["weights", "verify", "--config", str(TINY), *_overrides(tmp_path / "w"), "--registry", str(registry),
            "--depth-model", str(tmp_path / "w" / "depth"), "--no-progress"]
    assert main([*args, "--write-lock", str(lock)]) == 0
    out = capsys.readouterr().out
    assert "pinned 6 file(s)" in out
    pins = load_lock(lock).entries
    assert pins["eval.inception_weights"].sha256 == _sha(FILES["/inception.pt"])
    assert pins["prep.depth_model/model.safetensors"].size == len(FILES["/depth/model.safetensors"])
    assert pins["loss.clip_weights"].name == "tiny-clip"
    # With the lock, every file is pinned by a full hash: strict passes.
    assert main([*args, "--lock", str(lock), "--strict"]) == 0
    assert "pinned by weights.lock" in capsys.readouterr().out
    # A changed file is caught by the lock even where the registry knows no hash.
    files["/depth/model.safetensors"].write_bytes(b"Y" * len(FILES["/depth/model.safetensors"]))
    assert main([*args, "--lock", str(lock)]) == 2
    err = capsys.readouterr().err
    assert "prep.depth_model/model.safetensors" in err and "the lock" in err and "g3dr weights fetch tiny-depth" in err
    # A size change is caught without hashing; a mismatching file is never pinned by --write-lock.
    files["/clip.pt"].write_bytes(b"short")
    assert main([*args, "--lock", str(lock), "--write-lock", str(lock)]) == 2
    assert load_lock(lock).entries["loss.clip_weights"].sha256 == _sha(FILES["/clip.pt"])
    # The config's weights_lock is what jobs use.
    files["/clip.pt"].write_bytes(FILES["/clip.pt"])
    cfg = load_config(TINY, _overrides(tmp_path / "w", f"weights_lock={lock}"))
    with pytest.raises(WeightsError, match=r"prep\.depth_model/model\.safetensors.*mismatch"):
        verify_for(cfg, "all", registry=load_registry(registry), depth_model=str(tmp_path / "w" / "depth"),
                   progress=False)
    assert all(c.verified_by == "lock" for c in verify_for(cfg, "train", registry=load_registry(registry),
                                                           progress=False))
    with pytest.raises(WeightsError, match="weights lock file .*nolock.yaml not found.*--write-lock"):
        verify_for(cfg, "train", lock=str(tmp_path / "nolock.yaml"), progress=False)


def test_hash_cache_skips_rehashing_until_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    st = f.stat()
    assert file_sha256(f) == _sha(b"a" * 1000)
    assert (tmp_path / "hash-cache" / "sha256-cache.json").is_file()
    assert file_sha256(f) == _sha(b"a" * 1000)  # served from the cache (nothing changed)
    # Rewritten in place with the same size and inode, and its mtime set back: the kernel gave it a new ctime,
    # which no user can set back, so the file is rehashed (the cache used to return the old digest here).
    with open(f, "r+b") as fh:
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size and f.stat().st_ino == st.st_ino
    assert file_sha256(f) == _sha(b"b" + b"a" * 999)
    assert file_sha256(f, use_cache=False) == _sha(b"b" + b"a" * 999)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # any mtime change invalidates the entry too
    assert file_sha256(f) == _sha(b"b" + b"a" * 999)


def test_verify_sees_a_weight_file_changed_with_its_mtime_restored(tmp_path, capsys):
    """`g3dr weights verify` after a file was changed in place and its mtime restored: a mismatch, not the cached
    verdict."""
    files = _put(tmp_path / "w")
    registry = _registry(tmp_path)
    lock = tmp_path / "weights.lock"
    args = ["weights", "verify", "--config", str(TINY), *_overrides(tmp_path / "w"), "--registry", str(registry),
            "--depth-model", str(tmp_path / "w" / "depth"), "--no-progress"]
    assert main([*args, "--write-lock", str(lock)]) == 0  # hashes every file and caches the digests
    assert main([*args, "--lock", str(lock)]) == 0
    clip = files["/clip.pt"]
    st = clip.stat()
    data = bytearray(clip.read_bytes())
    data[0] ^= 0xFF
    clip.write_bytes(bytes(data))
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main([*args, "--lock", str(lock)]) == 2
    assert "loss.clip_weights" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# fetch (loopback)
# --------------------------------------------------------------------------------------------------


def test_fetch_by_name_verifies_and_renames(server, tmp_path, capsys):
    server.files.update(FILES)
    registry = _registry(tmp_path, server.base)
    dest = tmp_path / "out" / "clip.pt"
    assert main(["weights", "fetch", "tiny-clip", "--dest", str(dest), "--registry", str(registry),
                 "--no-progress"]) == 0
    assert dest.read_bytes() == FILES["/clip.pt"] and not dest.with_name("clip.pt.partial").exists()
    assert capsys.readouterr().out.startswith("downloaded\ttiny-clip")
    # Present and verified: no second request.
    n = len(server.requests)
    assert main(["weights", "fetch", "tiny-clip", "--dest", str(dest), "--registry", str(registry)]) == 0
    assert len(server.requests) == n and capsys.readouterr().out.startswith("present\t")
    # A folder entry; several names go into one folder.
    assert main(["weights", "fetch", "tiny-depth", "tiny-vgg", "--dest", str(tmp_path / "many"),
                 "--registry", str(registry), "--no-progress"]) == 0
    assert (tmp_path / "many" / "depth" / "model.safetensors").read_bytes() == FILES["/depth/model.safetensors"]
    assert (tmp_path / "many" / "vgg-abc.pth").read_bytes() == FILES["/vgg-abc.pth"]
    # A URL the server does not have: the HTTP status, and nothing written.
    assert main(["weights", "fetch", "tiny-clip-other", "--dest", str(tmp_path / "o.bin"), "--registry",
                 str(registry), "--no-progress"]) == 2
    assert re.search(r"cannot download http://\S+/other\.bin: HTTP 404", capsys.readouterr().err)
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.bin.partial").exists()


def test_fetch_hash_mismatch_leaves_no_file(server, tmp_path):
    server.files.update(FILES)
    reg = load_registry(_registry(tmp_path, server.base, clip_sha="0" * 64))
    dest = tmp_path / "out" / "clip.pt"
    with pytest.raises(WeightsError, match=r"tiny-clip has sha256 [0-9a-f]{64}, but the registry .* expects 0{64}; "
                                           r"the download was deleted"):
        fetch_target(targets_for_entry(reg.get("tiny-clip"), dest)[0], progress=False)
    assert not dest.exists() and not dest.with_name("clip.pt.partial").exists()
    # An existing (old) file at the destination is left as it was.
    dest.write_bytes(b"old")
    with pytest.raises(WeightsError):
        fetch_target(targets_for_entry(reg.get("tiny-clip"), dest)[0], progress=False)
    assert dest.read_bytes() == b"old"


def test_fetch_resumes_a_cut_download(server, tmp_path):
    server.files.update(FILES)
    server.cut_once.add("/inception.pt")
    reg = load_registry(_registry(tmp_path, server.base))
    dest = tmp_path / "inception.pt"
    target = targets_for_entry(reg.get("tiny-inception"), dest)[0]
    with pytest.raises(WeightsError, match=r"ended after \d+ of \d+ bytes.*partial download stays.*resume"):
        fetch_target(target, progress=False)
    partial = tmp_path / "inception.pt.partial"
    half = len(FILES["/inception.pt"]) // 2
    assert partial.stat().st_size == half and not dest.exists()
    result = fetch_target(target, progress=False)
    assert result.status == "downloaded" and dest.read_bytes() == FILES["/inception.pt"]
    assert server.requests[-1] == ("/inception.pt", f"bytes={half}-")
    # A server without Range support: the partial file is restarted, not appended to.
    server.ranges = False
    dest.unlink()
    partial.write_bytes(FILES["/inception.pt"][:10])
    fetch_target(target, progress=False)
    assert dest.read_bytes() == FILES["/inception.pt"]


def test_fetch_network_failure_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = load_registry(_registry(tmp_path, f"http://127.0.0.1:{port}"))
    with pytest.raises(WeightsError, match=r"cannot download http://127\.0\.0\.1:\d+/clip\.pt: .*no internet"):
        fetch_target(targets_for_entry(reg.get("tiny-clip"), tmp_path / "c.pt")[0], progress=False, timeout=5)
    assert not (tmp_path / "c.pt").exists()


def test_fetch_for_a_config_with_a_lock_mirror(server, tmp_path, capsys):
    """`fetch --config` puts each file where the config names it; a lock entry's url (a lab mirror) and
    sha256 take precedence over the registry's."""
    server.files.update(FILES)
    server.files["/mirror/inception.pt"] = b"the lab's own inception copy"
    registry = _registry(tmp_path, "http://127.0.0.1:9")  # the registry's host is unreachable
    lock = tmp_path / "weights.lock"
    lock.write_text(yaml.safe_dump({"version": 1, "files": {"eval.inception_weights": {
        "sha256": _sha(server.files["/mirror/inception.pt"]), "url": f"{server.base}/mirror/inception.pt"}}}))
    dest = tmp_path / "cluster" / "inception.pt"
    assert main(["weights", "fetch", "--config", str(TINY), "--for", "eval", f"eval.inception_weights={dest}",
                 "eval.metrics=[fid]", "--registry", str(registry), "--lock", str(lock), "--no-progress"]) == 0
    assert dest.read_bytes() == server.files["/mirror/inception.pt"]
    assert "verified=lock" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Entry points refuse to start
# --------------------------------------------------------------------------------------------------


def test_train_refuses_to_start_without_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("G3DR_WEIGHTS_REGISTRY", str(_registry(tmp_path)))
    missing = tmp_path / "w" / "clip.pt"
    code = main(["train", "--config", str(TINY), *_overrides(tmp_path / "w"), f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"loss.clip_weights={missing}: missing" in err
    assert f"g3dr weights fetch tiny-clip --dest {missing}" in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_submit_train_verifies_before_queueing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("G3DR_WEIGHTS_REGISTRY", str(_registry(tmp_path)))
    argv = ["submit", "train", "--executor", "slurm", "--dry-run", "--config", str(TINY),
            *_overrides(tmp_path / "w"), f"run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "g3dr weights fetch tiny-clip" in captured.err and "#SBATCH" not in captured.out
    assert main([*argv[:2], "--skip-weights-check", *argv[2:]]) == 0
    assert "#SBATCH" in capsys.readouterr().out


def test_prep_refuses_a_missing_depth_model(tmp_path, capsys):
    code = main(["prep", "shards", "--src", str(tmp_path), "--layout", "release", "--out", str(tmp_path / "out"),
                 "--depth-model", str(tmp_path / "depth"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"prep.depth_model={tmp_path / 'depth'}: missing: no depth model at" in err
    assert f"g3dr weights fetch depth-anything-v2-small --dest {tmp_path / 'depth'}" in err
    assert not (tmp_path / "out").exists()


def test_submit_prep_verifies_the_depth_model_before_queueing(tmp_path, capsys):
    argv = ["submit", "prep", "shards", "--executor", "slurm", "--dry-run", "--num-shard-jobs", "2", "--",
            "--src", str(tmp_path), "--layout", "imagenet", "--out", str(tmp_path / "out"),
            "--depth-model", str(tmp_path / "depth")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert f"prep.depth_model={tmp_path / 'depth'}: missing" in captured.err and "#SBATCH" not in captured.out
    assert main([*argv[:3], "--skip-weights-check", *argv[3:]]) == 0
    assert "#SBATCH" in capsys.readouterr().out


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}"])
    return save_f_trigen(FTrigen(cfg), cfg, tmp_path / "f_trigen.safetensors", step=1)


def test_eval_refuses_to_start_without_inception(tmp_path, tiny_checkpoint, capsys):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--metrics", "fid", "--inception", str(missing),
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"eval.inception_weights={missing}: missing" in err
    assert f"g3dr weights fetch inception-2015-12-05 --dest {missing}" in err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "mlflow.db").exists()


def test_submit_eval_verifies_each_job_config_before_queueing(tmp_path, tiny_checkpoint, capsys):
    """The config an eval array job will run with (the checkpoint's, plus the flags) is verified here."""
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    argv = ["submit", "eval", "--executor", "slurm", "--dry-run", "--checkpoints", str(tiny_checkpoint),
            "--metrics", "nfs,fid", "--", "--inception", str(missing)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert f"eval.inception_weights={missing}: missing" in captured.err and "#SBATCH" not in captured.out
    # NFS alone needs no Inception: that job passes the check, and the array is printed.
    assert main([*argv[:7], "--metrics", "nfs", *argv[9:]]) == 0
    assert "#SBATCH" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The critic loads OpenAI's original (TorchScript) CLIP format, the file whose sha256 is published
# --------------------------------------------------------------------------------------------------


def test_clip_loads_an_openai_style_torchscript_file(tmp_path):
    import torch

    from g3dr.losses.critics import TINY_CLIP_OVERRIDES, build_clip_model, is_torchscript_archive

    name = "ViT-B-16-quickgelu"
    source = build_clip_model(name, None, TINY_CLIP_OVERRIDES).eval()
    mask = source.attn_mask  # OpenAI's archives hold the causal mask as a constant, not a state-dict entry
    del source._buffers["attn_mask"]
    source.attn_mask = mask
    with warnings.catch_warnings():  # tracing's deprecation and tracer notes are not what this test checks
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(source, (torch.rand(1, 3, 32, 32), torch.zeros(1, 8, dtype=torch.long)),
                                 strict=False, check_trace=False)
        path = tmp_path / "ViT-B-16.pt"
        traced.save(str(path))
    assert is_torchscript_archive(path) and not is_torchscript_archive(REPO / "configs" / "tiny.yaml")
    loaded = build_clip_model(name, str(path), TINY_CLIP_OVERRIDES)
    state = loaded.state_dict()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert re.fullmatch(r"[0-9a-f]{64}", file_sha256(path))

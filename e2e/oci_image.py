"""Tiny OCI images for the real node, assembled by hand (no registry, no builder).

``busybox_archive(out)`` writes an OCI image-layout tarball holding two images
that share one layer, Debian's static busybox with its applet links:

    docker.io/clara-e2e/busybox:1   (CMD sh; what the node tests run)
    docker.io/clara-e2e/pause:1     (CMD sleep: the node's sandbox image)

``ctr -n k8s.io images import --local`` reads it; the names come from each
manifest's ``io.containerd.image.name`` annotation.  The tarball is
deterministic (mtime 0, sorted entries), so its digests are stable.

Standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = "/bin/busybox"
BUSYBOX_IMAGE = "docker.io/clara-e2e/busybox:1"
PAUSE_IMAGE = "docker.io/clara-e2e/pause:1"
# busybox sleep takes seconds as an int; 2^31-1 s is "forever" for a test cluster.
PAUSE_CMD = ["/bin/sleep", "2147483647"]


def is_static(path: str) -> bool:
    """An ELF executable without a program interpreter (so it runs in an empty image)."""
    try:
        head = Path(path).read_bytes()[:8192]
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"/ld-linux" not in head and b"ld-musl" not in head


def _tar_add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, mode: int = 0o755,
             kind: bytes = tarfile.DIRTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = mode
    info.type = kind
    info.linkname = link
    if data is not None:
        info.type = tarfile.REGTYPE
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def busybox_layer(busybox: str = BUSYBOX) -> bytes:
    """An uncompressed layer: /bin/busybox, a link per applet, and the usual empty dirs."""
    binary = Path(busybox).read_bytes()
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "work"):
            _tar_add(tar, d, mode=0o1777 if d == "tmp" else 0o755)
        _tar_add(tar, "bin/busybox", data=binary, mode=0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            _tar_add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _tar_add(tar, "etc/passwd", data=b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
                 mode=0o644)
        _tar_add(tar, "etc/group", data=b"root:x:0:\nnobody:x:65534:\n", mode=0o644)
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def write_layout_archive(out: Path, layer: bytes, images: dict[str, list[str]]) -> Path:
    """Write an OCI layout tarball: one image per name (image name -> CMD), all on ``layer``."""
    blobs: dict[str, bytes] = {}
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    manifests = []
    for name, cmd in images.items():
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        }, sort_keys=True).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(blobs, config)},
            "layers": [layer_desc],
        }, sort_keys=True).encode()
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(blobs, manifest),
                          "annotations": {"io.containerd.image.name": name,
                                          "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}})
    index = json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, "blobs")
        _tar_add(tar, "blobs/sha256")
        for digest in sorted(blobs):
            _tar_add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", data=blobs[digest], mode=0o644)
        _tar_add(tar, "oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}', mode=0o644)
        _tar_add(tar, "index.json", data=index, mode=0o644)
    tmp.replace(out)
    return out


def busybox_archive(out: Path, busybox: str = BUSYBOX) -> Path:
    """The test and sandbox images (see the module docstring) as one OCI archive at ``out``."""
    if not shutil.which(busybox) and not Path(busybox).is_file():
        raise FileNotFoundError(f"{busybox} not found (apt-get install busybox-static)")
    return write_layout_archive(out, busybox_layer(busybox), {BUSYBOX_IMAGE: ["/bin/sh"], PAUSE_IMAGE: PAUSE_CMD})


def derive_docker_archive(base: Path, out: Path, name: str, files: dict[str, tuple[bytes, int]],
                          workdir: str | None = None) -> Path:
    """A docker-archive at ``out``: the single image of the docker-archive ``base`` plus one layer
    holding ``files`` (absolute path -> (content, mode)), tagged ``name``.

    Like ``FROM base`` + ``COPY``, without a builder: the base's layers are copied as they are.
    """
    with tarfile.open(base) as src:
        (entry,) = json.loads(src.extractfile("manifest.json").read())
        config = json.loads(src.extractfile(entry["Config"]).read())
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as layer_tar:
            made: set[str] = set()
            for path in sorted(files):
                parts = path.strip("/").split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in made:
                        made.add(d)
                        _tar_add(layer_tar, d)
                data, mode = files[path]
                _tar_add(layer_tar, path.strip("/"), data=data, mode=mode)
        layer = buf.getvalue()
        layer_id = hashlib.sha256(layer).hexdigest()
        config["rootfs"]["diff_ids"].append(f"sha256:{layer_id}")
        config.setdefault("history", []).append({"created": "1970-01-01T00:00:00Z",
                                                 "created_by": f"e2e/oci_image.py: add {', '.join(sorted(files))}"})
        if workdir:
            config.setdefault("config", {})["WorkingDir"] = workdir
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": [name], "Layers": [*entry["Layers"], f"{layer_id}/layer.tar"]}]
        tmp = out.with_suffix(".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as dst:
            for member in src:
                if member.name in ("manifest.json", "repositories", entry["Config"]):
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            _tar_add(dst, layer_id)
            _tar_add(dst, f"{layer_id}/layer.tar", data=layer, mode=0o644)
            _tar_add(dst, config_name, data=config_bytes, mode=0o644)
            _tar_add(dst, "manifest.json", data=json.dumps(manifest).encode(), mode=0o644)
    tmp.replace(out)
    return out

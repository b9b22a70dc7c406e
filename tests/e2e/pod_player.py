"""Plays the containers of Kubernetes pods as local processes, or in podman.

kwok runs no containers, so the e2e harness does their part: for every pod
held by kwok (annotation ``e2e.clara-dicom.io/outcome=hold``) it reads the pod
spec the API server stored — init containers then containers, in order — and
runs each container's command on this machine, with

* its environment (``value`` and ``valueFrom.secretKeyRef``, read from the API),
* its volume mounts mapped to local folders: a hostPath volume is its path, a
  PVC is the folder given for its claim; ``subPath`` is appended,
* every container path in the command and environment rewritten to the local
  folder it is mounted from (longest mount first),
* the image's file system stood in for by a local folder (``images``: image
  name without tag -> folder; the command runs there, ``/app`` and the
  image's working directory map to it).

When the last container exits the pod's outcome annotation is set to
``succeed`` (or ``fail`` with the exit code), and kwok completes the pod.

``PodmanPodPlayer`` runs each container instead in podman, from the same pod spec:
its image, command and args, environment, volume mounts (``subPath``,
``readOnly``), working directory and securityContext, in the same order. Host
networking: the containers of a pod share one network namespace, and the servers
they call (Results Service, API server) listen on this machine's loopback only.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTCOME = "e2e.clara-dicom.io/outcome"
EXIT_CODE = "e2e.clara-dicom.io/exit-code"


@dataclass
class Played:
    pod: str
    containers: list[str]
    exit_code: int
    started: float
    finished: float
    logs: dict[str, str] = field(default_factory=dict)


class PodPlayer:
    def __init__(self, cluster: Any, namespace: str, images: dict[str, Path], claims: dict[str, Path] | None = None,
                 extra_env: dict[str, str] | None = None):
        self.cluster = cluster
        self.namespace = namespace
        self.images = images
        self.claims = claims or {}
        self.extra_env = extra_env or {}
        self.played: dict[str, Played] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-player", daemon=True)

    def start(self) -> "PodPlayer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # -- the loop -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.cluster.kubectl_json("get", "pods", "-n", self.namespace, "-o", "json")["items"]
            except Exception as exc:  # the API may be briefly unavailable
                self.errors.append(f"list pods: {exc}")
                time.sleep(0.5)
                continue
            for pod in pods:
                name = pod["metadata"]["name"]
                annotations = pod["metadata"].get("annotations") or {}
                if name in self.played or annotations.get(OUTCOME) != "hold":
                    continue
                if (pod.get("status") or {}).get("phase") != "Running":
                    continue
                try:
                    self.played[name] = self.play(pod)
                except Exception as exc:
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    self.played[name] = Played(name, [], 99, time.time(), time.time())
                    self._finish(name, 99)
            time.sleep(0.2)

    def play(self, pod: dict[str, Any]) -> Played:
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        started = time.time()
        names, logs, code = [], {}, 0
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            names.append(container["name"])
            code, output = self._run(container, volumes)
            logs[container["name"]] = output
            if code != 0:
                break
        self._finish(pod["metadata"]["name"], code)
        return Played(pod["metadata"]["name"], names, code, started, time.time(), logs)

    def _finish(self, pod: str, code: int) -> None:
        outcome = ["--overwrite", f"{OUTCOME}=succeed"] if code == 0 else \
            ["--overwrite", f"{OUTCOME}=fail", f"{EXIT_CODE}={code}"]
        self.cluster.kubectl("annotate", "pod", pod, "-n", self.namespace, *outcome)

    # -- one container ----------------------------------------------------------
    def _mounts(self, container: dict[str, Any], volumes: dict[str, Any], image_dir: Path) -> list[tuple[str, str]]:
        pairs = [("/app", str(image_dir))]
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "hostPath" in volume:
                base = Path(volume["hostPath"]["path"])
            elif "persistentVolumeClaim" in volume:
                base = self.claims[volume["persistentVolumeClaim"]["claimName"]]
            else:
                raise ValueError(f"volume {mount['name']}: only hostPath and PVC volumes can be played")
            local = base / mount["subPath"] if mount.get("subPath") else base
            pairs.append((mount["mountPath"].rstrip("/"), str(local)))
        return sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    @staticmethod
    def _rewrite(text: str, mounts: list[tuple[str, str]]) -> str:
        """Container paths -> local paths, in paths separated by ':' or ';' or spaces."""
        out = []
        for token in _split_keep(text):
            for container_path, local in mounts:
                if token == container_path or token.startswith(container_path + "/"):
                    token = local + token[len(container_path):]
                    break
            out.append(token)
        return "".join(out)

    def _secret(self, name: str, key: str) -> str:
        secret = self.cluster.kubectl_json("get", "secret", name, "-n", self.namespace, "-o", "json")
        return base64.b64decode(secret["data"][key]).decode()

    def _run(self, container: dict[str, Any], volumes: dict[str, Any]) -> tuple[int, str]:
        image = container["image"].rsplit(":", 1)[0] if ":" in container["image"].split("/")[-1] else container["image"]
        image_dir = self.images.get(image)
        if image_dir is None:
            raise ValueError(f"no local stand-in for image {image}")
        mounts = self._mounts(container, volumes, image_dir)
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
               **self.extra_env}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = self._rewrite(var["value"], mounts)
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self._secret(ref["name"], ref["key"])
        command = [self._rewrite(arg, mounts) for arg in [*container.get("command", []), *container.get("args", [])]]
        if not command:
            raise ValueError(f"container {container['name']} has no command to play")
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        proc = subprocess.run(command, cwd=image_dir, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


class PodmanPodPlayer(PodPlayer):
    """Plays each container of a held pod in podman (see the module's docstring)."""

    def __init__(self, cluster: Any, namespace: str, podman: list[str], run_flags: list[str],
                 claims: dict[str, Path] | None = None):
        super().__init__(cluster, namespace, images={}, claims=claims)
        self.podman = podman
        self.run_flags = run_flags
        self._pod: dict[str, Any] = {}

    def play(self, pod: dict[str, Any]) -> Played:
        self._pod = pod
        return super().play(pod)

    def _volume_flags(self, container: dict[str, Any], volumes: dict[str, Any]) -> list[str]:
        flags = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "hostPath" in volume:
                base = Path(volume["hostPath"]["path"])
            elif "persistentVolumeClaim" in volume:
                base = self.claims[volume["persistentVolumeClaim"]["claimName"]]
            else:
                raise ValueError(f"volume {mount['name']}: only hostPath and PVC volumes can be played")
            local = base / mount["subPath"] if mount.get("subPath") else base
            local.mkdir(parents=True, exist_ok=True)  # as the kubelet does for a missing subPath
            flags += ["-v", f"{local}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else "")]
        return flags

    def _security_flags(self, container: dict[str, Any]) -> list[str]:
        pod_sc = self._pod["spec"].get("securityContext") or {}
        sc = {**pod_sc, **(container.get("securityContext") or {})}
        flags = []
        if "runAsUser" in sc:
            flags += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        elif "runAsGroup" in sc:
            raise ValueError("runAsGroup without runAsUser cannot be played")
        if sc.get("runAsNonRoot"):
            user = str(sc.get("runAsUser", "")) or self._image_user(container["image"])
            if user.split(":")[0] in ("", "0", "root"):
                raise ValueError(f"runAsNonRoot, but {container['image']} would run as root ({user or 'no USER'})")
        if "fsGroup" in pod_sc:
            flags += ["--group-add", str(pod_sc["fsGroup"])]
        for group in pod_sc.get("supplementalGroups", []):
            flags += ["--group-add", str(group)]
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        for cap in (sc.get("capabilities") or {}).get("drop", []):
            flags += ["--cap-drop", cap]
        for cap in (sc.get("capabilities") or {}).get("add", []):
            flags += ["--cap-add", cap]
        if sc.get("readOnlyRootFilesystem"):
            flags += ["--read-only", "--read-only-tmpfs=false"]
        return flags

    def _image_user(self, image: str) -> str:
        res = subprocess.run([*self.podman, "image", "inspect", "--format", "{{.Config.User}}", image],
                             capture_output=True, text=True, timeout=60)
        return res.stdout.strip()

    def _run(self, container: dict[str, Any], volumes: dict[str, Any]) -> tuple[int, str]:
        name = f"{self._pod['metadata']['name']}-{container['name']}"[:200]
        flags = ["run", "--rm", "--name", name, "--network", "host", *self.run_flags,
                 *self._security_flags(container), *self._volume_flags(container, volumes)]
        for var in container.get("env", []):
            if "value" in var:
                flags += ["-e", f"{var['name']}={var['value']}"]
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                ref = var["valueFrom"]["secretKeyRef"]
                flags += ["-e", f"{var['name']}={self._secret(ref['name'], ref['key'])}"]
        if container.get("workingDir"):
            flags += ["-w", container["workingDir"]]
        if container.get("command"):
            flags += ["--entrypoint", json.dumps(container["command"])]
        cmd = [*self.podman, *flags, container["image"], *container.get("args", [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            subprocess.run([*self.podman, "rm", "-f", name], capture_output=True, timeout=120)
            return 124, f"podman run {name}: timed out"
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def _split_keep(text: str) -> list[str]:
    """Split on separators but keep them, so the text can be put back together."""
    parts, current = [], ""
    for ch in text:
        if ch in ":; ,=\"'[]":
            if current:
                parts.append(current)
            parts.append(ch)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


def dump(played: dict[str, Played]) -> str:
    return json.dumps({k: {"containers": v.containers, "exit": v.exit_code,
                           "seconds": round(v.finished - v.started, 2),
                           "logs": {c: log[-600:] for c, log in v.logs.items()}} for k, v in played.items()},
                      indent=1)

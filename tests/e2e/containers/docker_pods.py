"""Runs rendered Kubernetes pods as Docker containers, the way a kubelet would start them on one node.

Each container of a Deployment's or Job's pod template becomes one `docker run` whose flags come from the
rendered object alone: command and args, env (values and Secret keys), volume mounts, the security context
(`--user`, `--group-add` for fsGroup, `--read-only`, `--cap-drop`, no-new-privileges), memory and CPU limits,
and the termination-message file. Volumes map as a kubelet maps them:

- emptyDir: a tmpfs-backed Docker volume per pod, shared by the pod's containers;
- configMap / secret: files written from the applied object (items, defaultMode, group fsGroup), read-only;
- persistentVolumeClaim: a host directory per claim (subPath honoured), writable by fsGroup;
- hostPath: a host directory standing in for the node's, prepared as docs/install.md asks.

Services become network aliases (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) of the pods they
select on one Docker network; Job pods get no network at all. Init containers run to completion first.
Every Docker object carries the label `stratus-e2e=<run id>`, and `teardown()` removes them all.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plan_adapter import Manifest, parse_quantity

LABEL = "stratus-e2e"
# Kubernetes keeps the last 80 lines (at most 2048 bytes) of the log as a FallbackToLogsOnError message.
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
SPEC_HASH = "stratus.dev/spec-hash"


class PodError(AssertionError):
    """A pod could not be started or did not become ready; the message carries its logs."""


def docker(*args: str, check: bool = True, timeout: float = 300, input_text: str | None = None) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          input=input_text)
    if check and proc.returncode != 0:
        raise PodError(f"docker {shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def engine_missing() -> str | None:
    """Why no Docker engine can be used here, in one line, or None when one answers."""
    try:
        proc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=20, check=False)
    except FileNotFoundError:
        return "container suite skipped: docker is not installed"
    except subprocess.TimeoutExpired:
        return "container suite skipped: the Docker engine did not answer within 20 s"
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["docker version failed"])[-1]
        return f"container suite skipped: no Docker engine reachable ({reason})"
    return None


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass
class Pod:
    """One started pod: its Docker container (one main container per pod here) and owner."""

    name: str
    owner: str
    spec_hash: str
    template: Manifest
    container: str
    ip: str = ""


@dataclass
class JobRun:
    """A Job's one pod, started detached; `wait()` gives its exit code and termination message."""

    cluster: DockerCluster
    pod: Pod
    message_file: Path | None
    fallback_to_logs: bool

    def wait(self, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", self.pod.container)
            status, code = state.split()
            if status in ("exited", "dead"):
                return int(code), self.message(int(code))
            time.sleep(2)
        raise PodError(f"Job {self.pod.owner} still running after {timeout:.0f} s\n"
                       f"{self.cluster.logs(self.pod.container, 40)}")

    def message(self, exit_code: int) -> str:
        text = self.message_file.read_text() if self.message_file is not None else ""
        if not text.strip() and exit_code != 0 and self.fallback_to_logs:
            tail = "\n".join(self.cluster.logs(self.pod.container, FALLBACK_LINES).splitlines()[-FALLBACK_LINES:])
            text = tail[-FALLBACK_BYTES:]
        return text


@dataclass
class DockerCluster:
    """The applied objects of one run and the containers started for them."""

    run_id: str
    workdir: Path
    namespace: str
    # component label -> image to run instead of the rendered one (e.g. the cloud flavour), when given.
    image_for: Callable[[Mapping[str, str], str], str] = lambda labels, image: image
    gpus: bool = False
    objects: dict[tuple[str, str], Manifest] = field(default_factory=dict)
    pods: dict[str, list[Pod]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # owner name -> Deployment or Job
    notes: list[str] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{LABEL}-{self.run_id}"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def label(self) -> str:
        return f"{LABEL}={self.run_id}"

    def create_network(self) -> None:
        # Internal: no route out of it, so a server that tried to fetch anything at run time would fail.
        docker("network", "create", "--internal", "--label", self.label, self.network)

    # -- apply ------------------------------------------------------------------------------------------

    def apply(self, objects: Iterable[Manifest]) -> list[JobRun]:
        """Apply objects as an API server plus controllers would: pods for new or changed Deployments,
        one pod for each new Job; Deployments no longer listed are deleted. Returns the Jobs started."""
        objects = list(objects)
        for obj in objects:
            if obj["kind"] in ("ConfigMap", "Secret", "Service", "PersistentVolumeClaim"):
                self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        jobs: list[JobRun] = []
        wanted = set()
        for obj in objects:
            name = obj["metadata"]["name"]
            spec_hash = obj["metadata"].get("annotations", {}).get(SPEC_HASH, "")
            if obj["kind"] in ("Deployment", "Job"):
                self.kinds[name] = obj["kind"]
            if obj["kind"] == "Deployment":
                wanted.add(name)
                current = self.pods.get(name, [])
                if current and all(p.spec_hash == spec_hash for p in current):
                    continue
                self.delete(name)
                replicas = obj["spec"].get("replicas", 1)
                self.pods[name] = [self._start(name, spec_hash, obj["spec"]["template"], f"{name}-{i}", job=False)
                                   for i in range(replicas)]
            elif obj["kind"] == "Job" and name not in self.pods:
                template = obj["spec"]["template"]
                pod = self._start(name, spec_hash, template, name, job=True)
                self.pods[name] = [pod]
                main = template["spec"]["containers"][0]
                path = main.get("terminationMessagePath")
                log_file = self._workdir(pod.name) / f"{main['name']}.termination-log" if path else None
                fallback = main.get("terminationMessagePolicy") == "FallbackToLogsOnError"
                jobs.append(JobRun(self, pod, log_file, fallback))
        for name in [n for n in self.pods if self.kinds.get(n) == "Deployment" and n not in wanted]:
            self.delete(name)
        return jobs

    def delete(self, owner: str) -> None:
        for pod in self.pods.pop(owner, []):
            docker("rm", "-f", pod.container, check=False)

    # -- pods -------------------------------------------------------------------------------------------

    def _workdir(self, pod: str) -> Path:
        path = self.workdir / "pods" / pod
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _aliases(self, labels: Mapping[str, str]) -> list[str]:
        aliases: list[str] = []
        for (kind, name), svc in self.objects.items():
            if kind != "Service" or not _matches(svc["spec"]["selector"], labels):
                continue
            ns = svc["metadata"].get("namespace") or self.namespace
            aliases += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        return aliases

    def _check_service_ports(self, labels: Mapping[str, str], containers: list[Manifest]) -> None:
        # Docker aliases cannot remap ports: a Service's port must be the container port it targets.
        ports = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}
        for (kind, name), svc in self.objects.items():
            if kind == "Service" and _matches(svc["spec"]["selector"], labels):
                for port in svc["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    target = ports.get(target, target) if isinstance(target, str) else target
                    if target != port["port"]:
                        raise PodError(f"Service {name} maps port {port['port']} to {target}; "
                                       "this harness needs them equal")

    def _start(self, owner: str, spec_hash: str, template: Manifest, pod_name: str, *, job: bool) -> Pod:
        spec = template["spec"]
        labels = template["metadata"].get("labels", {})
        pod = f"{self.prefix}-{pod_name}"
        volumes = self._volumes(pod, spec)
        network = ["--network", "none"]
        if not job:
            self._check_service_ports(labels, spec["containers"])
            network = ["--network", self.network]
            for alias in self._aliases(labels):
                network += ["--network-alias", alias]
        for init in spec.get("initContainers", []):
            argv = self._run_argv(f"{pod}-init-{init['name']}", pod, spec, init, labels, volumes, network)
            self.commands[f"{pod_name}/{init['name']}"] = argv
            proc = subprocess.run(["docker", "run", *argv], capture_output=True, text=True, timeout=600,
                                  check=False)
            if proc.returncode != 0:
                raise PodError(f"init container {init['name']} of {pod_name} exited {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if len(spec["containers"]) != 1:
            raise PodError(f"{pod_name}: this harness runs pods of one container (got {len(spec['containers'])})")
        main = spec["containers"][0]
        argv = self._run_argv(pod, pod, spec, main, labels, volumes, network)
        self.commands[pod_name] = argv
        docker("run", "--detach", *argv)
        ip = "" if job else docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", pod)
        return Pod(pod, owner, spec_hash, template, pod, ip)

    def _volumes(self, pod: str, spec: Manifest) -> dict[str, tuple[str, str, bool]]:
        """volume name -> (mount type, source, read-only) for `--mount`."""
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        out: dict[str, tuple[str, str, bool]] = {}
        for volume in spec.get("volumes", []):
            name = volume["name"]
            if "emptyDir" in volume:
                source = f"{pod}-{name}"
                docker("volume", "rm", "-f", source, check=False)
                # tmpfs whatever the medium (a pod's scratch space); 0777 as the kubelet makes an emptyDir.
                docker("volume", "create", "--label", self.label, "--driver", "local", "--opt", "type=tmpfs",
                       "--opt", "device=tmpfs", "--opt", "o=mode=0777", source)
                out[name] = ("volume", source, False)
            elif "configMap" in volume:
                obj = self.objects[("ConfigMap", volume["configMap"]["name"])]
                data = {k: v.encode() for k, v in obj.get("data", {}).items()}
                out[name] = ("bind", str(self._files(pod, name, data, volume["configMap"], fs_group, 0o644)), True)
            elif "secret" in volume:
                obj = self.objects[("Secret", volume["secret"]["secretName"])]
                data = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
                out[name] = ("bind", str(self._files(pod, name, data, volume["secret"], fs_group, 0o644)), True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                path = self._owned_dir(self.workdir / "claims" / claim, fs_group)
                out[name] = ("bind", str(path), bool(volume["persistentVolumeClaim"].get("readOnly")))
            elif "hostPath" in volume:
                # The node's prepared directory (docs/install.md: exists, writable by uid 65532).
                path = self._owned_dir(self.workdir / "node" / volume["hostPath"]["path"].lstrip("/"), fs_group)
                out[name] = ("bind", str(path), False)
            else:
                raise PodError(f"{pod}: volume {name} has a source this harness does not map: {sorted(volume)}")
        return out

    @staticmethod
    def _owned_dir(path: Path, fs_group: int | None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if fs_group is not None and os.geteuid() == 0:
            os.chown(path, fs_group, fs_group)
            path.chmod(0o2775)
        else:
            path.chmod(0o777)
        return path

    def _files(self, pod: str, name: str, data: Mapping[str, bytes], source: Manifest, fs_group: int | None,
               default: int) -> Path:
        directory = self._workdir(pod) / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        mode = source.get("defaultMode", default)
        for item in items:
            path = directory / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            if fs_group is not None and os.geteuid() == 0:
                os.chown(path, 0, fs_group)  # the kubelet's ownership: root, group fsGroup
                path.chmod(item.get("mode", mode))
            else:
                path.chmod(0o444)
        return directory

    def _env(self, container: Manifest) -> list[str]:
        flags: list[str] = []
        for env in container.get("env", []):
            if "value" in env:
                value = str(env["value"])
            elif "secretKeyRef" in env.get("valueFrom", {}):
                ref = env["valueFrom"]["secretKeyRef"]
                value = base64.b64decode(self.objects[("Secret", ref["name"])]["data"][ref["key"]]).decode()
            else:
                raise PodError(f"env {env['name']}: a source this harness does not map: {env.get('valueFrom')}")
            flags += ["--env", f"{env['name']}={value}"]
        return flags

    def _run_argv(self, name: str, pod: str, spec: Manifest, container: Manifest, labels: Mapping[str, str],
                  volumes: Mapping[str, tuple[str, str, bool]], network: list[str]) -> list[str]:
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        argv = ["--name", name, "--label", self.label, "--label", f"{LABEL}-pod={pod}", "--pull", "never", *network]
        user = security.get("runAsUser")
        if user is not None:
            argv += ["--user", f"{user}:{security.get('runAsGroup', user)}"]
        elif security.get("runAsNonRoot"):
            raise PodError(f"{name}: runAsNonRoot without runAsUser; the kubelet would check the image's user")
        if spec.get("securityContext", {}).get("fsGroup") is not None:
            argv += ["--group-add", str(spec["securityContext"]["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        for cap in security.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", cap]
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            argv += ["--memory", str(int(parse_quantity(limits["memory"])))]
        if "cpu" in limits:
            argv += ["--cpus", str(float(parse_quantity(limits["cpu"])))]
        gpus = [v for k, v in limits.items() if k.endswith("/gpu")]
        if gpus and self.gpus:
            argv += ["--gpus", str(gpus[0])]
        elif gpus:
            self.notes.append(f"{name}: asks for {gpus[0]} GPU; none here, it runs on the CPU")
        argv += self._env(container)
        for mount in container.get("volumeMounts", []):
            kind, source, read_only = volumes[mount["name"]]
            if mount.get("subPath"):
                if kind != "bind":
                    raise PodError(f"{name}: subPath on a {kind} volume is not mapped by this harness")
                sub = self._owned_dir(Path(source) / mount["subPath"], spec.get("securityContext", {}).get("fsGroup"))
                source = str(sub)
            spec_text = f"type={kind},source={source},destination={mount['mountPath']}"
            if read_only or mount.get("readOnly"):
                spec_text += ",readonly"
            argv += ["--mount", spec_text]
        if container.get("terminationMessagePath"):
            log_file = self._workdir(pod) / f"{container['name']}.termination-log"
            log_file.write_text("")
            log_file.chmod(0o666)
            argv += ["--mount", f"type=bind,source={log_file},destination={container['terminationMessagePath']}"]
        command = [*container.get("command", []), *container.get("args", [])]
        image = self.image_for(labels, container["image"])
        if command:
            argv += ["--entrypoint", command[0], image, *command[1:]]
        else:
            argv.append(image)
        return argv

    # -- observe ----------------------------------------------------------------------------------------

    def logs(self, container: str, lines: int = 60) -> str:
        proc = subprocess.run(["docker", "logs", "--tail", str(lines), container], capture_output=True, text=True,
                              timeout=60, check=False)
        return proc.stdout + proc.stderr

    def running(self, container: str) -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", container, check=False) == "true"

    def wait_ready(self, owner: str, timeout: float) -> list[Pod]:
        """Poll each pod's readinessProbe (httpGet) from the host until it answers 200."""
        deadline = time.monotonic() + timeout
        pods = self.pods[owner]
        for pod in pods:
            main = pod.template["spec"]["containers"][0]
            probe = main["readinessProbe"]["httpGet"]
            ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
            port = ports.get(probe["port"], probe["port"])
            url = f"http://{pod.ip}:{port}{probe['path']}"
            while True:
                if not self.running(pod.container):
                    raise PodError(f"{pod.name} exited before it was ready:\n{self.logs(pod.container)}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise PodError(f"{pod.name} not ready at {url} after {timeout:.0f} s:\n{self.logs(pod.container)}")
                time.sleep(2)
        return pods

    def kill(self, owner: str) -> None:
        """SIGKILL every container of a Deployment, as a node or process dying would (nothing restarts it)."""
        for pod in self.pods.get(owner, []):
            docker("kill", pod.container)

    def state(self) -> str:
        return docker("ps", "-a", "--filter", f"label={self.label}", "--format",
                      "{{.Names}}\t{{.Status}}\t{{.Image}}", check=False)

    def teardown(self) -> list[str]:
        """Remove every container, volume and the network of this run; returns what failed to go."""
        problems = []
        ids = docker("ps", "-aq", "--filter", f"label={self.label}", check=False).split()
        if ids:
            out = subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                problems.append(out.stderr.strip())
        volumes = docker("volume", "ls", "-q", "--filter", f"label={self.label}", check=False).split()
        if volumes:
            out = subprocess.run(["docker", "volume", "rm", "-f", *volumes], capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                problems.append(out.stderr.strip())
        if docker("network", "ls", "-q", "--filter", f"name={self.network}", check=False):
            out = subprocess.run(["docker", "network", "rm", self.network], capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                problems.append(out.stderr.strip())
        self.pods.clear()
        return problems

    def leftovers(self) -> dict[str, list[str]]:
        """Docker objects of this run still present (empty after a clean teardown)."""
        return {
            "containers": docker("ps", "-aq", "--filter", f"label={self.label}", check=False).split(),
            "volumes": docker("volume", "ls", "-q", "--filter", f"label={self.label}", check=False).split(),
            "networks": docker("network", "ls", "-q", "--filter", f"label={self.label}", check=False).split(),
        }

    def describe(self) -> str:
        """Every `docker run` this run issued, by pod and container (for a failure's report)."""
        return "\n".join(f"{pod}: docker run {shlex.join(argv)}" for pod, argv in self.commands.items())


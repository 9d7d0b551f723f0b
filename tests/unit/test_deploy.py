"""The deploy files are valid for the tools that read them, and work as written.

Ray's cluster launcher config is checked against Ray's own schema, the KubeRay manifests
against KubeRay's v1 CRD schemas (vendored in deploy/kuberay/schemas/), the example
settings with ``MessagingSettings.from_toml``, and the shell commands the files run are
executed by bash with ``ray``, ``athomic``, ``python`` and ``python3`` replaced by
recorders.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

import athomic
from athomic import MessagingSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
SCHEMAS = KUBERAY / "schemas"
SHARED_SCHEMAS = ROOT.parent / "shared" / "kuberay"  # where the vendored copies came from
SCHEMA_FILES = ("RayCluster.v1.schema.json", "RayJob.v1.schema.json",
                "RayService.v1.schema.json")


# --- helpers ------------------------------------------------------------------------------
def launcher_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def kuberay_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/kuberay/*.yaml by (kind, metadata.name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def schema(kind: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())


def unknown_fields(value: Any, sch: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not know. CRD schemas leave additionalProperties unset (the API
    server prunes unknown fields silently), so jsonschema alone misses a misspelt field."""
    if sch.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = sch.get("properties")
        extra = sch.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(sch.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, sch["items"], f"{path}[{i}]")
    return found


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def pod_specs(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod specs of a RayCluster or RayJob: head, each worker group, the submitter."""
    spec = cluster_spec(obj)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec.get("workerGroupSpecs", []):
        pods[f"worker:{group['groupName']}"] = group["template"]["spec"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        pods["submitter"] = obj["spec"]["submitterPodTemplate"]["spec"]
    return pods


def head_container(obj: dict[str, Any]) -> dict[str, Any]:
    return cluster_spec(obj)["headGroupSpec"]["template"]["spec"]["containers"][0]


def mounted_files(obj: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]]
                  ) -> dict[str, tuple[str, str, str]]:
    """Path in the head container -> (kind, name, key) of the ConfigMap/Secret entry there."""
    pod = cluster_spec(obj)["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, tuple[str, str, str]] = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            kind, name, ref = "ConfigMap", volume["configMap"]["name"], volume["configMap"]
        elif "secret" in volume:
            kind, name, ref = "Secret", volume["secret"]["secretName"], volume["secret"]
        else:
            continue
        assert "subPath" not in mount, "whole-directory mounts follow updates; subPath does not"
        source = objects[(kind, name)]
        keys = {**source.get("data", {}), **source.get("stringData", {})}
        paths = ({i["key"]: i["path"] for i in ref["items"]} if "items" in ref
                 else {k: k for k in keys})
        for key, rel in paths.items():
            files[f"{mount['mountPath'].rstrip('/')}/{rel}"] = (kind, name, key)
    return files


def object_data(obj: dict[str, Any], key: str) -> str:
    """An entry of a ConfigMap (``data`` is text) or Secret (``data`` is base64)."""
    if key in obj.get("stringData", {}):
        return str(obj["stringData"][key])
    if obj["kind"] == "Secret":
        return base64.b64decode(obj["data"][key]).decode()
    return str(obj["data"][key])


RECORDERS = r"""
record() { local IFS=$'\x1f'; printf '%s\n' "$*" >> "$CALLS"; }
ray() { record ray "$@"; }
athomic() { record athomic "$@"; }
python() { record python "$@"; }
python3() { record python3 "$@"; }
ulimit() { :; }
sleep() { :; }
"""


def run_recorded(script: str, tmp_path: Path, **env: str) -> list[list[str]]:
    """Run ``script`` in bash with the commands above recorded instead of run; returns each
    recorded call as its argv."""
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                "CALLS": str(calls), **env}
    subprocess.run(["bash", "-c", RECORDERS + script + "\nwait"], env=full_env, check=True,
                   timeout=60, capture_output=True)
    if not calls.exists():
        return []
    return [line.split("\x1f") for line in calls.read_text().splitlines()]


def config_path_of_up(call: list[str]) -> str:
    assert call[:2] == ["athomic", "up"], call
    return call[call.index("--config") + 1]


def ray_version_pins() -> dict[str, str]:
    """Every place that names the Ray version of the deployment."""
    pins: dict[str, str] = {}
    setup = " ".join(launcher_config()["setup_commands"])
    match = re.search(r"ray\[[a-z,]+\]==([0-9.]+)", setup)
    assert match, "the launcher pins Ray, so late workers match the head"
    pins["deploy/ray-cluster.yaml"] = match.group(1)
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    pins["Dockerfile"] = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    for (kind, name), obj in kuberay_objects().items():
        if kind in ("RayCluster", "RayJob"):
            pins[f"{kind} {name}"] = cluster_spec(obj)["rayVersion"]
    return pins


# --- Ray cluster launcher -----------------------------------------------------------------
def test_ray_cluster_yaml_matches_rays_schema() -> None:
    config = launcher_config()
    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t != config["head_node_type"] and types[t].get("min_workers", 0) >= 1
               for t in types), "a worker node type with workers"
    assert any("pip install" in c and "athomic" in c for c in config["setup_commands"])


def test_ray_cluster_commands_are_valid_bash() -> None:
    config = launcher_config()
    for field in ("initialization_commands", "setup_commands", "head_setup_commands",
                  "worker_setup_commands", "head_start_ray_commands",
                  "worker_start_ray_commands"):
        for command in config.get(field) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True,
                                    text=True, check=False)
            assert result.returncode == 0, f"{field}: {command!r}: {result.stderr}"
            # A quoted ~ is not expanded by bash: the path would be literally "~/...".
            assert not re.search(r"[\"']~", command), f"{field}: quoted ~ in {command!r}"


def test_ray_cluster_setup_installs_the_mounted_checkout_with_data_extra(
        tmp_path: Path) -> None:
    config = launcher_config()
    assert config["file_mounts"]["~/athomic"] == "."
    calls: list[list[str]] = []
    for command in config["setup_commands"]:
        calls += run_recorded(command, tmp_path)
    home = tmp_path / "home"
    installs = [c for c in calls if c[:4] == ["python3", "-m", "pip", "install"]
                and any("athomic" in a for a in c)]
    assert installs, calls
    args = installs[0][4:]
    # Installed (editable) from the synced checkout, with the [data] extra, ~ expanded.
    assert "-e" in args
    assert args[args.index("-e") + 1] == f"{home}/athomic[data]"


def test_ray_cluster_head_runs_athomic_up_after_ray_start(tmp_path: Path) -> None:
    config = launcher_config()
    calls: list[list[str]] = []
    for command in config["head_start_ray_commands"]:
        calls += run_recorded(command, tmp_path)
    starts = [i for i, c in enumerate(calls) if c[:3] == ["ray", "start", "--head"]]
    ups = [i for i, c in enumerate(calls) if c[:2] == ["athomic", "up"]]
    assert starts and ups, calls
    assert ups[0] > starts[0], "athomic up runs once Ray runs"
    up = calls[ups[0]]
    home = tmp_path / "home"
    # The config it reads is the one file_mounts puts on the head.
    remote = {str(Path(k.replace("~", str(home), 1))): v
              for k, v in config["file_mounts"].items()}
    assert config_path_of_up(up) in remote, (up, remote)
    assert remote[config_path_of_up(up)].endswith("athomic.toml")
    assert up[up.index("--address") + 1] == "auto"


def test_ray_cluster_head_reports_a_failing_athomic_up(tmp_path: Path) -> None:
    """The retry loop ends, with a failure `ray up` shows, when athomic up keeps failing."""
    command = launcher_config()["head_start_ray_commands"][-1]
    assert "athomic up" in command
    failing = RECORDERS + "athomic() { record athomic \"$@\"; return 1; }\n" + command
    result = subprocess.run(["bash", "-c", failing], capture_output=True, timeout=60,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                 "HOME": str(tmp_path), "CALLS": str(tmp_path / "calls")},
                            check=False)
    assert result.returncode != 0
    attempts = (tmp_path / "calls").read_text().count("athomic\x1fup")
    assert 10 <= attempts <= 100


def test_ray_versions_agree() -> None:
    pins = ray_version_pins()
    assert len(set(pins.values())) == 1, pins


# --- KubeRay ------------------------------------------------------------------------------
def test_kuberay_schemas_are_vendored() -> None:
    for name in SCHEMA_FILES:
        vendored = SCHEMAS / name
        assert vendored.is_file(), f"{vendored} missing"
        data = json.loads(vendored.read_text())
        assert "spec" in data["properties"]
        shared = SHARED_SCHEMAS / name
        if shared.is_file():  # the source is present on the development machine only
            assert json.loads(shared.read_text()) == data, f"{name} differs from {shared}"


def test_kuberay_manifests_match_kuberay_schemas() -> None:
    objects = kuberay_objects()
    crs = {k: o for k, o in objects.items() if o["apiVersion"] == "ray.io/v1"}
    kinds = {kind for kind, _ in crs}
    assert {"RayCluster", "RayJob"} <= kinds, kinds
    for (kind, name), obj in crs.items():
        assert kind in ("RayCluster", "RayJob", "RayService"), kind
        sch = schema(kind)
        jsonschema.validate(obj, sch)
        assert unknown_fields(obj, sch) == [], f"{kind} {name}: fields KubeRay does not know"


def test_unknown_fields_catches_a_misspelt_field() -> None:
    obj = kuberay_objects()[("RayCluster", "athomic")]
    spec = dict(obj["spec"])
    spec["headGroupSpec"] = {**spec["headGroupSpec"], "rayStartParam": {}}
    assert unknown_fields({**obj, "spec": spec}, schema("RayCluster")) == [
        ".spec.headGroupSpec.rayStartParam"]


def test_configmaps_and_secret_are_kubernetes_objects() -> None:
    objects = kuberay_objects()
    allowed = {"ConfigMap": {"apiVersion", "kind", "metadata", "data", "binaryData",
                             "immutable"},
               "Secret": {"apiVersion", "kind", "metadata", "data", "stringData", "type",
                          "immutable"}}
    found = {kind for kind, _ in objects}
    assert {"ConfigMap", "Secret"} <= found
    for (kind, name), obj in objects.items():
        assert obj["apiVersion"], (kind, name)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if kind not in allowed:
            continue
        assert obj["apiVersion"] == "v1", (kind, name)
        assert set(obj) <= allowed[kind], (kind, name, set(obj) - allowed[kind])
        entries = {**obj.get("data", {}), **obj.get("stringData", {})}
        assert entries, f"{kind} {name} has no data"
        for key, value in entries.items():
            assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), key
            assert isinstance(value, str), (kind, name, key)
        if kind == "Secret":
            assert obj.get("type", "Opaque") == "Opaque"
            for key in obj.get("data", {}):
                base64.b64decode(obj["data"][key], validate=True)


def test_manifests_reference_configmaps_and_secrets_that_exist() -> None:
    objects = kuberay_objects()
    defined = {(kind, name) for kind, name in objects}
    for (kind, name), obj in objects.items():
        if kind not in ("RayCluster", "RayJob"):
            continue
        for pod_name, pod in pod_specs(obj).items():
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    ref = ("ConfigMap", volume["configMap"]["name"])
                elif "secret" in volume:
                    ref = ("Secret", volume["secret"]["secretName"])
                else:
                    continue
                assert ref in defined, f"{kind} {name} {pod_name}: {ref} is not defined"
            for container in pod["containers"]:
                for var in container.get("env", []):
                    source = var.get("valueFrom", {})
                    if "secretKeyRef" in source:
                        ref = ("Secret", source["secretKeyRef"]["name"])
                        assert ref in defined, ref
                    if "configMapKeyRef" in source:
                        ref = ("ConfigMap", source["configMapKeyRef"]["name"])
                        assert ref in defined, ref
        # The head mounts the settings and the keys.
        mounted = {(k, n) for k, n, _ in mounted_files(obj, objects).values()}
        assert {("ConfigMap", "athomic-config"), ("Secret", "athomic-keys")} <= mounted


def test_example_settings_parse_as_each_head_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = kuberay_objects()
    config_map = objects[("ConfigMap", "athomic-config")]
    secret = objects[("Secret", "athomic-keys")]
    text = object_data(config_map, "athomic.toml")
    parsed = tomllib.loads(text)
    encrypt = next(s for s in parsed["pipeline"] if s["stage"] == "encrypt")
    # The example ring has the key ids the settings use, with a placeholder value.
    ring = json.loads(object_data(secret, "keys.json"))
    assert encrypt["primary"] in ring
    for (kind, name), obj in objects.items():
        if kind not in ("RayCluster", "RayJob"):
            continue
        files = mounted_files(obj, objects)
        env = {v["name"]: v["value"] for v in head_container(obj).get("env", [])
               if "value" in v}
        # ATHOMIC_CONFIG and the keys_file name the mounted ConfigMap and Secret entries.
        assert files[env["ATHOMIC_CONFIG"]] == ("ConfigMap", "athomic-config", "athomic.toml")
        assert files[encrypt["keys_file"]] == ("Secret", "athomic-keys", "keys.json")
        # Parse it as that head would: with a real key in the Secret's place, and the
        # ATHOMIC_* variables of its container applied on top of the file.
        keys = tmp_path / f"{name}-keys.json"
        keys.write_text(json.dumps({kid: base64.b64encode(os.urandom(32)).decode()
                                    for kid in ring}))
        config = tmp_path / f"{name}.toml"
        config.write_text(text.replace(encrypt["keys_file"], str(keys)))
        for var in [v for v in os.environ if v.startswith("ATHOMIC_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            if var.startswith("ATHOMIC_"):
                monkeypatch.setenv(var, str(config) if var == "ATHOMIC_CONFIG" else value)
        settings = MessagingSettings.from_toml(os.environ["ATHOMIC_CONFIG"])
        assert settings.connection_name == parsed["connection_name"]
        assert settings.bootstrap_servers == parsed["bootstrap_servers"]
        assert set(settings.delay_topics.values()) == set(parsed["delay_topics"].values())
        assert [s.stage for s in settings.pipeline] == [s["stage"] for s in parsed["pipeline"]]
        assert sorted(settings.pipeline[-1].key_ring()) == sorted(ring)
        assert settings.lanes.actor_num_cpus > 0 and settings.republisher.actor_num_cpus > 0
        assert settings.republisher.enabled is (kind == "RayCluster"), (
            "only the long-running cluster runs the republisher")
        assert settings.republisher.replicas == parsed["republisher"]["replicas"]


def test_example_secret_is_refused_as_is(tmp_path: Path) -> None:
    """Applying the example Secret unchanged must not give a working, known key."""
    objects = kuberay_objects()
    text = object_data(objects[("ConfigMap", "athomic-config")], "athomic.toml")
    keys = tmp_path / "keys.json"
    keys.write_text(object_data(objects[("Secret", "athomic-keys")], "keys.json"))
    encrypt = next(s for s in tomllib.loads(text)["pipeline"] if s["stage"] == "encrypt")
    config = tmp_path / "athomic.toml"
    config.write_text(text.replace(encrypt["keys_file"], str(keys)))
    with pytest.raises(athomic.AthomicError, match="k1"):
        MessagingSettings.from_toml(config)


def test_raycluster_head_runs_athomic_up_with_the_mounted_config(tmp_path: Path) -> None:
    objects = kuberay_objects()
    cluster = objects[("RayCluster", "athomic")]
    container = head_container(cluster)
    # The head's own command replaces KubeRay's, so it must start Ray itself.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert container["command"][:2] == ["/bin/bash", "-lc"]
    script = "\n".join(container["args"])
    assert "ulimit -n 65536" in script
    calls = run_recorded(script, tmp_path, KUBERAY_GEN_RAY_START_CMD="ray start --head --block",
                         RAY_ADDRESS="127.0.0.1:6379")
    assert ["ray", "start", "--head", "--block"] in calls, calls
    ups = [c for c in calls if c[:2] == ["athomic", "up"]]
    assert len(ups) == 1, calls
    assert mounted_files(cluster, objects)[config_path_of_up(ups[0])] == (
        "ConfigMap", "athomic-config", "athomic.toml")
    # It waits for Ray before bringing the actors up.
    health = next(i for i, c in enumerate(calls) if c[:2] == ["ray", "health-check"])
    assert health < calls.index(ups[0])


def test_rayjob_runs_athomic_up_then_its_mounted_script(tmp_path: Path) -> None:
    objects = kuberay_objects()
    job = objects[("RayJob", "athomic-publish")]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "Ray wants string env vars"
    calls = run_recorded(spec["entrypoint"], tmp_path)
    assert len(calls) == 2 and calls[0][:2] == ["athomic", "up"], calls
    assert calls[1][0] == "python" and len(calls[1]) == 2, calls
    files = mounted_files(job, objects)
    assert files[config_path_of_up(calls[0])] == ("ConfigMap", "athomic-config",
                                                  "athomic.toml")
    # The script is the one the ConfigMap mounts, it compiles, and what it imports from
    # athomic exists.
    kind, name, key = files[calls[1][1]]
    source = object_data(objects[(kind, name)], key)
    tree = ast.parse(source, key)
    imported = [alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "athomic"
                for alias in node.names]
    assert imported
    for attr in imported:
        assert hasattr(athomic, attr), f"{key} imports athomic.{attr}"
    compile(source, key, "exec")


def test_every_pod_runs_the_athomic_image() -> None:
    objects = kuberay_objects()
    images = set()
    for (kind, name), obj in objects.items():
        if kind not in ("RayCluster", "RayJob"):
            continue
        for pod_name, pod in pod_specs(obj).items():
            for container in pod["containers"]:
                images.add(container["image"])
                assert "athomic-ray" in container["image"], (kind, name, pod_name)
    assert len(images) == 1, f"one image for every pod: {images}"


def test_dockerfile_installs_the_package_with_data_extra() -> None:
    text = (KUBERAY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+$", text, re.M)
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) == 1 and "[data]" in installs[0], installs
    assert " -e " not in installs[0], "a regular install: the source is removed afterwards"
    # It copies what the build needs, and all of it exists.
    copied = [p for line in text.splitlines() if line.startswith("COPY ")
              for p in line.split()[1:-1] if not p.startswith("--")]
    for needed in ("pyproject.toml", "README.md", "athomic", "actors", "pipeline",
                   "republisher"):
        assert needed in copied, needed
        assert (ROOT / needed).exists(), needed
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= set(copied)


def test_readme_gcs_fault_tolerance_snippet_matches_the_schema() -> None:
    readme = (KUBERAY / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    ft = [b for b in blocks if "gcsFaultToleranceOptions" in b.get("spec", {})]
    assert ft, "the README shows gcsFaultToleranceOptions"
    spec_schema = schema("RayCluster")["properties"]["spec"]
    options_schema = spec_schema["properties"]["gcsFaultToleranceOptions"]
    for block in ft:
        options = block["spec"]["gcsFaultToleranceOptions"]
        jsonschema.validate(options, options_schema)
        assert unknown_fields(options, options_schema) == []
        assert options["redisAddress"]


# --- docs ---------------------------------------------------------------------------------
def test_docs_settings_examples_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("ATHOMIC_")]:
        monkeypatch.delenv(var)
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S)
              if "bootstrap_servers" in b]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block)
        settings = MessagingSettings.from_toml(path)
        assert settings.delay_topics


def test_docs_name_files_that_exist_and_the_cli_contract() -> None:
    texts = {p: p.read_text() for p in (ROOT / "docs" / "deploy.md", KUBERAY / "README.md",
                                        DEPLOY / "ray-cluster.yaml")}
    for path, text in texts.items():
        for ref in set(re.findall(r"\bdeploy/[\w./-]*\w", text)):
            if "/." not in ref:  # not local state such as deploy/kafka/.lib
                assert (ROOT / ref).exists(), f"{path.name} names {ref}, which does not exist"
        for ref in set(re.findall(r"\bexamples/\w+\.py", text)):
            assert (ROOT / ref).exists(), f"{path.name} names {ref}"
    docs = " ".join(texts[ROOT / "docs" / "deploy.md"].split())
    for command in ("athomic up --config", "athomic status --config", "athomic down --config",
                    "ray up deploy/ray-cluster.yaml", "ray job submit --working-dir",
                    "kubectl apply -f deploy/kuberay/raycluster.yaml", "RAY_REDIS_ADDRESS",
                    "gcsFaultToleranceOptions"):
        assert command in docs, command

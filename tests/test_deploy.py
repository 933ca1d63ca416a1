"""deploy/: every manifest parses, has what its tool requires, and runs a command `mtrec` accepts.

- Kubernetes built-in kinds (ConfigMap, PersistentVolumeClaim, CronJob) are validated offline
  against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate` (strict: an unknown or
  misspelt field fails). KubeRay's RayCluster / RayJob have no schema package on PyPI: their pod
  templates are validated against the Kubernetes PodTemplateSpec schema (strict), and the KubeRay
  v1 fields the operator requires are checked here.
- The Ray cluster launcher config is validated against Ray's own schema (ray-schema.json).
- systemd units: parsed, required keys, OnCalendar checked by `systemd-analyze calendar`.
- Every command a manifest runs is parsed by `mtrec`'s own argument parser, and the mtrec config
  the ConfigMap carries is validated by the config model.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mtrec.cli import build_parser
from mtrec.cli.remote import check_command
from mtrec.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod_template_validate(template: dict, where: str) -> None:
    """A pod template against the Kubernetes PodTemplateSpec schema (strict), as kubernetes-validate
    does for whole resources."""
    import jsonschema
    from kubernetes_validate.utils import all_versions, major_minor, schema_contents
    from referencing import Registry, Resource

    version = [v for v in all_versions() if major_minor(v) <= K8S_VERSION][-1]
    d = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{d}/podtemplatespec-v1.json", version)
    registry = Resource.from_contents(schema) @ (
        Resource.from_contents(schema_contents(f"{d}/_definitions.json", version)) @ Registry()
    )
    errors = sorted(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(template), key=str)
    assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"


def _mtrec_command(argv: list[str], where: str):
    """Parse an mtrec command line (without the leading `mtrec`) like the console script does."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `mtrec {shlex.join(argv)}` is not accepted by mtrec's parser")


def _check_submit(argv: list[str], where: str) -> list[str]:
    from mtrec.cli import submit

    args = _mtrec_command(argv, where)
    assert args.run is submit.run, where
    inner = args.job_argv[1:] if args.job_argv[:1] == ["--"] else args.job_argv
    check_command(inner)  # the command after `--` parses (flags in full) and names no relative path
    return inner


def test_every_deploy_file_is_expected():
    files = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file())
    assert files == [
        "docker/Dockerfile",
        "k8s/configmap.yaml",
        "k8s/cronjob-nightly.yaml",
        "k8s/raycluster.yaml",
        "k8s/rayjob-full-retrain.yaml",
        "lock/common.txt",
        "lock/cpu.txt",
        "ray/cluster.yaml",
        "systemd/mtrec-nightly.service",
        "systemd/mtrec-nightly.timer",
    ]


def test_configmap_and_volume_validate_and_carry_a_valid_mtrec_config():
    docs = _docs(DEPLOY / "k8s/configmap.yaml")
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim"]
    for d in docs:
        _k8s_validate(d)
    assert docs[1]["spec"]["accessModes"] == ["ReadWriteMany"]  # every Ray pod mounts it
    cfg = parse_config(yaml.safe_load(docs[0]["data"]["config.yaml"]), "configmap")
    assert cfg.job.logs.startswith("/data/") and cfg.job.workdir.startswith("/data/") and cfg.tracking.enabled


def test_cronjob_is_valid_forbids_overlap_and_submits_a_nightly_for_yesterday():
    (cron,) = _docs(DEPLOY / "k8s/cronjob-nightly.yaml")
    _k8s_validate(cron)
    spec = cron["spec"]
    assert (
        spec["concurrencyPolicy"] == "Forbid"
        and re.fullmatch(r"\d+ \d+ \* \* \*", spec["schedule"])
        and spec["timeZone"]
    )
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[0] == "mtrec"
    inner = _check_submit(cmd[1:], "cronjob")
    assert inner[:1] == ["nightly"] and inner[inner.index("--date") + 1] == "yesterday"
    assert "http://mtrec-head-svc:8265" in cmd  # the service KubeRay creates for RayCluster `mtrec`
    # exit codes a retry cannot fix are not retried; they are mtrec's documented codes
    from mtrec import errors

    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MtrecError)}
    (rule,) = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert set(rule["onExitCodes"]["values"]) <= codes and rule["onExitCodes"]["containerName"] == container["name"]
    # the config it names is the ConfigMap's, mounted there
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
    assert inner[inner.index("--config") + 1] == f"{mount}/config.yaml"


def _check_ray_pod_spec(spec: dict, where: str) -> None:
    assert isinstance(spec["rayStartParams"], dict) and all(
        isinstance(v, str) for v in spec["rayStartParams"].values()
    ), f"{where}: rayStartParams values must be strings"
    _pod_template_validate(spec["template"], where)
    assert spec["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[-1] in ("cpu", "cuda")


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    _check_ray_pod_spec(head, f"{where} head")
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the job server must be reachable
    for g in spec.get("workerGroupSpecs", []):
        assert g["groupName"] and 0 <= g.get("minReplicas", 0) <= g["replicas"] <= g["maxReplicas"], where
        _check_ray_pod_spec(g, f"{where} {g['groupName']}")
        gpus = g["rayStartParams"].get("num-gpus")
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (gpus is None) == ("nvidia.com/gpu" not in limits), (
            f"{where} {g['groupName']}: num-gpus and the GPU limit disagree"
        )
        if gpus:
            assert g["template"]["spec"]["containers"][0]["image"].endswith(":cuda")


def test_raycluster_has_cpu_and_gpu_workers_and_valid_pod_templates():
    (rc,) = _docs(DEPLOY / "k8s/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"] == "mtrec"
    _check_ray_cluster_spec(rc["spec"], "RayCluster")
    assert {g["groupName"] for g in rc["spec"]["workerGroupSpecs"]} == {"cpu", "gpu"}


def test_rayjob_runs_a_full_retrain_that_mtrec_accepts():
    (job,) = _docs(DEPLOY / "k8s/rayjob-full-retrain.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
    prefix = ["python", "-m", "mtrec.cli"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == prefix
    from mtrec.cli import train

    args = _mtrec_command(argv[3:], "rayjob")
    assert args.run is train.run
    assert "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert str(Path(args.config).parent) in mounts  # the driver (on the head) reads the config there


def test_ray_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` does before it starts anything
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t["resources"].get("GPU") for t in types.values()) and any(
        not t["resources"].get("GPU") and name != cfg["head_node_type"] for name, t in types.items()
    )
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start  # `mtrec submit` talks to the job server


def _unit(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # systemd keys are case-sensitive
    p.read_string((DEPLOY / "systemd" / name).read_text())
    return p


def test_systemd_service_and_timer():
    service, timer = _unit("mtrec-nightly.service"), _unit("mtrec-nightly.timer")
    assert service["Service"]["Type"] == "oneshot"  # systemd never runs two at once
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start[0].endswith("/.venv/bin/mtrec")
    from mtrec.cli import nightly

    args = _mtrec_command(exec_start[1:], "systemd")
    assert args.run is nightly.run and args.date == "yesterday" and Path(args.config).is_absolute()
    assert timer["Timer"]["Unit"] == "mtrec-nightly.service" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target" and service["Install"]["WantedBy"]
    if shutil.which("systemd-analyze"):
        out = subprocess.run(
            ["systemd-analyze", "calendar", timer["Timer"]["OnCalendar"]], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr


def test_dockerfile_installs_from_the_lock_files_with_a_cuda_variant():
    lines = [
        ln for ln in (DEPLOY / "docker/Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    text = "\n".join(lines)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "make install VARIANT=${VARIANT}" in text
    for line in lines:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    mk = (ROOT / "Makefile").read_text()
    assert "ifeq ($(VARIANT),cuda)" in mk  # the build argument selects the Makefile's CUDA path
    assert "wget" in text  # KubeRay's probes run wget in the Ray containers
    assert "rsync" in text  # the cluster launcher copies files into the container with rsync
    # KubeRay and the cluster launcher start Ray in login shells, which reset PATH from /etc/profile
    assert re.search(r"/opt/mtrec/\.venv/bin.*> /etc/profile\.d/\S+\.sh", text)

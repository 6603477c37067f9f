"""The Kubernetes manifests in deploy/k8s/, without a cluster: every document validates against
the JSON schema of a fixed Kubernetes version (strict: an unknown field is an error), shipped
offline by kubernetes-validate; and what the schema cannot see holds too: the Service and the
HPA find the Deployment, the probes are real routes of the service, the ConfigMap holds only
real settings, every claimed volume exists, the nightly CronJob never overlaps itself, and the
containers' commands are accepted by the trainer's CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings
from trainer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest version the manifests target (CronJob timeZone: 1.27)
NAMESPACE = "eimf-recsys"
KUSTOMIZATION = "kustomization.yaml"


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == KUSTOMIZATION:
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCUMENTS = load_documents()


def find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for _, d in DOCUMENTS
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(kind, name)
    assert len(found) == 1, f"{kind} {name}: {len(found)} documents"
    return found[0]


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template, by the kind/name of its owner."""
    specs = {}
    for _, d in DOCUMENTS:
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            specs[f"CronJob/{d['metadata']['name']}"] = spec["jobTemplate"]["spec"]["template"]
        elif "template" in spec:
            specs[f"{d['kind']}/{d['metadata']['name']}"] = spec["template"]
    return specs


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["spec"]["containers"] if c["name"] == name)


def test_there_is_something_to_check():
    kinds = {d["kind"] for _, d in DOCUMENTS}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet",
                     "CronJob", "PersistentVolumeClaim", "ConfigMap"}, kinds


@pytest.mark.parametrize(("filename", "doc"), DOCUMENTS,
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCUMENTS])
def test_document_matches_the_kubernetes_schema(filename, doc):
    try:
        version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{filename} {doc['kind']}: {where}: {exc.message}")
    assert version == "1.31"  # validated against that version's schema, not a fallback


def test_validator_rejects_what_kubernetes_would():
    """The schemas are really applied: a typo and a wrong type fail."""
    deployment = one("Deployment", "api")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    wrong = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_file():
    kustomization = yaml.safe_load((K8S / KUSTOMIZATION).read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert not list(K8S.glob("*.yml")), "use .yaml"


def test_everything_is_in_one_namespace():
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    for filename, d in DOCUMENTS:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, filename


def test_service_and_hpa_select_the_deployment():
    deployment = one("Deployment", "api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = one("Service", "api")
    assert service["spec"]["selector"].items() <= labels.items()
    # ... and nothing else: the Redis pods do not share the API's selector.
    for kind in ("StatefulSet", "CronJob", "Job"):
        for other in find(kind):
            spec = other["spec"].get("jobTemplate", {}).get("spec", other["spec"])
            assert not service["spec"]["selector"].items() <= \
                spec["template"]["metadata"]["labels"].items(), other["metadata"]["name"]
    api = container(deployment["spec"]["template"], "api")
    port_names = {p["name"] for p in api["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    hpa = one("HorizontalPodAutoscaler", "api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        ("apps/v1", "Deployment", "api")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in api["resources"]["requests"]  # CPU utilization is relative to it
    assert hpa["spec"]["minReplicas"] >= 2  # one pod's death leaves one serving

    pdb = one("PodDisruptionBudget", "api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_are_real_routes(tmp_path):
    app = create_app(Settings(models_dir=tmp_path, redis_url=None, log_level="WARNING"))
    get_routes = {path for path, methods in app.openapi()["paths"].items() if "get" in methods}
    api = container(one("Deployment", "api")["spec"]["template"], "api")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    probes = {kind: api[kind]["httpGet"]
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    client = TestClient(app)  # no lifespan: no model loaded, so /readyz says 503
    for kind, probe in probes.items():
        assert probe["path"] in get_routes, (kind, probe["path"], sorted(get_routes))
        assert probe["port"] in ports, kind
        assert client.get(probe["path"]).status_code in (200, 503), (kind, probe["path"])
    # Ready = model loaded and Redis reachable; alive must not depend on Redis, or a Redis
    # outage would restart every pod.
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"


def test_configmap_holds_real_settings_that_fit_the_pods():
    data = one("ConfigMap", "recsys-config")["data"]
    fields = {name.upper() for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    template = one("Deployment", "api")["spec"]["template"]
    api = container(template, "api")
    assert [e["configMapRef"]["name"] for e in api["envFrom"]] == ["recsys-config"]
    for env in api.get("env", []):
        assert env["name"] in fields, env["name"]
    # On 0.0.0.0 the admin routes need their key: the pods take it from the Secret, which is
    # required (without it a pod would not start anyway: the settings refuse).
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in api["env"]}
    assert secrets["ADMIN_API_KEY"]["name"] == "recsys-secrets"
    assert not secrets["ADMIN_API_KEY"].get("optional", False)
    with pytest.raises(ValidationError, match="ADMIN_API_KEY"):
        Settings(**{k.lower(): v for k, v in data.items()})
    settings = Settings(**{k.lower(): v for k, v in data.items()},
                        admin_api_key="from-the-secret")  # valid values too
    # The app listens where the probes and the Service knock.
    assert settings.host == "0.0.0.0"
    assert settings.port in {p["containerPort"] for p in api["ports"]}
    assert settings.workers == 1
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert mounts[str(settings.models_dir)]["readOnly"] is True
    # The in-cluster Redis is the StatefulSet's Service.
    redis_host = urlsplit(settings.redis_url or "").hostname
    assert redis_host == one("StatefulSet", "redis")["spec"]["serviceName"]
    assert one("Service", redis_host)["spec"]["ports"][0]["port"] == \
        (urlsplit(settings.redis_url or "").port or 6379)


def test_statefulset_has_its_headless_service_and_volume():
    redis = one("StatefulSet", "redis")
    service = one("Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    templates = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    mounted = {m["name"] for c in redis["spec"]["template"]["spec"]["containers"]
               for m in c.get("volumeMounts", [])}
    assert mounted <= templates | {v["name"] for v in
                                   redis["spec"]["template"]["spec"].get("volumes", [])}


def test_claimed_volumes_exist_and_models_is_shared():
    claims = {d["metadata"]["name"]: d for d in find("PersistentVolumeClaim")}
    used: dict[str, list[str]] = {}
    for owner, template in pod_specs().items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                templates = {t["metadata"]["name"] for t in
                             one(*owner.split("/")).get("spec", {}).get(
                                 "volumeClaimTemplates", [])}
                assert mount["name"] in volumes or mount["name"] in templates, \
                    (owner, mount["name"])
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                name = v["persistentVolumeClaim"]["claimName"]
                assert name in claims, (owner, name)
                used.setdefault(name, []).append(owner)
    assert set(used) == set(claims), "a PVC nobody mounts"
    # Many API pods on many nodes read the models the nightly job writes.
    assert claims["models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert set(used["models"]) >= {"Deployment/api", "CronJob/nightly"}


def test_nightly_cronjob_never_overlaps_and_writes_the_models():
    cron = one("CronJob", "nightly")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    template = cron["spec"]["jobTemplate"]["spec"]["template"]
    nightly = container(template, "nightly")
    api_mounts = container(one("Deployment", "api")["spec"]["template"], "api")["volumeMounts"]
    models_path = next(m["mountPath"] for m in api_mounts if m["name"] == "models")
    mount = next(m for m in nightly["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == models_path and not mount.get("readOnly", False)
    claim = next(v for v in template["spec"]["volumes"] if v["name"] == "models")
    assert not claim["persistentVolumeClaim"].get("readOnly", False)
    # One run per schedule: the command is a single cycle, not the `--every` loop.
    args = build_parser().parse_args(nightly["command"][3:])
    assert nightly["command"][:3] == ["python", "-m", "trainer"]
    assert args.command == "nightly" and args.every is None
    refs = [e["configMapRef"]["name"] for e in nightly["envFrom"]]
    assert refs == ["recsys-config"]  # the same Redis, stream and store as the API
    data_dir = next(e["value"] for e in nightly["env"] if e["name"] == "DATA_DIR")
    assert data_dir in {m["mountPath"] for m in nightly["volumeMounts"]}


def test_first_training_job_publishes_where_the_api_reads():
    job = one("Job", "first-train")
    trainer = container(job["spec"]["template"], "trainer")
    assert trainer["command"][:3] == ["python", "-m", "trainer"]
    args = build_parser().parse_args(trainer["command"][3:])
    data = one("ConfigMap", "recsys-config")["data"]
    assert args.command == "train" and args.if_missing
    assert (str(args.out), args.name) == (data["MODELS_DIR"], data["MODEL_NAME"])


def test_images_are_the_compose_images():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    built = {s["image"] for s in compose["services"].values() if "build" in s}
    for owner, template in pod_specs().items():
        for c in template["spec"]["containers"]:
            image = c["image"].rsplit(":", 1)[0]
            if owner.startswith("StatefulSet/"):
                assert c["image"] == compose["services"]["redis"]["image"]
            else:
                assert image in built, (owner, c["image"])
            # Non-root everywhere (the images' own users).
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, owner

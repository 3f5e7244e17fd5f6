"""deploy/k8s: every manifest parses; the RayService's serveConfigV2 is what `attribution deploy serve-config`
prints for the shipped config and loads back through the applications' builders; ports, probes, images and
names agree across the RayService, the front doors' Deployment and Service, and the kustomizations.

No cluster is needed (nor started): these are the mistakes that a cluster would find only at deploy time.
"""
from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
CONFIG = BASE / "config.yaml"
GENERATE = "attribution deploy serve-config --config deploy/k8s/base/config.yaml"


def documents(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict]:
    return [d for path in sorted(BASE.glob("*.yaml")) if path.name not in ("kustomization.yaml", "config.yaml")
            for d in documents(path) if d.get("kind") == kind]


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (service,) = by_kind("RayService")
    return service


@pytest.fixture(scope="module")
def frontdoor() -> tuple[dict, dict]:
    (deployment,), (service,) = by_kind("Deployment"), by_kind("Service")
    return deployment, service


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_every_manifest_parses_and_names_its_kind():
    paths = sorted(K8S.rglob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        docs = documents(path)
        assert docs, path
        if path.name == "kustomization.yaml":
            assert docs[0]["kind"] == "Kustomization"
        elif path.parent == BASE and path.name != "config.yaml":
            assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), path


def test_the_kustomizations_name_files_that_exist():
    for path in K8S.rglob("kustomization.yaml"):
        (k,) = documents(path)
        named = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", []) if "path" in p]
        named += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
        for name in named:
            assert (path.parent / name).exists(), f"{path}: {name}"


def test_the_rayservice_has_a_head_and_a_gpu_worker_group(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = containers(workers["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[serve]=={cluster['rayVersion']}" in deps


def test_serve_config_v2_is_the_generators_output_for_the_shipped_config(rayservice):
    from service.cli import main

    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(shlex.split(GENERATE)[1:]) == 0
    assert rayservice["spec"]["serveConfigV2"] == printed.getvalue(), f"regenerate it: {GENERATE}"


def test_serve_config_v2_loads_back_through_the_applications_builders(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from service.settings import ServiceConfig
    from workers.config import model_config_from_dict
    from workers.serve.app import app_name, build_online_app, serve_config
    from workers.serve.offline import OFFLINE_APP, build_offline_app

    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    config = ServiceConfig.load(CONFIG)
    assert served == serve_config(config.app, config.jobs.offline)
    apps = {a["name"]: a for a in served["applications"]}
    assert set(apps) == {app_name(m.name) for m in config.app.models} | {OFFLINE_APP}
    builders = {"workers.serve.app:build_online_app": build_online_app,
                "workers.serve.offline:build_offline_app": build_offline_app}
    for app in apps.values():
        assert builders[app["import_path"]](app["args"]) is not None  # builds the Serve application (no Ray)
        for raw in [app["args"]["model"]] if "model" in app["args"] else app["args"]["models"]:
            assert model_config_from_dict(raw) in config.app.models


def _frontdoor_command(deployment: dict) -> list[str]:
    (container,) = containers(deployment["spec"]["template"])
    return shlex.split(" ".join(container.get("command", []) + container.get("args", [])))


def _flag(argv: list[str], name: str) -> str:
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def test_the_front_doors_ports_probes_and_service_agree(frontdoor):
    from service.cli import build_parser
    from service.settings import ServiceConfig

    deployment, service = frontdoor
    (container,) = containers(deployment["spec"]["template"])
    argv = _frontdoor_command(deployment)
    serve_at = argv.index("attribution")
    args = build_parser().parse_args(argv[serve_at + 1:])  # the command line `attribution serve` accepts
    assert args.attach and args.address == "auto"
    server = ServiceConfig.load(CONFIG, {"port": args.port, "metrics_port": args.metrics_port}).server
    shipped = ServiceConfig.load(CONFIG).server
    assert (server.port, server.metrics_port) == (shipped.port, shipped.metrics_port)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": server.port, "metrics": server.metrics_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == server.port, probe  # grpc.health.v1, on the gRPC port
        assert container[probe]["grpc"].get("service", "") == ""
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) == ports[port["name"]], port
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(pathlib.PurePosixPath(args.config).parent) in mounted
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (generator,) = documents(BASE / "kustomization.yaml")[0]["configMapGenerator"]
    config_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] in args.config)
    assert volumes[config_volume]["configMap"]["name"] == generator["name"]
    assert pathlib.PurePosixPath(args.config).name in [pathlib.Path(f).name for f in generator["files"]]


def test_the_front_doors_join_the_rayservices_head(frontdoor, rayservice):
    deployment, _ = frontdoor
    argv = _frontdoor_command(deployment)
    address = _flag(argv, "--address")  # `ray start`'s, the first one
    (head,) = containers(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    gcs = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    assert address == f"{rayservice['metadata']['name']}-head-svc:{gcs}"  # the head Service KubeRay names so


def test_the_service_selects_the_deployments_pods(frontdoor):
    deployment, service = frontdoor
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["metadata"]["name"] == deployment["metadata"]["name"]


def test_the_ray_containers_probe_the_raylet_not_the_disabled_proxy(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["proxy_location"] == "Disabled"
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        for container in containers(template):
            for probe in ("readinessProbe", "livenessProbe"):  # set here, KubeRay adds none of its own
                assert container[probe]["httpGet"]["port"] in (8265, 52365), (container["name"], probe)


def _image_name(image: str) -> str:
    return re.sub(r":[^/:]+$", "", image)


def test_one_image_everywhere_and_the_kustomize_images_name_it(rayservice, frontdoor):
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], frontdoor[0]["spec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in containers(t)}
    assert len(images) == 1, images
    (image,) = images
    (base,) = documents(BASE / "kustomization.yaml")
    (entry,) = base["images"]
    assert entry["name"] == _image_name(image) and image.endswith(":" + entry["newTag"])
    for path in (K8S / "overlays").rglob("kustomization.yaml"):
        (overlay,) = documents(path)
        assert [e["name"] for e in overlay.get("images", [])] in ([], [entry["name"]]), path
        for replica in overlay.get("replicas", []):
            assert replica["name"] == frontdoor[0]["metadata"]["name"], path
        for patch in overlay.get("patches", []):
            assert patch["target"]["name"] == rayservice["metadata"]["name"], path


def test_the_overlays_patches_land_on_paths_that_exist(rayservice):
    for path in (K8S / "overlays").rglob("kustomization.yaml"):
        (overlay,) = documents(path)
        for patch in overlay.get("patches", []):
            for op in documents(path.parent / patch["path"])[0]:
                node = rayservice
                for part in op["path"].strip("/").split("/"):
                    node = node[int(part)] if isinstance(node, list) else node[part]
                assert op["op"] in ("replace", "add", "remove") and type(node) is type(op.get("value", node))

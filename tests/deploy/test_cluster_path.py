"""The cluster path as a minikube user meets it. No cluster runs here, so each thing a
platform engineer found that would stop a real deployment is held by the rendered chart,
the recorded command plans or the CRD schemas (docs/kubernetes.md lists them)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.deploy.chart import ARGO, SCHEMAS, by_kind, pod_specs, render, values_file
from tests.deploy.test_minikube_plan import Recorder, jobs_json
from tests.support import load_script

minikube = load_script("minikube")
APPLICATION_SCHEMA = json.loads((SCHEMAS / "argoproj.io" / "application_v1alpha1.json").read_text())
DECLARATION = load_script("render_chart").EVERYTHING["dataset"]["declaration"]


def deployment(objects: list[dict], component: str) -> dict:
    return next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith(f"-{component}"))


def container_env(container: dict, config: dict) -> dict:
    return {**config, **{e["name"]: e.get("value") for e in container.get("env", [])}}


# 2. Argo CD deploys the image it loaded, after checking Argo CD is there.

def test_argo_apply_builds_and_loads_the_image_and_deploys_that_tag():
    rec = Recorder()
    root = minikube.root_application("https://git.example/f.git", "main", "0123456")
    minikube.run_plan(minikube.argo_plan("apply", "https://git.example/f.git", image_tag="0123456", root_app=root,
                                         secret_stream="x"), rec)
    commands = rec.commands()
    checks = commands[:2]
    assert checks == ["kubectl --context mlops get namespace argocd",
                      "kubectl --context mlops get crd applications.argoproj.io"]
    assert all("argo-cd/stable/manifests/install.yaml" in s.hint for s in rec.steps[:2])
    assert "minikube -p mlops image load mlops-shared-volume:0123456" in commands
    build = [s.argv for s in minikube.build_plan("0123456")]
    assert [s.argv for s in rec.steps if s.argv in build] == build  # the same path as build_images
    children = render(ARGO / "apps", yaml.safe_load(root)["spec"]["source"]["helm"]["valuesObject"],
                      release="mlops-root", namespace="argocd")
    for app in children:
        jsonschema.validate(app, APPLICATION_SCHEMA)
        assert {"name": "image.tag", "value": "0123456", "forceString": True} in app["spec"]["source"]["helm"]["parameters"]


def test_argo_apply_stops_with_the_install_command_when_argo_cd_is_missing():
    rec = Recorder(fail_on=("argocd",))
    with pytest.raises(minikube.StepFailed, match="install Argo CD first: .*install.yaml"):
        minikube.run_plan(minikube.argo_plan("apply", "https://git.example/f.git"), rec)
    assert len(rec.steps) == 1  # nothing built, nothing applied


# 3. metrics-server is enabled and used: an optional HPA, a PDB with more than one pod.

def test_autoscaler_and_disruption_budget():
    objects = render(values={"serve": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}}})
    hpa = by_kind(objects, "HorizontalPodAutoscaler")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment(objects, "serve")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in deployment(objects, "serve")["spec"]  # the HPA owns it
    pdb = by_kind(objects, "PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment(objects, "serve")["spec"]["template"]["metadata"]["labels"].items()
    single = render()
    assert by_kind(single, "HorizontalPodAutoscaler") == [] and by_kind(single, "PodDisruptionBudget") == []
    assert by_kind(render(values={"serve": {"replicas": 3}}), "PodDisruptionBudget")


# 4. Redis keeps the online store across a restart.

def test_redis_appends_to_a_file_on_its_own_volume():
    objects = render()
    redis = deployment(objects, "redis")["spec"]["template"]["spec"]
    script = redis["containers"][0]["args"][0]
    assert "appendonly yes" in script and "dir /data" in script
    assert {"name": "data", "mountPath": "/data"} in redis["containers"][0]["volumeMounts"]
    claim = next(v for v in redis["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert claim in {p["metadata"]["name"] for p in by_kind(objects, "PersistentVolumeClaim")}
    assert "appendonly no" in deployment(render(values={"redis": {"persistence": {"enabled": False}}}),
                                         "redis")["spec"]["template"]["spec"]["containers"][0]["args"][0]


# 5. No claim in a sync wave before its first consumer (WaitForFirstConsumer would deadlock).

def test_claims_are_not_in_a_wave_before_their_first_consumer():
    objects = render()
    wave = lambda o: int(o["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", 0))
    for claim in by_kind(objects, "PersistentVolumeClaim"):
        consumers = [o for o in by_kind(objects, "Deployment") + by_kind(objects, "Job")
                     if any(v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
                            for v in o["spec"]["template"]["spec"]["volumes"])]
        assert consumers and wave(claim) >= min(wave(c) for c in consumers), claim["metadata"]["name"]


# 6. ReadWriteOnce: every pod that mounts the volume stays on one node; ReadWriteMany may spread.

@pytest.mark.parametrize("values", [{}, values_file("values-minikube.yaml")], ids=["pvc", "hostPath"])
def test_pods_sharing_a_one_node_volume_are_kept_together(values):
    sharing = [(n, s) for n, s in pod_specs(render(values=values)) if any(v["name"] == "shared" for v in s["volumes"])]
    assert len(sharing) == 8
    objects = render(values=values)
    labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
              for o in by_kind(objects, "Deployment") + by_kind(objects, "Job")}
    for name, spec in sharing:
        term = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        selected = [n for n, lab in labels.items() if term["labelSelector"]["matchLabels"].items() <= lab.items()]
        assert len(selected) == 8, name  # the term selects exactly the pods that mount the volume
    spread = render(values={"sharedVolume": {"accessMode": "ReadWriteMany"}})
    assert all("affinity" not in s for _, s in pod_specs(spread))


# 7. One command per stage, and argo diff.

def test_stage_recreates_its_job_from_the_release_manifest_and_waits_for_it():
    import helm_python as helm

    chart = helm.Chart.load(str(minikube.ROOT / minikube.CHART))
    manifest = "\n---\n".join(t for p, t in chart.render({}, name="mlops", namespace="mlops", is_install=True).items()
                              if not p.endswith("NOTES.txt"))
    train = next(j for j in by_kind(render(), "Job") if "-train-" in j["metadata"]["name"])
    rec = Recorder(answers=[jobs_json(""), jobs_json("Complete")])
    minikube.run_plan(minikube.stage_plan(minikube.stage_name(["train"]), manifest), rec, sleep=lambda s: None)
    name = train["metadata"]["name"]
    assert rec.commands()[0] == f"kubectl --context mlops -n mlops delete job {name} --ignore-not-found --wait=true"
    assert yaml.safe_load(rec.steps[1].stdin) == train and rec.steps[1].argv[-2:] == ("-f", "-")
    assert [s.argv for s in rec.steps].count(rec.steps[2].argv) == 2  # polled until Complete
    with pytest.raises(minikube.UsageError, match="invalid choice"):
        minikube.stage_name(["trian"])
    assert set(minikube.STAGES) == {j["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                                    for j in by_kind(render(), "Job")}


# 8. Every step names the same cluster.

def test_every_cluster_command_pins_the_context():
    plans = [minikube.deploy_plan(minikube.DeployOptions(image_tag="t")), minikube.down_plan(),
             minikube.stage_plan("train", yaml.safe_dump({"kind": "Job", "metadata": {
                 "name": "j", "labels": {"app.kubernetes.io/component": "train"}}}))]
    plans += [minikube.argo_plan(a, "https://git.example/f.git") for a in ("apply", "sync", "get", "diff", "delete")]
    for plan in plans:
        for step in plan:
            argv = step.argv
            if argv[0] == "kubectl" and argv[1] != "config":
                assert argv[1:3] == ("--context", "mlops"), argv
            if argv[0] == "helm":
                assert argv[argv.index("--kube-context") + 1] == "mlops", argv
            if argv[0] == "argocd":
                assert argv[argv.index("--kube-context") + 1] == minikube.argo_context("mlops"), argv
    context = minikube.argo_plan("sync")[0].argv
    assert "--cluster=mlops" in context and "--namespace=argocd" in context


# 9. Waiting notices a failed Job, prints logs and events, and is bounded; the port comes from the values.

def test_a_failed_job_stops_the_wait_with_its_logs_and_events():
    rec = Recorder(answers=[jobs_json("", "Complete"), jobs_json("Failed", "Complete")])
    plan = minikube.deploy_plan(minikube.DeployOptions(image_tag="t"))
    with pytest.raises(minikube.StepFailed, match="stage Jobs .* failed"):
        minikube.run_plan(plan, rec, sleep=lambda s: None)
    after = rec.commands()[rec.commands().index(" ".join(rec.steps[-1].argv)):]
    assert any(" logs -l " in c for c in rec.commands()) and any("describe jobs" in c for c in rec.commands())
    assert not any("port-forward" in c for c in after)


def test_the_wait_is_bounded_in_time():
    now = [0.0]
    rec = Recorder(answers=[jobs_json("")] * 1000)
    step = minikube.wait_jobs(("kubectl",), "a=b", 1, 30, "x")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(minikube.StepFailed):
        minikube.run_plan([step], rec, sleep=sleep, clock=lambda: now[0], interval=5)
    assert 6 <= len([s for s in rec.steps if s.poll]) <= 8


def test_port_forward_follows_the_serve_port_value():
    rec = Recorder()
    minikube.run_plan(minikube.deploy_plan(minikube.DeployOptions(image_tag="t", helm_set=["serve.port=9000"])), rec)
    assert rec.steps[-1].argv[-1] == "8000:9000"


# 10. Tags: strings always, and a changed tree never reuses its commit's tag.

def test_image_tags_of_clean_and_dirty_trees():
    assert minikube.image_tag("0123456789ab") == "0123456789ab"
    dirty = minikube.image_tag("0123456789ab", "diff --git a/x")
    assert dirty.startswith("0123456789ab-dirty-") and dirty != minikube.image_tag("0123456789ab", "diff --git a/y")
    assert minikube.image_tag("") == "dev"


# 11. No secret in argv (nor in the nox log, which prints argv).

def test_argo_secrets_go_through_stdin_never_argv():
    stream = minikube.argo_secrets(token=lambda n: "S3CRET" * 4)
    plan = minikube.argo_plan("apply", "https://git.example/f.git", secret_stream=stream, root_app="x")
    assert all("S3CRET" not in " ".join(s.argv) and "S3CRET" not in s.why for s in plan)
    secret_step = next(s for s in plan if s.stdin == stream)
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(secret_step.stdin)}
    argocd = values_file("values-argocd.yaml")
    assert set(docs) == {argocd["redis"]["existingSecret"], argocd["mlflow"]["auth"]["existingSecret"]}
    assert set(docs["mlops-mlflow"]["stringData"]) == {"mlflow-password", "flask-secret-key"}


# 12. A kept claim and another release: no collision, and a way to reuse it.

def test_kept_claims_and_other_releases():
    other = render(release="other")
    assert "other-shared-volume-shared" in {p["metadata"]["name"] for p in by_kind(other, "PersistentVolumeClaim")}
    reuse = render(values={"sharedVolume": {"existingClaim": "mlops-shared-volume-shared"}}, release="other")
    assert "other-shared-volume-shared" not in {p["metadata"]["name"] for p in by_kind(reuse, "PersistentVolumeClaim")}
    for name, spec in pod_specs(reuse):
        shared = [v for v in spec["volumes"] if v["name"] == "shared"]
        assert not shared or shared[0]["persistentVolumeClaim"]["claimName"] == "mlops-shared-volume-shared", name


# 13. MLflow: migrations before the server, init resources of its own, namespaced host names.

def test_mlflow_upgrades_its_store_first_and_answers_its_service_names():
    spec = deployment(render(), "mlflow")["spec"]["template"]["spec"]
    inits = spec["initContainers"]
    assert [c["name"] for c in inits] == ["init", "db-upgrade"]
    assert inits[1]["command"][1:4] == ["mlflow", "db", "upgrade"]
    backend = next(a for a in spec["containers"][0]["command"] if a.startswith("--backend-store-uri="))
    assert inits[1]["command"][-1] == backend.split("=", 1)[1]
    assert all(c["resources"] == values_file("values.yaml")["jobs"]["init"]["resources"] for c in inits)
    hosts = next(a for a in spec["containers"][0]["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    for host in ("mlops-shared-volume-mlflow", "mlops-shared-volume-mlflow.mlops.svc:5000",
                 "mlops-shared-volume-mlflow.mlops.svc.cluster.local:5000"):
        assert host in hosts.split(","), host


# 14. NOTES.txt names the real Jobs.

def test_notes_name_the_jobs_the_chart_renders():
    import helm_python as helm

    chart = helm.Chart.load(str(minikube.ROOT / minikube.CHART))
    notes = next(t for p, t in chart.render({}, name="mlops", namespace="mlops", is_install=True).items()
                 if p.endswith("NOTES.txt"))
    assert "<" not in notes
    for job in by_kind(render(), "Job"):
        assert f"logs job/{job['metadata']['name']}" in notes
    assert "helm status mlops" in notes and "ls /shared" in notes and "mlops-shared-volume-mlflow" in notes


# 15. Pod Security labels on the namespace.

def test_the_namespace_enforces_restricted_in_pvc_mode():
    label = lambda plan: next(s.argv for s in plan if "label" in s.argv)
    assert "pod-security.kubernetes.io/enforce=restricted" in label(
        minikube.deploy_plan(minikube.DeployOptions(image_tag="t")))
    assert "pod-security.kubernetes.io/enforce=restricted" not in label(
        minikube.deploy_plan(minikube.DeployOptions(image_tag="t", host_path=True)))
    root = yaml.safe_load((ARGO / "application.yaml").read_text())
    for app in render(ARGO / "apps", root["spec"]["source"]["helm"]["valuesObject"], release="r", namespace="argocd"):
        jsonschema.validate(app, APPLICATION_SCHEMA)
        labels = app["spec"]["syncPolicy"]["managedNamespaceMetadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert values_file(app["spec"]["source"]["helm"]["valueFiles"][-1]).get("sharedVolume", {}).get(
            "useHostPath") is not True  # restricted needs the PVC


# Data set declarations: a ConfigMap mounted as a file, MLOPS_DATASET at it, new Jobs when it changes.

def test_a_declaration_is_mounted_in_every_pipeline_pod_and_changes_the_jobs():
    objects = render(values={"dataset": {"declaration": DECLARATION}})
    config = by_kind(objects, "ConfigMap")
    dataset = next(c for c in config if c["metadata"]["name"].endswith("-dataset"))
    assert yaml.safe_load(dataset["data"]["dataset.yaml"])["source"]["path"].startswith("/shared/")
    settings = next(c for c in config if c["metadata"]["name"].endswith("-config"))["data"]
    path = settings["MLOPS_DATASET"]
    for name, spec in pod_specs(objects):
        if name.endswith("-redis"):
            continue
        volume = next(v for v in spec["volumes"] if v["name"] == "dataset")
        assert volume["configMap"]["name"] == dataset["metadata"]["name"], name
        for c in spec["containers"]:
            mount = next(m for m in c["volumeMounts"] if m["name"] == "dataset")
            assert path == f"{mount['mountPath']}/dataset.yaml" and mount["readOnly"], name
    assert render()[0]["data"]["MLOPS_DATASET"] == ""  # unset: the built-in customers
    names = lambda objs: {j["metadata"]["name"] for j in by_kind(objs, "Job")}
    other = render(values={"dataset": {"declaration": DECLARATION.replace("price", "value")}})
    assert names(objects).isdisjoint(names(render())) and names(objects).isdisjoint(names(other))


# MLflow requires a login; the pipeline pods get the user and the password file.

def test_mlflow_requires_a_login_and_the_pipeline_pods_have_one():
    objects = render()
    config = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-config"))["data"]
    mlflow = deployment(objects, "mlflow")["spec"]["template"]["spec"]
    server = mlflow["containers"][0]
    assert "--app-name=basic-auth" in server["command"]
    env = container_env(server, {})
    secret = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-mlflow"))
    assert set(secret["data"]) == {"mlflow-password", "flask-secret-key"}
    mount = next(m for m in server["volumeMounts"] if m["name"] == "mlflow-password")["mountPath"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == f"{mount}/mlflow-password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == f"{mount}/flask-secret-key"
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == config["MLFLOW_TRACKING_USERNAME"]
    assert config["MLFLOW_TRACKING_PASSWORD_FILE"] == f"{mount}/mlflow-password"
    for name, spec in pod_specs(objects):
        if name.endswith("-redis"):
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["command"][0] == "/usr/local/bin/mlops-entrypoint", (name, c["name"])
            assert any(m["name"] == "mlflow-password" for m in c["volumeMounts"]), (name, c["name"])

"""`nox -s deploy_minikube` and the Argo CD helpers cannot run here (no cluster):
their command plans are checked against a recording runner, and cross-checked
against the chart they deploy. The README says so plainly."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from tests.deploy.chart import ROOT, by_kind, render, values_file
from tests.support import load_script

minikube = load_script("minikube")


def jobs_json(*conditions: str) -> str:
    """`kubectl get jobs -o json` with one Job per condition ("" for one still running)."""
    return json.dumps({"items": [{"status": {"conditions": [{"type": c, "status": "True"}] if c else []}}
                                 for c in conditions]})


class Recorder:
    """Records the steps; a poll step gets ``answers`` in turn (default: every stage Job complete);
    a step whose argv contains one of ``fail_on`` fails."""

    def __init__(self, answers: list[str] | None = None, fail_on: tuple[str, ...] = ()) -> None:
        self.steps: list[minikube.Step] = []
        self.answers = list(answers or [])
        self.fail_on = fail_on

    def __call__(self, step: minikube.Step) -> str | None:
        self.steps.append(step)
        if any(word in step.argv for word in self.fail_on):
            raise minikube.StepFailed(f"{' '.join(step.argv)} exited 1")
        if step.poll is not None:
            return self.answers.pop(0) if self.answers else jobs_json(*["Complete"] * len(minikube.STAGES))
        return None

    def commands(self) -> list[str]:
        return [" ".join(s.argv) for s in self.steps]


def test_preflight_names_every_missing_tool_with_how_to_install_it():
    with pytest.raises(minikube.PreflightError) as err:
        minikube.preflight(minikube.TOOLS, which=lambda name: None if name in ("minikube", "helm") else "/x")
    message = str(err.value)
    assert "minikube: not found" in message and "helm: not found" in message
    assert "https://minikube.sigs.k8s.io" in message and "https://helm.sh" in message
    assert "docker" not in message and "kubectl" not in message
    minikube.preflight(minikube.TOOLS, which=lambda name: f"/usr/bin/{name}")  # all there: no error


@pytest.fixture(scope="module")
def plan():
    rec = Recorder()
    opts = minikube.DeployOptions(image_tag="abc123", helm_set=["pipeline.rows=5000"])
    minikube.run_plan(minikube.deploy_plan(opts), rec)
    return rec, opts


def test_the_plan_runs_the_blueprint_steps_in_order(plan):
    rec, _ = plan
    first_words = [" ".join(s.argv[:4]) for s in rec.steps]
    order = ["minikube -p mlops start", "minikube -p mlops addons", "bash scripts/build_wheelhouse.sh",
             "docker build -t mlops-shared-volume:abc123", "minikube -p mlops image",
             "kubectl --context mlops create", "kubectl --context mlops label",
             "helm upgrade --install mlops", "kubectl --context mlops -n", "kubectl --context mlops -n",
             "kubectl --context mlops -n"]
    assert first_words == order
    assert rec.steps[-1].background and "port-forward" in rec.steps[-1].argv
    assert [s.argv[-1] for s in rec.steps if s.argv[3:5] == ("image", "load")] == ["mlops-shared-volume:abc123"]
    assert ("minikube", "-p", "mlops", "addons", "enable", "metrics-server") in [s.argv for s in rec.steps]


def test_helm_gets_the_chart_values_and_image_that_exist(plan):
    rec, opts = plan
    helm = next(s.argv for s in rec.steps if s.argv[0] == "helm")
    assert helm[:5] == ("helm", "upgrade", "--install", minikube.RELEASE, minikube.CHART)
    assert (ROOT / helm[4] / "Chart.yaml").is_file()
    values = [helm[i + 1] for i, a in enumerate(helm) if a == "--values"]
    assert values == [f"{minikube.CHART}/values.yaml"]  # a PVC by default
    assert all((ROOT / v).is_file() for v in values)
    sets = [helm[i + 1] for i, a in enumerate(helm) if a == "--set"]
    assert sets == ["image.repository=mlops-shared-volume", "pipeline.rows=5000"]
    # --set-string: an all-digit short commit stays a string (the schema refuses a number)
    assert [helm[i + 1] for i, a in enumerate(helm) if a == "--set-string"] == ["image.tag=abc123"]
    assert "--namespace" in helm and helm[helm.index("--namespace") + 1] == "mlops"


def test_the_waits_and_the_port_forward_name_what_the_chart_renders(plan):
    rec, opts = plan
    values = {"image": {"repository": "mlops-shared-volume", "tag": "abc123"}}
    objects = render(values=values, release=minikube.RELEASE, namespace=opts.namespace)
    wait = next(s for s in rec.steps if s.poll is not None)
    selector = dict(kv.split("=") for kv in wait.argv[wait.argv.index("-l") + 1].split(","))
    jobs = by_kind(objects, "Job")
    matched = [j for j in jobs if selector.items() <= j["metadata"]["labels"].items()]
    assert len(matched) == len(jobs) == len(minikube.STAGES) == 6  # the wait covers every stage, nothing else
    rollout = next(s.argv for s in rec.steps if "rollout" in s.argv)
    deployments = {f"deployment/{d['metadata']['name']}" for d in by_kind(objects, "Deployment")}
    assert rollout[rollout.index("status") + 1] in deployments
    forward = rec.steps[-1].argv
    services = {f"svc/{s['metadata']['name']}": s for s in by_kind(objects, "Service")}
    target = services[forward[forward.index("port-forward") + 1]]
    assert target["spec"]["ports"][0]["port"] == int(forward[-1].split(":")[1])
    assert forward[-1].split(":")[0] == "8000"  # curl localhost:8000/predict, as in the blueprint


def test_host_path_mode_adds_its_values_and_prepares_the_folder():
    rec = Recorder()
    minikube.run_plan(minikube.deploy_plan(minikube.DeployOptions(image_tag="t", host_path=True)), rec)
    helm = next(s.argv for s in rec.steps if s.argv[0] == "helm")
    assert f"{minikube.CHART}/values-minikube.yaml" in helm
    prepare = next(s.argv for s in rec.steps if "ssh" in s.argv)
    uid = str(values_file("values.yaml")["podSecurityContext"]["runAsUser"])
    folder = values_file("values-minikube.yaml")["sharedVolume"]["hostPath"]
    assert prepare[-1] == folder and prepare[prepare.index("-o") + 1] == uid and prepare[prepare.index("-g") + 1] == uid
    assert rec.commands().index(" ".join(prepare)) < rec.commands().index(" ".join(helm))


def test_argo_helpers_match_the_argo_objects():
    root = yaml.safe_load((ROOT / "argo" / "application.yaml").read_text())
    for action in ("sync", "get", "diff", "delete"):
        rec = Recorder()
        minikube.run_plan(minikube.argo_plan(action), rec)
        assert root["metadata"]["name"] in rec.steps[-1].argv, action
    rec = Recorder()
    minikube.run_plan(minikube.argo_plan("apply", "https://git.example/fork.git", secret_stream="s", root_app="r"), rec)
    assert rec.steps[-1].argv[-2:] == ("-f", "-") and rec.steps[-1].stdin == "r"
    with pytest.raises(ValueError, match="apply, sync, get, diff or delete"):
        minikube.argo_plan("explode")


def test_down_uninstalls_then_stops_the_cluster_and_deletes_only_when_asked():
    rec = Recorder()
    minikube.run_plan(minikube.down_plan(delete=minikube.down_options([])), rec)
    assert rec.commands()[0].startswith("helm uninstall mlops") and rec.steps[0].optional
    assert rec.commands()[-1] == "minikube -p mlops stop"
    rec = Recorder()
    minikube.run_plan(minikube.down_plan(delete=minikube.down_options(["--delete"])), rec)
    assert rec.commands()[-1] == "minikube -p mlops delete"


def test_check_predict_retries_a_bounded_number_of_times():
    answers = iter([OSError("refused"), OSError("refused")])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"prediction": 1.5}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/predict"
    try:
        import urllib.request

        def flaky(u, timeout):
            err = next(answers, None)
            if err:
                raise err
            return urllib.request.urlopen(u, timeout=timeout)

        assert minikube.check_predict(url, attempts=3, delay=0.01, opener=flaky) == {"prediction": 1.5}
    finally:
        server.shutdown()
    with pytest.raises(RuntimeError, match="did not answer after 2 attempts"):
        minikube.check_predict("http://127.0.0.1:9/predict", attempts=2, delay=0.01)


def test_deploy_arguments_are_parsed_in_any_order():
    opts = minikube.deploy_options(["--set", "pipeline.rows=5000", "--host-path", "--set", "a.b=c"], "abc",
                                   git_commit="abc")
    assert opts.host_path and opts.image_tag == "abc" and opts.git_commit == "abc"
    assert opts.helm_set == ["pipeline.rows=5000", "a.b=c"]
    assert minikube.deploy_options([], "dev").host_path is False  # a PVC unless asked


@pytest.mark.parametrize("argv", [["--set"], ["--host-path", "--sett", "a=b"], ["--pvc"]])
def test_bad_deploy_arguments_say_what_is_wrong_in_one_line(argv):
    with pytest.raises(minikube.UsageError) as err:
        minikube.deploy_options(argv, "dev")
    assert "nox -s deploy_minikube" in str(err.value) and "\n" not in str(err.value)


def test_repo_url_given_last_without_a_value_is_a_clear_error():
    assert minikube.argo_repo_url(["--repo-url", "https://git.example/f.git"]) == "https://git.example/f.git"
    assert minikube.argo_repo_url([], "https://from.env/f.git") == "https://from.env/f.git"
    with pytest.raises(minikube.UsageError, match="--repo-url: expected one argument"):
        minikube.argo_repo_url(["--repo-url"])

"""The minikube and Argo CD walkthroughs as command plans, run by the nox sessions.

Each plan is a list of steps (commands, or checks that read a command's output);
``run_plan`` executes them with a runner. The nox sessions pass a runner that runs
them for real; the tests pass a recording runner, since no cluster can run on the
development machines or in CI.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = "helm/shared-volume"
NAMESPACE = "mlops"
RELEASE = "mlops"
FULLNAME = f"{RELEASE}-shared-volume"
IMAGE_REPOSITORY = "mlops-shared-volume"

TOOLS = {
    "docker": "install Docker Engine: https://docs.docker.com/engine/install/ (Debian: apt-get install docker.io)",
    "minikube": "install minikube: https://minikube.sigs.k8s.io/docs/start/",
    "kubectl": "install kubectl: https://kubernetes.io/docs/tasks/tools/ (or use `minikube kubectl --`)",
    "helm": "install Helm 3.8+ or 4: https://helm.sh/docs/intro/install/",
}
ARGO_TOOLS = {**TOOLS, "argocd": "install the Argo CD CLI: https://argo-cd.readthedocs.io/en/stable/cli_installation/"}


class PreflightError(RuntimeError):
    pass


def preflight(tools: dict[str, str], which: Callable[[str], str | None] = shutil.which) -> None:
    """Name every missing tool with how to install it, in one error."""
    missing = [f"- {name}: not found; {hint}" for name, hint in tools.items() if which(name) is None]
    if missing:
        raise PreflightError("missing tools for this session:\n" + "\n".join(missing))


@dataclass(frozen=True)
class Step:
    """One command of a plan; ``background`` steps run while the next ones do."""

    argv: tuple[str, ...]
    why: str
    background: bool = False
    optional: bool = False


@dataclass
class DeployOptions:
    image_tag: str
    profile: str = "mlops"
    namespace: str = NAMESPACE
    host_path: bool = True
    local_port: int = 8000
    timeout: str = "900s"
    helm_set: list[str] = field(default_factory=list)


class UsageError(ValueError):
    """Arguments a session cannot use; the message says what it expects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line for the session to show, not argparse's exit
        raise UsageError(f"{self.prog}: {message}")


def deploy_options(argv: Sequence[str], image_tag: str, git_commit: str = "") -> DeployOptions:
    """``nox -s deploy_minikube -- [--pvc] [--set key=value ...]`` as options."""
    parser = _Parser(prog="nox -s deploy_minikube --", add_help=False)
    parser.add_argument("--pvc", action="store_true", help="a PersistentVolumeClaim instead of a hostPath")
    parser.add_argument("--set", dest="helm_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a chart value, as helm --set takes it (repeatable)")
    args = parser.parse_args(list(argv))
    helm_set = list(args.helm_set) + ([f"pipeline.gitCommit={git_commit}"] if git_commit else [])
    return DeployOptions(image_tag=image_tag, host_path=not args.pvc, helm_set=helm_set)


def argo_repo_url(argv: Sequence[str], default: str | None = None) -> str | None:
    """``nox -s argo_* -- [--repo-url URL]``: the Git repository Argo CD reads."""
    parser = _Parser(prog="nox -s argo_apply --", add_help=False)
    parser.add_argument("--repo-url", default=default, metavar="URL")
    return parser.parse_args(list(argv)).repo_url


def deploy_plan(opts: DeployOptions) -> list[Step]:
    """minikube start, build, load, helm upgrade --install, wait, port-forward."""
    image = f"{IMAGE_REPOSITORY}:{opts.image_tag}"
    mk = ("minikube", "-p", opts.profile)
    kubectl = ("kubectl", "--context", opts.profile, "-n", opts.namespace)
    values = ["--values", f"{CHART}/values.yaml"]
    if opts.host_path:
        values += ["--values", f"{CHART}/values-minikube.yaml"]
    sets = ["--set", f"image.repository={IMAGE_REPOSITORY}", "--set", f"image.tag={opts.image_tag}"]
    for item in opts.helm_set:
        sets += ["--set", item]
    return [
        Step((*mk, "start", "--cpus=2", "--memory=6g"), "start (or reuse) the minikube cluster"),
        Step(("bash", "scripts/build_wheelhouse.sh"), "wheels for the image, built on the host"),
        Step(("docker", "build", "-t", image, "."), "the one pipeline image"),
        Step((*mk, "image", "load", image), "copy the image into minikube (no registry needed)"),
        Step(("helm", "upgrade", "--install", RELEASE, CHART, "--namespace", opts.namespace,
              "--create-namespace", "--kube-context", opts.profile, *values, *sets),
             "install or upgrade the chart"),
        Step((*kubectl, "wait", "--for=condition=complete", "job", "-l",
              f"app.kubernetes.io/instance={RELEASE},mlops/role=stage", f"--timeout={opts.timeout}"),
             "wait for ingest, features, feast, train and promote"),
        Step((*kubectl, "rollout", "status", f"deployment/{FULLNAME}-serve", f"--timeout={opts.timeout}"),
             "wait for the server to be ready"),
        Step((*kubectl, "port-forward", f"svc/{FULLNAME}-serve", f"{opts.local_port}:8000"),
             "reach /predict on 127.0.0.1", background=True),
    ]


def down_plan(profile: str = "mlops", namespace: str = NAMESPACE) -> list[Step]:
    return [
        Step(("helm", "uninstall", RELEASE, "--namespace", namespace, "--kube-context", profile),
             "remove the release (the PVC is kept: helm.sh/resource-policy: keep)", optional=True),
        Step(("minikube", "-p", profile, "delete"), "delete the minikube cluster"),
    ]


def argo_plan(action: str, repo_url: str | None = None, app: str = "mlops-root",
              profile: str = "mlops") -> list[Step]:
    """The original blueprint's Makefile helpers: argo-apply, argo-sync, argo-get, argo-delete."""
    kubectl = ("kubectl", "--context", profile)
    if action == "apply":
        return [
            Step((*kubectl, "create", "namespace", NAMESPACE), "the app's namespace", optional=True),
            Step((*kubectl, "-n", NAMESPACE, "create", "secret", "generic", f"{RELEASE}-redis",
                  f"--from-literal=redis-password={secrets.token_hex(24)}"),
                 "the Redis password, made once outside Git", optional=True),
            Step((*kubectl, "apply", "-n", "argocd", "-f", "-"),
                 f"the root app, repoURL={repo_url}"),
        ]
    if action == "sync":
        return [Step(("argocd", "app", "sync", app, "--core"), "sync the root app now")]
    if action == "get":
        return [Step(("argocd", "app", "get", app, "--core"), "show the root app and its children")]
    if action == "delete":
        return [Step((*kubectl, "delete", "-n", "argocd", "application", app, "--wait=true"),
                     "delete the root app; the finalizers delete the children and their resources")]
    raise ValueError(f"unknown argo action {action!r}; use apply, sync, get or delete")


def root_application(repo_url: str, revision: str = "main") -> str:
    """argo/application.yaml with the repository URL set, ready for `kubectl apply -f -`."""
    import yaml

    app = yaml.safe_load((ROOT / "argo" / "application.yaml").read_text())
    app["spec"]["source"]["repoURL"] = repo_url
    app["spec"]["source"]["targetRevision"] = revision
    app["spec"]["source"]["helm"]["valuesObject"].update({"repoURL": repo_url, "targetRevision": revision})
    return yaml.safe_dump(app, sort_keys=False)


Runner = Callable[[Step], None]


def run_plan(plan: Sequence[Step], runner: Runner) -> None:
    for step in plan:
        runner(step)


def check_predict(url: str, attempts: int = 30, delay: float = 2.0,
                  opener: Callable = urllib.request.urlopen) -> dict:
    """GET /predict until it answers (bounded), as the blueprint's validation step does."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            with opener(url, timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
            time.sleep(delay)
    raise RuntimeError(f"{url} did not answer after {attempts} attempts: {last}")

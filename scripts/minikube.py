"""The minikube and Argo CD walkthroughs as command plans, run by the nox sessions.

Each plan is a list of steps (commands, or checks that read a command's output);
``run_plan`` executes them with a runner. The nox sessions pass a runner that runs
them for real; the tests pass a recording runner, since no cluster can run on the
development machines or in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shutil
import subprocess
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
    """One command of a plan.

    ``background`` steps run while the next ones do; an ``optional`` step may fail;
    ``stdin`` is fed to the command (secrets and manifests go there, never into argv);
    ``hint`` is the one line said when the command fails; a step with ``poll`` is run
    again until ``poll(stdout)`` says "complete" or "failed" (bounded by ``poll_seconds``),
    and ``on_failure`` are diagnostics (logs, events) run before the plan stops.
    """

    argv: tuple[str, ...]
    why: str
    background: bool = False
    optional: bool = False
    stdin: str | None = field(default=None, repr=False)
    hint: str = ""
    poll: Callable[[str], str | None] | None = field(default=None, compare=False)
    poll_seconds: float = 900.0
    on_failure: tuple["Step", ...] = ()


class StepFailed(RuntimeError):
    """A plan step failed; the message is the one line to show."""


# The stage Jobs the chart renders (one template each): what `stage` accepts and the waits count.
STAGES = tuple(sorted(p.stem.removeprefix("job-") for p in (ROOT / CHART / "templates").glob("job-*.yaml")))
STAGE_SELECTOR = f"app.kubernetes.io/instance={RELEASE},mlops/role=stage"
# The pods' uid and gid (podSecurityContext in values.yaml): the owner of a hostPath folder.
POD_UID = 10001
ARGOCD_INSTALL = ("install Argo CD first: kubectl --context {ctx} create namespace argocd && kubectl --context {ctx} "
                  "apply -n argocd --server-side -f https://raw.githubusercontent.com/argoproj/argo-cd/stable/"
                  "manifests/install.yaml")


@dataclass
class DeployOptions:
    image_tag: str
    profile: str = "mlops"
    namespace: str = NAMESPACE
    host_path: bool = False
    local_port: int = 8000
    timeout: str = "900s"
    helm_set: list[str] = field(default_factory=list)
    git_commit: str = ""


class UsageError(ValueError):
    """Arguments a session cannot use; the message says what it expects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line for the session to show, not argparse's exit
        raise UsageError(f"{self.prog}: {message}")


def deploy_options(argv: Sequence[str], image_tag: str, git_commit: str = "") -> DeployOptions:
    """``nox -s deploy_minikube -- [--host-path] [--set key=value ...]`` as options."""
    parser = _Parser(prog="nox -s deploy_minikube --", add_help=False)
    parser.add_argument("--host-path", action="store_true",
                        help="the node folder /tmp/mlops-shared instead of a PersistentVolumeClaim")
    parser.add_argument("--set", dest="helm_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a chart value, as helm --set takes it (repeatable)")
    args = parser.parse_args(list(argv))
    return DeployOptions(image_tag=image_tag, host_path=args.host_path, helm_set=list(args.helm_set),
                         git_commit=git_commit)


def down_options(argv: Sequence[str]) -> bool:
    """``nox -s minikube_down -- [--delete]``: True to delete the cluster, not stop it."""
    parser = _Parser(prog="nox -s minikube_down --", add_help=False)
    parser.add_argument("--delete", action="store_true")
    return parser.parse_args(list(argv)).delete


def stage_name(argv: Sequence[str]) -> str:
    """``nox -s stage -- <name>``: one of the chart's stage Jobs."""
    parser = _Parser(prog="nox -s stage --", add_help=False)
    parser.add_argument("name", choices=STAGES)
    return parser.parse_args(list(argv)).name


def argo_repo_url(argv: Sequence[str], default: str | None = None) -> str | None:
    """``nox -s argo_* -- [--repo-url URL]``: the Git repository Argo CD reads."""
    parser = _Parser(prog="nox -s argo_apply --", add_help=False)
    parser.add_argument("--repo-url", default=default, metavar="URL")
    return parser.parse_args(list(argv)).repo_url


def image_tag(commit: str, dirty: str = "") -> str:
    """The image tag of a tree: its commit, or the commit plus a hash of the uncommitted
    changes (``dirty``: their diff), so a changed tree never reuses its commit's tag."""
    if not commit:
        return "dev"
    if dirty:
        return f"{commit}-dirty-{hashlib.sha256(dirty.encode()).hexdigest()[:8]}"
    return commit


def git_image_tag(run: Callable = subprocess.run) -> tuple[str, str]:
    """(image tag, commit) of the working tree, read with git; ("dev", "") without git."""
    def git(*args: str) -> str:
        proc = run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return proc.stdout if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD").strip()
    status = git("status", "--porcelain")
    dirty = (status + git("diff", "HEAD")) if status.strip() else ""
    return image_tag(commit, dirty), commit


def chart_value(path: str, helm_set: Sequence[str] = (), files: Sequence[str] = ("values.yaml",)):
    """A chart value as the install will see it: the values files, then any --set."""
    import yaml

    value = None
    for name in files:
        node = yaml.safe_load((ROOT / CHART / name).read_text()) or {}
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            value = node
    for item in helm_set:
        key, _, raw = item.partition("=")
        if key == path:
            value = raw
    return value


def jobs_state(text: str, expected: int) -> str | None:
    """`kubectl get jobs -o json` read: "failed" as soon as one Job failed, "complete" once
    ``expected`` Jobs all completed, None while they run (``kubectl wait`` cannot wait for
    either condition: waiting for Complete alone never notices a Failed Job)."""
    items = json.loads(text or "{}").get("items", [])

    def conditions(job: dict) -> set[str]:
        return {c.get("type") for c in job.get("status", {}).get("conditions") or [] if c.get("status") == "True"}

    if any({"Failed", "FailureTarget"} & conditions(j) for j in items):
        return "failed"
    if len(items) >= expected and all("Complete" in conditions(j) for j in items):
        return "complete"
    return None


def wait_jobs(kubectl: tuple[str, ...], selector: str, expected: int, seconds: float, what: str) -> Step:
    """Wait for Complete or Failed; on failure print the Jobs' logs and events."""
    return Step(
        (*kubectl, "get", "jobs", "-l", selector, "-o", "json"),
        f"wait for {what} (Complete or Failed)",
        poll=lambda out: jobs_state(out, expected), poll_seconds=seconds,
        hint=f"{what} failed or did not finish: the Jobs' logs and events are above",
        on_failure=(
            Step((*kubectl, "logs", "-l", selector, "--all-containers", "--prefix", "--tail=60"),
                 "the failed Jobs' logs", optional=True),
            Step((*kubectl, "describe", "jobs", "-l", selector), "the Jobs and their events", optional=True),
            Step((*kubectl, "get", "events", "--sort-by=.lastTimestamp"), "recent events", optional=True),
        ))


def _seconds(timeout: str) -> float:
    return float(timeout.rstrip("s"))


def build_plan(tag: str, profile: str = "mlops") -> list[Step]:
    """The one build-and-load path (the blueprint's `make build-images`): wheelhouse, image,
    `minikube image load`; deploy_minikube and argo_apply both run it."""
    image = f"{IMAGE_REPOSITORY}:{tag}"
    return [
        Step(("bash", "scripts/build_wheelhouse.sh"), "wheels for the image, built on the host"),
        Step(("docker", "build", "-t", image, "."), "the one pipeline image"),
        Step(("minikube", "-p", profile, "image", "load", image), "copy the image into minikube (no registry needed)",
             hint=f"minikube profile {profile} is not running: start it (nox -s deploy_minikube does)"),
    ]


def namespace_plan(kubectl_ctx: tuple[str, ...], namespace: str, restricted: bool) -> list[Step]:
    """The namespace, labelled for Pod Security: `restricted` enforced with a PVC; a hostPath
    volume is outside every profile but `privileged`, so then only a warning."""
    labels = (("pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted")
              if restricted else
              ("pod-security.kubernetes.io/enforce-", "pod-security.kubernetes.io/warn=restricted"))
    return [
        Step((*kubectl_ctx, "create", "namespace", namespace), "the app's namespace (kept if it exists)",
             optional=True),
        Step((*kubectl_ctx, "label", "namespace", namespace, "--overwrite", *labels),
             "Pod Security labels on the namespace"),
    ]


def deploy_plan(opts: DeployOptions) -> list[Step]:
    """minikube start, metrics-server, build, load, namespace, helm upgrade --install, wait, port-forward."""
    mk = ("minikube", "-p", opts.profile)
    kubectl_ctx = ("kubectl", "--context", opts.profile)
    kubectl = (*kubectl_ctx, "-n", opts.namespace)
    values = ["--values", f"{CHART}/values.yaml"]
    if opts.host_path:
        values += ["--values", f"{CHART}/values-minikube.yaml"]
    # --set-string: an all-digit short commit would otherwise be read as a number
    sets = ["--set", f"image.repository={IMAGE_REPOSITORY}", "--set-string", f"image.tag={opts.image_tag}"]
    if opts.git_commit:
        sets += ["--set-string", f"pipeline.gitCommit={opts.git_commit}"]
    for item in opts.helm_set:
        sets += ["--set", item]
    files = ["values.yaml"] + (["values-minikube.yaml"] if opts.host_path else [])
    serve_port = chart_value("serve.port", opts.helm_set, files)
    plan = [
        Step((*mk, "start", "--cpus=2", "--memory=6g"), "start (or reuse) the minikube cluster"),
        Step((*mk, "addons", "enable", "metrics-server"), "CPU metrics for the server's HorizontalPodAutoscaler"),
        *build_plan(opts.image_tag, opts.profile),
    ]
    if opts.host_path:
        folder = chart_value("sharedVolume.hostPath", opts.helm_set, files)
        # fsGroup does not apply to hostPath: the folder must exist, owned by the pods' uid
        plan.append(Step((*mk, "ssh", "--", "sudo", "install", "-d", "-o", str(POD_UID), "-g", str(POD_UID),
                          "-m", "0770", folder), f"the node folder {folder}, writable by the pods (uid {POD_UID})"))
    plan += [
        *namespace_plan(kubectl_ctx, opts.namespace, restricted=not opts.host_path),
        Step(("helm", "upgrade", "--install", RELEASE, CHART, "--namespace", opts.namespace,
              "--kube-context", opts.profile, *values, *sets), "install or upgrade the chart"),
        wait_jobs(kubectl, STAGE_SELECTOR, len(STAGES), _seconds(opts.timeout),
                  "the stage Jobs (" + ", ".join(STAGES) + ")"),
        Step((*kubectl, "rollout", "status", f"deployment/{FULLNAME}-serve", f"--timeout={opts.timeout}"),
             "wait for the server to be ready"),
        Step((*kubectl, "port-forward", f"svc/{FULLNAME}-serve", f"{opts.local_port}:{serve_port}"),
             "reach /predict on 127.0.0.1", background=True),
    ]
    return plan


def job_in_manifest(manifest: str, stage: str) -> dict:
    """The stage's Job as the release rendered it (`helm get manifest`)."""
    import yaml

    for doc in yaml.safe_load_all(manifest):
        if doc and doc.get("kind") == "Job" and \
                doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == stage:
            return doc
    raise StepFailed(f"release {RELEASE} has no Job for stage {stage}: install it first (nox -s deploy_minikube)")


def manifest_step(profile: str = "mlops", namespace: str = NAMESPACE) -> Step:
    return Step(("helm", "get", "manifest", RELEASE, "--namespace", namespace, "--kube-context", profile),
                "the release's rendered objects",
                hint=f"no release {RELEASE} in namespace {namespace}: run nox -s deploy_minikube first")


def stage_plan(stage: str, manifest: str, profile: str = "mlops", namespace: str = NAMESPACE,
               timeout: str = "900s") -> list[Step]:
    """Re-run one stage (the blueprint's `make train`): delete its Job, create it again from
    the release's own manifest, wait for Complete or Failed, print its logs on failure."""
    import yaml

    job = job_in_manifest(manifest, stage)
    name = job["metadata"]["name"]
    kubectl = ("kubectl", "--context", profile, "-n", namespace)
    return [
        Step((*kubectl, "delete", "job", name, "--ignore-not-found", "--wait=true"), f"delete Job {name}"),
        Step((*kubectl, "create", "-f", "-"), f"create Job {name} again", stdin=yaml.safe_dump(job)),
        wait_jobs(kubectl, f"job-name={name}", 1, _seconds(timeout), f"Job {name}"),
        Step((*kubectl, "logs", f"job/{name}", "--tail=40"), f"the last lines of {stage}'s log", optional=True),
    ]


def down_plan(profile: str = "mlops", namespace: str = NAMESPACE, delete: bool = False) -> list[Step]:
    """Uninstall, then stop the cluster (as the blueprint does); ``delete`` deletes it."""
    return [
        Step(("helm", "uninstall", RELEASE, "--namespace", namespace, "--kube-context", profile, "--wait"),
             "remove the release (the PVCs are kept: helm.sh/resource-policy: keep; a reinstall of "
             f"release {RELEASE} adopts them)", optional=True),
        Step(("minikube", "-p", profile, "delete" if delete else "stop"),
             "delete the minikube cluster and everything on it" if delete else
             "stop the minikube cluster (`-- --delete` deletes it)"),
    ]


def secret_manifests(namespace: str, passwords: dict[str, dict[str, str]]) -> str:
    """Secrets as one YAML stream for `kubectl create -f -` (stdin: nothing in argv or the log)."""
    import yaml

    docs = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": name, "namespace": namespace}, "stringData": data}
            for name, data in passwords.items()]
    return yaml.safe_dump_all(docs, sort_keys=False)


def argo_secrets(namespace: str = NAMESPACE, token: Callable[[int], str] = secrets.token_hex) -> str:
    """The Redis and MLflow secrets values-argocd.yaml names, made once outside Git."""
    return secret_manifests(namespace, {
        f"{RELEASE}-redis": {"redis-password": token(24)},
        f"{RELEASE}-mlflow": {"mlflow-password": token(24), "flask-secret-key": token(32)},
    })


def argo_context(profile: str) -> str:
    """A kube context for `argocd --core`: the profile's cluster and user, namespace argocd
    (argocd --core finds Argo CD in the context's namespace)."""
    return f"{profile}-argocd"


def argo_plan(action: str, repo_url: str | None = None, app: str = "mlops-root",
              profile: str = "mlops", image_tag: str = "dev", root_app: str = "",
              secret_stream: str = "") -> list[Step]:
    """The original blueprint's Makefile helpers: argo-apply, argo-sync, argo-get, argo-diff, argo-delete.
    Every step names the same cluster: kubectl --context PROFILE, argocd --kube-context PROFILE-argocd."""
    kubectl = ("kubectl", "--context", profile)
    argocd = ("argocd", "--core", "--kube-context", argo_context(profile))
    hint = ARGOCD_INSTALL.format(ctx=profile)
    if action == "apply":
        return [
            Step((*kubectl, "get", "namespace", "argocd"), "Argo CD's namespace", hint=hint),
            Step((*kubectl, "get", "crd", "applications.argoproj.io"), "Argo CD's Application CRD", hint=hint),
            *build_plan(image_tag, profile),
            *namespace_plan(kubectl, NAMESPACE, restricted=True),
            Step((*kubectl, "create", "-f", "-"), "the Redis and MLflow secrets, made once outside Git "
                 "(kept if they exist)", optional=True, stdin=secret_stream),
            Step((*kubectl, "apply", "-n", "argocd", "-f", "-"),
                 f"the root app, repoURL={repo_url}, image tag {image_tag}", stdin=root_app),
        ]
    context = Step(("kubectl", "config", "set-context", argo_context(profile), f"--cluster={profile}",
                    f"--user={profile}", "--namespace=argocd"), "a kube context for argocd --core")
    if action == "sync":
        return [context, Step((*argocd, "app", "sync", app), "sync the root app now")]
    if action == "get":
        return [context, Step((*argocd, "app", "get", app), "show the root app and its children")]
    if action == "diff":
        # argocd app diff exits 1 when there is a difference: shown, not an error
        return [context, Step((*argocd, "app", "diff", app), "what a sync would change", optional=True)]
    if action == "delete":
        return [Step((*kubectl, "delete", "-n", "argocd", "application", app, "--wait=true"),
                     "delete the root app; the finalizers delete the children and their resources")]
    raise ValueError(f"unknown argo action {action!r}; use apply, sync, get, diff or delete")


def root_application(repo_url: str, revision: str = "main", image_tag: str | None = None) -> str:
    """argo/application.yaml with the repository URL (and the image tag just loaded) set,
    ready for `kubectl apply -f -`."""
    import yaml

    app = yaml.safe_load((ROOT / "argo" / "application.yaml").read_text())
    app["spec"]["source"]["repoURL"] = repo_url
    app["spec"]["source"]["targetRevision"] = revision
    values = app["spec"]["source"]["helm"]["valuesObject"]
    values.update({"repoURL": repo_url, "targetRevision": revision})
    if image_tag:
        values["imageTag"] = image_tag
    return yaml.safe_dump(app, sort_keys=False)


Runner = Callable[[Step], str | None]


def run_plan(plan: Sequence[Step], runner: Runner, *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic, interval: float = 5.0) -> None:
    """Run each step with ``runner`` (which returns the step's output and raises StepFailed
    when it fails); poll steps until settled, bounded in time; on a failure run the step's
    diagnostics, then raise StepFailed with its hint."""
    for step in plan:
        try:
            if step.poll is None:
                runner(step)
                continue
            deadline = clock() + step.poll_seconds
            while True:
                state = step.poll(runner(step) or "")
                if state == "complete":
                    break
                if state == "failed":
                    raise StepFailed(step.hint or f"{' '.join(step.argv)}: failed")
                if clock() >= deadline:
                    raise StepFailed(f"{step.why}: not settled after {step.poll_seconds:.0f}s")
                sleep(interval)
        except StepFailed as exc:
            for diagnostic in step.on_failure:
                try:
                    runner(diagnostic)
                except StepFailed:
                    pass
            raise StepFailed(step.hint or str(exc)) from None


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

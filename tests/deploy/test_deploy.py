"""deploy/: the Dockerfile, docker-compose files, Redis configuration and Kubernetes manifests, checked
against the code they deploy.

No Docker engine or Kubernetes cluster runs here, so no image is built, no container started and no
manifest applied. What is checked instead: every YAML file parses; every ``INCO_*`` variable is a field
of :class:`server.settings.Settings`; every ``inco`` and ``ray`` command line names real subcommands
and options (read from the click trees of ``cli.main.app`` and Ray's CLI); probes and health checks hit
routes the FastAPI app serves; images are the one the Dockerfile builds; the files the Dockerfile copies
build a wheel with the ``inco`` console script; and ``redis-server`` really loads deploy/redis/redis.conf
with append-only persistence on.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from packaging.specifiers import SpecifierSet
from redis import Redis

from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXPECTED_SERVICES = {"api", "worker", "redis", "postgres", "ray-head"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (``!reset``, ``!override``), which plain YAML does not know."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)
    ),
)


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=ComposeLoader) if doc is not None]


# -- what the code defines ------------------------------------------------------------------------
def settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def unknown_inco_vars(names: set[str]) -> set[str]:
    """The ``INCO_*`` names among ``names`` that no Settings field reads (a typo is silently ignored)."""
    return {n for n in names if n.startswith("INCO_")} - settings_env_names()


@pytest.fixture(scope="module")
def inco_cli() -> Any:
    from cli.main import app

    return typer.main.get_command(app)


@pytest.fixture(scope="module")
def ray_cli() -> Any:
    from ray.scripts.scripts import cli

    return cli


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The paths the FastAPI app serves (built, not started: no database or Redis is contacted)."""
    from server.api.app import create_app

    home = tmp_path_factory.mktemp("deploy-home")
    app = create_app(Settings(home=home, database_url=f"sqlite:///{home / 'inco.db'}"), run_migrations=False)
    return {route.path for route in app.routes if hasattr(route, "path")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_docs(path)]


# -- command lines ----------------------------------------------------------------------------------
def command_lines(command: list[str]) -> Iterator[list[str]]:
    """The programs a container command runs: itself, or each ``&&``/``;`` step of an ``sh -c`` script."""
    if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"]):
        for step in re.split(r"&&|\|\||;", command[2]):
            words = shlex.split(step)
            if words and words[0] == "exec":
                words = words[1:]
            if words:
                yield words
    else:
        yield command


def check_cli(group: Any, words: list[str]) -> str:
    """Walk ``words`` down a click tree; raise on an unknown subcommand or option. Returns the path.
    (Typer vendors its own click, so groups are told by their ``commands``, not by class.)"""
    command = group
    path = [words[0]]
    rest = words[1:]
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            raise AssertionError(f"{' '.join(path)} has no subcommand {rest[0]!r} (has {sorted(command.commands)})")
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in rest:
        if word.startswith("--") and word.split("=", 1)[0] not in options:
            raise AssertionError(f"{' '.join(path)} has no option {word.split('=', 1)[0]!r}")
    return " ".join(path)


def check_command(command: list[str], inco: Any, ray: Any) -> list[str]:
    checked = []
    for words in command_lines(command):
        assert words[0] in ("inco", "ray"), f"unexpected program {words[0]!r} in {command}"
        checked.append(check_cli(inco if words[0] == "inco" else ray, words))
    return checked


def test_command_check_rejects_what_does_not_exist(inco_cli: Any, ray_cli: Any) -> None:
    assert check_command(["inco", "serve", "--host", "0.0.0.0"], inco_cli, ray_cli) == ["inco serve"]
    with pytest.raises(AssertionError, match="no subcommand 'server'"):
        check_command(["inco", "server"], inco_cli, ray_cli)
    with pytest.raises(AssertionError, match="no option '--bind'"):
        check_command(["sh", "-c", "ray start --head && exec inco serve --bind x"], inco_cli, ray_cli)
    with pytest.raises(AssertionError, match="no option '--num-gpu'"):
        check_command(["ray", "start", "--num-gpu=1"], inco_cli, ray_cli)


# -- every file -----------------------------------------------------------------------------------
def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert load_docs(path), f"{path} holds no document"


def test_unknown_inco_variables_are_caught() -> None:
    assert unknown_inco_vars({"INCO_REDIS_URL", "INCO_DATABASE_URL", "RAY_ADDRESS"}) == set()
    assert unknown_inco_vars({"INCO_REDIS_URL", "INCO_REDIS_URI"}) == {"INCO_REDIS_URI"}


# -- docker-compose -------------------------------------------------------------------------------
def inco_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= EXPECTED_SERVICES
    assert set(inco_services(compose)) == {"api", "worker", "ray-head"}


def test_compose_worker_reserves_every_gpu(compose: dict[str, Any]) -> None:
    (device,) = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    (cpu,) = load_docs(DEPLOY / "docker-compose.cpu.yml")
    assert cpu["services"]["worker"]["deploy"] is None  # `!reset`: the CPU override drops the reservation


def test_compose_inco_variables_are_settings(compose: dict[str, Any]) -> None:
    names: set[str] = set()
    for svc in compose["services"].values():
        names |= set(svc.get("environment", {}))
    assert {"INCO_DATABASE_URL", "INCO_REDIS_URL", "INCO_ARTIFACTS", "INCO_HOME"} <= names
    assert unknown_inco_vars(names) == set()


def test_compose_commands_are_real(compose: dict[str, Any], inco_cli: Any, ray_cli: Any) -> None:
    ran = {name: check_command(svc["command"], inco_cli, ray_cli) for name, svc in inco_services(compose).items()}
    assert ran == {"api": ["inco serve"], "worker": ["ray start", "inco worker"], "ray-head": ["ray start"]}
    assert "--head" in compose["services"]["ray-head"]["command"]
    assert "0.0.0.0" in compose["services"]["api"]["command"]  # reachable from outside the container


def test_compose_ray_uses_token_auth_everywhere(compose: dict[str, Any]) -> None:
    for name in ("worker", "ray-head"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")
    assert compose["services"]["worker"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert "--port=6379" in compose["services"]["ray-head"]["command"]


def test_compose_secrets_come_from_the_env_file(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    assert "${POSTGRES_PASSWORD" in env["INCO_DATABASE_URL"]
    assert "${REDIS_PASSWORD" in env["INCO_REDIS_URL"]
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    text = "\n".join(p.read_text() for p in DEPLOY.glob("docker-compose*.yml"))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    )
    assert used <= set(example), f"not in deploy/.env.example: {sorted(used - set(example))}"
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "RAY_AUTH_TOKEN"):
        assert example[secret] == "", f"{secret} must be empty in .env.example"
    assert not {v for v in used if v.startswith("INCO_")}  # settings are set per service, not interpolated


def test_compose_shares_artifacts_between_worker_and_ray_head(compose: dict[str, Any]) -> None:
    target = compose["services"]["api"]["environment"]["INCO_ARTIFACTS"]
    mounts = {name: set(compose["services"][name]["volumes"]) for name in ("worker", "ray-head")}
    assert all(f"artifacts:{target}" in m for m in mounts.values()), mounts
    assert "artifacts" in compose["volumes"]


def test_compose_redis_runs_the_deploy_config(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    source, target, _ = redis["volumes"][0].split(":")
    assert (COMPOSE.parent / source).resolve() == REDIS_CONF
    assert redis["command"][:2] == ["redis-server", target]
    assert redis["command"][redis["command"].index("--dir") + 1] == "/data"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "pg_isready" in compose["services"]["postgres"]["healthcheck"]["test"]


def test_compose_api_healthcheck_hits_a_route(compose: dict[str, Any], app_paths: set[str]) -> None:
    test = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    (path,) = re.findall(r"http://127\.0\.0\.1:8000(/[a-z]+)", test)
    assert path == "/healthz" and path in app_paths


# -- the Dockerfile -------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else f"stage{len(stages)}"
            stages[current] = []
        stages[current].append((instruction, args.strip()))
    return stages


def test_dockerfile_runtime_runs_the_console_script_as_non_root(inco_cli: Any, ray_cli: Any) -> None:
    stages = dockerfile_stages()
    runtime = dict(stages["runtime"])  # the last of each instruction wins, as in Docker
    user = runtime["USER"].split(":")[0]
    assert user not in ("0", "root") and int(user) >= 1000
    assert any(i == "RUN" and f"--uid {user}" in a for i, a in stages["runtime"])  # the user exists
    script = next(iter(PYPROJECT["project"]["scripts"]))
    cmd = yaml.safe_load(runtime["CMD"])
    assert cmd[0] == script == "inco"
    assert check_command(cmd, inco_cli, ray_cli) == ["inco serve"]
    assert yaml.safe_load(runtime["ENTRYPOINT"])[-1] == "--"  # tini, then the command
    assert PYPROJECT["project"]["scripts"][script] == "cli.main:app"


def test_dockerfile_installs_the_package_from_the_repo() -> None:
    stages = dockerfile_stages()
    build = stages["build"]
    copied = {src for i, a in build if i == "COPY" for src in shlex.split(a)[:-1]}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "README.md", *packages} <= copied
    assert any(i == "RUN" and "pip install ." in a for i, a in build)
    assert any(i == "RUN" and "torch==2.14.1" in a and "torchvision==0.29.1" in a for i, a in build)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stages["runtime"]
    args = {a.split("=")[0] for stages_ in stages.values() for i, a in stages_ if i == "ARG"}
    assert {"BASE", "TORCH_INDEX"} <= args


def test_dockerfile_inco_variables_are_settings() -> None:
    names = set(re.findall(r"\b(INCO_[A-Z_]+)=", DOCKERFILE.read_text()))
    assert {"INCO_HOME", "INCO_ARTIFACTS"} <= names
    assert unknown_inco_vars(names) == set()
    assert 'VOLUME ["/var/lib/inco"]' in DOCKERFILE.read_text() and "INCO_HOME=/var/lib/inco" in DOCKERFILE.read_text()


def test_dockerfile_healthcheck_hits_a_route(app_paths: set[str]) -> None:
    (check,) = [a for i, a in dockerfile_stages()["runtime"] if i == "HEALTHCHECK"]
    (path,) = re.findall(r"http://127\.0\.0\.1:8000(/[a-z]+)", check)
    assert path in app_paths


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line[:1] == "!"
    }
    copied = {src for i, a in dockerfile_stages()["build"] if i == "COPY" for src in shlex.split(a)[:-1]}
    assert copied <= kept, f"excluded from the build context: {sorted(copied - kept)}"


def test_the_files_the_dockerfile_copies_build_the_package(tmp_path: Path) -> None:
    """``pip install .`` in the image sees only what the build stage copies: build a wheel from just that."""
    context = tmp_path / "src"
    context.mkdir()
    for i, args in dockerfile_stages()["build"]:
        if i == "COPY":
            *sources, dest = shlex.split(args)
            for src in sources:
                target = context / (src if dest in ("./", ".") else dest.removeprefix("./"))
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy(REPO / src, target)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("inco-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "inco = cli.main:app" in entry_points
    assert "server/store/migrations/env.py" in names  # migrations run when the API starts
    assert any(n.startswith("server/store/migrations/versions/0001") for n in names)
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == {"inco_core", "cli", "server", "worker"}


# -- image names ----------------------------------------------------------------------------------
def test_images_are_the_dockerfile_build(compose: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> None:
    version = PYPROJECT["project"]["version"]
    stages = dockerfile_stages()
    arg_names = {a.split("=")[0] for s in stages.values() for i, a in s if i == "ARG"}
    images = set()
    for svc in inco_services(compose).values():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages and set(build["args"]) <= arg_names
        images.add(svc["image"])
    (image,) = images  # one image for the API, the worker and the Ray head
    assert image.startswith(f"inco:${{IMAGE_TAG:-{version}}}-")
    k8s_images = {c["image"] for doc in k8s_docs for c in containers(doc)}
    inco_images = {i for i in k8s_images if i.split(":")[0] == "inco"}
    assert inco_images == {f"inco:{version}-cuda"}
    assert k8s_images - inco_images == {"redis:7.4", "postgres:17"}
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    (rewrite,) = kustomization["images"]
    assert rewrite["name"] == "inco" and rewrite["newTag"] == f"{version}-cuda"


# -- Redis ----------------------------------------------------------------------------------------
def redis_directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip()
    return out


def test_redis_conf_is_append_only_and_fsyncs_every_write() -> None:
    conf = redis_directives(REDIS_CONF.read_text())
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "always"
    assert "requirepass" not in conf  # the password is given at start-up, never stored here
    assert "dir" not in conf  # `dir` is applied while the file is read: --dir on the command line must win


def test_k8s_redis_config_is_the_deploy_file(k8s_docs: list[dict[str, Any]]) -> None:
    (cm,) = [d for d in k8s_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "redis-config"]
    assert cm["data"]["redis.conf"] == REDIS_CONF.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redis_server_loads_the_config(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt install redis-server): it must load deploy/redis/redis.conf")
    port = free_port()
    proc = subprocess.Popen(
        [binary, str(REDIS_CONF), "--port", str(port), "--dir", str(tmp_path), "--daemonize", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        for _ in range(100):
            if proc.poll() is not None:
                pytest.fail(f"redis-server refused the config: {proc.stdout.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                client.ping()
                break
            except Exception:
                time.sleep(0.1)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("dir") == {"dir": str(tmp_path)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.rpush("rq:queue:inco", "job-1")
        assert (tmp_path / "appendonlydir").is_dir()
        client.shutdown(save=False)
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


# -- Kubernetes -----------------------------------------------------------------------------------
def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in POD_KINDS:
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(doc) for c in pod.get("initContainers", []) + pod["containers"]]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_k8s_documents_are_named_and_listed(k8s_docs: list[dict[str, Any]]) -> None:
    for doc in k8s_docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == files
    kinds = {d["kind"] for d in k8s_docs}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service", "RayCluster"} <= kinds
    assert {"PersistentVolumeClaim"} <= kinds
    assert {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "StatefulSet"} == {"redis", "postgres"}
    assert {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "Deployment"} == {"inco-api", "inco-worker"}


def test_k8s_inco_variables_are_settings(k8s_docs: list[dict[str, Any]]) -> None:
    names = {env["name"] for doc in k8s_docs for c in containers(doc) for env in c.get("env", [])}
    for doc in k8s_docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "inco-config":
            names |= set(doc["data"])
    assert {"INCO_DATABASE_URL", "INCO_REDIS_URL", "INCO_ARTIFACTS"} <= names
    assert unknown_inco_vars(names) == set()


def test_k8s_references_resolve(k8s_docs: list[dict[str, Any]]) -> None:
    """Every Secret key, ConfigMap and claim a pod uses exists (the Secret in its example)."""
    (example,) = load_docs(K8S / "secrets.example.yaml")
    config_maps = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in k8s_docs:
        for c in containers(doc):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == example["metadata"]["name"] and ref["key"] in example["stringData"], ref
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
        for pod in pod_specs(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps


def test_k8s_every_container_runs_as_non_root(k8s_docs: list[dict[str, Any]]) -> None:
    seen = 0
    for doc in k8s_docs:
        for pod in pod_specs(doc):
            pod_ctx = pod.get("securityContext", {})
            for c in pod["containers"]:
                ctx = {**pod_ctx, **c.get("securityContext", {})}
                assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, (doc["metadata"]["name"], c)
                assert ctx.get("allowPrivilegeEscalation") is False
                assert c["resources"]["requests"].get("cpu") and c["resources"]["requests"].get("memory")
                seen += 1
    assert seen == 6  # api, worker, redis, postgres, ray head, ray gpu worker
    api = by_kind(k8s_docs, "Deployment", "inco-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["securityContext"]["readOnlyRootFilesystem"] is True


def test_k8s_api_probes_hit_routes(k8s_docs: list[dict[str, Any]], app_paths: set[str]) -> None:
    api = by_kind(k8s_docs, "Deployment", "inco-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["path"] in app_paths
        port = api[probe]["httpGet"]["port"]
        assert port in {p["name"] for p in api["ports"]} | {p["containerPort"] for p in api["ports"]}
    assert api["ports"][0]["containerPort"] == int(api["command"][api["command"].index("--port") + 1])


def test_k8s_commands_are_real(k8s_docs: list[dict[str, Any]], inco_cli: Any, ray_cli: Any) -> None:
    api = by_kind(k8s_docs, "Deployment", "inco-api")["spec"]["template"]["spec"]["containers"][0]
    worker = by_kind(k8s_docs, "Deployment", "inco-worker")["spec"]["template"]["spec"]["containers"][0]
    assert check_command(api["command"], inco_cli, ray_cli) == ["inco serve"]
    assert check_command(worker["command"], inco_cli, ray_cli) == ["ray start", "inco worker"]
    ray = by_kind(k8s_docs, "RayCluster", "inco-ray")["spec"]
    for params in [ray["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in ray["workerGroupSpecs"]]:
        check_command(["ray", "start", *(f"--{key}={value}" for key, value in params.items())], inco_cli, ray_cli)


def test_k8s_raycluster_has_a_gpu_group_and_the_worker_reaches_it(k8s_docs: list[dict[str, Any]]) -> None:
    cluster = by_kind(k8s_docs, "RayCluster", "inco-ray")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    ray_spec = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert spec["rayVersion"] in SpecifierSet(ray_spec.split("]", 1)[1])
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token authentication
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    worker = by_kind(k8s_docs, "Deployment", "inco-worker")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    assert env["RAY_ADDRESS"]["value"] == f"{cluster['metadata']['name']}-head-svc:{gcs_port}"
    for c in [worker, *containers(cluster)]:
        c_env = {e["name"]: e for e in c["env"]}
        assert c_env["RAY_AUTH_MODE"]["value"] == "token"
        assert c_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "ray-token"


def test_k8s_artifacts_are_shared_at_one_path(k8s_docs: list[dict[str, Any]]) -> None:
    config = by_kind(k8s_docs, "ConfigMap", "inco-config")["data"]
    claim = by_kind(k8s_docs, "PersistentVolumeClaim", "inco-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [by_kind(k8s_docs, "Deployment", "inco-worker"), by_kind(k8s_docs, "RayCluster", "inco-ray")]
    mounted = 0
    for doc in pods:
        for pod in pod_specs(doc):
            volume = next(
                v["name"]
                for v in pod["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == "inco-artifacts"
            )
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
            assert mount["mountPath"] == config["INCO_ARTIFACTS"] and not mount.get("readOnly")
            mounted += 1
    assert mounted == 3  # the worker, the Ray head and the GPU group


def test_k8s_redis_keeps_its_append_only_file(k8s_docs: list[dict[str, Any]]) -> None:
    redis = by_kind(k8s_docs, "StatefulSet", "redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["redis-server", "/etc/redis/redis.conf"]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert container["command"][container["command"].index("--dir") + 1] == data_mount["mountPath"]
    postgres = by_kind(k8s_docs, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: `kubectl kustomize` not run")
def test_kustomize_builds_and_points_every_inco_pod_at_the_registry() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "inco" for d in docs if d["kind"] != "Namespace")
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    (rewrite,) = kustomization["images"]
    images = {c["image"] for d in docs for c in containers(d)}
    assert f"{rewrite['newName']}:{rewrite['newTag']}" in images
    assert not {i for i in images if i.split(":")[0] == "inco"}  # the RayCluster's pods too

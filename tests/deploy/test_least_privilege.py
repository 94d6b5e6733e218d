"""Each party gets its own S3 user with only what it needs; none but minio-init holds the root keys.

- docker/minio/<party>.json are the S3 policies (AWS IAM language, which SeaweedFS and MinIO both
  take as it is): a data producer may only write under ``raw/``; only the Ray side may write
  checkpoints (``ray-results/``), which training resumes from; only MLflow touches the artifact
  bucket. A small evaluator of the policy language (Allow statements, wildcards) checks them
  against every prefix the code writes; tests/deploy/test_seaweedfs.py checks that a real
  SeaweedFS answers every party as the evaluator does.
- docker/compose.yaml: SeaweedFS (profile seaweedfs, the default) makes an identity per party with
  its policy at start (docker/seaweedfs/start.sh), no admin identity; with profile minio, minio-init
  creates the users and policies (docker/minio/init.sh); every service gets its own party's
  credentials from docker/.env.
- docker/k8s/: a Secret per party (s3-airflow, s3-ray, s3-mlflow), referenced by that party's pods.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from functools import cache
from typing import Any

import pytest
import yaml

from ml.monitor import DRIFT_REPORTS
from ml.prediction_log import PREDICTIONS
from ml.settings import Settings
from ml.storage import QUARANTINE, RAW, REPORTS, SNAPSHOTS
from tests.deploy.test_docker import DOCKER, ROOT, _dotenv, _raw_compose, compose
from tests.deploy.test_k8s_manifests import all_objects, containers, documents, one, pod_templates

POLICIES = DOCKER / "minio"
PARTIES = ("producer", "airflow", "ray", "mlflow")
DATA = Settings().data_bucket
ARTIFACTS = Settings().mlflow_bucket
WRITE = "s3:PutObject"
READ = "s3:GetObject"
DELETE = "s3:DeleteObject"
# compose services -> the party whose credentials they carry
SERVICE_PARTY = {
    "airflow-init": "airflow",
    "airflow-api-server": "airflow",
    "airflow-scheduler": "airflow",
    "airflow-dag-processor": "airflow",
    "airflow-triggerer": "airflow",
    "ray-head": "ray",
    "ray-gpu-worker": "ray",
    "mlflow": "mlflow",
}


@cache
def policy(party: str) -> dict[str, Any]:
    return json.loads((POLICIES / f"{party}.json").read_text())


def allowed(party: str, action: str, bucket: str, key: str | None = None) -> bool:
    """Whether ``party``'s policy allows ``action`` on the bucket (key None) or on one object.

    Enough of the policy language for these files: Allow statements only (checked below), ``*``
    in actions and resources, no conditions.
    """
    resource = f"arn:aws:s3:::{bucket}" + (f"/{key}" if key is not None else "")
    for statement in policy(party)["Statement"]:
        if statement["Effect"] != "Allow":
            continue
        actions, resources = statement["Action"], statement["Resource"]
        if any(fnmatchcase(action, a) for a in actions) and any(fnmatchcase(resource, r) for r in resources):
            return True
    return False


def _code_prefix(pattern: str, path: str) -> str:
    """A key prefix the code builds inline, found in its source (so the list cannot go stale)."""
    found = re.search(pattern, (ROOT / path).read_text())
    assert found, f"{path} no longer builds keys like {pattern!r}: update this test"
    return found.group(1)


def written_prefixes() -> dict[str, str]:
    """Every key prefix the pipeline writes -> the party that writes it (docs/pipeline.md, data layout)."""
    from ml.train import _ray_storage

    ray_results = _ray_storage(Settings())[0].removeprefix(f"{DATA}/")
    training = _code_prefix(r'result_key = f"(training)/', "dags/continuous_training.py")
    return {
        f"{SNAPSHOTS}/s1/manifest.json": "airflow",  # extract
        f"{SNAPSHOTS}/s1/validation.json": "airflow",  # validate
        f"{QUARANTINE}/agnews/2026-01-01/part-000.csv": "airflow",  # validate (moved from raw/)
        f"{REPORTS}/validation/s1/data_docs/index.html": "airflow",  # validate
        f"{DRIFT_REPORTS}/m/w/summary.json": "airflow",  # drift_monitor
        f"{REPORTS}/raw_watch/agnews.json": "airflow",  # raw_data_watch
        f"{SNAPSHOTS}/s1/splits/train.parquet": "ray",  # training driver
        f"{ray_results}/run/checkpoint_000001/zero/mp_rank_00_model_states.pt": "ray",  # workers
        f"{training}/run/result.json": "ray",  # training driver; evaluation.json: evaluate job
        f"{PREDICTIONS}/dt=2026-01-01/hour=00/part.parquet": "ray",  # Serve replicas
    }


# ---- the policy files --------------------------------------------------------------------------


@pytest.mark.parametrize("party", PARTIES)
def test_policy_is_a_plain_allow_list_of_s3_actions_on_the_projects_buckets(party: str) -> None:
    doc = policy(party)
    assert doc["Version"] == "2012-10-17"
    assert doc["Statement"], party
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow", f"{party}: keep to Allow statements (the evaluator here)"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource"}, f"{party}: {sorted(statement)}"
        for action in statement["Action"]:
            assert action.startswith("s3:") and "*" not in action, f"{party}: {action} is too broad"
        for resource in statement["Resource"]:
            assert re.fullmatch(rf"arn:aws:s3:::({DATA}|{ARTIFACTS})(/.+)?", resource), resource
            assert not resource.endswith(":::*"), f"{party}: every bucket"


def test_the_policy_files_are_exactly_the_parties() -> None:
    assert {p.stem for p in POLICIES.glob("*.json")} == set(PARTIES)


def test_the_evaluator_tells_allowed_from_refused() -> None:
    """The tests below are only worth something if the evaluator can say no."""
    assert allowed("ray", WRITE, DATA, f"{SNAPSHOTS}/s1/splits/test.parquet")
    assert not allowed("ray", WRITE, DATA, f"{SNAPSHOTS}/s1/validated.parquet")
    assert not allowed("ray", WRITE, DATA, f"{SNAPSHOTS}/s1/splits")
    assert not allowed("airflow", "s3:PutBucketPolicy", DATA)


def test_a_producer_may_only_write_new_batches_under_raw() -> None:
    assert allowed("producer", WRITE, DATA, f"{RAW}/agnews/2026-01-01/part-000.csv")
    assert allowed("producer", "s3:AbortMultipartUpload", DATA, f"{RAW}/agnews/2026-01-01/big.parquet")
    for key in [*written_prefixes(), "ray-results/x", "snapshots/x", "raw"]:
        assert not allowed("producer", WRITE, DATA, key), key
    for action in (READ, DELETE, "s3:ListBucket"):
        assert not allowed("producer", action, DATA, f"{RAW}/agnews/2026-01-01/part-000.csv"), action
        assert not allowed("producer", action, DATA), action
    assert not allowed("producer", WRITE, ARTIFACTS, "1/models/m/artifacts/export/model.safetensors")


def test_every_prefix_the_code_writes_is_writable_by_its_writer_only() -> None:
    for key, writer in written_prefixes().items():
        assert allowed(writer, WRITE, DATA, key), f"{writer} cannot write {key}"
        # Airflow owns snapshots/ (manifests, validation); the Ray side adds only the splits.
        may = {writer, "airflow"} if key.startswith(f"{SNAPSHOTS}/") else {writer}
        for other in set(PARTIES) - may:
            assert not allowed(other, WRITE, DATA, key), f"{other} may write {key}, which {writer} owns"


def test_checkpoints_are_written_and_read_by_the_ray_side_alone() -> None:
    """Training resumes from ray-results/: whoever can write there chooses what it loads."""
    checkpoint = next(key for key in written_prefixes() if "/checkpoint_" in key)
    for party in PARTIES:
        assert allowed(party, WRITE, DATA, checkpoint) == (party == "ray"), party
    assert allowed("ray", READ, DATA, checkpoint) and allowed("ray", DELETE, DATA, checkpoint)


def test_each_side_reads_what_it_needs() -> None:
    for key in (
        f"{RAW}/agnews/2026-01-01/part-000.csv",  # extract
        f"{SNAPSHOTS}/s1/splits/train.parquet",  # drift reference
        f"{PREDICTIONS}/dt=2026-01-01/hour=00/part.parquet",  # drift window
        f"{QUARANTINE}/agnews/b/_validation/s1.html",  # report viewer
        f"{REPORTS}/drift/m/w/report.html",  # report viewer
        "training/run/evaluation.json",  # register
    ):
        assert allowed("airflow", READ, DATA, key), key
    assert allowed("airflow", DELETE, DATA, f"{RAW}/agnews/b/part.csv")  # quarantine = move
    assert not allowed("airflow", DELETE, DATA, f"{SNAPSHOTS}/s1/manifest.json")
    assert allowed("ray", READ, DATA, f"{SNAPSHOTS}/s1/validated.parquet")
    assert not allowed("ray", READ, DATA, f"{RAW}/agnews/b/part.csv")  # unvalidated data
    for action in (READ, WRITE, DELETE):
        assert allowed("mlflow", action, ARTIFACTS, "1/models/m/artifacts/export/model.safetensors")
        for party in ("airflow", "ray"):  # clients reach artifacts through MLflow's proxy
            assert not allowed(party, action, ARTIFACTS, "1/models/m/artifacts/MLmodel"), party
        assert not allowed("mlflow", action, DATA, f"{SNAPSHOTS}/s1/manifest.json")


# ---- compose -----------------------------------------------------------------------------------


def test_no_service_but_minio_and_minio_init_gets_the_root_credentials() -> None:
    for name, svc in _raw_compose()["services"].items():
        text = yaml.safe_dump(svc.get("environment") or {})
        if name in {"minio", "minio-init"}:
            continue
        assert "MINIO_ROOT" not in text, f"{name} gets MinIO's root credentials"


@pytest.mark.parametrize(("service", "party"), sorted(SERVICE_PARTY.items()))
def test_every_service_uses_its_own_partys_s3_user(service: str, party: str) -> None:
    env = _raw_compose()["services"][service]["environment"]  # YAML merge keys (<<) resolved
    key_vars = {k: v for k, v in env.items() if k in {"CT_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}}
    assert key_vars, f"{service}: no S3 credentials"
    prefix = f"${{S3_{party.upper()}_"
    for variable in ("CT_S3_ACCESS_KEY", "CT_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if variable in env:
            assert str(env[variable]).startswith(prefix), f"{service}: {variable} = {env[variable]}"
    if party == "mlflow":
        assert "CT_S3_ACCESS_KEY" not in env


def test_minio_init_creates_a_user_and_policy_for_every_party() -> None:
    init = compose()["services"]["minio-init"]
    assert init["entrypoint"] == ["/bin/sh", "/etc/ct-minio/init.sh"]
    assert "./minio:/etc/ct-minio:ro" in init["volumes"]
    script = (POLICIES / "init.sh").read_text()
    loop = re.search(r"for party in ([a-z ]+); do", script)
    assert loop and tuple(loop.group(1).split()) == PARTIES
    for command in ("mc admin policy create", "mc admin user add", "mc admin policy attach"):
        assert command in script
    env = _dotenv(DOCKER / ".env.example")
    access_keys = {env[f"S3_{party.upper()}_ACCESS_KEY"] for party in PARTIES}
    assert len(access_keys) == len(PARTIES) and env["MINIO_ROOT_USER"] not in access_keys
    for party in PARTIES:
        for variable in (f"S3_{party.upper()}_ACCESS_KEY", f"S3_{party.upper()}_SECRET_KEY"):
            assert init["environment"][variable] == env[variable], variable
        assert len(env[f"S3_{party.upper()}_SECRET_KEY"]) >= 8  # MinIO refuses shorter secrets


def test_seaweedfs_makes_an_identity_per_party_with_its_policy_and_no_admin() -> None:
    svc = compose()["services"]["seaweedfs"]
    script = (DOCKER / "seaweedfs" / "start.sh").read_text()
    loop = re.search(r'^parties="([a-z ]+)"$', script, re.MULTILINE)
    assert loop and tuple(loop.group(1).split()) == PARTIES
    assert '"policyNames": ["ct-%s"]' in script and '"document": ' in script
    assert "Admin" not in script and "AWS_ACCESS_KEY_ID" not in yaml.safe_dump(svc["environment"])
    env = _dotenv(DOCKER / ".env.example")
    for party in PARTIES:
        for variable in (f"S3_{party.upper()}_ACCESS_KEY", f"S3_{party.upper()}_SECRET_KEY"):
            assert svc["environment"][variable] == env[variable], variable
    assert set(svc["environment"]) == {
        f"S3_{p.upper()}_{k}" for p in PARTIES for k in ("ACCESS_KEY", "SECRET_KEY")
    }


# ---- Kubernetes --------------------------------------------------------------------------------

K8S_SECRETS = {"airflow": "s3-airflow", "ray": "s3-ray", "mlflow": "s3-mlflow"}


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}
    for env in container.get("env", []):
        if "secretKeyRef" in env.get("valueFrom", {}):
            refs.add(env["valueFrom"]["secretKeyRef"]["name"])
    return refs


def test_k8s_has_a_secret_per_party_and_ct_secrets_holds_no_s3_keys() -> None:
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in documents("secret.example.yaml")}
    for party, name in K8S_SECRETS.items():
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets[name]), name
        if party != "mlflow":
            assert {"CT_S3_ACCESS_KEY", "CT_S3_SECRET_KEY"} <= set(secrets[name]), name
    assert not {k for k in secrets["ct-secrets"] if "S3" in k or k.startswith("AWS_")}


def test_k8s_pods_reference_their_own_partys_secret_only() -> None:
    s3_secrets = set(K8S_SECRETS.values())
    for kind in ("RayCluster", "RayService"):
        for where, template in pod_templates(one(kind)):
            for container in template["spec"]["containers"]:
                assert _secret_refs(container) & s3_secrets == {"s3-ray"}, f"{kind} {where}"
    (mlflow,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert _secret_refs(mlflow) & s3_secrets == {"s3-mlflow"}
    values = documents("airflow-values.yaml")[0]
    airflow_refs = {
        item["secretRef"]["name"] for item in yaml.safe_load(values["extraEnvFrom"]) if "secretRef" in item
    }
    assert airflow_refs & s3_secrets == {"s3-airflow"}
    referenced = {name for _, doc in all_objects() for c in containers(doc) for name in _secret_refs(c)}
    assert s3_secrets - {"s3-airflow"} <= referenced


def test_the_k8s_readme_names_the_policy_files() -> None:
    text = (DOCKER / "k8s" / "README.md").read_text()
    assert all(name in text for name in K8S_SECRETS.values())
    assert "docker/minio" in text

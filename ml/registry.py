"""The MLflow side of the model's life: log it (as a pyfunc model from code), register it, promote it.

A trained model is logged as the pyfunc model of ``ml/pyfunc_model.py`` with the export directory
(safetensors + tokenizer + label map) as its ``export`` artifact: nothing is pickled. Every
registered version gets the alias ``challenger``; the gate's verdict (``ml.evaluate``) decides
whether ``champion`` moves to it, in one alias update so that ``models:/<name>@champion`` always
resolves to a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name of the logged model inside its run: runs:/<run id>/model
EXPORT_ARTIFACT = "export"  # context.artifacts key; the files lie under <model>/artifacts/export
CHAMPION = "champion"
CHALLENGER = "challenger"
SERVING = "serving"  # the version the Ray Serve application answers with (set after a good deploy)
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
# Installed versions of these are pinned into the model's requirements.txt.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")


def model_pip_requirements() -> list[str]:
    """Exact pins of what loading the model needs, from this environment.

    torch's local version label (``+cpu``, ``+cu128``) is dropped so that the same model installs
    on a CPU or a GPU machine from that machine's index.
    """
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def model_signature():
    """Input: strings (a ``text`` column or a list); output: ``label`` and ``score``; ``batch_size`` param.

    The input column is unnamed on purpose: MLflow then accepts both a DataFrame with a ``text``
    column and a plain list of strings (a named column rejects the list).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
    )


def log_model(export_dir: str | Path, name: str = MODEL_NAME) -> ModelInfo:
    """Log ``export_dir`` as a pyfunc model from code in the active MLflow run.

    ``ml/predict.py`` travels with the model (``code_paths``), so loading it needs only the
    pinned packages, not this repository.
    """
    import mlflow

    export_dir = Path(export_dir)
    if not (export_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{export_dir} holds no model.safetensors: not a model export")
    if mlflow.active_run() is None:
        raise RuntimeError("log_model needs an active MLflow run (inside `with mlflow.start_run():`)")
    with tempfile.TemporaryDirectory(prefix="ct-model-") as tmp:
        # MLflow names an artifact directory after its source directory: stage the export as
        # "export" so that it always lies at <model>/artifacts/export, whatever the trainer called it.
        staged_export = Path(tmp) / EXPORT_ARTIFACT
        # (hard links, not a symlink: MLflow refuses artifact paths that resolve outside the folder)
        shutil.copytree(export_dir, staged_export, copy_function=_link_or_copy)
        package = Path(tmp) / "code" / "ml"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            '"""The inference part of the ml package, shipped with a model."""\n'
        )
        shutil.copy2(Path(__file__).with_name("predict.py"), package / "predict.py")
        with warnings.catch_warnings():
            # An input example would make MLflow load the model and predict at log time (~25 s
            # here); the explicit signature documents the input instead.
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={EXPORT_ARTIFACT: str(staged_export)},
                code_paths=[str(package)],
                signature=model_signature(),
                pip_requirements=model_pip_requirements(),
            )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def run_url(settings: Settings, run_id: str) -> str:
    """The MLflow UI page of a run (a browser link)."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri=settings.mlflow_tracking_uri).get_run(run_id).info.experiment_id
    return settings.mlflow_link(f"experiments/{experiment_id}/runs/{run_id}")


def model_version_url(settings: Settings, name: str, version: str | int) -> str:
    """The MLflow UI page of a registered model version (a browser link)."""
    from urllib.parse import quote

    return settings.mlflow_link(f"models/{quote(name)}/versions/{version}")


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the ``champion`` alias points to; None if the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        # MLflow 3.17: no such model -> RESOURCE_DOES_NOT_EXIST; no such alias -> INVALID_PARAMETER_VALUE
        # ("Registered model alias champion not found.")
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            err.error_code == "INVALID_PARAMETER_VALUE"
            and "alias" in err.message
            and "not found" in err.message
        ):
            return None
        raise


def resolve_version(client: MlflowClient, name: str, ref: str | int) -> ModelVersion:
    """A registered version from a version number (``"3"``) or an alias (``"champion"``).

    Raises :class:`LookupError` naming the model and the reference when it does not resolve.
    """
    from mlflow.exceptions import MlflowException

    ref = str(ref).strip()
    if not ref:
        raise LookupError(f"empty model reference for {name!r}: give a version number or an alias")
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as err:
        if err.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            kind = "version" if ref.isdigit() else "alias"
            raise LookupError(
                f"registered model {name!r} has no {kind} {ref!r} at {client.tracking_uri} ({err.message})"
            ) from err
        raise


def mark_serving(
    settings: Settings, version: str, tags: dict[str, Any] | None = None, name: str | None = None
) -> None:
    """Point model ``name``'s ``serving`` alias at ``version`` and tag it, so the MLflow UI shows what
    production runs. ``name`` defaults to the settings' registered model."""
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    name = name or settings.registered_model
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in {"deployed_at": stamp, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, SERVING, version)
    client.set_registered_model_tag(name, "serving_version", version)


def logged_model_id(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> str:
    """The id of the model named ``name`` that run ``run_id`` logged (MLflow 3 logged models)."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    ids = [o.model_id for o in sorted(outputs, key=lambda o: o.step)]
    matches = [i for i in ids if client.get_logged_model(i).name == name]
    if not matches:
        raise LookupError(f"run {run_id} logged no model named {name!r}: was ml.registry.log_model called?")
    return matches[-1]  # the one logged at the latest step, like mlflow.register_model


def register_challenger(
    settings: Settings,
    run_id: str,
    evaluation: dict[str, Any],
    tags: dict[str, Any] | None = None,
    force_promote: bool = False,
    move_champion: bool = True,
) -> dict[str, Any]:
    """Register the run's model as the ``challenger``; move ``champion`` to it if the gate said so.

    ``move_champion`` False (a staged rollout, ``ml.staged_rollout``): a version the gate passed
    stays ``challenger`` until it passed the live stages; the result says ``champion_moved``.

    ``evaluation`` is what :func:`ml.evaluate.evaluate_challenger` returned for this run; ``tags``
    are extra version tags (validation summary, trigger reason, ...). ``force_promote`` makes it
    champion whatever the gate said (an operator's override, recorded on the version as
    ``forced_promotion``). Idempotent: a retry finds the version already created for ``run_id``
    and reuses it.
    """
    from mlflow import MlflowClient

    if evaluation.get("run_id") not in {None, run_id}:
        raise ValueError(f"evaluation is for run {evaluation['run_id']}, not {run_id}")
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    name = settings.registered_model
    version = _version_for_run(client, name, run_id)

    gate = evaluation["gate"]
    promote = bool(gate["promote"])
    reason = gate["reason"]
    current = champion_version(client, name)
    evaluated_against = (evaluation.get("champion") or {}).get("version")
    current_number = current.version if current else None
    if promote and str(current_number) not in {str(evaluated_against), str(version.version)}:
        # Another version became champion after this one was evaluated: the comparison is stale.
        promote = False
        reason = (
            f"not promoted: champion moved to v{current_number} after this model was evaluated against "
            f"v{evaluated_against}; re-run the evaluation. Gate said: {reason}"
        )

    forced = force_promote and not promote
    if forced:
        log.warning(
            "FORCED PROMOTION of %s v%s by the force_promote param; the gate said: %s",
            name,
            version.version,
            reason,
        )
        promote = True
        reason = f"FORCED by an operator (force_promote); the gate said: {reason}"

    version_tags = {
        **{k: v for k, v in (tags or {}).items() if v is not None},
        "snapshot_id": evaluation.get("snapshot_id"),
        "gate_decision": "promote" if promote else "reject",
        "gate_reason": reason,
        "challenger_macro_f1": gate.get("challenger_macro_f1"),
        "champion_macro_f1": gate.get("champion_macro_f1"),
        "champion_version_at_evaluation": evaluated_against,
        **({"forced_promotion": "true"} if forced else {}),
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version.version, key, "" if value is None else str(value))
    client.update_model_version(
        name, version.version, description=f"{'PROMOTED' if promote else 'NOT PROMOTED'}: {reason}"
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    champion_moved = promote and (move_champion or forced)
    if champion_moved:
        # one alias update: models:/<name>@champion never dangles, not even for a moment
        client.set_registered_model_alias(name, CHAMPION, version.version)
        current_number = version.version
    log.info(
        "%s v%s (run %s): challenger; %s; champion is v%s",
        name,
        version.version,
        run_id,
        "promoted" if promote else "not promoted",
        current_number,
    )
    return {
        "name": name,
        "version": str(version.version),
        "run_id": version.run_id,
        "promoted": promote,
        "champion_moved": champion_moved,
        "forced": forced,
        "champion_version": None if current_number is None else str(current_number),
        "reason": reason,
    }


def _version_for_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion:
    """The registered version of ``run_id``'s model: the existing one, or a new one."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="Text classifier trained by the continuous_training DAG."
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        first = min(existing, key=lambda v: int(v.version))
        log.info("%s v%s already registered for run %s; reusing it", name, first.version, run_id)
        return first
    model_id = logged_model_id(client, run_id)
    return client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)


def download_export(client: MlflowClient, model_root: str, dst: Path, member: str = "") -> Path:
    """Download only the ``export`` folder (weights, tokenizer, label map) of a logged model, or
    only its file ``member`` (e.g. ``label_map.json``).

    ``model_root`` is the folder holding its MLmodel (a logged model's ``artifact_location``, a
    version's download URI); pyfunc artifacts lie in its ``artifacts/`` folder.
    """
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    uri = f"{model_root.rstrip('/')}/artifacts/{EXPORT_ARTIFACT}"
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{uri}/{member}" if member else uri,
        dst_path=str(dst),
        tracking_uri=client.tracking_uri,
    )
    return Path(local)

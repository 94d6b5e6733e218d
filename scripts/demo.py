"""The README's one-command demo: seed data, run ``continuous_training`` through Airflow, report,
and finish with a prediction served by Ray Serve from the model MLflow marks ``champion``.

On the 2-core CPU machines we test on, the full run (AG News 5.6k, 2 epochs, 2 Ray workers,
DeepSpeed ZeRO-2, deploy, smoke test) takes roughly 12-15 minutes; progress shows in the log
and the Airflow UI.

Expects the local stack to be up (``make demo`` runs ``make up`` first). Unpausing the DAG
makes the scheduler start today's daily run, which consumes the seeded batches; if today's run
already happened, a manual run is triggered instead (it skips cleanly when nothing is new).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack
from airflow_client import AirflowClient

from ml.seed import seed_raw
from ml.settings import Settings
from ml.storage import QUARANTINE, RAW, ObjectStore

DAG_ID = "continuous_training"
log = logging.getLogger("demo")


def seed_if_empty(settings: Settings, store: ObjectStore) -> None:
    if any(True for _ in store.list(f"{RAW}/{settings.dataset}/")) or any(
        True for _ in store.list("snapshots/")
    ):
        log.info("raw/%s/ or snapshots/ already hold data: not seeding again", settings.dataset)
        return
    keys = seed_raw(settings, bad_batch=True, store=store)
    log.info("seeded %d batches into s3://%s/%s/%s/", len(keys), store.bucket, RAW, settings.dataset)


def runs_to_watch(client: AirflowClient, wait_for_scheduled: float) -> list[str]:
    """Unfinished runs of the DAG; waits a little for the scheduler to create today's run."""
    deadline = time.monotonic() + wait_for_scheduled
    while True:
        runs = client.runs(DAG_ID)
        active = [r["dag_run_id"] for r in reversed(runs) if r["state"] in {"queued", "running"}]
        if active or time.monotonic() > deadline:
            return active
        time.sleep(3)


def report(settings: Settings, store: ObjectStore, client: AirflowClient, run_id: str) -> bool:
    run = client.run(DAG_ID, run_id)
    states = client.task_states(DAG_ID, run_id)
    print(f"\nrun {run_id}: {run['state']}  ({', '.join(f'{k}={v}' for k, v in states.items())})")
    if states.get("extract") == "success":
        snapshot = client.xcom(DAG_ID, run_id, "extract")
        print(
            f"  snapshot   s3://{store.bucket}/snapshots/{snapshot['snapshot_id']}/  "
            f"({snapshot['rows']} rows in {len(snapshot['batches'])} batches)"
        )
    if states.get("validate") == "success":
        gate = client.xcom(DAG_ID, run_id, "validate")
        print(f"  validated  {gate['rows']} rows, labels {gate['labels']}")
        print(f"  Data Docs  {gate['data_docs']}")
        for batch in gate["quarantined"]:
            print(
                f"  quarantined batch {batch}: s3://{store.bucket}/{QUARANTINE}/{settings.dataset}/{batch}/"
            )
    if states.get("training_summary") == "success":
        trained = client.xcom(DAG_ID, run_id, "training_summary")
        print(
            f"  trained    {trained['epochs_completed']} epochs, best validation macro-F1 "
            f"{trained['best_val_macro_f1']:.3f} (MLflow run {trained['mlflow_run_id']})"
        )
    if states.get("register") == "success":
        outcome = client.xcom(DAG_ID, run_id, "register")
        print(
            f"  registered {outcome['name']} v{outcome['version']}: "
            f"{'champion' if outcome['promoted'] else 'challenger'} - {outcome['reason']}"
        )
    if states.get("smoke_test") == "success":
        deployed = client.xcom(DAG_ID, run_id, "deploy")
        print(
            f"  deployed   v{deployed['version']} to Ray Serve in {deployed['seconds']:.0f} s "
            f"(before: {'v' + deployed['previous_version'] if deployed['previous_version'] else 'nothing'}); "
            "smoke test passed"
        )
    elif states.get("deploy") == "skipped" and states.get("register") == "success":
        print("  deploy     skipped: the champion did not change")
    elif states.get("extract") == "skipped":
        print("  no new data since the last snapshot: the run skipped cleanly")
    return run["state"] == "success"


DEMO_TEXT = "Oil prices climb as OPEC signals deeper output cuts"


def show_serving(settings: Settings) -> bool:
    """One prediction over HTTP, checked against the version MLflow marks champion."""
    import json

    import requests
    from mlflow import MlflowClient

    from ml.registry import champion_version

    champion = champion_version(MlflowClient(settings.mlflow_tracking_uri), settings.registered_model)
    body = {"texts": [DEMO_TEXT]}
    url = f"{settings.serve_url}/v1/predict"
    try:
        resp = requests.post(url, json=body, timeout=30)
    except requests.RequestException as err:
        print(f"\nRay Serve does not answer at {url}: {err}")
        return False
    if resp.status_code != 200:
        print(f"\n{url} answered {resp.status_code}: {resp.text[:300]}")
        return False
    answer = resp.json()
    marked = f"v{champion.version}" if champion else "nothing"
    print(f"\nServed prediction (MLflow marks {marked} of {settings.registered_model} champion):")
    print(f"  curl -s -X POST {url} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    print(f"  {json.dumps(answer)}")
    if champion is None or answer["model"]["version"] != str(champion.version):
        print("  WARNING: the service does not answer with the champion version (see the deploy task's log)")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    settings = Settings()
    store = ObjectStore(settings)
    store.ensure_bucket()
    seed_if_empty(settings, store)

    user, password = stack.airflow_login()
    client = AirflowClient("http://127.0.0.1:8080", user, password)
    client.wait_for_dag(DAG_ID)
    client.unpause(DAG_ID)
    run_ids = runs_to_watch(client, wait_for_scheduled=45)
    if not run_ids:
        log.info("today's scheduled run already happened; triggering a manual run")
        run_ids = [client.trigger(DAG_ID)]
    ok = True
    for run_id in run_ids:
        log.info("waiting for %s (watch it at http://127.0.0.1:8080/dags/%s)", run_id, DAG_ID)
        client.wait_for_run(DAG_ID, run_id, timeout=args.timeout)
        ok = report(settings, store, client, run_id) and ok
    ok = show_serving(settings) and ok
    print(f"\nAirflow UI: http://127.0.0.1:8080 (login: {user} / {password})")
    print(f"MLflow UI:  {settings.mlflow_tracking_uri}   Ray dashboard: {settings.ray_address}")
    print(f"API docs:   {settings.serve_url}/docs")
    print("The stack keeps running for you to explore; stop it with `make down` (S3 data is in memory).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

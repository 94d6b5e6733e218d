"""The README's one-command demo: seed data, run ``continuous_training`` through Airflow, report.

On the 2-core CPU machines we test on, the full run (AG News 5.6k, 2 epochs, 2 Ray workers,
DeepSpeed ZeRO-2) takes roughly 10-15 minutes; progress shows in the log and the Airflow UI.

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
    elif states.get("extract") == "skipped":
        print("  no new data since the last snapshot: the run skipped cleanly")
    return run["state"] == "success"


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
    print(f"\nAirflow UI: http://127.0.0.1:8080 (login: {user} / {password})")
    print("MLflow UI:  http://127.0.0.1:5000")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

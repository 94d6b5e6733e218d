"""The README's one-command demo: the whole loop on the local stack, watched through Airflow.

Act 1: seed AG News (5,000 rows as four daily batches plus a bad one), run ``continuous_training``
(extract, data gate, Ray Train + DeepSpeed, evaluate, register, deploy to Ray Serve, smoke test)
and show a prediction served by the version MLflow marks ``champion``.
Act 2 (``--no-drift`` skips it): labelled production data arrives (the 600 AG News rows held
back, as a new batch in ``raw/``), 20 Newsgroups posts are sent to the service over HTTP,
``drift_monitor`` finds drift and triggers ``continuous_training``, which retrains on the new
batch plus the earlier data, warm-starting from the champion for one epoch; a model that beats
the champion then runs in shadow beside it on live traffic (the demo sends AG News texts) and is
deployed only if it agrees with the champion there. Finally the
monitor and the raw-data watch are unpaused, so the loop keeps running on its schedules.

Expects the local stack to be up (``make demo`` runs ``make up`` first). Unpausing the training
DAG makes the scheduler start today's daily run, which consumes the seeded batches; if today's
run already happened, a manual run is triggered instead (it skips cleanly when nothing is new).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
import stack
from airflow_client import AirflowClient

from ml.sample_data import NEWSGROUPS_SAMPLE
from ml.seed import DEFAULT_SOURCE, balanced_sample, seed_raw
from ml.settings import Settings
from ml.storage import QUARANTINE, RAW, ObjectStore

DAG_ID = "continuous_training"
MONITOR = "drift_monitor"
WATCH = "raw_data_watch"
SEED_ROWS = 5000  # the other 600 AG News rows arrive in act 2 as labelled production data
QUICK_ROWS = 1200  # --quick: a first look in a few minutes (act 1 only, a smaller model quality)
DRIFT_TEXTS = 300
# The retrained model takes over through a shadow stage: it answers a mirrored copy of the live
# traffic (the demo sends some) and must agree with the champion before it serves. The canary
# stage is left to the production default (shadow+canary) to keep the demo short.
RETRAIN_PARAMS = {
    "init_from": "champion",
    "epochs": 1,
    "rollout": "shadow",
    "shadow_min_texts": 150,
    "shadow_max_minutes": 4,
}
LIVE_TEXTS = 400  # AG News texts sent while the shadow stage runs, paced
log = logging.getLogger("demo")


def seed_if_empty(settings: Settings, store: ObjectStore, rows: int = SEED_ROWS) -> None:
    # Only this dataset counts: the local S3 keeps its data, e.g. the test suite's datasets.
    if any(True for _ in store.list(f"{RAW}/{settings.dataset}/")) or any(
        True for _ in store.list(f"snapshots/{settings.dataset}-")
    ):
        log.info("raw/%s/ or its snapshots already hold data: not seeding again", settings.dataset)
        return
    keys = seed_raw(settings, rows=rows, bad_batch=True, store=store)
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
    outcome = {}
    if states.get("register") == "success":
        outcome = client.xcom(DAG_ID, run_id, "register")
        role = "challenger"
        if outcome["promoted"]:
            role = (
                "champion"
                if outcome.get("champion_moved", True)
                else "passed the gate (challenger until live)"
            )
        print(f"  registered {outcome['name']} v{outcome['version']}: {role} - {outcome['reason']}")
    if states.get("shadow_check") in {"success", "failed"}:
        stage = client.xcom(DAG_ID, run_id, "shadow_check") or {}
        links = client.links(DAG_ID, run_id, "shadow_check")
        shadow = stage.get("shadow") or {}
        print(
            f"  shadow     v{outcome['version']} beside the champion on live traffic: "
            f"{(shadow.get('decision') or states['shadow_check']).upper()} - "
            f"{shadow.get('reason') or 'see the task log'}"
        )
        print(f"  Rollout report: {links.get('Rollout report')}  (log in to Airflow first)")
    elif states.get("start_shadow") == "skipped" and states.get("register") == "success":
        print("  shadow     skipped: nothing served yet (or rollout direct): deployed directly")
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


def held_back_rows() -> pd.DataFrame:
    """The AG News rows act 1 did not seed (seed_raw's sample is deterministic)."""
    full = pd.read_csv(DEFAULT_SOURCE)
    return full.drop(index=balanced_sample(full, SEED_ROWS).index)


def drift_act(settings: Settings, store: ObjectStore, client: AirflowClient, timeout: float) -> bool:
    """New labelled data + drifted traffic -> drift_monitor -> a drift-triggered training run."""
    from datetime import UTC, datetime

    from ml.prediction_log import wait_for_logged
    from serve.client import predict

    print("\n=== Act 2: the service's traffic drifts ===")
    today = datetime.now(UTC).date().isoformat()
    review = held_back_rows()
    key = f"{RAW}/{settings.dataset}/{today}_review/part-000.csv"
    store.put_bytes(key, review.to_csv(index=False).encode(), "text/csv")
    print(f"  labelled production data: {len(review)} rows -> s3://{store.bucket}/{key}")

    news = pd.read_csv(NEWSGROUPS_SAMPLE)
    news = news[news["text"].str.strip().str.len().between(20, 3000)]
    texts = news.sample(DRIFT_TEXTS, random_state=5)["text"].tolist()
    since = datetime.now(UTC)
    answers = predict(settings.serve_url, texts)
    wait_for_logged(store, since, settings.registered_model, len(texts))
    print(f"  sent {len(answers)} 20 Newsgroups posts to {settings.serve_url}/v1/predict (logged to S3)")

    client.wait_for_dag(MONITOR)
    client.unpause(MONITOR)
    hours = ((datetime.now(UTC) - since).total_seconds() + 5) / 3600
    # The retrain warm-starts from the champion: one epoch over the new batch and the data window
    # reaches what two epochs from the base model reach, in half the time (docs/benchmarks.md).
    monitor_run = client.trigger(MONITOR, conf={"window_hours": hours, "training_params": RETRAIN_PARAMS})
    log.info("waiting for %s (http://127.0.0.1:8080/dags/%s)", monitor_run, MONITOR)
    client.wait_for_run(MONITOR, monitor_run, timeout=900)
    # one mapped check per model that served the window: this demo's model
    checks = client.mapped(MONITOR, monitor_run, "per_model.check")
    index = next(
        (ti["map_index"] for ti in checks if ti["rendered_map_index"] == settings.registered_model), None
    )
    if index is None:
        states = client.task_states(MONITOR, monitor_run)
        print(f"  drift_monitor checked no traffic of {settings.registered_model}: {states}")
        return False
    check = client.xcom(MONITOR, monitor_run, "per_model.check", map_index=index)
    states = {
        task: ti["state"]
        for task in ("decide", "trigger_training")
        for ti in client.mapped(MONITOR, monitor_run, f"per_model.{task}")
        if ti["map_index"] == index
    }
    print(
        f"  drift_monitor: verdict {check['verdict']}, drift score {check.get('drift_score')}, "
        f"text ROC AUC {(check.get('text') or {}).get('score')}, "
        f"label JS distance {(check.get('label') or {}).get('distance')}"
    )
    links = client.links(MONITOR, monitor_run, "per_model.check", map_index=index)
    print(f"  Evidently report: {links.get('Evidently report')}  (log in to Airflow first)")
    print(f"  in MLflow:        {links.get('MLflow run')}")
    if states.get("trigger_training") != "success":
        print(f"  no training triggered: {states}")
        return check["verdict"] == "drift"
    triggered = [
        r
        for r in client.runs(DAG_ID, limit=20)
        if (r.get("conf") or {}).get("drift_run_id") == check["mlflow_run_id"]
    ]
    ok = bool(triggered)
    live = held_back_rows()["text"].tolist()[:LIVE_TEXTS]  # in-distribution texts users keep sending
    for run in triggered:
        log.info("waiting for the drift-triggered run %s", run["dag_run_id"])
        with LiveTraffic(
            settings.serve_url, live, lambda r=run["dag_run_id"]: _in_shadow(client, r)
        ) as traffic:
            client.wait_for_run(DAG_ID, run["dag_run_id"], timeout=timeout)
        if traffic.sent:
            print(
                f"  live traffic during the shadow stage: {traffic.sent} requests, "
                f"{traffic.failed} failed, answered by {', '.join(sorted(traffic.versions)) or 'nothing'}"
            )
        ok = report(settings, store, client, run["dag_run_id"]) and ok
    return ok


def _in_shadow(client: AirflowClient, run_id: str) -> bool:
    try:
        return client.task_states(DAG_ID, run_id).get("shadow_check") == "running"
    except Exception:
        return False


class LiveTraffic:
    """Users' requests while a run is in its shadow stage: one request every ``pause_s`` once
    ``start()`` says so, at most ``len(texts)`` of them; counts failures and answering versions."""

    def __init__(
        self, url: str, texts: list[str], start, pause_s: float = 0.25, client_keys: int = 25
    ) -> None:
        import threading

        self.url, self.texts, self.start, self.pause_s = (
            f"{url.rstrip('/')}/v1/predict",
            texts,
            start,
            pause_s,
        )
        self.sent, self.failed, self.versions, self.client_keys = 0, 0, set(), client_keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import requests

        while not self._stop.is_set() and not self.start():
            self._stop.wait(5)
        session = requests.Session()
        for i, text in enumerate(self.texts):
            if self._stop.is_set():
                return
            try:
                resp = session.post(
                    self.url,
                    json={"text": text},
                    headers={"X-Client-Key": f"user-{i % self.client_keys}"},
                    timeout=60,
                )
                if resp.status_code == 200:
                    self.versions.add(f"v{resp.json()['model']['version']}")
                else:
                    self.failed += 1
            except requests.RequestException:
                self.failed += 1
            self.sent += 1
            self._stop.wait(self.pause_s)

    def __enter__(self) -> LiveTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a run")
    parser.add_argument("--no-drift", action="store_true", help="stop after act 1")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look: seed {QUICK_ROWS} rows instead of {SEED_ROWS} and stop after act 1 "
        "(on a fresh stack; `make clean` first to go from quick to the full demo)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.no_drift = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    started = time.monotonic()
    settings = Settings()
    store = ObjectStore(settings)
    store.ensure_bucket()
    seed_if_empty(settings, store, QUICK_ROWS if args.quick else SEED_ROWS)

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
    serving = show_serving(settings)
    ok = serving and ok
    act_1 = time.monotonic() - started
    print(f"\nAct 1 took {_minutes(act_1)}.")
    if not args.no_drift and not serving:
        print("\nAct 2 (drift) needs a serving model: skipped; see the failed task's log above.")
    elif not args.no_drift:
        ok = drift_act(settings, store, client, args.timeout) and ok
        ok = show_serving(settings) and ok
        for dag_id in (MONITOR, WATCH):
            client.wait_for_dag(dag_id)
            client.unpause(dag_id)
        print(f"\n{MONITOR} (hourly) and {WATCH} (every 15 min) are unpaused: the loop now runs by itself.")
        print(f"Act 2 took {_minutes(time.monotonic() - started - act_1)}.")
    print_where_to_look(settings, user)
    print(f"\nThe demo took {_minutes(time.monotonic() - started)} (after the stack was up).")
    return 0 if ok else 1


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def print_where_to_look(settings: Settings, user: str) -> None:
    """The UIs to explore. The Airflow password stays in its own file: the demo's output (a
    terminal, a CI log) never shows it."""
    print(f"\nAirflow UI: http://127.0.0.1:8080 (login: {user}, password in {stack.airflow_password_file()})")
    print(f"MLflow UI:  {settings.mlflow_link()}   Ray dashboard: {settings.ray_link()}")
    print(f"API docs:   {settings.serve_link('docs')}")
    print(
        "The stack keeps running for you to explore; stop it with `make down` "
        "(S3 objects, runs and models stay in .state/ for the next `make up`)."
    )


if __name__ == "__main__":
    sys.exit(main())

#!/bin/sh
# One-shot set-up of MinIO for docker/compose.yaml (service minio-init), idempotent: the buckets,
# and one user per party with its own policy (the JSON files beside this script), so that no
# service holds the root credentials:
#
#   producer  writes new labelled batches under ct-data/raw/ and nothing else
#   airflow   extract, validate, drift and raw-data watch tasks, the report viewer
#   ray       training and evaluation jobs, Serve replicas (prediction log)
#   mlflow    the tracking server, which proxies every model and artifact in mlflow-artifacts
#
# Re-running it updates the policies and secrets from the files and docker/.env.
set -eu

mc alias set ct http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing ct/ct-data ct/mlflow-artifacts

for party in producer airflow ray mlflow; do
  upper=$(echo "$party" | tr '[:lower:]' '[:upper:]')
  eval "access_key=\${S3_${upper}_ACCESS_KEY:?set S3_${upper}_ACCESS_KEY in docker/.env}"
  eval "secret_key=\${S3_${upper}_SECRET_KEY:?set S3_${upper}_SECRET_KEY in docker/.env}"
  if [ "$access_key" = "$MINIO_ROOT_USER" ]; then
    echo "S3_${upper}_ACCESS_KEY must not be the root user" >&2
    exit 1
  fi
  mc admin policy create ct "ct-$party" "/etc/ct-minio/$party.json"
  mc admin user add ct "$access_key" "$secret_key"
  # attach fails when the policy is attached already: that is the state we want
  mc admin policy attach ct "ct-$party" --user "$access_key" \
    || mc admin user info ct "$access_key" | grep -q "ct-$party"
done

# syntax=docker/dockerfile:1
# MLflow tracking server + model registry: PostgreSQL backend store, artifacts in MinIO (S3 API).
#
#   docker build -f docker/mlflow.Dockerfile -t ct-mlflow .        (from the repository root)
FROM python:3.11-slim-bookworm

RUN useradd --create-home --uid 1000 mlflow
COPY constraints.txt docker/requirements-mlflow.txt /opt/ct/
RUN pip install --no-cache-dir -r /opt/ct/requirements-mlflow.txt -c /opt/ct/constraints.txt

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
# The backend store and artifact destination come from the environment (docker/compose.yaml).
CMD ["sh", "-c", "exec mlflow server --host 0.0.0.0 --port 5000 --workers ${MLFLOW_WORKERS:-2} --backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\" --artifacts-destination \"$MLFLOW_ARTIFACTS_DESTINATION\""]

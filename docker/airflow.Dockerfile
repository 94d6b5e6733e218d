# syntax=docker/dockerfile:1
# The Airflow side: DAGs, plugins, and the ml/ + serve/ modules their tasks import. No torch here:
# training and evaluation run as Ray jobs on the Ray image; these tasks call the MinIO, MLflow,
# Ray Jobs and Serve APIs (and run the Great Expectations and Evidently checks).
#
#   docker build -f docker/airflow.Dockerfile -t ct-airflow .        (from the repository root)
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:slim-${AIRFLOW_VERSION}-python${PYTHON_VERSION}

# Dependencies before code, so editing a DAG rebuilds only the last, small layers. The pins are
# requirements.txt's (docker/requirements-airflow.txt is generated from it), resolved with the
# project's constraints.txt, the set the test suite runs against.
COPY --chown=airflow:0 constraints.txt docker/requirements-airflow.txt /opt/ct/
RUN pip install --no-cache-dir -r /opt/ct/requirements-airflow.txt -c /opt/ct/constraints.txt

ENV PYTHONPATH=/opt/ct/src \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
# the simple auth manager's password file lives here (a named volume in docker/compose.yaml takes
# this directory's owner when first mounted)
RUN mkdir -p /opt/airflow/auth
COPY --chown=airflow:0 ml /opt/ct/src/ml
COPY --chown=airflow:0 serve /opt/ct/src/serve
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 dags /opt/airflow/dags

# the base image's non-root user `airflow` (uid 50000, gid 0)
USER 50000

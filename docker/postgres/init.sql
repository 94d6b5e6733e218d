-- Runs once, when the PostgreSQL volume is first created (docker-entrypoint-initdb.d). POSTGRES_DB
-- (airflow) already exists; MLflow's backend store gets its own database, same owner.
CREATE DATABASE mlflow;

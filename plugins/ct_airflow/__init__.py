"""Airflow-side glue of the continuous-training pipeline: settings from connections, operators.

Importable without heavy dependencies; everything here is cheap enough for DAG parse time.
"""

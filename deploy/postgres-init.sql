-- Runs once, when the PostgreSQL volume is first initialised (as POSTGRES_USER, in POSTGRES_DB).
-- MLflow gets its own database: its schema and the job store's both have a table named "jobs".
CREATE DATABASE mlflow;

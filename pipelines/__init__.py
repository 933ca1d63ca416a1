"""Entry points for schedulers that call Python rather than the `mtrec` command (e.g. Airflow's
PythonOperator). The jobs themselves live in `mtrec.jobs`; imports go one way: pipelines -> mtrec."""

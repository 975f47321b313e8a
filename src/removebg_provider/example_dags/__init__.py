"""Example DAGs shipped with the provider; a DAG file of one line in your dags folder imports one."""

"""The provider's example Airflow DAG `catalog_remove_background`, found here through this import.

The DAG itself ships in the package (`removebg_provider/example_dags/`), so an installed provider
carries it too: put this same line in a file of your own dags folder to run it.
"""

from removebg_provider.example_dags.catalog_remove_background import dag as dag

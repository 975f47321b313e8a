"""Remove backgrounds from catalog product photos at scale on Apache Airflow."""

__version__ = "0.1.0"

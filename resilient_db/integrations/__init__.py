"""Framework integrations: SQLAlchemy 2 dialects (:mod:`resilient_db.integrations.sqlalchemy`),
Django database backends (``resilient_db.integrations.django.postgresql`` / ``.mysql``) and a
psycopg_pool connection pool (:mod:`resilient_db.integrations.psycopg_pool`). Each is imported
only by the framework that uses it; the frameworks are optional extras
(``resilient_db[sqlalchemy]``, ``resilient_db[django]``, ``resilient_db[psycopg_pool]``)."""

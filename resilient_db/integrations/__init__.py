"""Framework integrations: SQLAlchemy 2 dialects (:mod:`resilient_db.integrations.sqlalchemy`)
and Django database backends (``resilient_db.integrations.django.postgresql`` /
``.mysql``). Each is imported only by the framework that uses it; the frameworks are optional
extras (``resilient_db[sqlalchemy]``, ``resilient_db[django]``)."""

"""Settings of the Django test app. The database comes from the environment that
tests/test_django.py sets: ``RESILIENT_DJANGO_DB`` (JSON: engine, host, port, name, user,
password, options)."""

from __future__ import annotations

import json
import os
from typing import Any

_db: dict[str, Any] = json.loads(os.environ["RESILIENT_DJANGO_DB"])

SECRET_KEY = "resilient_db-tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["tests.django_app"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": _db["engine"],
        "HOST": _db["host"],
        "PORT": _db["port"],
        "NAME": _db["name"],
        "USER": _db["user"],
        "PASSWORD": _db["password"],
        "OPTIONS": _db["options"],
        # The application user may not create databases: the runner keeps (--keepdb) and
        # uses the cluster's own database.
        "TEST": {"NAME": _db["name"]},
    },
}

from __future__ import annotations

from django.db import models


class Item(models.Model):  # type: ignore[misc]  # Django is untyped
    """One row per acknowledged write; ``id`` is chosen by the writer, so a retried insert
    whose first attempt did commit shows up as an IntegrityError."""

    id = models.BigIntegerField(primary_key=True)
    worker = models.IntegerField()
    note = models.CharField(max_length=50)

"""``ENGINE = "resilient_db.integrations.django.postgresql"``: Django's PostgreSQL backend
(psycopg 3) with every connection made by ``resilient_db.connect``."""

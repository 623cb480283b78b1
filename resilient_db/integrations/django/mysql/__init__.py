"""``ENGINE = "resilient_db.integrations.django.mysql"``: mysql-connector's Django backend
(``mysql.connector.django``) with every connection made by ``resilient_db.connect``."""
